"""Benchmark: the warp-specialized register-A wgmma kernel (quant_gemm_rws.py, ``path="rws"``, W4) for
M 64..1024 against cuBLAS bf16 (F.linear), the launcher's current choice ("auto") and the one-program
register-A kernel (``path="ra"``) on the Llama-3-8B layer shapes, with a correctness check first and a
sweep (BLOCK_M, stream-K or whole tiles, programs per SM) per shape.

    python benchmarks/bench_quant_gemm_rws.py            # JSON quant_matmul_rws.json to $OUT or results/
    python benchmarks/bench_quant_gemm_rws.py --quick    # correctness + 14336x4096 only

Timing as in bench_quant_matmul.py (CUDA graph of R calls over R weight copies > 150 MB, median of
20 replays / R). Sections are skipped when the time budget (--budget s) runs out; the JSON is
rewritten after every section.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from anybit.kernels import quant_matmul as qm  # noqa: E402
from anybit.kernels.quant_gemm_rws import rws_config, rws_programs  # noqa: E402
from anybit.kernels.quant_gemv_h2 import _num_sms  # noqa: E402
from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402
from benchmarks.bench_quant_matmul import (  # noqa: E402
    bench_shape,
    check_cases,
    copies_for,
    graph_time_us,
    random_packed,
    run_variant,
)
from benchmarks.common import write_result  # noqa: E402

SHAPES = [(14336, 4096), (4096, 14336), (6144, 4096)]
MS = [64, 128, 256, 512, 1024]


def correctness(log) -> list[dict]:
    """path="rws" vs the float32 dequantization on RTN weights and random codes: the launcher's
    configuration and forced variants (stream-K over 5 / 7 programs, BLOCK_M, stages, two programs per
    SM), and bit equality with path="ra" on whole tiles (the same weights and products)."""
    torch.manual_seed(0)
    cases = []
    for g in (64, 128):
        pw = rtn_quantize(torch.randn(384, 1152), QuantSpec(4, g, "uniform")).to("cuda")
        for M in (2, 16, 64, 100, 300):
            cases.append((f"b4 g{g} 384x1152 M{M}", pw, M, {}))
        cases.append((f"b4 g{g} 384x1152 M64 P5", pw, 64, dict(programs=5)))
        cases.append((f"b4 g{g} 384x1152 M64 P7", pw, 64, dict(programs=7)))
        cases.append((f"b4 g{g} 384x1152 M200 bm256 st3", pw, 200, dict(block_m=256, stages=3)))
        cases.append((f"b4 g{g} 384x1152 M40 bm64 2/SM", pw, 40,
                      dict(block_m=64, max_regs=80, cons_regs=104)))
    pw = rtn_quantize(torch.randn(512, 1152), QuantSpec(4, 128, "uniform")).to("cuda")
    for M, kw in ((40, {}), (64, dict(programs=9)), (200, {})):
        cases.append((f"b4 g128 512x1152 M{M} four consumers", pw, M, dict(consumers=4, block_m=64, **kw)))
    for kw in (dict(ping=True), dict(ping=True, programs=5), dict(epi=True),  # PING / EPI on
               dict(ping=True, epi=True, programs=5), dict(ping=True, epi=True, programs=7),
               dict(ping=True, epi=True, block_m=256)):
        cases.append((f"b4 g128 512x1152 M300 {kw}", pw, 300, kw))
    for kw in (dict(duo=True, programs=5), dict(duo=True, epi=True, block_m=256, programs=3),
               dict(duo=False, programs=5)):  # DUO: two pieces per tile, added in registers
        cases.append((f"b4 g128 512x1152 M300 {kw}", pw, 300, kw))
    cases.append(("b4 g128 512x1152 M40 four consumers ping epi", pw, 40,
                  dict(consumers=4, block_m=64, ping=True, epi=True)))
    for b in (1, 2, 3, 5, 6, 7, 8):  # the other widths (ra_slices)
        pw = rtn_quantize(torch.randn(384, 1152), QuantSpec(b, 64, "uniform")).to("cuda")
        for M, kw in ((40, {}), (300, {}), (64, dict(programs=7))):
            cases.append((f"b{b} g64 384x1152 M{M} {kw}", pw, M, kw))
    pw = rtn_quantize(torch.randn(384, 1152), QuantSpec(4, 128, "uniform")).to("cuda")
    for M, kw in ((16, dict(block_m=16, programs=5)), (64, dict(programs=7)),
                  (300, dict(block_m=128, programs=5)), (300, {})):  # 128-wide K tiles
        cases.append((f"b4 g128 384x1152 M{M} bk128 {kw}", pw, M, dict(block_k=128, **kw)))
    for M, kw in ((300, dict(block_m=256, programs=12)), (300, dict(block_m=256, programs=12, swap=False)),
                  (300, dict(block_m=128, programs=6, dp_waves=1))):  # halves: DUO with fixed roles
        cases.append((f"b4 g128 384x1152 M{M} {kw}", pw, M, kw))
    for M, kw in ((64, dict(programs=7)), (300, {}), (40, {})):  # launched plainly (the default is PDL)
        cases.append((f"b4 g128 384x1152 M{M} no pdl {kw}", pw, M, dict(pdl=False, **kw)))
    for b in (4, 3, 6):
        pw = random_packed(4096, 14336, b)
        for M in (64, 256, 1024):
            cases.append((f"b{b} random 4096x14336 M{M}", pw, M, {}))
        for M, bm in ((16, 16), (64, 64), (256, 128)):
            cases.append((f"b{b} random 4096x14336 M{M} bm{bm} bk128", pw, M, dict(block_m=bm, block_k=128)))
    rows = check_cases(cases, lambda x, pw, out, kw: qm.quant_gemm_rws(x, pw, out, **kw), log, 1e-2)
    pw = random_packed(4096, 14336, 4)
    for M in (64, 256):  # whole tiles (one program per tile) and ra without split-K: the same bits
        x = torch.randn(M, 14336, device="cuda", dtype=torch.bfloat16)
        bm = rws_config(M, 4096)[0]
        a = qm.quant_matmul(x, pw, path="ra", block_m=bm, split_k=1)
        b = qm.quant_gemm_rws(x, pw, torch.empty_like(a), block_m=bm, programs=-(-M // bm) * 4096 // 128)
        same = bool(torch.equal(a, b))
        rows.append(dict(case=f"rws == ra bits, 4096x14336 M{M}, whole tiles", kw="", rel_err=0.0,
                         repeat_equal=same, ok=same))
        log(f"rws == ra at M{M}, whole tiles: {same}")
    return rows


def main_variants(M: int, b: int) -> list:
    return [("anybit", {}), ("anybit_ra", dict(path="ra")), ("anybit_rws", dict(direct_rws=True))]


def sweep(N: int, K: int):
    """BLOCK_M x programs: stream-K over every SM (``_sk``), whole tiles (one program per tile, when they
    fit one wave), and the launcher's choice between the two (``anybit_rws_bm*``)."""
    def variants(M: int, b: int) -> list:
        out = [("anybit_rws", dict(direct_rws=True))]
        for bm in (64, 128, 256):
            if bm > 2 * max(M, 64) or bm < min(M, 256) // 2:
                continue
            tiles = -(-M // bm) * N // 128
            out.append((f"anybit_rws_bm{bm}", dict(direct_rws=True, block_m=bm)))
            out.append((f"anybit_rws_bm{bm}_sk", dict(direct_rws=True, block_m=bm, programs=132)))
            if tiles <= 132:
                out.append((f"anybit_rws_bm{bm}_whole", dict(direct_rws=True, block_m=bm, programs=tiles)))
        return out
    variants.__name__ = f"sweep_{N}x{K}"
    return variants


def ab_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The candidates for the launcher at this size: the launcher's choice, ra, rws (whole tiles, stream-K),
    BLOCK_M 128 at M 256, dequantize + cuBLAS at M 1024; four consumers (BLOCK_M 64) up to M 64. Widths
    other than 4: the launcher's choice, rws, and dequantize + cuBLAS from M 256."""
    if bits != 4:
        return [("anybit", {}), ("anybit_rws", dict(direct_rws=True))] + (
            [("anybit_dequant", dict(path="dequant"))] if M >= 256 else [])
    bm = rws_config(M, N)[0]
    tiles = -(-M // bm) * N // 128
    out = [("anybit", {}), ("anybit_rws", dict(direct_rws=True))]
    if M < 64:
        out.append(("anybit_ws", dict(path="ws")))
    if M >= 64:
        out += [("anybit_ra", dict(path="ra")), ("anybit_rws_whole", dict(direct_rws=True, programs=tiles)),
                ("anybit_rws_sk", dict(direct_rws=True, programs=132))]
    if M <= 64 and N % 256 == 0:
        b4 = max(16, min(64, 1 << (M - 1).bit_length()))
        t4 = -(-M // b4) * N // 256
        out += [("anybit_rws4", dict(direct_rws=True, consumers=4, block_m=b4)),
                ("anybit_rws4_sk", dict(direct_rws=True, consumers=4, block_m=b4, programs=132))]
        if t4 <= 132:
            out.append(("anybit_rws4_whole", dict(direct_rws=True, consumers=4, block_m=b4, programs=t4)))
    if M == 256:
        out.append(("anybit_rws_bm128", dict(direct_rws=True, block_m=128)))
    for st in (8, 10, 12):  # deeper rings than the launcher's 6 (more bytes in flight per SM)
        if bm < 256 and st * (bm * 128 + 4096 + 1024 + 16) <= 227 * 1024:
            out.append((f"anybit_rws_st{st}", dict(direct_rws=True, stages=st)))
    if M >= 1024:
        out.append(("anybit_dequant", dict(path="dequant")))
    return out


def epi_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The consumers' turns (the kernel's PING) and the TMA-store epilogue of whole tiles (EPI): neither, EPI
    alone and both, at the launcher's configuration; where the tiles exceed one wave also at 128 programs
    (whole half tiles per program: a piece per program pair instead of two per program)."""
    out = [("anybit", {})]
    for ping, epi in ((False, False), (False, True), (True, True)):
        tag = ("_ping" if ping else "") + ("_epi" if epi else "")
        out.append((f"anybit_rws{tag or '_plain'}", dict(direct_rws=True, ping=ping, epi=epi)))
    bm = rws_config(M, N)[0]
    if -(-M // bm) * N // 128 > 132:
        for ping in (False, True):
            out.append((f"anybit_rws_p128{'_ping' if ping else ''}_epi",
                        dict(direct_rws=True, ping=ping, epi=True, programs=128)))
    return out


def duo_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """Stream-K tiles in two pieces added in registers by the second (the kernel's DUO) against both pieces
    stored and summed by the last (no DUO), at the launcher's configuration."""
    return [("anybit", {}), ("anybit_rws_duo", dict(direct_rws=True, duo=True)),
            ("anybit_rws_noduo", dict(direct_rws=True, duo=False))]


def programs_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The program count at the launcher's BLOCK_M: whole tiles with 1..8 tiles per program (where the tiles
    divide evenly and fit one wave), each tile in 2-4 equal parts (where they fit one wave), stream-K over
    132, 128 and 66 programs (pieces; DUO where ranges >= K tiles)."""
    bm = rws_config(M, N)[0]
    tiles = -(-M // bm) * N // 128
    counts = [tiles // k for k in range(1, 9) if tiles % k == 0 and tiles // k <= 132]
    counts += [k * tiles for k in (2, 3, 4) if k * tiles <= 132]  # equal parts: halves, thirds, quarters
    return [("anybit", {})] + [(f"anybit_rws_p{P}", dict(direct_rws=True, programs=P))
                               for P in sorted(set(counts + [132, 128, 66]), reverse=True)]


def dp_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """Whole-tile waves before the stream-K part (``dp_waves``): none (the launcher's default), every whole
    wave, all but one, at the launcher's configuration."""
    bm = rws_config(M, N)[0]
    tiles = -(-M // bm) * N // 128
    P = rws_programs(M, N, K, bm, 64, 132)
    out = [("anybit", {}), ("anybit_rws_dp0", dict(direct_rws=True, dp_waves=0))]
    for w in sorted({tiles // P, tiles // P - 1} - {0}, reverse=True):
        if tiles > P and w > 0:
            out.append((f"anybit_rws_dp{w}", dict(direct_rws=True, dp_waves=w)))
    return out


def tile_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """BLOCK_M 128 and 256 with 132 and 128 programs, two programs per tile (halves) and one (whole), where
    those fit one wave."""
    out = [("anybit", {})]
    for bm in (128, 256):
        tiles = -(-M // bm) * N // 128
        for P in sorted({132, 128} | {c for c in (2 * tiles, tiles) if c <= 132}, reverse=True):
            out.append((f"anybit_rws_bm{bm}_p{P}", dict(direct_rws=True, block_m=bm, programs=P)))
    return out


def even_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The launcher against its choice before session 32's equal parts (``rws_even_split``): BLOCK_M 128 where
    256 has < 3/4 of a wave of tiles, stream-K over min(132, tile-steps / 4) programs where not one wave."""
    bm = 64 if M <= 64 else 128 if M <= 128 else 256
    if bm == 256 and 4 * (-(-M // 256) * N // 128) < 3 * 132:
        bm = 128
    tiles = -(-M // bm) * N // 128
    P = tiles if 3 * 132 <= 4 * tiles <= 4 * 132 else max(1, min(132, tiles * (K // 64) // 4))
    return [("anybit", {}), ("anybit_rws", dict(direct_rws=True)),
            (f"anybit_rws_before_bm{bm}_p{P}", dict(direct_rws=True, block_m=bm, programs=P))]


def parts_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The launcher (whole waves, then one equal part of the tiles left per program, where such a program
    count exists) against s32-3's rule (132 programs, all whole waves but one, stream-K for the rest) and
    stream-K alone over the launcher's program count."""
    bm = rws_config(M, N)[0]
    tiles = -(-M // bm) * N // 128
    P = rws_programs(M, N, K, bm, 64, 132)
    keep1 = tiles // 132 - 1 if tiles // 132 > 1 else 0
    return [("anybit", {}),
            (f"anybit_rws_p132_dp{keep1}", dict(direct_rws=True, programs=132, dp_waves=keep1)),
            (f"anybit_rws_p{P}_dp0", dict(direct_rws=True, programs=P, dp_waves=0))]


def knob_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The launcher's configuration with one kernel option flipped: EPI off (a deeper ring at BLOCK_M 256),
    PING on, DUO off."""
    return [("anybit", {}), ("anybit_rws_noepi", dict(direct_rws=True, epi=False)),
            ("anybit_rws_ping", dict(direct_rws=True, ping=True)),
            ("anybit_rws_noduo", dict(direct_rws=True, duo=False))]


def bk_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """K per ring tile 64 (the launcher's) against 128, at the launcher's BLOCK_M (16 / 32 below M 33, where
    the launcher does not take this kernel for W4), and at M 256 also BLOCK_M 128."""
    bm = 16 if M <= 16 else 32 if M <= 32 else rws_config(M, N)[0]
    out = [("anybit", {})]
    for b in sorted({bm} | ({128} if M == 256 else set())):
        for bk in (64, 128):
            out.append((f"anybit_rws_bm{b}_bk{bk}", dict(direct_rws=True, block_m=b, block_k=bk)))
    return out


def pdl_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The launcher (a programmatic dependent launch where pdl.py enables it) against the same configuration
    launched plainly, and with 128-wide K tiles."""
    return [("anybit", {}), ("anybit_rws_nopdl", dict(direct_rws=True, pdl=False)),
            ("anybit_rws_pdl", dict(direct_rws=True, pdl=True)),
            ("anybit_rws_pdl_bk128", dict(direct_rws=True, pdl=True, block_k=128))]


def swap_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The launcher (DUO with fixed roles where every program's stream-K range is one half tile: ``rws_swap``)
    against DUO by arrival order at the same configuration."""
    return [("anybit", {}), ("anybit_rws_noswap", dict(direct_rws=True, swap=False)),
            ("anybit_rws_swap", dict(direct_rws=True, swap=True))]


def consumer_variants(N: int, K: int, M: int, bits: int = 4) -> list:
    """The launcher (two consumer warpgroups) against four (256 weight rows per tile, BLOCK_M 64), at the
    launcher's program count for that tile and over one program per SM."""
    return [("anybit", {}), ("anybit_rws_nc4", dict(direct_rws=True, consumers=4, block_m=64)),
            ("anybit_rws_nc4_p132", dict(direct_rws=True, consumers=4, block_m=64, programs=132))]


AB_NOTE = ("--ab rows (section 'ab'): each round times cuBLAS and every candidate once, back to back; "
           "time_us = median over rounds (time_min_us / time_max_us their range), speedup = median over "
           "rounds of the round's cuBLAS time / the candidate's time")


def ab(log, reps: int, ms: list[int], widths: tuple[int, ...] = (4,), variants=ab_variants,
       shapes=SHAPES) -> list[dict]:
    """Interleaved timing: for each case, every variant and cuBLAS once per round, ``reps`` rounds; the
    ratio to cuBLAS is taken within each round (next to each other in time), its median reported. In
    s20-1..3 the same configuration differed by up to 10% between sections of one run (drift), more than
    the differences between variants."""
    rows = []
    for bits, N, K, M in [(b, n, k, m) for b in widths for n, k in shapes for m in ms]:
        R = copies_for(N * K * 2)
        Ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(R)]
        pws = [random_packed(N, K, bits) for _ in range(copies_for(N * K * bits // 8))]
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        calls = {"cublas_bf16": [lambda x=xs[i % 8], w=w: F.linear(x, w) for i, w in enumerate(Ws)]}
        for name, kw in variants(N, K, M, bits):
            calls[name] = [lambda x=xs[i % 8], p=p, kw=kw: run_variant(x, p, kw) for i, p in enumerate(pws)]
        times = {name: [] for name in calls}
        for _ in range(reps):
            for name, cs in calls.items():
                try:
                    times[name].append(graph_time_us(cs))
                except Exception as e:  # noqa: BLE001
                    log(f"ab {N}x{K} M{M} {name}: {type(e).__name__}: {str(e)[:200]}")
                    times[name].append(float("nan"))
        base = times["cublas_bf16"]
        for name, ts in times.items():
            ratios = [b / t for b, t in zip(base, ts)]
            rows.append(dict(shape=f"{N}x{K}", M=M, method=name, bits=16 if name == "cublas_bf16" else bits,
                             time_us=statistics.median(ts), speedup=statistics.median(ratios),
                             time_min_us=min(ts), time_max_us=max(ts), section="ab"))
        log(f"ab W{bits} {N}x{K} M{M}: " + " ".join(f"{r['method'].replace('anybit_', '')} "
                                                     f"{r['time_us']:.1f}us "
                                             f"({r['speedup']:.2f}x)" for r in rows[-len(times):]))
        del Ws, pws
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=400.0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--name", default="quant_matmul_rws")
    ap.add_argument("--sweep-ms", default="64,256,1024")
    ap.add_argument("--ab", type=int, default=0, help="only the correctness check and the interleaved A/B, "
                    "this many rounds")
    ap.add_argument("--ab-ms", default="64,256,1024")
    ap.add_argument("--ab-bits", default="4", help="widths of the A/B, comma list (1..7)")
    ap.add_argument("--ab-shapes", default="", help="NxK comma list (default: the three layer shapes)")
    ap.add_argument("--ab-set", default="launcher",
                    choices=["launcher", "epi", "duo", "programs", "dp", "tiles", "even", "parts", "knobs",
                             "bk", "pdl", "swap", "consumers"],
                    help="the A/B's candidates: the launcher's (ab_variants), PING / EPI on and off "
                    "(epi_variants), DUO on and off (duo_variants), program counts (programs_variants), "
                    "whole-tile waves (dp_variants), BLOCK_M x programs (tile_variants) or the launcher "
                    "before equal parts (even_variants), whole waves + equal parts (parts_variants), one "
                    "option flipped (knob_variants), K 64 / 128 per ring tile (bk_variants), PDL on / off "
                    "(pdl_variants), DUO's fixed roles on / off (swap_variants) or four consumers "
                    "(consumer_variants)")
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
    configs = {}
    for N, K in SHAPES:
        for M in MS:
            bm, bk, st, regs = rws_config(M, N, sms)
            configs[f"{N}x{K} M{M}"] = dict(block_m=bm, stages=st, cons_regs=regs,
                                             programs=rws_programs(M, N, K, bm, bk, sms))

    def dump():
        write_result(args.name, "Warp-specialized register-A wgmma GEMM (M 17-1024; W4, and W1-7 by slices) "
                     "vs cuBLAS bf16, the launcher and the one-program register-A kernel, Llama-3-8B layer "
                     "shapes, group 128",
                     ["shape", "M", "method", "bits", "time_us"]
                     + (["time_min_us", "time_max_us"] if args.ab else ["tbps"]) + ["speedup"], rows,
                     ["time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB), "
                      "/ R; speedup = cuBLAS bf16 time / time; anybit = the launcher's choice, anybit_ra = "
                      "path='ra', anybit_rws = quant_gemm_rws with its launcher config (rws_config, "
                      "rws_programs: whole tiles or stream-K on every SM); anybit_rws_bm* = forced BLOCK_M, "
                      "_whole = one program per tile (no pieces), _sk = stream-K over 132 programs",
                      f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} checks passed (rel err < 1e-2 "
                      "vs the float32 dequantization, repeated call identical; rws == ra bits on whole "
                      "tiles)"] + ([AB_NOTE] if args.ab else []),
                     out_dir=args.out, correctness=corr, configs=configs, log=logs)

    if args.ab:
        rows += ab(log, args.ab, [int(m) for m in args.ab_ms.split(",")],
                   tuple(int(b) for b in args.ab_bits.split(",")),
                   dict(launcher=ab_variants, epi=epi_variants, duo=duo_variants,
                        programs=programs_variants, dp=dp_variants, tiles=tile_variants,
                        even=even_variants, parts=parts_variants, knobs=knob_variants,
                        bk=bk_variants, pdl=pdl_variants, swap=swap_variants,
                        consumers=consumer_variants)[args.ab_set],
                   [tuple(int(v) for v in sh.split("x")) for sh in args.ab_shapes.split(",")]
                   if args.ab_shapes else SHAPES)
        dump()
        return 0
    sweep_ms = [int(m) for m in args.sweep_ms.split(",")]
    shapes = SHAPES[:1] if args.quick else SHAPES
    plan = [((n, k), MS, main_variants) for n, k in shapes]
    plan += [] if args.quick else [((128256, 4096), [64, 256, 1024], main_variants)]
    plan += [((n, k), sweep_ms, sweep(n, k)) for n, k in shapes]
    for (N, K), ms, variants in plan:
        if time.time() - t0 > args.budget:
            log(f"budget reached: skipped {N}x{K} {variants.__name__}")
            continue
        rows += [dict(r, section=variants.__name__) for r in bench_shape(N, K, ms, [4], variants, log)]
        dump()
        log(f"after {N}x{K} {variants.__name__}: {time.time() - t0:.0f}s")
    dump()
    print(f"{'shape':>12} {'M':>5} {'cuBLAS':>8} {'auto':>6} {'ra':>6} {'rws':>6}  (x cuBLAS)")
    for shp, M in sorted({(r["shape"], r["M"]) for r in rows if r.get("section") == "main_variants"}):
        sel = {r["method"]: r for r in rows
               if (r["shape"], r["M"]) == (shp, M) and r.get("section") == "main_variants"}
        cells = [f"{sel[m]['speedup']:6.2f}" if m in sel else "     -"
                 for m in ("anybit", "anybit_ra", "anybit_rws")]
        print(f"{shp:>12} {M:>5} {sel['cublas_bf16']['time_us']:8.1f} " + " ".join(cells))
    best = {}
    for r in rows:
        if r.get("section", "").startswith("sweep") and r["method"].startswith("anybit_rws"):
            k = (r["shape"], r["M"])
            if k not in best or r["time_us"] < best[k]["time_us"]:
                best[k] = r
    for (shp, M), r in sorted(best.items()):
        print(f"sweep {shp} M{M}: best {r['method']} {r['time_us']:.1f} us ({r['speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
