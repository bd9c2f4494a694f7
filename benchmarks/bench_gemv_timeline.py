"""Benchmark (diagnostic): where the time of back-to-back M = 1 quant GEMVs goes, from in-kernel timestamps.

The M = 1 matrix (bench_quant_matmul.py) times a CUDA graph of R calls over R weight copies. Our kernels
there take ~3-4 us per call more than a kernel that only reads the same bytes (bench_stream_floor.py, s22-3).
This script runs the mma.sync GEMV (quant_gemv_mma) the same way with its TS stamps on: every program writes
the global timer at entry, after the PDL wait, once x is in shared memory, after its K loop and after its
stores, plus its SM id. Per call (the graph's calls 1..R-1) the stamps are taken relative to the end of the
previous call's last program, so they say how long a call's programs wait, load x, loop and store, how many
start before the previous call has ended, and how long the last programs trail the median.

    python benchmarks/bench_gemv_timeline.py --out $OUT/gemv_timeline.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import anybit.kernels.quant_gemv_mma as mm  # noqa: E402
from anybit.kernels.quant_gemv_mma import mma_config, quant_gemv_mma  # noqa: E402
from benchmarks.bench_quant_matmul import graph_time_us, random_packed  # noqa: E402
from benchmarks.bench_stream_floor import packed_bytes  # noqa: E402

CASES = [(6144, 4096, 4), (14336, 4096, 4), (4096, 14336, 4), (6144, 4096, 3), (14336, 4096, 3),
         (6144, 4096, 5), (14336, 4096, 5), (6144, 4096, 6), (6144, 4096, 8)]
# s34-1 also ran max_registers=96 (the default grid) and x_whole=False on the W4 shapes and W2; s34-2 a
# variant that waited for the whole x slice in the first iteration, after its weight loads (slower, not kept)
VARIANTS = {"default": {}, "nopdl": {"pdl": False}}
# --set smem3: the whole-x buffer compiled for 32 tiles (64 KB of shared memory at BLOCK_M 8), so at most 3
# programs fit per SM and PDL cannot place 4 (s34-1: 1-4 per SM); for grids of <= 3 per SM (6144x4096)
SMEM3 = {"default": {}, "smem3": {"_x_whole_tiles": (32,)}}
SMEM3_CASES = [(6144, 4096, b) for b in (4, 3, 5, 6, 8)]
# s34-4 ran a variant with three tiles in flight (the kernel's PF3, removed: 152 registers at W4 BLOCK_M 8
# KS 8, 3 programs per SM; slower or level everywhere)
# --set half: half the programs (the K split inside a program halved, ks / 2), so two calls' grids fit the 4
# slots per SM at once and every program of the next call can start before the previous call ends (s34-1:
# calls of 384-512 programs on 528 slots, the rest start as the previous call's programs leave)
HALF = {"default": {}, "half": {"_ks_half": True}}
HALF_CASES = [(6144, 4096, 4), (6144, 4096, 2), (6144, 4096, 3), (6144, 4096, 5), (6144, 4096, 8),
              (14336, 4096, 4), (14336, 4096, 2), (4096, 14336, 4), (4096, 14336, 2)]
SETS = {"main": (CASES, VARIANTS), "smem3": (SMEM3_CASES, SMEM3), "half": (HALF_CASES, HALF)}
COPIES = 8
MAX_PROGRAMS = 8192
SLOTS = ("start", "waited", "x_ready", "loop_done", "end")


def call_summary(stamps: torch.Tensor) -> dict:
    """stamps ``[R, MAX_PROGRAMS, 8]`` int64 (0 where no program) -> medians over calls 1..R-1 of each
    phase, in us relative to the previous call's last ``end``."""
    per_call = []
    prev_end = None
    for c in range(stamps.shape[0]):
        rows = stamps[c][stamps[c, :, 0] > 0].double()
        if prev_end is not None:
            rel = (rows[:, :5] - prev_end) / 1e3
            q = {}
            for i, name in enumerate(SLOTS):
                col = rel[:, i].sort().values
                q[name] = (col[0].item(), col[len(col) // 2].item(), col[-1].item())
            sm = rows[:, 7].long()
            per_sm = torch.bincount(sm, minlength=int(sm.max()) + 1)
            per_call.append(dict(**last_programs(rel, per_sm[sm].double(), torch.arange(len(rows)).double()),
                programs=len(rows), period_us=q["end"][2], early=(rel[:, 0] < 0).float().mean().item(),
                per_sm_max=int(per_sm.max()), per_sm_min=int(per_sm[per_sm > 0].min()),
                wait_to_loop_us=statistics.median((rel[:, 3] - rel[:, 1]).tolist()),
                x_us=statistics.median((rel[:, 2] - rel[:, 1]).tolist()),
                loop_us=statistics.median((rel[:, 3] - rel[:, 2]).tolist()),
                store_us=statistics.median((rel[:, 4] - rel[:, 3]).tolist()),
                **{f"{n}_{k}": v for n, t in q.items() for k, v in zip(("min", "p50", "max"), t)}))
        prev_end = rows[:, 4].max()
    keys = per_call[0].keys()
    return {k: statistics.median(pc[k] for pc in per_call) for k in keys}


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation (0 where either is constant)."""
    a, b = a - a.mean(), b - b.mean()
    den = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / den) if den > 0 else 0.0


def last_programs(rel: torch.Tensor, sm_load: torch.Tensor, order: torch.Tensor) -> dict:
    """Who ends last: the correlation of each program's end with its start, with the programs on its SM and
    with its grid position, and, for the last tenth by end, the share that were in the last quarter by start
    and their mean SM load against everyone's (rel ``[programs, 5]`` us; sm_load, order ``[programs]``)."""
    end, start = rel[:, 4], rel[:, 0]
    n = max(1, len(end) // 10)
    last = end.argsort()[-n:]
    late = start >= start.quantile(0.75)
    return dict(corr_end_start=_corr(end, start), corr_end_smload=_corr(end, sm_load),
                corr_end_pid=_corr(end, order), last_late_start=late[last].float().mean().item(),
                last_smload=sm_load[last].mean().item(), mean_smload=sm_load.mean().item())


def timer_step_ns(stamps: torch.Tensor) -> float:
    """The smallest positive difference between sorted stamps (the timer's update step)."""
    v = stamps[..., :5][stamps[..., :5] > 0].sort().values
    d = v[1:] - v[:-1]
    return float(d[d > 0].min().item())


@contextlib.contextmanager
def patched(kw: dict, ks: int, split: int):
    """The launcher keywords of a variant: ``_x_whole_tiles`` replaces ``MMA_X_WHOLE_TILES`` inside the block,
    ``_ks_half`` becomes half the default K split inside a program (``ks``) at the default ``split``."""
    tiles = kw.get("_x_whole_tiles")
    saved = mm.MMA_X_WHOLE_TILES
    if tiles:
        mm.MMA_X_WHOLE_TILES = tiles
    try:
        yield {k: v for k, v in kw.items() if not k.startswith("_")} | (
            {"ks": ks // 2, "split_k": split} if kw.get("_ks_half") else {})
    finally:
        mm.MMA_X_WHOLE_TILES = saved


def stamped_row(shape: str, bits: int, name: str, kw: dict, pws, x, y, ref, mb: float, plain: list,
                log) -> dict | None:
    """One variant's stamped graph and its summary row (None where the variant does not apply)."""
    try:
        out = quant_gemv_mma(x, pws[0], torch.empty_like(y), **kw).float()
    except ValueError as e:
        log(f"{shape} W{bits} {name}: skipped ({e})")
        return None
    stamps = torch.zeros(COPIES, MAX_PROGRAMS, 8, dtype=torch.int64, device="cuda")
    timed = graph_time_us([lambda pw=pw, ts=stamps[i]: quant_gemv_mma(x, pw, y, timeline=ts, **kw)
                           for i, pw in enumerate(pws)])
    s = stamps.cpu()
    q = call_summary(s)
    phases = (f"start {q['start_p50']:+.2f}/{q['start_max']:+.2f} waited {q['waited_min']:+.2f}/"
              f"{q['waited_p50']:+.2f} x {q['x_us']:.2f} loop {q['loop_us']:.2f} [{q['loop_done_min']:+.2f} "
              f"{q['loop_done_p50']:+.2f} {q['loop_done_max']:+.2f}] end {q['end_p50']:+.2f}/"
              f"{q['end_max']:+.2f}")
    log(f"{shape} W{bits} {name:8s} t {min(plain):6.2f} ts {timed:6.2f} floor {mb / 2.68:5.2f} | "
        f"P {q['programs']} sm {q['per_sm_min']}-{q['per_sm_max']} early {q['early']:.2f} | {phases} | "
        f"corr end~start {q['corr_end_start']:+.2f} ~smload {q['corr_end_smload']:+.2f} ~pid "
        f"{q['corr_end_pid']:+.2f} last10%: late-start {q['last_late_start']:.2f} smload "
        f"{q['last_smload']:.2f}/{q['mean_smload']:.2f}")
    return dict(shape=shape, bits=bits, M=1, variant=name, MB=round(mb, 2), time_us=min(plain),
                time_runs_us=plain, time_ts_us=timed, floor_us=mb / 2.68,
                max_diff_vs_default=(out - ref).abs().max().item(), timer_step_ns=timer_step_ns(s), **q)


def run_case(N: int, K: int, bits: int, log, variants: dict) -> list[dict]:
    torch.manual_seed(0)
    pws = [random_packed(N, K, bits) for _ in range(COPIES)]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    ref = quant_gemv_mma(x, pws[0], torch.empty_like(y)).float()
    mb = packed_bytes(N, K, bits) / 1e6
    _, _, split, ks = mma_config(1, N, K, 128, torch.cuda.get_device_properties(0).multi_processor_count)
    rows = []
    plain = {name: [] for name in variants}
    for _ in range(2):  # interleaved: A B A B
        for name, kw0 in variants.items():
            with patched(kw0, ks, split) as kw:
                calls = [lambda pw=pw, kw=kw: quant_gemv_mma(x, pw, y, **kw) for pw in pws]
                plain[name].append(graph_time_us(calls))
    for name, kw0 in variants.items():
        with patched(kw0, ks, split) as kw:
            row = stamped_row(f"{N}x{K}", bits, name, kw, pws, x, y, ref, mb, plain[name], log)
        if row:
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gemv_timeline.json")
    ap.add_argument("--set", choices=sorted(SETS), default="main", help="cases and variants (SETS)")
    args = ap.parse_args()
    def log(msg):
        print(msg, flush=True)

    rows = []
    cases, variants = SETS[args.set]
    for N, K, bits in cases:
        rows += run_case(N, K, bits, log, variants)
    result = dict(
        benchmark="gemv_timeline", device=torch.cuda.get_device_name(),
        versions=dict(torch=torch.__version__, triton=__import__("triton").__version__),
        date=datetime.datetime.now(datetime.UTC).isoformat(),
        columns=list(rows[0].keys()), rows=rows,
        notes=["stamps relative to the previous call's last program end, us; medians over calls 1..R-1 of a "
               f"graph of R = {COPIES} calls (distinct weights); time_us: the plain graph (no stamps; the "
               "lower of two interleaved runs, both in time_runs_us), "
               "time_ts_us: with stamps; floor_us: bytes / 2.68 TB/s (s22-3's read floor)"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
