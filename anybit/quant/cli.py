"""``anybit quantize MODEL OUT``: command-line front end of quant/quantize.py.

The lead's anybit/cli.py adds a ``quantize`` sub-command with ``add_quantize_arguments(parser)``
and runs it with ``run_quantize(args)`` (exit code). ``quantize_model(...)`` is the same for
scripts.
"""

from __future__ import annotations

import argparse
import sys

from anybit.quant.format import FORMATS
from anybit.quant.quantize import quantize_model

__all__ = ["add_quantize_arguments", "run_quantize", "quantize_model"]


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--bits", type=int, default=4, help="weight bits 1-8 (default 4)")
    parser.add_argument("--group-size", type=int, default=128,
                        help="columns per scale group: 32, 64, 128, ... or -1 for per channel (default 128)")
    parser.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--format", dest="fmt", choices=list(FORMATS), default="uniform",
                        help="uniform (scale+zero), nf4 / fp4 (4-bit tables), learned (k-means table)")
    parser.add_argument("--calib", default=None, help="calibration text file (GPTQ)")
    parser.add_argument("--bits-map", default=None,
                        help="per-module overrides, e.g. 'lm_head=8,*.down_proj=6,model.layers.0.*=16' "
                             "(16 = keep unquantized; first match wins)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration sequences (GPTQ)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--act-order", action="store_true",
                        help="GPTQ: quantize columns by decreasing Hessian diagonal")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run_quantize(args: argparse.Namespace) -> int:
    try:
        out = quantize_model(args.model, args.out, bits=args.bits, group_size=args.group_size,
                             method=args.method, fmt=args.fmt, calib=args.calib, bits_map=args.bits_map,
                             nsamples=args.nsamples, seqlen=args.seqlen, act_order=args.act_order,
                             device=args.device, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"anybit quantize: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anybit quantize: interrupted; no output written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anybit quantize", description="quantize a model's weights")
    add_quantize_arguments(p)
    return run_quantize(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
