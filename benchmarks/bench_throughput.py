"""Offline throughput: N requests with random input/output lengths, anybit vs transformers.

Usage (GPU): python benchmarks/bench_throughput.py --num-requests 1000 --hf-requests 128
Requests: input length uniform in [128, 1024], output length uniform in [64, 512] (fixed seed),
random token ids, EOS ignored. anybit gets all requests at once (continuous batching).
transformers gets ``--hf-requests`` of them (the first ones), in batches of ``--hf-batch`` with
left padding and max_new_tokens = the batch's largest output; only the requested tokens count.
Reported: output tokens/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anybit.llm import OFFLINE_MAX_NUM_BATCHED_TOKENS  # noqa: E402
from benchmarks.bench_e2e import PRESETS, make_folder, quant_config, sync  # noqa: E402
from benchmarks.common import print_table, write_result  # noqa: E402


def make_requests(n, vocab, seed, in_range, out_range):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        lin = int(torch.randint(in_range[0], in_range[1] + 1, (1,), generator=g))
        lout = int(torch.randint(out_range[0], out_range[1] + 1, (1,), generator=g))
        reqs.append((torch.randint(3, vocab, (lin,), generator=g).tolist(), lout))
    return reqs


WARMUP_MAX_TOKENS = 32


class StepProfile:
    """Device time of every step, from CUDA events recorded around ``ModelRunner.launch`` (no
    host sync added), grouped into decode-only steps and steps with prompt tokens."""

    def __init__(self, runner):
        self.steps = []  # (start event, end event, num seqs, num tokens, decode only)
        launch = runner.launch

        def timed(sched, prev=None):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step = launch(sched, prev)
            end.record()
            n_tok = sum(s.num_new_tokens for s in sched.seqs)
            self.steps.append((start, end, len(sched.seqs), n_tok, n_tok == len(sched.seqs)))
            return step

        runner.launch = timed

    def summary(self, wall_s: float) -> dict:
        """Seconds of device time by step kind, their counts and token totals; ``idle_s`` = wall
        minus the device time of all steps (host work the device waited for)."""
        torch.cuda.synchronize()
        out = {"decode_steps": 0, "decode_s": 0.0, "decode_seqs": 0, "mixed_steps": 0, "mixed_s": 0.0,
               "mixed_tokens": 0}
        for start, end, n_seq, n_tok, decode in self.steps:
            ms = start.elapsed_time(end)
            kind = "decode" if decode else "mixed"
            out[f"{kind}_steps"] += 1
            out[f"{kind}_s"] += ms / 1e3
            out["decode_seqs" if decode else "mixed_tokens"] += n_seq if decode else n_tok
        out["idle_s"] = wall_s - out["decode_s"] - out["mixed_s"]
        out["decode_mean_batch"] = out["decode_seqs"] / max(1, out["decode_steps"])
        out["mixed_tok_per_s"] = out["mixed_tokens"] / max(1e-9, out["mixed_s"])
        return out


def run_anybit(folder, reqs, dtype, device, backend, gpu, profile=False, warmup=(), passes=1, **kw):
    """Output tok/s, wall s and engine stats for ``reqs``, after a warm-up pass over ``warmup``
    (requests drawn like the workload, outputs capped at WARMUP_MAX_TOKENS): Triton compiles a
    kernel variant the first time it meets a new specialization (prompt lengths, split counts),
    ~10 s of the first pass on a fresh machine (H100 s17-4), which would otherwise be timed.
    ``passes`` > 1: the whole workload runs that many times and the last is timed."""
    from anybit import LLM, SamplingParams

    engine_kw = {"load_format": "dummy"} if gpu else {}
    llm = LLM(str(folder), dtype=dtype, device=device, attention_backend=backend, progress=False, **engine_kw,
              **kw)
    llm.generate([reqs[0][0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    if warmup:
        capped = [SamplingParams(temperature=0, max_tokens=min(o, WARMUP_MAX_TOKENS), ignore_eos=True)
                  for _, o in warmup]
        llm.generate([p for p, _ in warmup], capped)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    for last in [False] * (passes - 1) + [True]:  # only the last pass is timed
        if not llm.reset_prefix_cache():  # no hits on an earlier pass's prompts
            raise RuntimeError("requests left over from the warm-up")
        prof = StepProfile(llm.engine.runner) if profile and gpu and last else None
        sync()
        t = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs], params)
        sync()
        dt = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(o for _, o in reqs)
    stats = llm.engine.get_stats()
    if prof is not None:
        stats["profile"] = prof.summary(dt)
    del llm
    gc.collect()
    torch.cuda.empty_cache() if gpu else None
    return tokens / dt, dt, stats


def run_hf(folder, reqs, dtype, device, batch):
    import json

    import transformers

    cfg = transformers.LlamaConfig(**json.loads((Path(folder) / "config.json").read_text()))
    if any(Path(folder).glob("*.safetensors")):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        model = model.to(device)
    else:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.eval()
    useful = 0
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(reqs), batch):
            chunk = reqs[i:i + batch]
            width = max(len(p) for p, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, (p, _) in enumerate(chunk):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            max_new = max(o for _, o in chunk)
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                           min_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
            useful += sum(o for _, o in chunk)
    sync()
    dt = time.perf_counter() - t
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return useful / dt, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=list(PRESETS), default="llama3-8b")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--hf-requests", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--input", type=int, nargs=2, default=[128, 1024])
    ap.add_argument("--output", type=int, nargs=2, default=[64, 512])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="default: the offline API's (anybit.llm.OFFLINE_MAX_NUM_BATCHED_TOKENS)")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--passes", type=int, default=1, help="run the workload this many times, time the last")
    ap.add_argument("--warmup-requests", type=int, default=200,
                    help="untimed requests first (other seed, outputs capped at WARMUP_MAX_TOKENS)")
    ap.add_argument("--admit-batch", type=int, nargs="+", default=[0],
                    help="anybit runs, one per value of the scheduler's admit_batch (0: the engine's "
                    "default)")
    ap.add_argument("--quant-bits", type=int, default=None, help="quantize every Linear (random codes)")
    ap.add_argument("--lm-head-bits", type=int, default=None, help="lm_head width with --quant-bits")
    ap.add_argument("--profile", action="store_true", help="device time per step kind (CUDA events)")
    ap.add_argument("--hf-only-ratio", type=float, default=None,
                    help="skip transformers and divide by this earlier hf_out_tok_s instead")
    ap.add_argument("--name", default=None, help="result name (default e2e_throughput_gpu/cpu)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if gpu else ("cpu", "float32")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        quant = quant_config(args.preset, args.quant_bits, lm_head_bits=args.lm_head_bits) \
            if args.quant_bits else None
        make_folder(args.preset, folder, with_weights=not gpu, quant=quant)
        vocab = PRESETS[args.preset]["vocab_size"]
        reqs = make_requests(args.num_requests, vocab, 0, args.input, args.output)
        warmup = make_requests(args.warmup_requests, vocab, 1, args.input, args.output)
        rows = []
        budget = args.max_num_batched_tokens or OFFLINE_MAX_NUM_BATCHED_TOKENS
        for admit in args.admit_batch:
            tps, dt, stats = run_anybit(folder, reqs, dtype, device, args.backend, gpu,
                                        max_num_seqs=args.max_num_seqs,
                                        max_num_batched_tokens=budget,
                                        kv_cache_dtype=args.kv_cache_dtype, admit_batch=admit or None,
                                        profile=args.profile, warmup=warmup,
                                        passes=args.passes)
            row = {"preset": args.preset, "requests": args.num_requests, "weights":
                   f"W{args.quant_bits}" if args.quant_bits else dtype, "anybit_backend": args.backend,
                   "kv_cache_dtype": args.kv_cache_dtype,
                   "max_num_batched_tokens": budget,
                   "admit_batch": admit, "passes": args.passes, "anybit_out_tok_s": tps, "anybit_wall_s": dt,
                   "preemptions": stats["num_preemptions"], **stats.get("profile", {})}
            print(row, flush=True)
            rows.append(row)
        if args.hf_only_ratio:
            for row in rows:
                row.update({"hf_out_tok_s": args.hf_only_ratio,
                            "ratio_vs_hf": row["anybit_out_tok_s"] / args.hf_only_ratio})
        elif args.hf_requests:
            hf_tps, hf_dt = run_hf(folder, reqs[:args.hf_requests], dtype, device, args.hf_batch)
            for row in rows:
                row.update({"hf_requests": args.hf_requests, "hf_batch": args.hf_batch,
                            "hf_out_tok_s": hf_tps, "ratio_vs_hf": row["anybit_out_tok_s"] / hf_tps})
    cols = list(rows[-1])
    note = (f"inputs uniform {args.input}, outputs uniform {args.output} tokens, seed 0, random ids, EOS "
            "ignored; transformers runs a prefix of the requests in left-padded batches, counting only "
            f"requested tokens; anybit runs {args.warmup_requests} untimed warm-up requests first (seed 1, "
            f"outputs capped at {WARMUP_MAX_TOKENS})")
    if args.hf_only_ratio:
        note += "; hf_out_tok_s from an earlier run of this script on the same device (--hf-only-ratio)"
    name = args.name or f"e2e_throughput_{'gpu' if gpu else 'cpu'}"
    write_result(name, "Offline throughput (output tokens/s)", cols,
                 rows, [note], out_dir=args.out_dir)
    print_table(cols, rows)


if __name__ == "__main__":
    main()
