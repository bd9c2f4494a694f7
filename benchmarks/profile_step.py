"""Where does a decode step's time go? (GPU; Llama-3-8B-shaped dummy weights)

For each batch size: wall time of engine.step() in steady decode, the pure GPU time of the
captured decode graph (replayed back to back), and the host phases of a step timed with a
synchronize at each boundary (schedule, input build + replay launch, logits + sampling +
transfer, scheduler update, detokenize / outputs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_e2e import make_folder, quant_config  # noqa: E402
from benchmarks.common import print_table, write_result  # noqa: E402


def timed(fn, acc: dict, key: str):
    def wrapper(*a, **kw):
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn(*a, **kw)
        torch.cuda.synchronize()
        acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
        return r
    return wrapper


def kernel_table(graph, steps: int, top: int = 14) -> list[dict]:
    """GPU time per decode step by kernel name (torch.profiler over graph replays)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    per: dict[str, list] = {}
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in events:
        d = per.setdefault(e.name, [0, 0.0])
        d[0] += 1
        d[1] += e.device_time
    rows = [{"kernel": k[:60], "calls_per_step": c / steps, "us_per_step": t / steps}
            for k, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]]
    total = sum(t for _, t in per.values()) / steps
    print(f"GPU kernel time per step: {total:.1f} us", flush=True)
    print_table(["kernel", "calls_per_step", "us_per_step"], rows)
    return [{"total_us_per_step": total}] + rows + layer_timeline(events, steps)


def layer_timeline(events, steps: int, layers: int = 32) -> list[dict]:
    """The kernels of one decoder layer in launch order, each with its GPU time and the idle gap
    before it (start minus the previous kernel's end; negative = overlap, e.g. PDL), as medians
    over the layers of the middle replayed step."""
    events = sorted(events, key=lambda e: e.time_range.start)
    per_step = len(events) // steps
    step = events[per_step * (steps // 2):per_step * (steps // 2 + 1)]
    per_layer = per_step // layers
    extra = per_step - per_layer * layers  # embedding, final norm: assumed at the ends
    body = step[extra // 2: extra // 2 + per_layer * layers]
    rows = []
    for i in range(per_layer):
        durs, gaps = [], []
        for j in range(layers):
            k = j * per_layer + i
            e = body[k]
            durs.append(e.time_range.end - e.time_range.start)
            if k > 0:
                gaps.append(e.time_range.start - body[k - 1].time_range.end)
        durs.sort()
        gaps.sort()
        rows.append({"kernel": f"layer[{i}] {body[i].name[:50]}", "calls_per_step": layers,
                     "us_per_step": durs[len(durs) // 2] * layers, "median_us": durs[len(durs) // 2],
                     "median_gap_before_us": gaps[len(gaps) // 2] if gaps else 0.0})
    span = step[-1].time_range.end - step[0].time_range.start
    print(f"one step: {len(step)} kernels, first start to last end {span:.1f} us; one layer:", flush=True)
    print_table(["kernel", "median_us", "median_gap_before_us"], rows)
    return [{"kernel": "step_span", "us_per_step": span}] + rows


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:ENV=V,ENV2=W`` (``NAME:`` = the environment as it is) -> (name, {ENV: V, ...}). The
    pseudo-variable ``GRAPH=short`` / ``GRAPH=full`` picks the runner's one-split short-context graph
    or the full one (default: the one the profiled steps replayed)."""
    name, _, spec = text.partition(":")
    env = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    return name, env


def variant_graphs(gr, key: tuple[int, bool], variants: list[str], steps: int, rounds: int = 5,
                   kernels: bool = False) -> list[dict]:
    """The decode graph of bucket b captured once per environment variant (kernels read their
    switches at launch, i.e. at capture), replayed in interleaved rounds; median GPU ms per step
    and whether its logits equal the first variant's bit for bit."""
    graphs, outs, envs = {}, {}, {}
    for text in variants:
        name, env = parse_variant(text)
        envs[name] = dict(env)
        short = env.pop("GRAPH", "short" if key[1] else "full") == "short"
        with mock.patch.dict(os.environ, env), torch.inference_mode():
            for _ in range(2):
                gr._forward(key[0], short)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=gr.pool):
                outs[name] = gr._forward(key[0], short)
        graphs[name] = graph
    times: dict[str, list] = {n: [] for n in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for name, graph in graphs.items():
            start.record()
            for _ in range(steps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / steps)
    first = next(iter(graphs))
    graphs[first].replay()
    ref = outs[first].clone()  # the graphs share one memory pool: a later replay may overwrite it
    rows = []
    for name, graph in graphs.items():
        graph.replay()
        same = bool(torch.equal(outs[name], ref))
        ts = sorted(times[name])
        row = {"variant": name, "env": envs[name], "graph_gpu_ms": ts[len(ts) // 2], "min_ms": ts[0],
               "max_ms": ts[-1], "same_logits": same}
        if kernels:
            print(f"variant {name}:", flush=True)
            row["kernels"] = kernel_table(graph, steps)
        rows.append(row)
    base = rows[0]["graph_gpu_ms"]
    for row in rows:
        row["speedup_vs_first"] = base / row["graph_gpu_ms"]
    return rows


def profile(folder: Path, batch: int, steps: int, kernels: bool = False, variants: list[str] = ()) -> dict:
    from anybit import LLM, SamplingParams

    llm = LLM(str(folder), load_format="dummy", progress=False, max_num_seqs=max(batch, 8))
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=3 * steps + 20, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"p{i}", list(range(10, 138)), params)
    for _ in range(5):
        eng.step()
    # 1. wall time of plain steps
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    # 2. pure GPU time of the graph
    gr = eng.runner.graph_runner
    key = gr.last_key  # (bucket, short-context graph) of the steps above
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        gr.graphs[key].replay()
    end.record()
    torch.cuda.synchronize()
    graph_ms = start.elapsed_time(end) / steps
    # 3. phases with syncs at the boundaries
    acc: dict[str, float] = {}
    runner, sched = eng.runner, eng.scheduler
    sched.schedule = timed(sched.schedule, acc, "schedule")
    gr.run = timed(gr.run, acc, "inputs+replay")
    runner.model.compute_logits = timed(runner.model.compute_logits, acc, "lm_head")
    runner.sampler = timed(runner.sampler, acc, "sampler")
    sched.update_from_output = timed(sched.update_from_output, acc, "update")
    eng._apply = timed(eng._apply, acc, "detok+outputs")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    synced = (time.perf_counter() - t) / steps
    row = {"batch": batch, "step_wall_ms": wall * 1e3, "graph_gpu_ms": graph_ms,
           "host_overhead_ms": wall * 1e3 - graph_ms, "synced_step_ms": synced * 1e3}
    for k, v in acc.items():
        row[f"{k}_ms"] = v / steps * 1e3
    row["graph"] = "short" if key[1] else "full"
    if kernels:
        row["kernels"] = kernel_table(gr.graphs[key], steps)
    if variants:
        row["variants"] = variant_graphs(gr, key, variants, steps, kernels=kernels)
        print_table(["variant", "graph_gpu_ms", "min_ms", "max_ms", "speedup_vs_first", "same_logits"],
                    row["variants"])
    del llm, eng
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--quant-bits", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--kernels", action="store_true", help="per-kernel GPU time table")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="NAME:ENV=V,... decode graphs captured under these environments, timed interleaved")
    ap.add_argument("--name", default=None, help="result file name (default e2e_step_profile_<weights>)")
    ap.add_argument("--title", default=None, help="result title prefix")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        quant = quant_config("llama3-8b", args.quant_bits, lm_head_bits=8) if args.quant_bits else None
        make_folder("llama3-8b", folder, with_weights=False, quant=quant)
        for b in args.batch:
            row = profile(folder, b, args.steps, args.kernels, args.variants)
            row["weights"] = f"w{args.quant_bits}" if args.quant_bits else "bf16"
            rows.append(row)
            print(row, flush=True)
    cols = ["weights"] + [c for c in rows[0] if c not in ("weights", "kernels", "variants")]
    name = args.name or "e2e_step_profile_" + (f"w{args.quant_bits}" if args.quant_bits else "bf16")
    title = "Decode step breakdown (Llama-3-8B shape, triton + CUDA graphs)"
    write_result(name, f"{args.title}: {title}" if args.title else title, cols, rows,
                 ["step_wall_ms: engine.step() in steady decode; graph_gpu_ms: the captured decode graph "
                  "replayed back to back (GPU only); phases timed with a synchronize at each boundary"],
                 out_dir=args.out_dir)
    print_table(cols, rows)


if __name__ == "__main__":
    main()
