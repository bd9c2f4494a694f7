"""Benchmark: the register-A wgmma kernel (quant_gemm_ra.py, ``path="ra"``, W4) for M 16..1024
against cuBLAS bf16 (F.linear), torch int4 (_weight_int4pack_mm), the launcher's current choice
("auto") and the shared-memory wgmma kernel (``path="wg"``), on the Llama-3-8B shapes, with a
correctness check first and a small sweep (BLOCK_M, stages, split-K) on 4096x14336.

    python benchmarks/bench_quant_gemm_ra.py            # JSON quant_matmul_ra.json to $OUT or results/
    python benchmarks/bench_quant_gemm_ra.py --quick    # correctness + 4096x14336 only

Timing as in bench_quant_matmul.py (CUDA graph of R calls over R weight copies > 150 MB, median of
20 replays / R). Sections are skipped when the time budget (--budget s) runs out; the JSON is
rewritten after every section.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from anybit.kernels import quant_matmul as qm  # noqa: E402
from anybit.kernels.quant_gemm_ra import ra_config, ra_shared_bytes, ra_split  # noqa: E402
from anybit.kernels.quant_gemv_h2 import _num_sms  # noqa: E402
from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402
from benchmarks.bench_quant_matmul import bench_shape, check_cases, random_packed  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (6144, 4096), (128256, 4096)]
MS = [16, 32, 64, 128, 256, 512, 1024]


def correctness(log) -> list[dict]:
    """path="ra" vs the float32 dequantization (ref_quant_matmul) on RTN weights and random codes,
    launcher configuration and forced variants (split-K, BLOCK_M, stages, BLOCK_K)."""
    torch.manual_seed(0)
    cases = []
    for g in (64, 128):
        pw = rtn_quantize(torch.randn(384, 1152), QuantSpec(4, g, "uniform")).to("cuda")
        for M in (2, 3, 16, 40, 100, 300):
            cases.append((f"b4 g{g} 384x1152 M{M}", pw, M, {}))
        cases.append((f"b4 g{g} 384x1152 M16 split3", pw, 16, dict(split_k=3)))
        cases.append((f"b4 g{g} 384x1152 M200 bm256 st3", pw, 200, dict(block_m=256, num_stages=3)))
    pw = random_packed(4096, 14336, 4)
    for M in (16, 64, 256, 1024):
        cases.append((f"b4 random 4096x14336 M{M}", pw, M, {}))
    return check_cases(cases, lambda x, pw, out, kw: qm.quant_matmul(x, pw, out=out, path="ra", **kw),
                       log, 1e-2)


def main_variants(M: int, b: int) -> list:
    return [("anybit", {}), ("anybit_wg", dict(path="wg")), ("anybit_ra", dict(path="ra"))]


def sweep_variants(M: int, b: int) -> list:
    """(BLOCK_N, warps) x stages x split-K around the launcher's choice, skipping what does not fit."""
    out = [("anybit_ra", dict(path="ra"))]
    bm = ra_config(M, 4096, 14336, 128, 132)[0]
    shapes = [(64, 4), (128, 8), (256, 8)] if bm <= 128 else [(64, 4), (128, 8)]
    for bn, warps in shapes:
        auto = ra_split(M, 4096, 14336, bm, bn, 64, warps, 132)
        for st in (4, 6):
            if ra_shared_bytes(bm, bn, 64, st) > 227 * 1024:
                continue
            for sk in sorted({auto, max(1, auto // 2)} | ({2 * auto} if bm < 256 else set())):
                out.append((f"anybit_ra_bn{bn}_w{warps}_st{st}_sk{sk}",
                            dict(path="ra", block_m=bm, block_n=bn, num_warps=warps, num_stages=st,
                                 split_k=sk)))
    return out


def wave_sweep(N: int, K: int):
    """Variants for one shape (session 18): BLOCK_M 64 / 128 / 256 x (BLOCK_N, warps) x split-K, around
    the launcher's choice, for the wave fill that the 4096x14336 sweep did not see."""
    def variants(M: int, b: int) -> list:
        out = [("anybit_ra", dict(path="ra"))]
        for bm in (64, 128, 256):
            if bm > 2 * max(M, 64):
                continue
            for bn, warps in ((64, 4), (128, 8)):
                auto = ra_split(M, N, K, bm, bn, 64, warps, 132)
                for sk in sorted({1, auto, 2 * auto} if bm < 256 else {1}):
                    if (K // 64) % sk or K // 64 // sk < 8:
                        continue
                    out.append((f"anybit_ra_bm{bm}_bn{bn}_w{warps}_sk{sk}",
                                dict(path="ra", block_m=bm, block_n=bn, num_warps=warps, split_k=sk)))
        return out
    variants.__name__ = f"wave_sweep_{N}x{K}"
    return variants


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--name", default="quant_matmul_ra")
    ap.add_argument("--sweep-shapes", default=None,
                    help="only the correctness check and wave_sweep on these shapes (e.g. 6144x4096)")
    ap.add_argument("--sweep-ms", default="256,1024")
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
    configs = {}  # launcher's (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, split_k) at group 128
    for N, K in SHAPES:
        for M in MS:
            bm, bn, bk, st, wp = ra_config(M, N, K, 128, sms)
            configs[f"{N}x{K} M{M}"] = (bm, bn, bk, st, wp, ra_split(M, N, K, bm, bn, bk, wp, sms))

    def dump():
        write_result(args.name, "Register-A wgmma W4 GEMM (M 16-1024) vs cuBLAS bf16, torch int4, the "
                     "launcher and the shared-memory wgmma kernel, Llama-3-8B shapes, group 128",
                     ["shape", "M", "method", "bits", "time_us", "tbps", "speedup"], rows,
                     ["time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB), "
                      "/ R; speedup = cuBLAS bf16 time / time; anybit = the launcher's choice, anybit_wg = "
                      "path='wg', anybit_ra = path='ra' with its launcher config (ra_config, ra_split)",
                      f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} checks vs the float32 "
                      f"dequantization passed (rel err < 1e-2, repeated call identical)"],
                     out_dir=args.out, correctness=corr, configs=configs, log=logs)

    plan = [((4096, 14336), MS, main_variants)] if args.quick else \
        [((4096, 14336), MS, main_variants), ((14336, 4096), MS, main_variants),
         ((6144, 4096), MS, main_variants), ((128256, 4096), [16, 64, 256, 1024], main_variants),
         ((4096, 14336), [16, 64, 256, 1024], sweep_variants)]
    if args.sweep_shapes:
        sweep_ms = [int(m) for m in args.sweep_ms.split(",")]
        plan = [((n, k), sweep_ms, wave_sweep(n, k))
                for n, k in (tuple(int(v) for v in sh.split("x")) for sh in args.sweep_shapes.split(","))]
    for (N, K), ms, variants in plan:
        if time.time() - t0 > args.budget:
            log(f"budget reached: skipped {N}x{K} {variants.__name__}")
            continue
        rows += [dict(r, section=variants.__name__) for r in bench_shape(N, K, ms, [4], variants, log)]
        dump()
        log(f"after {N}x{K} {variants.__name__}: {time.time() - t0:.0f}s")
    dump()
    print(f"{'shape':>12} {'M':>5} {'cuBLAS':>8} {'int4':>6} {'auto':>6} {'wg':>6} {'ra':>6}  (x cuBLAS)")
    keys = sorted({(r["shape"], r["M"]) for r in rows if r.get("section") == "main_variants"},
                  key=lambda k: (k[0], k[1]))
    for shp, M in keys:
        sel = {r["method"]: r for r in rows if (r["shape"], r["M"]) == (shp, M)
               and r.get("section") == "main_variants"}
        cells = [f"{sel[m]['speedup']:6.2f}" if m in sel else "     -"
                 for m in ("torch_int4pack", "anybit", "anybit_wg", "anybit_ra")]
        print(f"{shp:>12} {M:>5} {sel['cublas_bf16']['time_us']:8.1f} " + " ".join(cells))
    best = {}
    for r in rows:
        swept = r.get("section", "").startswith(("sweep_variants", "wave_sweep"))
        if swept and r["method"].startswith("anybit_ra"):
            k = (r["shape"], r["M"])
            if k not in best or r["time_us"] < best[k]["time_us"]:
                best[k] = r
    for (shp, M), r in sorted(best.items()):
        auto = next((x for x in rows if (x["shape"], x["M"], x["method"]) == (shp, M, "anybit_ra")), r)
        print(f"sweep {shp} M{M}: best {r['method']} {r['time_us']:.1f} us ({r['speedup']:.2f}x); "
              f"launcher {auto['time_us']:.1f} us ({auto['speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
