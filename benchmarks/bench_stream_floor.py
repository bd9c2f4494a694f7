"""Benchmark: the floor for reading a weight once, in the harness of bench_quant_matmul.py.

A Triton kernel that only reads a buffer (xor of every 32-bit word, one int per program written) is
timed exactly like the quantized matmuls: a CUDA graph of R calls over R buffers (> 150 MB in all),
median of 20 replays / R. Sizes are the bytes of the packed weights (+ scales and zeros) of the
Llama-3-8B layer shapes at 2..8 bits, and of the bf16 weight (cuBLAS's GEMV in the same run). The
result says how much of a quantized GEMV's time at M = 1 any kernel that reads its bytes pays: launch,
ramp-up and tail, not the matmul.

    python benchmarks/bench_stream_floor.py --out benchmarks/results/stream_floor.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_quant_matmul import copies_for, graph_time_us  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (6144, 4096)]
BITS = [2, 3, 4, 5, 6, 8]


@triton.jit
def _stream_read_kernel(src, out, n_words, words_per_program, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program p xors words [p W, (p + 1) W) of src (W = words_per_program, BLOCK per step) and writes the
    result to out[p]. PDL: the next kernel may launch at once; the store waits for the previous grid."""
    pid = tl.program_id(0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    start = pid * words_per_program
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, start + words_per_program, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc ^= tl.load(src + idx, mask=idx < n_words, other=0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    tl.store(out + pid, tl.xor_sum(acc, axis=0))


def stream_read(src: torch.Tensor, out: torch.Tensor, programs: int, block: int, pdl: bool) -> None:
    """Read every word of the int32 vector src with ``programs`` programs of ``block`` words per step."""
    n = src.numel()
    per = triton.cdiv(triton.cdiv(n, programs), block) * block
    _stream_read_kernel[(programs,)](src, out, n, per, block, pdl, num_warps=4,
                                     **({"launch_pdl": True} if pdl else {}))


def packed_bytes(N: int, K: int, bits: int, G: int = 128) -> int:
    """Words + f16 scales + f16 zeros of a packed weight (anybit/quant/format.py)."""
    return N * K * bits // 8 + 2 * (K // G) * N * 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "stream_floor.json"))
    ap.add_argument("--per-sm", default="4,8,16", help="programs per SM to try")
    ap.add_argument("--blocks", default="1024,4096", help="words per program step to try")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sizes = sorted({(f"{N}x{K}", b, packed_bytes(N, K, b)) for N, K in SHAPES for b in BITS}
                   | {(f"{N}x{K}", 16, N * K * 2) for N, K in SHAPES}, key=lambda t: t[2])
    rows = []
    out = torch.empty(64 * sms, dtype=torch.int32, device="cuda")
    for shape, bits, nbytes in sizes:
        R = copies_for(nbytes)
        bufs = [torch.randint(-2 ** 31, 2 ** 31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
                for _ in range(R)]
        best = None
        for per_sm in (int(v) for v in args.per_sm.split(",")):
            for block in (int(v) for v in args.blocks.split(",")):
                for pdl in (False, True):
                    calls = [lambda b=b, p=per_sm * sms, bl=block, pd=pdl: stream_read(b, out, p, bl, pd)
                             for b in bufs]
                    t = graph_time_us(calls)
                    rows.append(dict(shape=shape, bits=bits, mbytes=nbytes / 1e6, method="stream_read",
                                     programs_per_sm=per_sm, block=block, pdl=pdl, time_us=t,
                                     tbps=nbytes / t / 1e6))
                    best = t if best is None else min(best, t)
        if bits == 16:  # cuBLAS's GEMV on the same bytes
            N, K = (int(v) for v in shape.split("x"))
            ws = [b.view(torch.bfloat16).view(N, K) for b in bufs]
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            t = graph_time_us([lambda w=w, x=x: F.linear(x, w) for w in ws])
            rows.append(dict(shape=shape, bits=16, mbytes=nbytes / 1e6, method="cublas_bf16", time_us=t,
                             tbps=nbytes / t / 1e6))
            print(f"{shape} bf16 cuBLAS GEMV {t:.1f} us", flush=True)
        print(f"{shape} W{bits} {nbytes / 1e6:.1f} MB: best read {best:.1f} us "
              f"({nbytes / best / 1e6:.2f} TB/s)", flush=True)
        del bufs
    result = {
        "benchmark": os.path.splitext(os.path.basename(args.out))[0],
        "title": "floor: reading a weight once (Triton read-only kernel), in the quant_matmul harness",
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "columns": ["shape", "bits", "mbytes", "method", "programs_per_sm", "block", "pdl", "time_us",
                    "tbps"],
        "rows": rows,
        "notes": ["time: median of 20 CUDA-graph replays of R calls over R buffers (> 150 MB), divided by R, "
                  "as in bench_quant_matmul.py; mbytes: packed words + f16 scales + zeros (group 128) of the "
                  "shape at that width (16: the bf16 weight)"],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
