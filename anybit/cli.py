"""``anybit`` command line: generate | serve | chat | quantize | bench.

MODEL is a local Hugging Face-style folder; when it is left out, the built-in default model
shipped with the package is used.
"""

from __future__ import annotations

import argparse
import json
import sys

from anybit.cli_args import add_engine_args, engine_config_from_args


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="local model folder (default: the built-in default model)")


def _resolve_model(model: str | None) -> str:
    if model is not None:
        return model
    from anybit.default_model import default_model_path

    return default_model_path()


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text offline for one or many prompts")
    _model_arg(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a text file with one prompt per line (or a JSON list of strings)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", "--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    add_engine_args(p)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"--prompt-file: cannot read {args.prompt_file!r} ({e.strerror})") from None
        if text.lstrip().startswith("["):
            loaded = json.loads(text)
            if not all(isinstance(x, str) for x in loaded):
                raise ValueError("--prompt-file: a JSON prompt file must be a list of strings")
            prompts.extend(loaded)
        else:
            prompts.extend(line.replace("\\n", "\n") for line in text.splitlines() if line.strip())
    if not prompts:
        raise ValueError("--prompt: give at least one prompt (--prompt TEXT or --prompt-file FILE)")
    return prompts


def run_generate(args) -> int:
    from anybit.llm import LLM
    from anybit.sampling_params import SamplingParams

    prompts = _read_prompts(args)
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=args.stop or [])
    config = engine_config_from_args(args, _resolve_model(args.model))
    llm = LLM(config.model.model, progress=sys.stderr.isatty(), **_flat_options(args))
    if args.stream and len(prompts) == 1 and args.n == 1:
        sys.stdout.write(prompts[0])
        for out in llm.generate_stream(prompts, params):
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for prompt, result in zip(prompts, llm.generate(prompts, params, use_tqdm=len(prompts) > 1)):
        for comp in result.outputs:
            if args.json:
                print(json.dumps({"prompt": prompt, "index": comp.index, "text": comp.text,
                                  "token_ids": comp.token_ids, "finish_reason": comp.finish_reason}))
            else:
                print(prompt + comp.text)
                print(f"--- [{comp.finish_reason}, {len(comp.token_ids)} tokens]")
    return 0


def _flat_options(args) -> dict:
    from anybit.cli_args import _GROUPS, _SKIP

    out = {}
    for cls in _GROUPS:
        for name in cls.__dataclass_fields__:
            if name not in _SKIP and getattr(args, name, None) is not None:
                out[name] = getattr(args, name)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anybit", description="LLM inference at any weight bit width")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    try:
        from anybit.server.cli import add_chat_arguments, add_serve_arguments
    except ImportError:
        add_serve_arguments = add_chat_arguments = None
    if add_serve_arguments is not None:
        p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        _model_arg(p)
        add_serve_arguments(p)
        add_engine_args(p)
        p = sub.add_parser("chat", help="chat in the terminal")
        _model_arg(p)
        add_chat_arguments(p)
        add_engine_args(p)
    from anybit.bench import add_bench_arguments

    p = sub.add_parser("bench", help="measure generation speed (random prompts, EOS ignored)")
    _model_arg(p)
    add_bench_arguments(p)
    add_engine_args(p)
    try:
        from anybit.quant.cli import add_quantize_arguments
    except ImportError:
        add_quantize_arguments = None
    if add_quantize_arguments is not None:
        p = sub.add_parser("quantize", help="quantize a model to any bit width (RTN or GPTQ)")
        add_quantize_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command in ("serve", "chat"):
            from anybit.server.cli import run_chat, run_serve

            config = engine_config_from_args(args, _resolve_model(args.model))
            return (run_serve if args.command == "serve" else run_chat)(args, config)
        if args.command == "bench":
            from anybit.bench import run_bench

            return run_bench(args, engine_config_from_args(args, _resolve_model(args.model)))
        if args.command == "quantize":
            from anybit.quant.cli import run_quantize

            return run_quantize(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"anybit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
