"""Benchmark: the register-operand mma.sync kernel (quant_gemv_mma.py, ``path="mma"``, M <= 16)
against cuBLAS bf16 (F.linear), torch int4 (_weight_int4pack_mm) and the launcher's current choice
("auto": the packed-half GEMV at M = 1, the older tensor-core paths above), on the Llama-3-8B
shapes, with a correctness check first and a small sweep (split-K, BLOCK_K).

    python benchmarks/bench_quant_gemv_mma.py          # JSON quant_matmul_mma.json to $OUT or results/

Timing as in bench_quant_matmul.py (CUDA graph of R calls over R weight copies > 150 MB, median of
20 replays / R). Sections are skipped when the time budget (--budget s) runs out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from anybit.kernels import quant_matmul as qm  # noqa: E402
from anybit.kernels.quant_gemv_h2 import _num_sms  # noqa: E402
from anybit.kernels.quant_gemv_mma import mma_config, mma_rows  # noqa: E402
from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402
from benchmarks.bench_quant_matmul import bench_shape, check_cases, random_packed, run_variant  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (6144, 4096), (128256, 4096)]
MS = [1, 4, 8, 16]


def correctness(log) -> list[dict]:
    """mma vs the float32 dequantization (ref_quant_matmul) on RTN weights and random codes, with
    the launcher's configuration and forced splits / BLOCK_K; a repeated call must give the same
    bits."""
    cases = []
    torch.manual_seed(0)
    for bits in (2, 4):
        for g in (64, 128, -1):
            pw = rtn_quantize(torch.randn(384, 1536), QuantSpec(bits, g, "uniform")).to("cuda")
            for M in (1, 3, 8, 9, 16):
                cases.append((f"b{bits} g{g} 384x1536 M{M}", pw, M, {}))
            cases.append((f"b{bits} g{g} 384x1536 M5 split3", pw, 5, dict(split_k=3)))
            cases.append((f"b{bits} g{g} 384x1536 M5 split4 cl", pw, 5, dict(split_k=4, cluster=True)))
        pw = random_packed(4096, 14336, bits)
        for M in (1, 16):
            for kw in ({}, dict(block_k=64), dict(split_k=7), dict(split_k=8, cluster=True),
                       dict(split_k=16, cluster=True)):
                cases.append((f"b{bits} random 4096x14336 M{M}", pw, M, kw))
    return check_cases(cases, lambda x, pw, out, kw: run_variant(x, pw, dict(kw, direct_mma=True), out), log,
                       5e-3)


def main_variants(M: int, b: int) -> list:
    """The kernel as launched (K splits through the global workspace), the same with the K splits
    as one thread-block cluster per tile (opt-in), the launcher without this kernel."""
    return [("anybit_mma", dict(path="mma")), ("anybit_mma_cluster", dict(direct_mma=True, cluster=True)),
            ("anybit", {})]


def sweep_variants(M: int, b: int) -> list:
    sms = _num_sms(torch.device("cuda"))
    out = [("anybit_mma", dict(path="mma"))]
    out.append(("anybit_mma_bk64", dict(path="mma", block_k=64)))
    return out + [(f"anybit_mma_sk{s}", dict(path="mma", split_k=s)) for s in (2, 4, 8, 16)
                  if s != mma_config(M, 4096, 14336, 128, sms)[2]]


def ks_variants(M: int, b: int) -> list:
    """The K split inside the program (KS): the launcher without this kernel ("anybit": the packed-half
    GEMV at M = 1), the kernel with KS = 1 (the session-10 kernel), its default (mma_config), and each
    KS with the split-K of mma_config and without split-K."""
    out = ks_bits_variants(M, b)
    for ks in (2, 4, 8):
        if ks * mma_rows(M) <= 8:
            out += [(f"anybit_mma_ks{ks}", dict(direct_mma=True, ks=ks)),
                    (f"anybit_mma_ks{ks}_sk1", dict(direct_mma=True, ks=ks, split_k=1))]
    return out


def tma_variants(M: int, b: int) -> list:
    """The TMA-ring variant (quant_gemv_tma.py) against the launcher ("auto" as shipped: anybit) and
    quant_gemv_mma with its config: 3 / 4 / 6 ring slots, without split-K, without PDL. (Session 15's
    s15-2 also timed a column-block copy of the words, contiguous tiles: no faster; removed.)"""
    return [("anybit", {}), ("anybit_mma", dict(direct_mma=True)), ("anybit_tma", dict(direct_tma=True)),
            ("anybit_tma_s4", dict(direct_tma=True, stages=4)),
            ("anybit_tma_s6", dict(direct_tma=True, stages=6)),
            ("anybit_tma_sk1", dict(direct_tma=True, split_k=1)),
            ("anybit_tma_nopdl", dict(direct_tma=True, pdl=False))]


def tma_bits_variants(M: int, b: int) -> list:
    return [("anybit", {}), ("anybit_mma", dict(direct_mma=True)), ("anybit_tma", dict(direct_tma=True))]


def m16_variants(M: int, b: int) -> list:
    """M 9..16: quant_gemv_mma with the split-K sum of session 14 (8 partial tiles in flight: 224
    registers, 2 programs per SM), as shipped now (2 in flight: 160 registers, 3 per SM), capped at 128
    registers (4 per SM), and the TMA-ring kernel (single-slice widths)."""
    out = [("anybit", {}), ("anybit_mma_sl8", dict(direct_mma=True, sum_loads=8)),
           ("anybit_mma", dict(direct_mma=True)),
           ("anybit_mma_cap128", dict(direct_mma=True, max_registers=128))]
    return out + ([("anybit_tma", dict(direct_tma=True))] if b in (1, 2, 4) else [])


def tma_n_variants(M: int, b: int) -> list:
    """Where the TMA-ring kernel should start by N (TMA_MIN_N): the mma.sync kernel against it."""
    return [("anybit_mma", dict(direct_mma=True)), ("anybit_tma", dict(direct_tma=True))]


def m16_correctness(log) -> list[dict]:
    """quant_gemv_mma at M 9..16 with its register cap and split-K sum variants, RTN weights."""
    cases = []
    torch.manual_seed(0)
    for bits in (2, 3, 4):
        pw = rtn_quantize(torch.randn(384, 2048), QuantSpec(bits, 128, "uniform")).to("cuda")
        for M in (9, 16):
            for kw in (dict(max_registers=128), dict(sum_loads=8), dict(max_registers=128, split_k=4)):
                cases.append((f"m16 b{bits} 384x2048 M{M} {kw}", pw, M, dict(kw, direct_mma=True)))
    return check_cases(cases, lambda x, pw, out, kw: run_variant(x, pw, kw, out), log, 5e-3)


def xs_variants(M: int, b: int) -> list:
    """The x ring (the kernel's XS): x tiles through 2 / 3 shared slots copied ahead against the loads in
    the loop (XS 0), also under a 128-register cap (4 programs per SM at BLOCK_M 8)."""
    out = [("anybit", {}), ("anybit_mma", dict(direct_mma=True, x_slots=0))]
    for xs in (3, 4) if M > 8 else (3,):
        out.append((f"anybit_mma_xs{xs}", dict(direct_mma=True, x_slots=xs)))
    if b in (1, 2, 4) and M > 1:  # the TMA-ring kernel with x in its ring (KS 1) and without
        out += [("anybit_tma_x", dict(direct_tma=True, x_tma=True)),
                ("anybit_tma", dict(direct_tma=True, x_tma=False))]
    return out


def xw_variants(M: int, b: int) -> list:
    """x from global memory in the loop (x_slots 0), through the ring (3 slots), and the whole slice in
    shared memory up front (x_whole: the default where it fits)."""
    return [("anybit_mma_x0", dict(direct_mma=True, x_slots=0, x_whole=False)),
            ("anybit_mma_xs3", dict(direct_mma=True, x_slots=3, x_whole=False)),
            ("anybit_mma_xw", dict(direct_mma=True))]


def xw_regs_variants(M: int, b: int) -> list:
    """With the whole x slice (default): register caps at BLOCK_M 16 (x no longer lives in registers),
    and other split counts at M 1 (no split-K ending with split 1)."""
    out = [("anybit_mma", dict(direct_mma=True))]
    if M > 8:  # 2 partial tiles in flight in the split-K sum: 154 registers (3 per SM); capped at 128: 4
        out += [("anybit_mma_sl2", dict(direct_mma=True, sum_loads=2)),
                ("anybit_mma_sl2_r128", dict(direct_mma=True, sum_loads=2, max_registers=128))]
    else:
        out += [(f"anybit_mma_sk{k}", dict(direct_mma=True, split_k=k)) for k in (1, 4)]
    return out


def zw_variants(M: int, b: int) -> list:
    """Zero points as halves (the compiler packs them where they are loaded) or as int32 words."""
    return [("anybit_mma", dict(direct_mma=True, zero_words=0)),
            ("anybit_mma_zw", dict(direct_mma=True, zero_words=1)),
            ("anybit_mma_zw2", dict(direct_mma=True, zero_words=2))]


def u2_variants(M: int, b: int) -> list:
    """The K loop as shipped (three word buffers rotated by moves) or unrolled by two (one buffer per
    half, refilled after its unpacking), also under a 128-register cap at BLOCK_M 8."""
    out = [("anybit_mma", dict(direct_mma=True)), ("anybit_mma_u2", dict(direct_mma=True, unroll2=True))]
    if M <= 8:
        out.append(("anybit_mma_u2_r128", dict(direct_mma=True, unroll2=True, max_registers=128)))
    return out


def u2_correctness(log) -> list[dict]:
    """quant_gemv_mma unrolled by two: single-slice RTN weights, odd and even tile counts, splits, K
    splits, the whole x slice or x from global memory."""
    cases = []
    for bits, g, pw in _rtn_weights():
        if bits not in (1, 2, 4):
            continue
        for M in (1, 3, 8, 9, 16):
            for kw in ({}, dict(split_k=3), dict(split_k=1), dict(x_whole=False, x_slots=0),
                       dict(max_registers=128)):
                cases.append((f"u2 b{bits} g{g} 384x2048 M{M} {kw}", pw, M,
                              dict(kw, direct_mma=True, unroll2=True)))
    for bits in (2, 4):
        pw = random_packed(4096, 14336, bits)
        for M in (1, 5, 16):
            cases.append((f"u2 b{bits} random 4096x14336 M{M}", pw, M, dict(direct_mma=True, unroll2=True)))
    return check_cases(cases, lambda x, pw, out, kw: run_variant(x, pw, kw, out), log, 5e-3)


def _rtn_weights():
    """(bits, group, RTN weight 384x2048 on CUDA) for every width 1-7 and group 64 / 128 / channel that
    the mma.sync kernel takes (a 1-bit slice needs groups of 128 K or more)."""
    torch.manual_seed(0)
    for bits in (1, 2, 3, 4, 5, 6, 7):
        for g in (64, 128, -1):
            if bits in (1, 3, 5, 7) and g == 64:
                continue
            yield bits, g, rtn_quantize(torch.randn(384, 2048), QuantSpec(bits, g, "uniform")).to("cuda")


def zw_correctness(log) -> list[dict]:
    """quant_gemv_mma with the zero points as int32 words: RTN weights of every width, groups 64 / 128 /
    channel, M 1..16, splits and K splits; random codes on 4096x14336."""
    cases = []
    for bits, g, pw in _rtn_weights():
        for M in (1, 3, 8, 9, 16):
            for kw in (dict(zero_words=1), dict(zero_words=2), dict(zero_words=2, split_k=3),
                       dict(zero_words=2, x_whole=False, x_slots=0)):
                cases.append((f"zw b{bits} g{g} 384x2048 M{M} {kw}", pw, M, dict(kw, direct_mma=True)))
    for bits in (2, 4):
        pw = random_packed(4096, 14336, bits)
        for M in (1, 5, 16):
            cases.append((f"zw b{bits} random 4096x14336 M{M}", pw, M,
                          dict(direct_mma=True, zero_words=2)))
    return check_cases(cases, lambda x, pw, out, kw: run_variant(x, pw, kw, out), log, 5e-3)


def xs_correctness(log) -> list[dict]:
    """quant_gemv_mma with the x ring (2-4 slots) on RTN weights of every width (slices share the tile),
    groups 64 / 128 / per channel, M 1..16, forced splits and K splits, pending sums; random codes on
    4096x14336."""
    cases = []
    for bits, g, pw in _rtn_weights():
        for M in (1, 3, 8, 9, 16):
            cases.append((f"xs b{bits} g{g} 384x2048 M{M}", pw, M, dict(direct_mma=True, x_slots=3,
                                                                           x_whole=False)))
            cases.append((f"xw b{bits} g{g} 384x2048 M{M}", pw, M, dict(direct_mma=True, x_whole=True)))
            cases.append((f"xw b{bits} g{g} 384x2048 M{M} split3", pw, M,
                          dict(direct_mma=True, x_whole=True, split_k=3)))
        for kw in (dict(x_slots=2, split_k=3), dict(x_slots=4, split_k=1, ks=8), dict(x_slots=2, ks=2),
                   dict(x_slots=3, max_registers=128)):
            cases.append((f"xs b{bits} g{g} 384x2048 M1 {kw}", pw, 1, dict(kw, direct_mma=True)))
    for bits in (1, 2, 4):
        for g in (64, 128, -1):
            if bits == 1 and g == 64:
                continue
            pw = rtn_quantize(torch.randn(384, 2048), QuantSpec(bits, g, "uniform")).to("cuda")
            for M in (2, 5, 8, 9, 16):
                for kw in (dict(x_tma=True), dict(x_tma=True, split_k=3), dict(x_tma=True, stages=2)):
                    cases.append((f"tma_x b{bits} g{g} 384x2048 M{M} {kw}", pw, M, dict(kw, direct_tma=True)))
    for bits in (2, 4):
        pw = random_packed(4096, 14336, bits)
        for M in (1, 5, 16):
            for kw in (dict(x_slots=2, x_whole=False), dict(x_slots=3, x_whole=False), dict(x_whole=True),
                       dict(x_whole=True, split_k=8)):
                cases.append((f"xs b{bits} random 4096x14336 M{M} {kw}", pw, M, dict(kw, direct_mma=True)))
        for M in (5, 16):
            cases.append((f"tma_x b{bits} random 4096x14336 M{M}", pw, M, dict(direct_tma=True, x_tma=True)))
    return check_cases(cases, lambda x, pw, out, kw: run_variant(x, pw, kw, out), log, 5e-3)


def tma_correctness(log) -> list[dict]:
    """quant_gemv_tma vs the float32 dequantization: RTN weights of 1/2/4 bits, groups 64 / 128 /
    per channel, M 1..16, forced splits, K splits inside the program, ring sizes; random codes on
    4096x14336."""
    cases = []
    torch.manual_seed(0)
    for bits in (1, 2, 4):
        for g in (64, 128, -1):
            if bits == 1 and g == 64:
                continue
            pw = rtn_quantize(torch.randn(384, 2048), QuantSpec(bits, g, "uniform")).to("cuda")
            for M in (1, 3, 8, 9, 16):
                cases.append((f"tma b{bits} g{g} 384x2048 M{M}", pw, M, dict(direct_tma=True)))
            for kw in (dict(split_k=3), dict(split_k=1, ks=8), dict(ks=2, stages=2), dict(stages=6),
                       dict(ks=4, split_k=2)):
                cases.append((f"tma b{bits} g{g} 384x2048 M1 {kw}", pw, 1, dict(kw, direct_tma=True)))
        pw = random_packed(4096, 14336, bits)
        for M in (1, 16):
            for kw in ({}, dict(split_k=1), dict(stages=4)):
                cases.append((f"tma b{bits} random 4096x14336 M{M} {kw}", pw, M, dict(kw, direct_tma=True)))
    return check_cases(cases, lambda x, pw, out, kw: run_variant(x, pw, kw, out), log, 5e-3)


def ks_bits_variants(M: int, b: int) -> list:
    """Other widths: the launcher without this kernel, KS = 1 and the default."""
    return [("anybit", {}), ("anybit_mma_ks1", dict(direct_mma=True, ks=1)),
            ("anybit_mma", dict(direct_mma=True))]


def diag_variants(M: int, b: int) -> list:
    """What limits the kernel: PDL off; DIAG bit 0 = no x load in the loop, bit 1 = no split-K sum
    (wrong results)."""
    return [("anybit_mma", dict(direct_mma=True)), ("anybit_mma_nopdl", dict(direct_mma=True, pdl=False))] + [
        (f"anybit_mma_diag{d}", dict(direct_mma=True, diag=d)) for d in (1, 2, 3)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--plan", default="default",
                    choices=["default", "ks", "tma", "tma_n", "m16", "diag", "xs", "xw", "xw_regs", "zw",
                             "u2"],
                    help="ks: the in-program K split sweep (W4 M 1/2/4 on three shapes, W2/3/5/6 at M 1); "
                    "tma: the TMA-ring variant (quant_gemv_tma.py); diag: the DIAG variants at M 1/4/16 on "
                    "the layer shapes; xs: the x ring (x_slots); xw: the whole x slice up front (x_whole)")
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    qm.MMA_MODE = "0"  # "anybit" = the launcher without this kernel; anybit_mma* call it directly
    logs: list[str] = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    checks = {"tma": tma_correctness, "tma_n": tma_correctness, "m16": m16_correctness, "xs": xs_correctness,
              "xw": xs_correctness, "zw": zw_correctness, "u2": u2_correctness}
    checks = checks.get(args.plan, correctness)
    corr = [] if args.skip_correctness else checks(log)
    log(f"after correctness: {time.time() - t0:.0f}s")
    rows: list[dict] = []
    sms = _num_sms(torch.device("cuda"))
    configs = {f"{N}x{K} M{M}": mma_config(M, N, K, 128, sms) for N, K in SHAPES for M in MS}

    def dump():
        write_result(name, "Register-operand mma.sync any-bit GEMV/GEMM (M <= 16) vs cuBLAS "
                     "bf16, torch int4 and the current launcher, Llama-3-8B shapes, group 128",
                     ["shape", "M", "method", "bits", "time_us", "tbps", "speedup"], rows,
                     ["time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB) / R; "
                      "speedup = cuBLAS bf16 time / time; anybit_mma = quant_gemv_mma with the launcher's "
                      "config (mma_config: BLOCK_M, BLOCK_K, split), anybit_mma_<name> = one change "
                      "(_cluster: the K splits as one thread-block cluster per tile), "
                      "anybit = the launcher's choice without this kernel ('auto')",
                      "ks = the K split inside a program (anybit_mma_ks<k>[_sk1]: forced, without split-K)",
                      f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} checks vs the float32 "
                      f"dequantization passed (rel err < 5e-3, repeated call identical)"],
                     out_dir=args.out, correctness=corr, configs=configs, log=logs)

    name = "quant_matmul_mma" if args.plan == "default" else f"quant_matmul_mma_{args.plan}"
    if args.plan == "m16":
        plan = [((N, K), [9, 12, 16], [4], m16_variants) for N, K in SHAPES]
        plan += [((N, K), [16], [2, 3], m16_variants) for N, K in SHAPES[:2]]
    elif args.plan == "tma_n":
        plan = [((N, 4096), [9, 12, 16], [b], tma_n_variants) for N in (14336, 28672) for b in (4, 2)]
    elif args.plan == "tma":
        plan = [((N, K), MS, [4], tma_variants) for N, K in SHAPES]
        plan += [((N, K), [1, 16], [2], tma_bits_variants) for N, K in SHAPES[:2]]
    elif args.plan == "xs":
        plan = [((N, K), [4, 8, 12, 16], [4], xs_variants) for N, K in SHAPES[:3]]
        plan += [((N, K), [16], [2, 3], xs_variants) for N, K in SHAPES[:2]]
        plan += [((128256, 4096), [16], [4], xs_variants)]
    elif args.plan == "xw":
        plan = [((N, K), [1, 4, 8, 16], [4], xw_variants) for N, K in SHAPES[:3]]
        plan += [((N, K), [1, 16], [2, 3], xw_variants) for N, K in SHAPES[:2]]
    elif args.plan == "u2":
        plan = [((N, K), [1, 4, 8, 16], [4], u2_variants) for N, K in SHAPES[:3]]
        plan += [((N, K), [1, 16], [2], u2_variants) for N, K in SHAPES[:2]]
    elif args.plan == "zw":
        plan = [((N, K), [1, 4, 8, 16], [4], zw_variants) for N, K in SHAPES[:3]]
        plan += [((N, K), [1, 16], [2, 3], zw_variants) for N, K in SHAPES[:2]]
    elif args.plan == "xw_regs":
        plan = [((N, K), [1, 12, 16], [4], xw_regs_variants) for N, K in SHAPES[:3]]
        plan += [((N, K), [16], [3], xw_regs_variants) for N, K in SHAPES[:2]]
    elif args.plan == "diag":
        plan = [((N, K), [1, 4, 16], [4], diag_variants) for N, K in SHAPES[:3]]
    elif args.plan == "ks":
        plan = [((N, K), [1, 2, 4], [4], ks_variants) for N, K in SHAPES[:3]]
        plan += [((N, K), [1], [2, 3, 5, 6], ks_bits_variants) for N, K in SHAPES[:3]]
    else:
        plan = [((4096, 14336), [1], [4], diag_variants)]
        plan += [((N, K), MS, [4], main_variants) for N, K in SHAPES]
        plan += [((4096, 14336), MS, [2], main_variants), ((4096, 14336), [1, 16], [4], sweep_variants),
                 ((14336, 4096), MS, [2], main_variants)]
    for (N, K), ms, bits, variants in plan:
        if time.time() - t0 > args.budget:
            log(f"budget reached: skipped {N}x{K} {variants.__name__}")
            continue
        rows += [dict(r, section=variants.__name__, plan_bits=bits[0])
                 for r in bench_shape(N, K, ms, bits, variants, log)]
        dump()
        log(f"after {N}x{K} {variants.__name__}: {time.time() - t0:.0f}s")
    dump()
    print(f"{'shape':>12} {'M':>3} {'b':>2} {'cuBLAS':>7} {'int4':>6} {'auto':>6} {'mma':>6}  (x cuBLAS) "
          "mma TB/s")
    keys = sorted({(r["shape"], r["M"], r["bits"]) for r in rows if r.get("section") == "main_variants"
                   and r["method"] == "anybit_mma"}, key=lambda k: (k[0], k[2], k[1]))
    for shp, M, b in keys:
        sel = {r["method"]: r for r in rows if (r["shape"], r["M"], r.get("plan_bits")) == (shp, M, b)
               and r.get("section") == "main_variants"}
        sel.update({r["method"]: r for r in rows
                    if (r["shape"], r["M"], r["method"]) == (shp, M, "torch_int4pack")})
        cells = [f"{sel[m]['speedup']:6.2f}" if m in sel else "     -"
                 for m in ("torch_int4pack", "anybit", "anybit_mma")]
        print(f"{shp:>12} {M:>3} {b:>2} {sel['cublas_bf16']['time_us']:7.1f} " + " ".join(cells)
              + f"  {sel['anybit_mma']['tbps']:.2f}")
    ks_rows = [r for r in rows if r.get("section") in ("ks_variants", "ks_bits_variants")]
    for shp, M, b in sorted({(r["shape"], r["M"], r["bits"]) for r in ks_rows if r["bits"] < 16}):
        cub = next(r["time_us"] for r in ks_rows
                   if (r["shape"], r["M"], r["method"]) == (shp, M, "cublas_bf16"))
        cells = [f"{r['method'][7:] or 'auto'}={r['time_us']:.1f}({r['speedup']:.2f}x)" for r in ks_rows
                 if (r["shape"], r["M"], r["bits"]) == (shp, M, b)]
        print(f"{shp} M{M} W{b} cublas={cub:.1f} " + " ".join(cells))
    for r in rows:
        if r.get("section") in ("sweep_variants", "diag_variants", "xs_variants", "xw_variants",
                                "xw_regs_variants", "zw_variants", "u2_variants", "m16_variants",
                                "tma_n_variants"):
            print(f"sweep {r['shape']} M{r['M']} {r['method']}: {r['time_us']:.1f}us {r['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
