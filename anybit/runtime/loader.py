"""Load a local Hugging Face-style model folder into an anybit model.

In: a folder with config.json, *.safetensors (single file or sharded with
model.safetensors.index.json) and tokenizer files. Out: the model on the target device with
weights loaded (progress bar), plus its ArchConfig. Called by ModelRunner. Pickled weights
(*.bin, *.pt) are never loaded: a folder that only has those is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from anybit.models.arch import ArchConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_folder(model: str | os.PathLike) -> Path:
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model: folder {str(path)!r} does not exist (anybit loads local "
                                "Hugging Face-style folders; it never downloads)")
    if not path.is_dir():
        raise NotADirectoryError(f"model: {str(path)!r} is not a folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {str(path / 'config.json')!r} is missing")
    return path


def load_hf_config(model: str | os.PathLike) -> dict:
    path = check_model_folder(model) / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder, in load order."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {index.name} but missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"model: {folder} has only pickled weights ({', '.join(pickles)}); anybit never "
                         "loads pickles. Convert them to safetensors first.")
    raise FileNotFoundError(f"model: no *.safetensors weights in {folder}")


def iter_safetensors(files: list[Path], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) on CPU from every file; a corrupt file raises naming it."""
    handles = []
    total = 0
    for f in files:
        try:
            h = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        keys = list(h.keys())
        handles.append((f, h, keys))
        total += len(keys)
    bar = tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress, leave=False)
    for f, h, keys in handles:
        for key in keys:
            try:
                tensor = h.get_tensor(key)
            except Exception as e:
                raise ValueError(f"{f}: tensor {key!r} could not be read ({e})") from None
            bar.update(1)
            yield key, tensor
    bar.close()


def resolve_model_dtype(requested: str, arch: ArchConfig, device: torch.device) -> torch.dtype:
    """'auto': the checkpoint's dtype on GPU (bf16 if unknown), float32 on CPU."""
    from anybit.config import resolve_dtype

    if requested != "auto":
        dtype = resolve_dtype(requested)
    elif device.type == "cpu":
        dtype = torch.float32
    else:
        dtype = resolve_dtype(arch.torch_dtype) if arch.torch_dtype else torch.bfloat16
        if dtype == torch.float32:
            dtype = torch.bfloat16
    return dtype


def load_model(model_path: str, dtype: torch.dtype, device: torch.device, backend, max_positions: int,
               hf_config: dict | None = None, progress: bool = True, load_format: str = "auto"):
    """Build the model on ``device`` and load its weights. Returns (model, arch_config).
    load_format "dummy" fills every weight with seeded random values instead (benchmarks)."""
    from anybit.models.registry import get_model_class

    folder = check_model_folder(model_path)
    hf_config = hf_config if hf_config is not None else load_hf_config(folder)
    arch = ArchConfig.from_hf(hf_config)
    quant_config = _quant_config(hf_config)
    cls = get_model_class(arch.architecture)
    with torch.device(device):
        model = cls(arch, dtype, backend, max_positions, quant_config=quant_config)
    if load_format == "dummy":
        _fill_random(model)
    else:
        model.load_weights(iter_safetensors(weight_files(folder), progress=progress))
    model.eval()
    return model, arch


def _quant_config(hf_config: dict):
    if not hf_config.get("quantization_config"):
        return None
    from anybit.quant.config import quant_config_from_hf

    return quant_config_from_hf(hf_config)


@torch.no_grad()
def _fill_random(model: torch.nn.Module) -> None:
    """Random weights for speed benchmarks (speed does not depend on the values). Quantized
    layers get random codes, small positive scales and in-range integer zeros."""
    from anybit.layers.linear import Linear, UnquantizedMethod

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        if not isinstance(module, Linear) or isinstance(module.quant_method, UnquantizedMethod):
            continue
        for name, buf in module.named_buffers(recurse=False):
            base = name.split("__")[0].split(".")[0]
            if base.startswith("perm"):
                buf.copy_(torch.randperm(buf.numel(), generator=gen, device=buf.device).to(buf.dtype))
            elif buf.dtype == torch.int32:
                buf.random_(-(2 ** 31), 2 ** 31 - 1, generator=gen)
            elif base.startswith("scales"):
                buf.uniform_(1e-3, 1e-2, generator=gen)
            elif base.startswith("zeros"):  # integers, as RTN / GPTQ produce (in range for every width)
                buf.copy_(torch.randint(0, 2, buf.shape, generator=gen, device=buf.device).to(buf.dtype))
            elif base.startswith("codebook"):
                buf.copy_(torch.linspace(-1, 1, buf.numel(), device=buf.device))
            else:
                buf.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        if isinstance(module, Linear):
            module.process_after_loading()
