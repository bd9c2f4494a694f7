"""Codebook weights (nf4 / fp4 / learned 4-bit tables, learned 2- and 3-bit) on the GPU: the launcher's choice
against the generic Triton kernels, the mma.sync kernel's table variants, uniform W4 (and uniform at a 2- or
3-bit table's width) and cuBLAS bf16, on Llama-3-8B layer shapes.

    python benchmarks/bench_quant_codebook.py            # -> $OUT/quant_codebook.json
    python benchmarks/bench_quant_codebook.py --formats learned:2:128,learned:4:128 --ms 1,4,16

Every row: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB), divided by R (the
timing of bench_quant_matmul.py). Correctness first: every variant against ``ref_quant_matmul`` (float32
table and scales) on fresh data, relative error < 1e-2, and a second call must give the same bits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anybit.kernels.quant_gemv_mma import (  # noqa: E402
    MMA_PROGRAMS_PER_SM,
    g2_applies,
    mma_config,
    quant_gemv_mma,
)
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul  # noqa: E402
from anybit.quant.format import PackedWeight, builtin_codebook  # noqa: E402
from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402
from benchmarks.bench_quant_matmul import _pending_acc, copies_for, graph_time_us, random_packed  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (6144, 4096)]
FORMATS = [("nf4", 4, 64), ("fp4", 4, 128), ("learned", 4, 128)]  # (format, bits, group size)


def label(fmt: str, bits: int) -> str:
    """A format's name in the rows: the 4-bit tables by name, other widths with theirs (learned2)."""
    return fmt if bits == 4 else f"{fmt}{bits}"
MS = [1, 4, 16, 24, 32, 64]


def random_codebook(N: int, K: int, fmt: str, G: int, bits: int = 4) -> PackedWeight:
    """Random b-bit codes, scales ~0.01, the format's table (learned: 2^b sorted normal values)."""
    q = torch.randint(-2 ** 31, 2 ** 31 - 1, (bits * K // 32, N), dtype=torch.int32, device="cuda")
    s = (torch.rand(K // G, N, device="cuda") * 0.01 + 0.001).half()
    cb = builtin_codebook(fmt, bits)
    cb = cb if cb is not None else torch.sort(torch.randn(2 ** bits)).values
    return PackedWeight(q, s, None, bits, G, K, N, fmt=fmt, codebook=cb.float().cuda())


def g2_variants(M: int):
    """Groups of 64 at M <= 16: the mma.sync kernel with two groups per 128-K tile (G2) and without."""
    if M > 16:
        return []

    def g2(on):
        return lambda x, p: quant_gemv_mma(
            x, p, torch.empty(M, p.out_features, dtype=x.dtype, device=x.device), two_groups=on)
    return [("mma_g2", g2(True)), ("mma_g1", g2(False))]


def _unrolled_3sm(x: torch.Tensor, p: PackedWeight, **kw) -> torch.Tensor:
    """The unrolled loop at BLOCK_M 8 with ks and split chosen for 3 resident programs per SM (``kw``: more
    ``quant_gemv_mma`` keywords, e.g. ``unroll2=False``)."""
    M, K = x.shape
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    per_sm = {**MMA_PROGRAMS_PER_SM, 8: 3}
    _, _, split, ks = mma_config(M, p.out_features, K, p.group_size, sms, per_sm=per_sm, bits=p.bits,
                                 g2=g2_applies(p, M))
    y = None if "acc" in kw else torch.empty(M, p.out_features, dtype=x.dtype, device=x.device)
    return quant_gemv_mma(x, p, y, ks=ks, split_k=split, **{"unroll2": True, **kw})


def variants(M: int):
    """(name, call(x, pw)) pairs for one M: the launcher's choice; the generic Triton kernel (path gemv at
    M = 1, gemm above) and dequantize + cuBLAS; at M <= 16 the mma.sync table kernel unrolled / not and
    adding into a pending float32 sum."""
    v = [("auto", lambda x, p: quant_matmul(x, p)),
         ("generic", lambda x, p: quant_matmul(x, p, path="gemv" if M == 1 else "gemm")),
         ("dequant", lambda x, p: quant_matmul(x, p, path="dequant"))]
    if M <= 16:
        def mma(u2):
            return lambda x, p: quant_gemv_mma(x, p, torch.empty(M, p.out_features, dtype=x.dtype,
                                                                 device=x.device), unroll2=u2)
        v += [("mma_u2", mma(True)), ("mma_u1", mma(False)),
              ("mma_u2_xp", lambda x, p: quant_gemv_mma(x, p, torch.empty(M, p.out_features, dtype=x.dtype,
                                                                         device=x.device), unroll2=True,
                                                        x_prefetch=True)),
              ("mma_acc", lambda x, p: quant_gemv_mma(x, p, None, acc=_pending_acc(x, p)))]
    if M <= 8:  # BLOCK_M 8: no register cap (3-bit: the launcher caps at 128), unrolled with the split count
        # of 3 programs per SM (2-bit G2 and 3-bit take > 128 registers unrolled with x two tiles ahead), and
        # unrolled without x two tiles ahead
        v += [("mma_cap0", lambda x, p: quant_gemv_mma(x, p, torch.empty(M, p.out_features, dtype=x.dtype,
                                                                          device=x.device), max_registers=0)),
              ("mma_u2_3sm", lambda x, p: _unrolled_3sm(x, p)),
              ("mma_u2_noxp", lambda x, p: quant_gemv_mma(x, p, torch.empty(M, p.out_features, dtype=x.dtype,
                                                                             device=x.device), unroll2=True,
                                                          x_prefetch=False))]
    return v


def check_call(log, what: str, call, x, pw, ref) -> tuple[float, bool, bool]:
    """One correctness check: ``call(x, pw)`` twice against ``ref``; returns (relative error, the two calls
    gave the same bits, ok = error < 1e-2 and the same bits), logging errors and failures under ``what``."""
    try:
        y, y2 = call(x, pw), call(x, pw)
        err = float((y.float() - ref).norm() / ref.norm())
        same = bool(torch.equal(y, y2))
    except Exception as e:  # noqa: BLE001
        log(f"ERROR {what}: {type(e).__name__}: {str(e)[:300]}")
        err, same = float("inf"), False
    ok = err < 1e-2 and same
    if not ok:
        log(f"FAIL {what}: rel err {err:.3e} repeat_equal {same}")
    return err, same, ok


def correctness_note(rows: list[dict]) -> str:
    """The results' note on ``check_call`` rows."""
    return (f"correctness: {sum(r['ok'] for r in rows)}/{len(rows)} checks against ref_quant_matmul passed "
            f"(rel err < 1e-2, repeat-equal), max {max(r['rel_err'] for r in rows):.2e}")


def check(log, formats) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for fmt_name, bits, G in formats:
        fmt = label(fmt_name, bits)
        for bits_K in (1152, 2048):
            W = torch.randn(384, bits_K)
            pw = rtn_quantize(W, QuantSpec(bits, G, fmt_name)).to("cuda")
            for M in (1, 3, 8, 16, 24, 33, 64):
                x = torch.randn(M, bits_K, device="cuda", dtype=torch.bfloat16)
                ref = ref_quant_matmul(x.float(), pw)
                for name, call in variants(M):
                    if name == "mma_acc":
                        continue
                    err, same, ok = check_call(log, f"{fmt} K{bits_K} M{M} {name}", call, x, pw, ref)
                    rows.append(dict(fmt=fmt, K=bits_K, M=M, variant=name, rel_err=err, repeat_equal=same,
                                     ok=ok))
    log(correctness_note(rows))
    return rows


COMPACT_COLUMNS = ["shape", "M", "fmt", "cublas_us", "auto_us", "auto_x", "generic_x", "dequant_x",
                   "uniform_x", "uniform_g64_x", "uniform_w2_x", "uniform_w3_x", "mma_u1_us", "mma_u2_us",
                   "mma_u2_xp_us", "mma_acc_us", "mma_g1_us", "mma_g2_us", "mma_cap0_us", "mma_u2_3sm_us",
                   "mma_u2_noxp_us", "uniform_g64_g1_us", "uniform_g64_g2_us"]


def compact(rows: list[dict]) -> list[dict]:
    """One row per (shape, M, codebook format) from the per-call rows: the launcher's time and its ratio to
    cuBLAS, the ratios of the generic kernel, dequantize + cuBLAS and uniform W4 (g128 / g64), and the
    mma.sync table kernel's variants in us."""
    t = {(r["shape"], r["M"], r["fmt"], r["method"]): r["time_us"] for r in rows}
    out = []
    cases = dict.fromkeys((r["shape"], r["M"], r["fmt"]) for r in rows if r["method"] == "generic")
    for shape, M, fmt in cases:
        cub = t[(shape, M, "bf16", "cublas_bf16")]

        def x(key, cub=cub):
            return cub / t[key] if key in t else None

        out.append(dict(shape=shape, M=M, fmt=fmt, cublas_us=cub, auto_us=t[(shape, M, fmt, "auto")],
                        auto_x=x((shape, M, fmt, "auto")), generic_x=x((shape, M, fmt, "generic")),
                        dequant_x=x((shape, M, fmt, "dequant")), uniform_x=x((shape, M, "uniform", "auto")),
                        uniform_g64_x=x((shape, M, "uniform_g64", "auto")),
                        uniform_w2_x=x((shape, M, "uniform_w2", "auto")),
                        uniform_w3_x=x((shape, M, "uniform_w3", "auto")),
                        **{f"{v}_us": t.get((shape, M, fmt, v)) for v in ("mma_u1", "mma_u2", "mma_u2_xp",
                                                                          "mma_acc", "mma_g1", "mma_g2",
                                                                          "mma_cap0", "mma_u2_3sm",
                                                                          "mma_u2_noxp")},
                        uniform_g64_g1_us=t.get((shape, M, "uniform_g64", "mma_g1")),
                        uniform_g64_g2_us=t.get((shape, M, "uniform_g64", "mma_g2"))))
    return out


def bf16_weights(N: int, K: int) -> list[torch.Tensor]:
    """bf16 ``[N, K]`` weight copies for the cuBLAS reference, > 150 MB together (``copies_for``)."""
    copies = copies_for(N * K * 2)
    return [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]


def grid_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the layer-shape benchmarks: --ms (comma list), --shapes (NxK, comma list), --out."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--ms", default=None)
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--out", default=None)
    return ap


def grid_args(args, ms_default, shapes_default, out_name: str):
    """(ms, shapes, out path) from ``grid_parser``'s options (out: under $OUT by default)."""
    ms = [int(m) for m in args.ms.split(",")] if args.ms else ms_default
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else shapes_default)
    return ms, shapes, args.out or os.path.join(os.environ.get("OUT", "."), out_name)


def main() -> int:
    ap = grid_parser(__doc__)
    ap.add_argument("--formats", default=None, help="comma list of format:bits:group (default "
                    "nf4:4:64,fp4:4:128,learned:4:128)")
    args = ap.parse_args()
    formats = FORMATS
    if args.formats:
        formats = [(f, int(b), int(g)) for f, b, g in (e.split(":") for e in args.formats.split(","))]
        if len({label(f, b) for f, b, _ in formats}) != len(formats):
            ap.error(f"--formats: each format and width once per run (rows are named by them), got "
                     f"{args.formats}")
    ms, shapes, out = grid_args(args, MS, SHAPES, "quant_codebook.json")
    logs: list[str] = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    t0 = time.time()
    corr = check(log, formats)
    rows = []
    for N, K in shapes:
        Ws = bf16_weights(N, K)
        uni = [random_packed(N, K, 4) for _ in range(copies_for(N * K // 2))]
        uni64 = [random_packed(N, K, 4, G=64) for _ in range(copies_for(N * K // 2))]
        uni_low = {b: [random_packed(N, K, b) for _ in range(copies_for(N * K * b // 8))]
                   for b in sorted({b for _, b, _ in formats} & {2, 3})}  # uniform at the tables' width
        cbs = {label(fmt, b): [random_codebook(N, K, fmt, G, b) for _ in range(copies_for(N * K * b // 8))]
               for fmt, b, G in formats}
        groups = {label(fmt, b): G for fmt, b, G in formats}
        for M in ms:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(24)]
            t_cub = graph_time_us([lambda x=xs[i % 24], w=w: F.linear(x, w) for i, w in enumerate(Ws)])
            shape = f"{N}x{K}"
            rows.append(dict(shape=shape, M=M, fmt="bf16", method="cublas_bf16", time_us=t_cub, speedup=1.0))
            t = graph_time_us([lambda x=xs[i % 24], p=p: quant_matmul(x, p) for i, p in enumerate(uni)])
            rows.append(dict(shape=shape, M=M, fmt="uniform", method="auto", time_us=t, speedup=t_cub / t))
            t = graph_time_us([lambda x=xs[i % 24], p=p: quant_matmul(x, p) for i, p in enumerate(uni64)])
            rows.append(dict(shape=shape, M=M, fmt="uniform_g64", method="auto", time_us=t,
                             speedup=t_cub / t))
            for name, call in g2_variants(M):
                t = graph_time_us([lambda x=xs[i % 24], p=p, c=call: c(x, p) for i, p in enumerate(uni64)])
                rows.append(dict(shape=shape, M=M, fmt="uniform_g64", method=name, time_us=t,
                                 speedup=t_cub / t))
            for b, uni_b in uni_low.items():
                t = graph_time_us([lambda x=xs[i % 24], p=p: quant_matmul(x, p) for i, p in enumerate(uni_b)])
                rows.append(dict(shape=shape, M=M, fmt=f"uniform_w{b}", method="auto", time_us=t,
                                 speedup=t_cub / t))
            for fmt in cbs:
                for name, call in variants(M) + (g2_variants(M) if groups[fmt] == 64 else []):
                    try:
                        t = graph_time_us([lambda x=xs[i % 24], p=p, c=call: c(x, p)
                                           for i, p in enumerate(cbs[fmt])])
                    except Exception as e:  # noqa: BLE001
                        log(f"{shape} M{M} {fmt} {name}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    rows.append(dict(shape=shape, M=M, fmt=fmt, method=name, time_us=t, speedup=t_cub / t))
            cells = " ".join(f"{r['fmt']}/{r['method']}={r['time_us']:.1f}({r['speedup']:.2f}x)" for r in rows
                             if r["shape"] == shape and r["M"] == M and r["method"] != "cublas_bf16")
            log(f"{shape} M{M} cublas={t_cub:.1f} {cells}")
        del Ws, uni, uni64, uni_low, cbs
        torch.cuda.empty_cache()
        log(f"after {N}x{K}: {time.time() - t0:.0f}s")
        result = {
            "benchmark": "quant_codebook",
            "title": "codebook weights (" + ", ".join(f"{label(f, b)} g{g}" for f, b, g in formats)
                     + ") vs uniform W4 / W3 / W2 and cuBLAS bf16",
            "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "columns": COMPACT_COLUMNS,
            "rows": compact(rows),
            "detail": rows,
            "notes": ["time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB) "
                      "and 24 rotating inputs, divided by R; speedup = cuBLAS bf16 time / time; 'auto' is "
                      "the launcher's choice, 'generic' the Triton GEMV (M = 1) / GEMM, 'mma_*' the mma.sync "
                      "table kernel (u1 / u2: loop not / unrolled by two, xp: x loaded two tiles ahead, acc: "
                      "adding into a pending float32 sum, cap0: no register cap, u2_3sm: unrolled with the "
                      "split count of 3 programs per SM, u2_noxp: unrolled, x not loaded ahead); *_x = x "
                      "cuBLAS bf16; uniform = W4 g128 / g64 "
                      "(uniform_w2 / _w3: W2 / W3 g128) through the launcher; per-call rows under 'detail'",
                      correctness_note(corr)],
            "correctness": corr,
        }
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
