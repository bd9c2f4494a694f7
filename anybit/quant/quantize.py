"""``quantize_model``: a Hugging Face safetensors checkpoint -> an anybit quantized checkpoint.

In: a model folder, an output folder and the quantization choices (bits, group size, format,
method rtn|gptq, calibration text, per-module ``bits_map`` overrides). Out: the output folder
(config.json with ``quantization_config``, safetensors, tokenizer files), written to a
temporary sibling folder and renamed when complete (nothing at OUT on failure or interrupt).
RTN streams one tensor at a time; GPTQ walks the decoder layers one at a time (calib_forward.py),
so memory holds one layer's weights and the calibration activations. Called by quant/cli.py.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import torch

from anybit.quant.calib_forward import (
    LayerWeights,
    arch_from_config,
    attention_context,
    mlp_act,
    rms_norm,
)
from anybit.quant.checkpoint import CheckpointWriter, SafetensorsReader, load_hf_config
from anybit.quant.config import QuantConfig
from anybit.quant.gptq import HessianAccumulator, gptq_quantize
from anybit.quant.rtn import QuantSpec, rtn_quantize

FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("mlp.gate_proj", "mlp.up_proj"))
_LAYER_RE = re.compile(r"^model\.layers\.\d+\.")


def parse_bits_map(text: str | None) -> list[tuple[str, int | None]]:
    """'lm_head=8,*.down_proj=4,model.layers.0.*=16' -> [(glob, bits or None for unquantized)]."""
    out: list[tuple[str, int | None]] = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise ValueError(f"--bits-map: entry {part!r} must look like GLOB=BITS")
        pat, val = (v.strip() for v in part.rsplit("=", 1))
        if val.lower() in ("16", "none", "skip", "fp16", "bf16"):
            out.append((pat, None))
            continue
        try:
            b = int(val)
        except ValueError:
            raise ValueError(f"--bits-map: {val!r} in {part!r} is not a bit width (1-8 or 16)") from None
        QuantSpec(bits=b)  # validates
        out.append((pat, b))
    return out


def module_specs(names: list[str], default: QuantSpec, bits_map, quantize_lm_head: bool = False
                 ) -> dict[str, QuantSpec]:
    """Which 2-D weights to quantize: every Linear inside the decoder layers (and lm_head when a
    bits_map pattern names it). The first matching bits_map pattern wins."""
    specs = {}
    for name in names:
        if not name.endswith(".weight"):
            continue
        mod = name[: -len(".weight")]
        in_layers = bool(_LAYER_RE.match(mod)) and mod.split(".")[-1].endswith("proj")
        matches = [b for p, b in bits_map if fnmatch.fnmatchcase(mod, p) or mod.endswith("." + p) or mod == p]
        if not in_layers and not (mod.split(".")[-1] == "lm_head" and (matches or quantize_lm_head)):
            continue
        bits = matches[0] if matches else default.bits
        if bits is None:
            continue
        fmt = default.fmt if default.fmt in ("uniform", "learned") or bits == 4 else "uniform"
        specs[mod] = QuantSpec(bits, default.group_size, fmt, default.act_order)
    for mod in list(specs):  # parts of one fused layer: all quantized or none
        parts = mod.split(".")
        base, tail = ".".join(parts[:-2]), ".".join(parts[-2:])
        for group in FUSED_GROUPS:
            if tail in group:
                missing = [g for g in group if f"{base}.{g}.weight" in names and f"{base}.{g}" not in specs]
                if missing:
                    raise ValueError(f"--bits-map: {mod} is quantized but its fused partners {missing} "
                                     f"are not; quantize all of {list(group)} or none")
    return specs


def _emit(writer: CheckpointWriter, mod: str, pw) -> None:
    writer.add(f"{mod}.qweight", pw.qweight)
    writer.add(f"{mod}.scales", pw.scales)
    if pw.zeros is not None:
        writer.add(f"{mod}.zeros", pw.zeros)
    if pw.codebook is not None:
        writer.add(f"{mod}.codebook", pw.codebook)
    if pw.perm is not None:
        writer.add(f"{mod}.perm", pw.perm.to(torch.int32))


def load_calibration(model_dir, calib_file, nsamples: int, seqlen: int) -> torch.Tensor:
    """Calibration text -> token ids ``[n, seqlen]`` with the model's tokenizer.json."""
    from tokenizers import Tokenizer

    tok_path = Path(model_dir) / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path}: GPTQ calibration needs the model's tokenizer.json")
    text = Path(calib_file).read_text(encoding="utf-8", errors="replace")
    ids = Tokenizer.from_file(str(tok_path)).encode(text).ids
    if len(ids) < 2:
        raise ValueError(f"--calib {calib_file}: the text has fewer than 2 tokens")
    seqlen = min(seqlen, len(ids))
    n = max(1, min(nsamples, len(ids) // seqlen))
    step = max(1, (len(ids) - seqlen) // max(1, n - 1)) if n > 1 else 0
    return torch.tensor([ids[i * step:i * step + seqlen] for i in range(n)], dtype=torch.long)


def quantize_model(model_dir, out_dir, bits: int = 4, group_size: int = 128, method: str = "rtn",
                   fmt: str = "uniform", calib: str | None = None, bits_map: str | None = None,
                   nsamples: int = 128, seqlen: int = 512, act_order: bool = False,
                   device: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Quantize ``model_dir`` into ``out_dir``; returns the output path."""
    from tqdm import tqdm

    if method not in ("rtn", "gptq"):
        raise ValueError(f"method: got {method!r}, allowed: rtn, gptq")
    if method == "gptq" and not calib:
        raise ValueError("--calib FILE is required for --method gptq")
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: output folder already exists (pass overwrite to replace it)")
    default = QuantSpec(bits, group_size, fmt, act_order and method == "gptq")
    cfg = load_hf_config(model_dir)
    if cfg.get("quantization_config"):
        raise ValueError(f"{model_dir}: already quantized ({cfg['quantization_config'].get('quant_method')})")
    reader = SafetensorsReader(model_dir)
    names = reader.names()
    specs = module_specs(names, default, parse_bits_map(bits_map))
    for mod in specs:
        K = reader.get(f"{mod}.weight").shape[1]
        if K % 32 or (group_size not in (-1, 0) and K % group_size):
            raise ValueError(f"group_size: {group_size} does not divide in_features={K} of {mod} "
                             f"(in_features must also be a multiple of 32)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    qcfg = QuantConfig("anybit", default, specs)
    out_cfg = dict(cfg, quantization_config=qcfg.to_dict())
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        if method == "rtn":
            for name in tqdm(names, desc="quantize (rtn)", disable=not progress):
                mod = name[: -len(".weight")] if name.endswith(".weight") else None
                if mod in specs:
                    _emit(writer, mod, rtn_quantize(reader.get(name).to(dev), specs[mod]))
                else:
                    writer.add(name, reader.get(name))
        else:
            _gptq_model(reader, cfg, specs, writer, load_calibration(model_dir, calib, nsamples, seqlen),
                        dev, progress)
        return writer.finish(out_cfg, src_dir=model_dir)


def _gptq_model(reader, cfg, specs, writer, ids, dev, progress) -> None:
    """Layer by layer: capture each linear's inputs with the already-quantized earlier linears,
    accumulate H, quantize, and feed the quantized layer's outputs to the next layer."""
    from tqdm import tqdm

    arch = arch_from_config(cfg)
    done: set[str] = set()
    hidden = [reader.get("model.embed_tokens.weight").float().to(dev)[row.to(dev)] for row in ids]

    def quantize_group(lw, mods, inputs):
        mods = [m for m in mods if f"{lw.prefix}{m}" in specs]
        if not mods:
            return
        acc = HessianAccumulator(inputs[0].shape[-1], dev)
        for x in inputs:
            acc.add(x)
        for m in mods:
            full = f"{lw.prefix}{m}"
            pw = gptq_quantize(lw.t[f"{m}.weight"], acc.H, specs[full])
            _emit(writer, full, pw)
            from anybit.quant.format import dequantize
            lw.t[f"{m}.weight"] = dequantize(pw).to(dev)  # later captures see the quantized layer
            done.add(full + ".weight")

    for i in tqdm(range(arch.num_layers), desc="quantize (gptq)", disable=not progress):
        lw = LayerWeights(reader, i, dev)
        normed = [rms_norm(h, lw.t["input_layernorm.weight"], arch.eps) for h in hidden]
        quantize_group(lw, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], normed)
        ctx = [attention_context(arch, lw, x) for x in normed]
        quantize_group(lw, ["self_attn.o_proj"], ctx)
        hidden = [h + lw.linear(c, "self_attn.o_proj") for h, c in zip(hidden, ctx)]
        del ctx, normed
        normed = [rms_norm(h, lw.t["post_attention_layernorm.weight"], arch.eps) for h in hidden]
        quantize_group(lw, ["mlp.gate_proj", "mlp.up_proj"], normed)
        acts = [mlp_act(lw, x) for x in normed]
        quantize_group(lw, ["mlp.down_proj"], acts)
        hidden = [h + lw.linear(a, "mlp.down_proj") for h, a in zip(hidden, acts)]
        del acts, normed, lw
    if "lm_head" in specs:
        norm_w = reader.get("model.norm.weight").float().to(dev)
        acc = HessianAccumulator(arch.hidden, dev)
        for h in hidden:
            acc.add(rms_norm(h, norm_w, arch.eps))
        _emit(writer, "lm_head", gptq_quantize(reader.get("lm_head.weight").float().to(dev), acc.H,
                                               specs["lm_head"]))
        done.add("lm_head.weight")
    for name in reader.names():  # everything else (embeddings, norms, biases, unquantized linears)
        if name not in done:
            writer.add(name, reader.get(name))
