"""End-to-end greedy generation throughput: anybit vs transformers.generate, same random model.

Usage:
  python benchmarks/bench_e2e.py --preset tiny            # CPU: small random model
  python benchmarks/bench_e2e.py --preset llama3-8b       # GPU: Llama-3-8B-shaped random model, bf16

Both engines get the same prompts (random token ids, equal length, no padding) and generate
``--gen`` tokens each with EOS ignored. Reported: output tokens/s = batch * gen / wall time
(prefill included), and the ratio anybit / transformers.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_result  # noqa: E402

PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=384, max_position_embeddings=2048),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
}


def quant_config(preset: str, bits: int, group_size: int = 128, lm_head_bits: int | None = None,
                 fmt: str = "uniform") -> dict:
    """An anybit quantization_config for every Linear of the preset (lm_head at lm_head_bits; a codebook
    ``fmt`` applies to the body's layers, lm_head stays uniform)."""
    layers = PRESETS[preset]["num_hidden_layers"]
    spec = {"bits": bits, "group_size": group_size, "format": fmt}
    modules = {}
    for i in range(layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            modules[f"model.layers.{i}.{m}"] = spec
    if lm_head_bits:
        modules["lm_head"] = {**spec, "bits": lm_head_bits, "format": "uniform"}
    return {"quant_method": "anybit", "format_version": 1, **spec, "modules": modules}


def make_folder(preset: str, path: Path, with_weights: bool, quant: dict | None = None) -> None:
    from tests.model_factory import make_tokenizer

    make_tokenizer(path)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               torch_dtype="bfloat16")
    cfg.update(PRESETS[preset])
    if quant:
        cfg["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(cfg))
    if with_weights:
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        model.save_pretrained(str(path), safe_serialization=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def anybit_runner(folder, prompts, gen, dtype, device, backend, **engine_kw):
    """A callable that runs one timed generation and returns (wall time, decode-phase time:
    from the step that gave every request its first token to the end)."""
    from anybit import LLM, SamplingParams
    from anybit.bench import timed_generation

    llm = LLM(str(folder), dtype=dtype, device=device, attention_backend=backend, progress=False,
              max_num_seqs=max(8, len(prompts)), **engine_kw)
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    engine = llm.engine
    counter = iter(range(10**9))

    def run():
        return timed_generation(engine, prompts, params, f"bench{next(counter)}")

    return run


def transformers_runner(folder, prompts, gen, dtype, device):
    import transformers

    tdtype = getattr(torch, dtype)
    if any(Path(folder).glob("*.safetensors")):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=tdtype).to(device)
    else:
        cfg = transformers.LlamaConfig(**json.loads((Path(folder) / "config.json").read_text()))
        previous = torch.get_default_dtype()
        torch.set_default_dtype(tdtype)  # build in bf16 directly (an fp32 8B model is 32 GB)
        try:
            with torch.device(device):
                model = transformers.LlamaForCausalLM(cfg).to(tdtype)
        finally:
            torch.set_default_dtype(previous)
    model.eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)

    def run():
        with torch.no_grad():
            sync()
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, **kw)
            sync()
            assert out.shape[1] == len(prompts[0]) + gen
            return time.perf_counter() - t, None

    return run


def median(xs):
    return sorted(xs)[len(xs) // 2]


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="auto",
                    help="anybit attention backend(s) of the bf16 engine, comma separated ('': none)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--compare-sync", action="store_true",
                    help="also run every anybit engine with async scheduling off (rows *_sync_tok_s)")
    ap.add_argument("--quant-bits", type=int, nargs="*", default=[],
                    help="also run anybit with weights at these bit widths (GPU, random codes)")
    ap.add_argument("--lm-head-bits", type=int, default=None, help="quantize lm_head too (with --quant-bits)")
    ap.add_argument("--quant-format", nargs="+", default=["uniform"],
                    help="with --quant-bits: uniform, nf4, fp4, learned (one engine per format and width)")
    ap.add_argument("--group-size", type=int, default=128, help="with --quant-bits")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = "bfloat16" if gpu else "float32"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_folder(args.preset, folder, with_weights=not gpu)
        vocab = PRESETS[args.preset]["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        for batch in args.batch:
            prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).tolist()
            row = {"preset": args.preset, "batch": batch, "prompt_len": args.prompt_len, "gen": args.gen}
            # several engines live at once: each gets a fixed 4 GiB KV cache (enough for the batch)
            engine_kw = {"load_format": "dummy", "kv_cache_memory": 4 << 30} if gpu else {}
            if args.enforce_eager:
                engine_kw["enforce_eager"] = True
            # Every engine is built once and the timed repeats are interleaved round-robin, so a
            # change in machine load hits all of them alike (the CPU machines are shared).
            runners = {}
            for backend in [b for b in args.backend.split(",") if b]:  # "": quantized engines only
                runners[f"anybit_{backend}"] = anybit_runner(folder, prompts, args.gen, dtype, device,
                                                             backend, **engine_kw)
                if args.compare_sync:
                    runners[f"anybit_{backend}_sync"] = anybit_runner(
                        folder, prompts, args.gen, dtype, device, backend, async_scheduling=False,
                        **engine_kw)
            for bits, fmt in [(b, f) for b in args.quant_bits for f in args.quant_format]:
                tag = f"w{bits}" if fmt == "uniform" else f"{fmt}{bits}"
                qdir = folder / tag
                qdir.mkdir(exist_ok=True)
                group = 64 if fmt == "nf4" else args.group_size  # nf4's usual group (QLoRA's block of 64)
                make_folder(args.preset, qdir, with_weights=False,
                            quant=quant_config(args.preset, bits, group, args.lm_head_bits, fmt))
                runners[f"anybit_{tag}"] = anybit_runner(qdir, prompts, args.gen, dtype, device, "auto",
                                                         **engine_kw)
                if args.compare_sync:
                    runners[f"anybit_{tag}_sync"] = anybit_runner(
                        qdir, prompts, args.gen, dtype, device, "auto", async_scheduling=False, **engine_kw)
            if not args.skip_transformers:
                runners["transformers"] = transformers_runner(folder, prompts, args.gen, dtype, device)
            times = {name: [] for name in runners}
            for _ in range(args.repeats):
                for name, run in runners.items():
                    times[name].append(run())
            for name, ts in times.items():
                row[f"{name}_tok_s"] = batch * args.gen / median([t for t, _ in ts])
                if ts[0][1] is not None:
                    row[f"{name}_decode_tok_s"] = batch * (args.gen - 1) / median([d for _, d in ts])
            if "transformers" in runners:
                for name in runners:
                    if name != "transformers":
                        row[f"ratio_{name}_vs_hf"] = row[f"{name}_tok_s"] / row["transformers_tok_s"]
            del runners
            free_memory()
            rows.append(row)
            print(row, flush=True)
    columns = list(rows[0].keys())
    name = args.name or f"e2e_{args.preset}_{'gpu' if gpu else 'cpu'}"
    note = (f"output tokens/s = batch*gen/wall time (prefill of {args.prompt_len} tokens included), "
            "median of repeats; EOS ignored. decode_tok_s: batch*(gen-1) / time after every request "
            "has its first token (host work per step included)")
    path = write_result(name, f"Greedy generation, {args.preset} random model, {dtype}, {device}",
                        columns, rows, [note], out_dir=args.out_dir)
    print_table(columns, rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
