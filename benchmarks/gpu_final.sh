#!/usr/bin/env bash
# One device call: e2e decode (torch / triton / W4 / W3 / W8 vs transformers) and offline
# throughput (admit_batch 1 vs 32). JSON under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
python3 benchmarks/bench_e2e.py --preset llama3-8b --batch 1 8 32 --prompt-len 128 --gen 64 --repeats 3 \
  --backend torch,triton --quant-bits 4 3 8 --lm-head-bits 8 --out-dir "$OUT" --name e2e_llama3-8b_gpu \
  2>&1 | grep -v Warning | tail -6
python3 benchmarks/bench_throughput.py --num-requests 1000 --hf-requests 64 --hf-batch 32 --backend triton \
  --admit-batch 1 32 --out-dir "$OUT" 2>&1 | grep -v Warning | tail -4
