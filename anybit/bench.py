"""``anybit bench MODEL``: measure generation speed of a model on this machine.

Runs batches of random-token prompts (fixed seed, EOS ignored) through the engine and prints,
for each batch size: time to the first token of the whole batch, decode tokens/s (after every
request has its first token) and overall output tokens/s. ``--json`` prints the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=64, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(engine, prompts: list[list[int]], params, prefix: str) -> tuple[float, float]:
    """Run ``prompts`` to completion through ``engine`` (request ids ``prefix-i``). Returns (wall
    seconds of the whole run, seconds from the end of the step that gave every request its first
    token to the end). Raises if a request did not produce ``params.max_tokens`` tokens."""
    device = engine.runner.device
    ids = [f"{prefix}-{i}" for i in range(len(prompts))]
    _sync(device)
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    counts = dict.fromkeys(ids, 0)
    t_first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id in counts:
                counts[out.request_id] = len(out.outputs[0].token_ids)
        if t_first is None and all(counts.values()):
            _sync(device)
            t_first = time.perf_counter()
    _sync(device)
    t_end = time.perf_counter()
    if any(c != params.max_tokens for c in counts.values()):
        raise RuntimeError(f"bench: expected {params.max_tokens} tokens per request, got {counts}")
    return t_end - t0, t_end - t_first


def measure(engine, batch: int, prompt_len: int, gen: int, seed: int) -> dict:
    """One timed run of ``batch`` prompts of ``prompt_len`` random tokens, ``gen`` tokens each."""
    from anybit.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    vocab = engine.vocab_size
    prompts = torch.randint(min(3, vocab - 1), vocab, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    total, decode_s = timed_generation(engine, prompts, params, f"bench-{seed}")
    decode = batch * (gen - 1) / decode_s if gen > 1 and decode_s > 0 else float("nan")
    return {"batch": batch, "prompt_len": prompt_len, "gen": gen, "ttft_s": total - decode_s,
            "decode_tok_s": decode, "total_tok_s": batch * gen / total}


def run_bench(args, engine_config) -> int:
    from anybit.engine import LLMEngine

    if args.prompt_len < 1 or args.gen < 1:
        raise ValueError("--prompt-len and --gen: must be >= 1")
    if any(b < 1 for b in args.batch):
        raise ValueError("--batch: batch sizes must be >= 1")
    engine = LLMEngine(engine_config, progress=False)
    if args.prompt_len + args.gen > engine.max_model_len:
        raise ValueError(f"--prompt-len + --gen: {args.prompt_len + args.gen} exceeds max_model_len "
                         f"{engine.max_model_len}")
    measure(engine, 1, min(args.prompt_len, 8), 2, seed=-1)  # warm-up (compiles, captures graphs)
    device = engine.runner.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if not args.json:
        print(f"model {engine_config.model.model} on {name}, dtype {engine.runner.dtype}, "
              f"KV {engine.runner.kv_dtype}, attention {engine.runner.backend.name}")
        print(f"{'batch':>5} {'prompt':>6} {'gen':>5} {'ttft_s':>8} {'decode_tok_s':>13} {'total_tok_s':>12}")
    for batch in args.batch:
        runs = [measure(engine, batch, args.prompt_len, args.gen, seed=r) for r in range(args.repeats)]
        row = sorted(runs, key=lambda r: r["total_tok_s"])[len(runs) // 2]
        if args.json:
            print(json.dumps({**row, "device": name}))
        else:
            print(f"{row['batch']:>5} {row['prompt_len']:>6} {row['gen']:>5} {row['ttft_s']:>8.3f} "
                  f"{row['decode_tok_s']:>13.1f} {row['total_tok_s']:>12.1f}")
    return 0
