"""Where does a mixed step's time go in offline serving? (GPU; Llama-3-8B-shaped dummy weights)

Runs bench_throughput's workload (random prompts of 128-1024 tokens, outputs of 64-512) through
``LLMEngine.step()`` and, once ``--warm-steps`` steps have run, looks at the steps that carry
prompt tokens ("mixed": decodes + prefill chunks, run eagerly) and at decode-only steps (CUDA
graphs). Each looked-at step alternates between two measurements:
- synchronized wall time of ``ModelRunner.launch`` + the device work it queued, the host time
  until ``launch`` returned (close to the wall: the device waited for the host), and the host
  time of ``prepare`` (the input build) inside it;
- the same step under ``torch.profiler`` (CUDA activity): device time per kernel name.
Reported per step kind: mean wall, mean kernel time (sum of kernel durations), mean prepare
time, tokens, and the top kernels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_e2e import PRESETS, make_folder, quant_config  # noqa: E402
from benchmarks.bench_throughput import make_requests  # noqa: E402
from benchmarks.common import print_table, write_result  # noqa: E402


def kernel_times(fn) -> tuple[object, dict[str, list]]:
    """Run ``fn()`` under torch.profiler; (its result, {kernel name: [calls, device us]})."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        result = fn()
        torch.cuda.synchronize()
    per: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA or not gpu:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time
    return result, per


class MixedStepProbe:
    """Wraps ``runner.launch`` and ``runner.prepare``; see the module docstring."""

    def __init__(self, runner, max_per_kind: int):
        self.runner, self.max_per_kind = runner, max_per_kind
        self.active = False
        self.walls = defaultdict(list)  # kind -> [synchronized wall s]
        self.prepares = defaultdict(list)
        self.tokens = defaultdict(list)  # kind -> [(decodes, prompt tokens)] of timed steps
        self.host = defaultdict(list)  # kind -> [host seconds until launch returned]
        self.profiled_tokens = defaultdict(list)  # kind -> [(decodes, prompt tokens)] of profiled steps
        self.kernels = {k: defaultdict(lambda: [0, 0.0]) for k in ("mixed", "decode")}
        self.profiled = defaultdict(int)
        self._prepare_s = 0.0
        launch, prepare = runner.launch, runner.prepare

        def timed_prepare(seqs):
            t = time.perf_counter()
            out = prepare(seqs)
            self._prepare_s += time.perf_counter() - t
            return out

        def probe(sched, prev=None):
            kind = "decode" if all(s.num_new_tokens == 1 for s in sched.seqs) else "mixed"
            seen = len(self.walls[kind]) + self.profiled[kind]
            if not self.active or seen >= 2 * self.max_per_kind:
                return launch(sched, prev)
            torch.cuda.synchronize()
            decodes = sum(s.num_new_tokens == 1 for s in sched.seqs)
            prompt = sum(s.num_new_tokens for s in sched.seqs if s.num_new_tokens != 1)
            if seen % 2:
                self.profiled_tokens[kind].append((decodes, prompt))
                step, per = kernel_times(lambda: launch(sched, prev))
                for name, (calls, us) in per.items():
                    acc = self.kernels[kind][name]
                    acc[0] += calls
                    acc[1] += us
                self.profiled[kind] += 1
                return step
            self._prepare_s = 0.0
            t = time.perf_counter()
            step = launch(sched, prev)
            self.host[kind].append(time.perf_counter() - t)
            torch.cuda.synchronize()
            self.walls[kind].append(time.perf_counter() - t)
            self.prepares[kind].append(self._prepare_s)
            self.tokens[kind].append((decodes, prompt))
            return step

        runner.launch, runner.prepare = probe, timed_prepare

    def summary(self, kind: str, top: int) -> tuple[dict, list[dict]]:
        n = len(self.walls[kind])
        p = max(1, self.profiled[kind])
        if not n:
            return {"kind": kind, "steps": 0}, []
        kern = self.kernels[kind]
        total_us = sum(us for _, us in kern.values()) / p
        row = {"kind": kind, "steps": n, "profiled_steps": self.profiled[kind],
               "mean_decodes": sum(d for d, _ in self.tokens[kind]) / n,
               "mean_prompt_tokens": sum(t for _, t in self.tokens[kind]) / n,
               "wall_ms": 1e3 * sum(self.walls[kind]) / n, "host_launch_ms": 1e3 * sum(self.host[kind]) / n,
               "prepare_ms": 1e3 * sum(self.prepares[kind]) / n,
               "profiled_decodes": sum(d for d, _ in self.profiled_tokens[kind]) / p,
               "profiled_prompt_tokens": sum(t for _, t in self.profiled_tokens[kind]) / p,
               "kernel_ms": total_us / 1e3}
        rows = [{"kind": kind, "kernel": name[:70], "calls_per_step": c / p, "ms_per_step": us / p / 1e3,
                 "share": us / p / max(total_us, 1e-9)}
                for name, (c, us) in sorted(kern.items(), key=lambda kv: -kv[1][1])[:top]]
        return row, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b", help="tiny: a CPU smoke run of this script")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--warm-steps", type=int, default=120)
    ap.add_argument("--steps-per-kind", type=int, default=6, help="timed and profiled steps of each kind")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--quant-bits", type=int, default=None)
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--name", default="profile_mixed")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    from anybit import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bits = args.quant_bits
        quant = quant_config(args.preset, bits, lm_head_bits=bits) if bits else None
        gpu = torch.cuda.is_available()
        make_folder(args.preset, folder, with_weights=not gpu, quant=quant)
        if not gpu:
            torch.cuda.synchronize = lambda: None
        llm = LLM(str(folder), dtype="bfloat16" if gpu else "float32", device="cuda" if gpu else "cpu",
                  progress=False, **({"load_format": "dummy"} if gpu else {}),
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_dtype=args.kv_cache_dtype)
        engine = llm.engine
        probe = MixedStepProbe(engine.runner, args.steps_per_kind)
        vocab = PRESETS[args.preset]["vocab_size"]
        reqs = make_requests(args.num_requests, vocab, 0, *(((16, 64), (8, 32)) if args.preset == "tiny"
                                                          else ((128, 1024), (64, 512))))
        for i, (prompt, out_len) in enumerate(reqs):
            params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
            engine.add_request(str(i), prompt, params)
        steps = 0
        while engine.has_unfinished_requests():
            probe.active = steps >= args.warm_steps
            engine.step()
            steps += 1
            done = all(len(probe.walls[k]) + probe.profiled[k] >= 2 * args.steps_per_kind
                       for k in ("mixed", "decode"))
            if probe.active and done:
                break
    rows, kernels = [], []
    for kind in ("mixed", "decode"):
        row, top = probe.summary(kind, args.top)
        rows.append(row)
        kernels += top
    cols = ["kind", "steps", "mean_decodes", "mean_prompt_tokens", "wall_ms", "host_launch_ms", "prepare_ms",
            "profiled_steps", "profiled_decodes", "profiled_prompt_tokens", "kernel_ms"]
    kcols = ["kind", "kernel", "calls_per_step", "ms_per_step", "share"]
    note = (f"{args.preset} dummy weights ({f'W{args.quant_bits}' if args.quant_bits else 'bf16'}), "
            f"kv {args.kv_cache_dtype}, max_num_batched_tokens {args.max_num_batched_tokens}, max_num_seqs "
            f"{args.max_num_seqs}; steps looked at after {args.warm_steps} warm steps")
    write_result(args.name, "Mixed and decode steps of the offline workload", cols, rows, [note],
                 out_dir=args.out_dir, kernels=kernels)
    print_table(kcols, kernels)
    print_table(cols, rows)


if __name__ == "__main__":
    main()
