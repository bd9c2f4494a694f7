"""Run one quantized kernel a few times, for Nsight Compute (GPU): the packed-half GEMV, the
warp-specialized GEMM (``--kernel ws``), the mma.sync GEMV (``mma``), its TMA-ring variant (``tma``), the
warp-specialized register-A GEMM (``rws``), all at ``--m`` rows (the GEMV: 1), or the paged decode
attention (``decode``: ``--batch`` sequences of ``--context`` tokens, ``--kv`` cache dtype, 32 query / 8 kv
heads, d128; the launcher's choice).

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

from anybit.kernels.quant_gemm_rws import quant_gemm_rws  # noqa: E402
from anybit.kernels.quant_gemm_ws import quant_gemm_ws  # noqa: E402
from anybit.kernels.quant_gemv_h2 import quant_gemv_h2  # noqa: E402
from anybit.kernels.quant_gemv_mma import quant_gemv_mma  # noqa: E402
from anybit.kernels.quant_gemv_tma import quant_gemv_tma  # noqa: E402
from benchmarks.bench_quant_matmul import random_packed  # noqa: E402


def parse_config(text: str) -> dict:
    kw = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        kw[key] = {"true": True, "false": False}.get(value.lower())
        if kw[key] is None:
            kw[key] = int(value)
    return kw


def run_decode(batch: int, context: int, kv: str, kw: dict) -> int:
    """paged_attention_decode on a random paged cache (bench_attention.paged_batch), 4 calls."""
    from anybit.kernels.attention_decode import paged_attention_decode
    from benchmarks import bench_attention as ba

    cache, table = ba.paged_batch([context] * batch, kv)
    q = torch.randn(batch, ba.NH, ba.D, device="cuda", dtype=torch.bfloat16)
    sl = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    for _ in range(4):
        paged_attention_decode(q, cache, sl, table, ba.D ** -0.5, None, max(context, 8192), **kw)
    torch.cuda.synchronize()
    print("decode", batch, context, kv, kw, "ok")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--shape", default="4096x14336", help="NxK (out x in features)")
    ap.add_argument("--config", default="", help="launcher keywords, e.g. stages=3,block_n=128")
    ap.add_argument("--kernel", default="gemv_h2", choices=["gemv_h2", "ws", "mma", "tma", "rws", "decode"])
    ap.add_argument("--m", type=int, default=1, help="rows of x (not gemv_h2)")
    ap.add_argument("--batch", type=int, default=32, help="decode: sequences")
    ap.add_argument("--context", type=int, default=4096, help="decode: tokens per sequence")
    ap.add_argument("--kv", default="int4", help="decode: cache dtype (bfloat16, int8, int4)")
    args = ap.parse_args()
    if args.kernel == "decode":
        return run_decode(args.batch, args.context, args.kv, parse_config(args.config))
    N, K = (int(v) for v in args.shape.split("x"))
    pw = random_packed(N, K, args.bits)
    M = 1 if args.kernel == "gemv_h2" else args.m
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    kw = parse_config(args.config)
    kernels = {"gemv_h2": quant_gemv_h2, "ws": quant_gemm_ws, "mma": quant_gemv_mma, "tma": quant_gemv_tma,
               "rws": quant_gemm_rws}
    run = kernels[args.kernel]
    for _ in range(4):
        run(x, pw, y, **kw)
    torch.cuda.synchronize()
    print(args.bits, args.shape, kw, "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
