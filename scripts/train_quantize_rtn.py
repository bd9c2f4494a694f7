"""Fallback RTN quantization of a model folder with anybit's own ``rtn_quantize``, written in
anybit's documented checkpoint format (``qweight`` / ``scales`` / ``zeros`` per Linear,
``quantization_config`` with ``quant_method: "anybit"`` in config.json).

Used by ``eval_perplexity.py`` / ``train_ship_model.py`` only when ``anybit quantize`` is not
available; embeddings (tied with the LM head) and norms stay as they are.

    python scripts/train_quantize_rtn.py SRC OUT --bits 4 --group-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_folder(src: str, out: str, bits: int, group_size: int) -> None:
    from safetensors.torch import load_file, save_file

    spec = QuantSpec(bits=bits, group_size=group_size)
    sd = load_file(os.path.join(src, "model.safetensors"))
    q: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        if mod and mod.split(".")[-1] in LINEAR_SUFFIXES:
            pw = rtn_quantize(t, spec)
            q[mod + ".qweight"] = pw.qweight.contiguous()
            q[mod + ".scales"] = pw.scales.contiguous()
            q[mod + ".zeros"] = pw.zeros.contiguous()
        else:
            q[name] = t.contiguous()
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(q, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "anybit", "format_version": 1, **spec.to_dict()}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for name in os.listdir(src):
        if name not in ("config.json", "model.safetensors"):
            shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args()
    quantize_folder(a.src, a.out, a.bits, a.group_size)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
