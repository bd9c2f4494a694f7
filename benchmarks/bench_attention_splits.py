"""Quantized decode in CUDA graphs at the short end of the issue-4 grid (b32/b64 x 4k-16k): the Gluon
kernel's split count forced up and down, and its split merge launched with PDL (``GL_REDUCE_PDL``),
against the shipped launcher and the bf16 cache in the same run; outputs checked against ref_.

    python benchmarks/bench_attention_splits.py      # JSON attention_decode_splits.json to $OUT or results/
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from anybit.kernels import attention_decode as ad  # noqa: E402
from anybit.kernels import attention_decode_gl as agl  # noqa: E402
from anybit.kernels.attention_decode import paged_attention_decode, ref_paged_attention_decode  # noqa: E402
from benchmarks import bench_attention as ba  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

CASES = [(32, 4096), (64, 4096), (32, 16384), (64, 16384)]
GRID = [(b, c) for b in (8, 32, 64) for c in (1000, 4096, 16384, 32768)]


def sweep_runs(dtype: str) -> list:
    """(name, launcher keywords, GL_REDUCE_PDL, GL_WAVE_FILL): the Gluon split count and PDL merge."""
    runs = [("shipped", {}, False, 1.0)]
    if dtype != "bfloat16":
        runs += [("gl", dict(gl=True), False, 1.0), ("gl_pdl", dict(gl=True), True, 1.0)]
        runs += [(f"gl_s{s}", dict(gl=True, num_splits=s), False, 1.0) for s in (4, 6, 12, 16)]
        runs += [(f"gl_s{s}_pdl", dict(gl=True, num_splits=s), True, 1.0) for s in (4, 6)]
    return runs


def grid_runs(dtype: str) -> list:
    """The session-14 rule (all resident slots, no PDL) against half the slots with the PDL merge,
    for the launcher's choice and the Gluon kernel forced."""
    runs = [("default_old", {}, False, 1.0), ("default_new", {}, True, 0.5)]
    if dtype != "bfloat16":
        runs += [("gl_old", dict(gl=True), False, 1.0), ("gl_new", dict(gl=True), True, 0.5)]
    return runs


def fill_runs(dtype: str) -> list:
    """The Gluon kernel with its splits filling 0.5 / 0.35 / 0.25 of the resident slots (PDL merge)."""
    if dtype == "bfloat16":
        return [("default", {}, True, 0.5)]
    return [(f"gl_fill{f}", dict(gl=True), True, f) for f in (0.5, 0.35, 0.25)]


def stage_runs(dtype: str) -> list:
    """The Gluon kernel's TMA ring at 3 (shipped) to 6 slots, the split count held at the shipped rule's
    (with half the resident programs per SM, each program streams twice as long: s14-9's 4-slot test
    ran at 16 programs per SM)."""
    if dtype == "bfloat16":
        return [("default", {}, True, 0.5)]
    return [(f"gl_stages{n}", dict(gl=True, stages=n), True, 0.5) for n in ((3, 4, 5, 6) if dtype == "int4"
                                                                            else (3, 4, 5))]


def pair_runs(dtype: str) -> list:
    """The Gluon kernel with one chunk per iteration (3 slots, shipped before session 18) against two
    chunks per iteration (``GL_PAIR``) with 4 and 6 ring slots, the split count held at the shipped rule's."""
    if dtype == "bfloat16":
        return [("default", {}, True, 0.5)]
    return [("gl_single", dict(gl=True, pair=False, stages=3), True, 0.5),
            ("gl_pair4", dict(gl=True, pair=True, stages=4), True, 0.5),
            ("gl_pair6", dict(gl=True, pair=True, stages=6), True, 0.5)]


FIXED_CASES = [(32, 16), (32, 256), (32, 1000), (32, 4096), (8, 4096), (64, 4096)]


def fixed_runs(dtype: str) -> list:
    """The per-call cost: the shipped split rule against one split (no partials, no merge kernel), at
    short and 4k contexts. (s18-2 also timed the query converted after the prologue's copies: level,
    not kept.)"""
    if dtype == "bfloat16":
        return [("default", {}, True, 0.5), ("s1", dict(num_splits=1), True, 0.5)]
    return [("gl", dict(gl=True), True, 0.5), ("gl_s1", dict(gl=True, num_splits=1), True, 0.5)]


def empty_graph_us() -> float:
    """Two one-element kernels per call (the decode and its merge) in the same CUDA-graph timing: the
    floor of a call's launches."""
    x = torch.zeros(1, device="cuda")
    return ba.graph_time_us(lambda: (x.add_(1.0), x.mul_(1.0)))


def split_runs(dtype: str) -> list:
    """The shipped kernel (two chunks per iteration, float16 scales; s18) at 2-8 splits against the shipped
    rule (PDL merge on)."""
    if dtype == "bfloat16":
        return [("default", {}, True, 0.5)]
    return [("gl", dict(gl=True), True, 0.5)] + [(f"gl_s{n}", dict(gl=True, num_splits=n), True, 0.5)
                                                 for n in (2, 3, 4, 6, 8)]


MERGE_CASES = [(32, 16), (32, 1000), (32, 4096), (64, 4096), (8, 4096), (16, 4096), (32, 16384), (64, 16384)]


def merge_runs(dtype: str) -> list:
    """The Gluon kernel's splits merged by the merge kernel (PDL) against in-kernel by the last split
    (``GL_MERGE``), and one split (no merge at all), at the shipped split rule."""
    if dtype == "bfloat16":
        return [("default", {}, True, 0.5)]
    return [("gl", dict(gl=True, merge=False), True, 0.5), ("gl_merge", dict(gl=True, merge=True), True, 0.5),
            ("gl_s1", dict(gl=True, num_splits=1), True, 0.5)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", action="store_true", help="the old vs new split rule on b8/32/64 x 1k-32k")
    ap.add_argument("--fills", action="store_true", help="GL_WAVE_FILL 0.5 / 0.35 / 0.25, b8/32/64 x 1k-32k")
    ap.add_argument("--stages", action="store_true", help="GL_STAGES 3-6 at the shipped split count")
    ap.add_argument("--pair", action="store_true", help="one vs two chunks per iteration, b8/32/64 x 1k-32k")
    ap.add_argument("--fixed", action="store_true", help="per-call cost: query order, one split")
    ap.add_argument("--splits", action="store_true", help="2-8 splits on b32/b64 x 4k/16k (s18 kernel)")
    ap.add_argument("--merge", action="store_true", help="merge kernel vs in-kernel merge (GL_MERGE)")
    ap.add_argument("--pair-large", action="store_true",
                    help="--pair at b128/b192, pairs forced past gl_pair_fits")
    args = ap.parse_args()
    cases, runs_of = (CASES, sweep_runs)
    if args.grid or args.fills or args.stages or args.pair:
        cases, runs_of = GRID, (grid_runs if args.grid else fill_runs if args.fills else stage_runs
                                if args.stages else pair_runs)
    if args.splits:
        runs_of = split_runs
    if args.pair_large:  # the A/B itself: pairs wherever GL_PAIR says, resident or not
        cases, runs_of = [(128, 4096), (192, 1000), (192, 4096)], pair_runs
        agl.gl_pair_fits = lambda mode, *_: agl.gl_pair(mode)
    if args.merge:
        cases, runs_of = MERGE_CASES, merge_runs
    if args.fixed or args.merge:
        if args.fixed:
            cases, runs_of = FIXED_CASES, fixed_runs
        print(f"empty graph call (2 one-element kernels): {empty_graph_us():.2f} us", flush=True)
    rows = []
    defaults = ad.GL_REDUCE_PDL, ad.GL_WAVE_FILL
    stage_defaults = dict(agl.GL_STAGES)
    pair_defaults, pair_stage_defaults = dict(agl.GL_PAIR), dict(agl.GL_PAIR_STAGES)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, ctx in cases:
        sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, ba.NH, ba.D, device="cuda", dtype=torch.bfloat16)
        t_bf16 = None
        for dtype in ("bfloat16", "int4", "int8"):
            cache, table = ba.paged_batch([ctx] * batch, dtype)
            ref = ref_paged_attention_decode(q[:1], cache, sl[:1], table[:1], ba.D ** -0.5, None, ctx)
            nbytes = batch * ctx * ba.NKV * 2 * ba.kv_bytes_per_token_head(dtype) + 2 * q.numel() * 2
            for name, kw, pdl, fill in runs_of(dtype):
                ad.GL_REDUCE_PDL, ad.GL_WAVE_FILL = pdl, fill
                kw = dict(kw)
                merge = kw.pop("merge", None)
                if merge is None:
                    os.environ.pop("ANYBIT_GL_MERGE", None)
                else:  # forced either way, whatever the split count
                    os.environ["ANYBIT_GL_MERGE"] = str(int(merge))
                stages = kw.pop("stages", None)
                pair = kw.pop("pair", None)
                agl.GL_STAGES.update(stage_defaults)
                agl.GL_PAIR.update(pair_defaults)
                agl.GL_PAIR_STAGES.update(pair_stage_defaults)
                if stages:  # hold the split count at the shipped rule's, then change the ring
                    mode = 1 if dtype == "int8" else 2
                    cap = int(agl.gl_programs_per_sm(mode, ba.D) * fill) * sms
                    kw["num_splits"] = ad.choose_splits(batch * ba.NKV, max(ctx, 8192), cap)
                    if pair is not None:
                        agl.GL_PAIR[mode] = pair
                    (agl.GL_PAIR_STAGES if pair else agl.GL_STAGES)[mode] = stages
                fn = functools.partial(paged_attention_decode, q, cache, sl, table, ba.D ** -0.5, None,
                                       max(ctx, 8192), **kw)
                err = ba.rel(fn()[:1], ref)
                t = ba.graph_time_us(fn)
                t_bf16 = t if dtype == "bfloat16" and t_bf16 is None else t_bf16
                rows.append({"batch": batch, "context": ctx, "kv_dtype": dtype, "variant": name, "time_us": t,
                             "tb_per_s": nbytes / t / 1e6, "speedup_vs_bf16": t_bf16 / t, "rel_err": err})
                print(f"b{batch} ctx{ctx} {dtype:9s} {name:12s} {t:8.1f} us {nbytes / t / 1e6:5.2f} TB/s "
                      f"x{t_bf16 / t:.2f} err {err:.1e}", flush=True)
            ad.GL_REDUCE_PDL, ad.GL_WAVE_FILL = defaults
            os.environ.pop("ANYBIT_GL_MERGE", None)
            agl.GL_STAGES.update(stage_defaults)
            agl.GL_PAIR.update(pair_defaults)
            agl.GL_PAIR_STAGES.update(pair_stage_defaults)
            cache = table = None
            torch.cuda.empty_cache()
    cols = ["batch", "context", "kv_dtype", "variant", "time_us", "tb_per_s", "speedup_vs_bf16", "rel_err"]
    name = "attention_decode_splits" + ("_grid" if args.grid else "_fills" if args.fills else
                                        "_stages" if args.stages else "_pair" if args.pair else
                                        "_fixed" if args.fixed else "_count" if args.splits else
                                        "_pair_large" if args.pair_large else "_merge" if args.merge else "")
    write_result(name, "Quantized decode in CUDA graphs: Gluon split count and PDL "
                 "merge vs the shipped launcher and bf16, 32 q / 8 kv heads, d128", cols, rows,
                 ["time: CUDA graph of 20 calls, median of 15 replays / 20; max_seq_len = max(context, 8192) "
                  "as in the engine's graphs; shipped = paged_attention_decode defaults; gl = the Gluon "
                  "kernel forced; _s<n> = n splits forced; _pdl = the split merge launched with PDL "
                  "(GL_REDUCE_PDL); shipped = the session-14 rule (splits fill every resident slot, no PDL); "
                  "--grid: _old = that rule, _new = half the slots (GL_WAVE_FILL 0.5) with the PDL merge; "
                  "--stages: gl_stages<n> = a ring of n slots, the split count of the shipped rule; "
                  "--fills: gl_fill<f> = GL_WAVE_FILL f with the PDL merge; "
                  "--pair: gl_single = one chunk per iteration (3 slots), gl_pair<n> = two chunks per "
                  "iteration (GL_PAIR) with n slots, split count of the shipped rule; "
                  "--splits: gl_s<n> = n splits forced, gl = the shipped rule; "
                  "--merge: gl_merge = the last split of each (sequence, kv head) merges (GL_MERGE), gl = "
                  "the merge kernel with PDL, gl_s1 = one split; "
                  "--fixed: _s1 = one split (no partials, no merge kernel); s18-2's gl_lateq0 / gl_lateq1 = "
                  "the query converted before / after the prologue's copies (not kept); "
                  "speedup_vs_bf16 against the case's first bf16 row; rel_err: first sequence vs ref_"],
                 out_dir=os.environ.get("OUT"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
