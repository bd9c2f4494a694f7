"""Benchmark: the Gluon wgmma kernel (quant_gemm_wg.py, ``path="wg"``) for M >= 2 against cuBLAS
bf16 (F.linear), torch int4 (_weight_int4pack_mm) and the launcher's current choice ("auto"), on the
Llama-3-8B shapes, with a correctness check first and a block-size sweep.

    python benchmarks/bench_quant_gemm_wg.py            # JSON quant_matmul_wg.json to $OUT or results/
    python benchmarks/bench_quant_gemm_wg.py --quick    # correctness + W4 on 4096x14336 only

Timing as in bench_quant_matmul.py (CUDA graph of R calls over R weight copies > 150 MB, median of
20 replays / R). Sections are skipped when the time budget (--budget s) runs out; the JSON is
rewritten after every shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from anybit.kernels import quant_matmul as qm  # noqa: E402
from anybit.kernels.quant_gemm_wg import wg_config, wg_shared_bytes, wg_split  # noqa: E402
from anybit.kernels.quant_gemv_h2 import _num_sms  # noqa: E402
from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402
from benchmarks.bench_quant_matmul import bench_shape, check_cases, random_packed  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (6144, 4096), (128256, 4096)]
MS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def correctness(log) -> list[dict]:
    """path="wg" vs the float32 dequantization (ref_quant_matmul) on RTN weights and random codes,
    launcher configuration and forced variants (split-K, block sizes, stages, warps)."""
    torch.manual_seed(0)
    cases = []
    for bits in (2, 4, 8):
        for g in (64, 128):
            W = torch.randn(384, 1152)
            pw = rtn_quantize(W, QuantSpec(bits, g, "uniform")).to("cuda")
            for M in (2, 3, 16, 40, 100, 300):
                cases.append((f"b{bits} g{g} 384x1152 M{M}", pw, M, {}))
            cases.append((f"b{bits} g{g} 384x1152 M16 split3", pw, 16, dict(split_k=3)))
            cases.append((f"b{bits} g{g} 384x1152 M64 bk128 bn64 st5", pw, 64,
                          dict(block_k=128 if g == 128 else 64, block_n=64, num_stages=5)))
            cases.append((f"b{bits} g{g} 384x1152 M200 bm128 w8", pw, 200,
                          dict(block_m=128, block_n=128, num_warps=8, num_stages=3)))
    for bits in (2, 4, 8):
        pw = random_packed(4096, 14336, bits)
        for M in (16, 64, 256):
            cases.append((f"b{bits} random 4096x14336 M{M}", pw, M, {}))
    return check_cases(cases, lambda x, pw, out, kw: qm.quant_matmul(x, pw, out=out, path="wg", **kw),
                       log, 1e-2)


def main_variants(M: int, b: int) -> list:
    out = [("anybit_wg", dict(path="wg"))]
    if b == 4:
        out.append(("anybit", {}))  # the launcher's choice without the wgmma kernel
    return out


def sweep_variants(M: int, b: int) -> list:
    """Block sizes x stages (split-K by the launcher's rule for each), skipping what does not fit."""
    bm0 = max(16, min(128, 1 << (M - 1).bit_length()))
    out = [("anybit_wg", dict(path="wg"))]
    for bm in sorted({bm0, 64} if M >= 128 else {bm0}):
        for bn in (64, 128):
            for bk in (64, 128):
                for st in (3, 4, 5, 6, 8):
                    if wg_shared_bytes(bm, bn, bk, st, b) <= 227 * 1024 and (st >= 4 or bm >= 128):
                        out.append((f"anybit_wg_bm{bm}_bn{bn}_bk{bk}_st{st}",
                                    dict(path="wg", block_m=bm, block_n=bn, block_k=bk, num_stages=st)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=480.0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    t0 = time.time()
    logs: list[str] = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    corr = correctness(log)
    log(f"after correctness: {time.time() - t0:.0f}s")
    rows: list[dict] = []
    sms = _num_sms(torch.device("cuda"))
    configs = {}  # launcher's (BLOCK_M, BLOCK_N, BLOCK_K, stages, split_k) at group 128
    for N, K in SHAPES:
        for M in MS:
            bm, bn, bk, st = wg_config(M, N, K, 128)
            configs[f"{N}x{K} M{M}"] = (bm, bn, bk, st, wg_split(M, N, K, bm, bn, bk, sms))

    def dump():
        write_result("quant_matmul_wg", "Gluon wgmma any-bit GEMM (M >= 2) vs cuBLAS bf16, torch int4 and "
                     "the previous launcher, Llama-3-8B shapes, group 128",
                     ["shape", "M", "method", "bits", "time_us", "tbps", "speedup"], rows,
                     ["time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB), "
                      "/ R; "
                      "speedup = cuBLAS bf16 time / time; anybit_wg = path='wg' with the launcher's config "
                      "(wg_config), anybit = the launcher's choice without it (WG_AUTO off)",
                      f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} checks vs the float32 "
                      f"dequantization passed (rel err < 1e-2, repeated call identical)"],
                     out_dir=args.out, correctness=corr, configs=configs, log=logs)

    plan = [((4096, 14336), MS, [4], sweep_variants)] if args.quick else \
        [((4096, 14336), MS, [4], main_variants), ((14336, 4096), MS, [4], main_variants),
         ((6144, 4096), MS, [4], main_variants), ((128256, 4096), [4, 16, 64, 256, 1024], [4], main_variants),
         ((4096, 14336), [16, 64, 256], [2, 8], main_variants),
         ((4096, 14336), [16, 64, 256, 1024], [4], sweep_variants),
         ((14336, 4096), [16, 64, 256], [4], sweep_variants),
         ((6144, 4096), [16, 64, 256], [4], sweep_variants)]
    for (N, K), ms, bits, variants in plan:
        if time.time() - t0 > args.budget:
            log(f"budget reached: skipped {N}x{K} {variants.__name__}")
            continue
        rows += [dict(r, section=variants.__name__) for r in bench_shape(N, K, ms, bits, variants, log)]
        dump()
        log(f"after {N}x{K} {variants.__name__}: {time.time() - t0:.0f}s")
    dump()
    print(f"{'shape':>12} {'M':>5} {'bits':>4} {'cuBLAS':>8} {'int4':>6} {'auto':>6} {'wg':>6}  (x cuBLAS)")
    keys = sorted({(r["shape"], r["M"], r["bits"]) for r in rows if r.get("section") == "main_variants"
                   and r["method"] == "anybit_wg"}, key=lambda k: (k[0], k[2], k[1]))
    for shp, M, b in keys:
        sel = {r["method"]: r for r in rows if (r["shape"], r["M"]) == (shp, M)
               and r.get("section") == "main_variants" and r["bits"] in (b, 16)}
        sel.update({r["method"]: r for r in rows
                    if (r["shape"], r["M"], r["method"]) == (shp, M, "torch_int4pack")})
        cells = [f"{sel[m]['speedup']:6.2f}" if m in sel else "     -"
                 for m in ("torch_int4pack", "anybit", "anybit_wg")]
        print(f"{shp:>12} {M:>5} {b:>4} {sel['cublas_bf16']['time_us']:8.1f} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
