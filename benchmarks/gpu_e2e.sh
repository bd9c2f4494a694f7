#!/usr/bin/env bash
# One device call: GPU engine tests, then the Llama-3-8B-shaped e2e benchmark (torch and triton
# backends vs transformers). Results JSON under $OUT (and benchmarks/results/ when run locally).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_engine.py 2>&1 | tail -5
python3 benchmarks/bench_e2e.py --preset llama3-8b --batch 1 8 32 --prompt-len 128 --gen 64 --repeats 3 \
  --backend torch,triton --out-dir "$OUT" 2>&1 | grep -v Warning
