"""Benchmark: anybit's bf16 GEMV (anybit/kernels/gemv_bf16.py) vs cuBLAS (F.linear) at M = 1.

Llama-3-8B shapes (N x K): 6144x4096 (qkv), 4096x4096 (o_proj), 28672x4096 (gate_up),
4096x14336 (down), 128256x4096 (lm_head). Each measurement is a CUDA graph of R calls over R
weight copies (> 150 MB together, so L2 does not hold them) and R inputs, replayed 20 times; the
median graph time / R is reported (graph_time_us / copies_for from bench_quant_matmul.py). Methods:
cublas_bf16, anybit (launcher default, PDL off), anybit_pdl (default with PDL between the
consecutive calls of the graph), anybit_bn*_bk*_w*[_s*|_pps*] (sweep, PDL off). Correctness is
checked first against ref_gemv_bf16. Must finish in ~2 minutes on an H100 (compiles included).

    python benchmarks/bench_gemv_bf16.py            # -> $OUT/gemv_bf16.json or benchmarks/results/
    python benchmarks/bench_gemv_bf16.py --shapes 4096x4096 --ms 1,4

Writes JSON in the repository's benchmark schema (benchmark, title, device, versions, date,
columns, rows, notes) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_quant_matmul import copies_for, graph_time_us  # noqa: E402

from anybit.kernels import gemv_bf16 as gk  # noqa: E402
from anybit.kernels.gemv_bf16 import gemv_bf16, ref_gemv_bf16  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
COPY_TBPS = 3.0
BUDGET_S = 100.0  # sweep variants are dropped once the run has taken this long (the default rows stay)


def variants(N: int, K: int, M: int) -> list[tuple[str, dict]]:
    """(method, gemv_bf16 keywords): the default, PDL, then a small sweep (PDL off)."""
    v = [("anybit", dict(pdl=False)), ("anybit_pdl", dict(pdl=True))]
    for bn, bk, w in ((8, 256, 4), (16, 256, 4), (32, 256, 4), (16, 512, 4), (32, 512, 8), (64, 256, 8)):
        tag = f"anybit_bn{bn}_bk{bk}_w{w}"
        kw = dict(block_n=bn, block_k=bk, num_warps=w, pdl=False)
        if (bn, bk, w) != gk.gemv_config(N, K, M):
            v.append((tag, kw))
        if (bn, bk) == (16, 256):
            v.append((tag + "_s1", dict(kw, split_k=1)))
            v.append((tag + "_pps8", dict(kw, programs_per_sm=8)))
            v.append((tag + "_nocap", dict(kw, maxnreg=None)))  # ptxas uncapped (offline: 16-byte stack)
    return v


def check_correctness(log) -> list[dict]:
    """Kernel vs ref_gemv_bf16 on fresh random data: odd and real shapes, M 1..4, bias, both dtypes,
    every swept config on one real shape."""
    rows = []
    torch.manual_seed(0)
    cases = [(1, 1000, 1032, torch.bfloat16, True, {}), (3, 1000, 1032, torch.float16, True, {}),
             (4, 4096, 4096, torch.bfloat16, False, {}), (2, 6144, 4096, torch.bfloat16, True, {}),
             (1, 128256, 4096, torch.bfloat16, False, {}), (1, 4096, 14336, torch.float16, False, {})]
    cases += [(1, 4096, 14336, torch.bfloat16, True, kw) for _, kw in variants(4096, 14336, 1)]
    for M, N, K, dt, bias, kw in cases:
        x = torch.randn(M, K, device="cuda").to(dt)
        w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dt)
        b = torch.randn(N, device="cuda").to(dt) if bias else None
        ref = ref_gemv_bf16(x, w, b).float()
        errs = []
        for _ in range(2):  # twice: the split-K counters must have reset
            y = gemv_bf16(x, w, b, **kw).float()
            errs.append(float((y - ref).abs().max() / ref.abs().max()))
        err = max(errs)
        ok = bool(torch.isfinite(y).all()) and err < 1e-2
        rows.append(dict(case=f"M{M} {N}x{K} {str(dt)[6:]} bias={bias}", kw=str(kw), rel_err=err, ok=ok))
        if not ok:
            log(f"FAIL {rows[-1]}")
    log(f"correctness: {sum(r['ok'] for r in rows)}/{len(rows)} ok, max rel err "
        f"{max(r['rel_err'] for r in rows):.2e}")
    return rows


def bench_shape(N: int, K: int, M: int, t0: float, log) -> list[dict]:
    nbytes = N * K * 2 + M * K * 2 + M * N * 2
    R = copies_for(N * K * 2)
    ws = [torch.randn(N, K, device="cuda").to(torch.bfloat16) for _ in range(R)]
    xs = [torch.randn(M, K, device="cuda").to(torch.bfloat16) for _ in range(R)]
    floor = nbytes / (COPY_TBPS * 1e12) * 1e6
    rows = []

    def add(method, us, cfg=None):
        rows.append(dict(shape=f"{N}x{K}", M=M, method=method, config=cfg, time_us=us,
                         tbps=nbytes / us / 1e6, floor_us=floor))

    add("cublas_bf16", graph_time_us([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)]))
    for method, kw in variants(N, K, M):
        if method not in ("anybit", "anybit_pdl") and time.time() - t0 > BUDGET_S:
            log(f"  budget: skipping {method}")
            continue
        try:
            us = graph_time_us([lambda w=w, x=x, kw=kw: gemv_bf16(x, w, **kw) for w, x in zip(ws, xs)])
        except Exception as e:  # noqa: BLE001
            log(f"ERROR {N}x{K} {method}: {type(e).__name__}: {str(e)[:200]}")
            continue
        add(method, us, {k: v for k, v in kw.items()})
    cub = rows[0]["time_us"]
    for r in rows:
        r["speedup"] = cub / r["time_us"]
    del ws, xs
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,6144x4096")
    ap.add_argument("--ms", default="1", help="comma list of M (1..4), default 1")
    args = ap.parse_args()
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    t0 = time.time()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(m) for m in args.ms.split(",")]
    corr = check_correctness(log)
    log(f"correctness done: {time.time() - t0:.0f}s")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    out = args.out or os.path.join(out_dir, "gemv_bf16.json")
    rows = []

    def dump():
        result = {
            "benchmark": "gemv_bf16",
            "title": "anybit bf16 GEMV (Triton) vs cuBLAS F.linear, Llama-3-8B shapes, M = 1",
            "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "columns": ["shape", "M", "method", "config", "time_us", "tbps", "floor_us", "speedup"],
            "rows": rows,
            "notes": [f"time: median of 20 CUDA-graph replays of R calls over R bf16 weight copies "
                      f"(> 150 MB) and R inputs, divided by R; tbps counts W + x + y bytes; floor_us = "
                      f"bytes / {COPY_TBPS} TB/s (H100 copy bandwidth); speedup = cuBLAS time / time",
                      f"launcher default: BLOCK_N={gk.BLOCK_N}, BLOCK_K={gk.BLOCK_K}, warps={gk.NUM_WARPS}, "
                      f"split-K to fill {gk.PROGRAMS_PER_SM} programs per SM; 'anybit' and the sweep rows "
                      f"run with PDL off, 'anybit_pdl' with PDL between the consecutive calls in the graph",
                      f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} kernel-vs-ref checks passed "
                      f"(max abs err / max |ref| < 1e-2), max {max(r['rel_err'] for r in corr):.2e}"],
            "correctness": corr,
            "log": logs,
        }
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    for N, K in shapes:
        for M in ms:
            rows += bench_shape(N, K, M, t0, log)
            dump()
            log(f"after {N}x{K} M{M}: {time.time() - t0:.0f}s")
    print(f"{'shape':>12} {'M':>2} {'method':<28} {'us':>8} {'TB/s':>6} {'floor':>7} {'x cuBLAS':>8}")
    for r in rows:
        print(f"{r['shape']:>12} {r['M']:>2} {r['method']:<28} {r['time_us']:8.1f} {r['tbps']:6.2f} "
              f"{r['floor_us']:7.1f} {r['speedup']:8.2f}")
    dump()
    log(f"wrote {out} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
