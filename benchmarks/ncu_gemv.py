"""Run the packed-half GEMV (or, ``--kernel ws``, the warp-specialized GEMM at ``--m`` rows) once
per configuration, for Nsight Compute (GPU).

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section SchedulerStats \\
        --section WarpStateStats -k regex:_quant_gemv_h2 --launch-skip 3 --launch-count 1 \\
        python benchmarks/ncu_gemv.py --bits 4 --shape 4096x14336 --config stages=1,block_n=128,num_warps=4

Each configuration is called 4 times (the first compiles and sizes the split; ``--launch-skip 3``
profiles the last). Shapes are ``NxK`` (out x in features) as in bench_quant_matmul.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anybit.kernels.quant_gemm_ws import quant_gemm_ws  # noqa: E402
from anybit.kernels.quant_gemv_h2 import quant_gemv_h2  # noqa: E402
from benchmarks.bench_quant_matmul import random_packed  # noqa: E402


def parse_config(text: str) -> dict:
    kw = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        kw[key] = {"true": True, "false": False}.get(value.lower())
        if kw[key] is None:
            kw[key] = int(value)
    return kw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--shape", default="4096x14336", help="NxK (out x in features)")
    ap.add_argument("--config", default="", help="launcher keywords, e.g. stages=3,block_n=128")
    ap.add_argument("--kernel", default="gemv_h2", choices=["gemv_h2", "ws"])
    ap.add_argument("--m", type=int, default=1, help="rows of x (ws)")
    args = ap.parse_args()
    N, K = (int(v) for v in args.shape.split("x"))
    pw = random_packed(N, K, args.bits)
    M = args.m if args.kernel == "ws" else 1
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    kw = parse_config(args.config)
    run = quant_gemm_ws if args.kernel == "ws" else quant_gemv_h2
    for _ in range(4):
        run(x, pw, y, **kw)
    torch.cuda.synchronize()
    print(args.bits, args.shape, kw, "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
