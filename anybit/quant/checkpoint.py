"""Reading Hugging Face safetensors checkpoints and writing quantized ones atomically.

In: a model folder (config.json, model.safetensors or model.safetensors.index.json + shards,
tokenizer files). Out (``CheckpointWriter``): a folder with config.json (+ quantization_config),
sharded ``model-0000i-of-0000n.safetensors`` with an index, and the tokenizer files, written into
a temporary sibling folder and renamed to the destination only when complete.
Used by ``anybit quantize`` (quant/cli.py) and the GPTQ calibration forward.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja", "added_tokens.json")


def load_hf_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class SafetensorsReader:
    """Name -> tensor access over a single or sharded safetensors checkpoint, loading lazily."""

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: corrupt index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"{self.dir}: no model.safetensors or index (only safetensors "
                                        f"checkpoints are read)")
            files, weight_map = found, None
        self._handles = {}
        self.name_to_file: dict[str, str] = {}
        for f in files:
            p = self.dir / f
            if not p.is_file():
                raise FileNotFoundError(f"{p}: shard listed in the index is missing")
            try:
                h = safe_open(str(p), framework="pt")
            except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
                raise ValueError(f"{p}: cannot read safetensors file ({e})") from None
            self._handles[f] = h
            for k in h.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                self.name_to_file[k] = f
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self.name_to_file]
            if missing:
                raise ValueError(f"{index}: tensors listed but not in their shard: {missing[:5]}")

    def names(self) -> list[str]:
        return list(self.name_to_file)

    def __contains__(self, name: str) -> bool:
        return name in self.name_to_file

    def get(self, name: str) -> torch.Tensor:
        if name not in self.name_to_file:
            raise KeyError(f"tensor {name!r} not found in {self.dir}")
        return self._handles[self.name_to_file[name]].get_tensor(name)


class CheckpointWriter:
    """Collects output tensors into shards; ``finish(config)`` renames the temporary folder into
    place. Use as a context manager: on an exception the temporary folder is removed and the
    destination is left untouched."""

    def __init__(self, out_dir: str | os.PathLike, shard_bytes: int = 2 * 1024 ** 3, overwrite: bool = False):
        self.out = Path(out_dir).absolute()
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out}: output folder already exists (pass overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0
        self.done = False

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu().contiguous()
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()
        self.total += t.numel() * t.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        idx = len(self.shards)
        save_file(self.pending, str(self.tmp / f"shard-{idx}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: dict, src_dir: str | os.PathLike | None = None) -> Path:
        self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i}.safetensors", self.tmp / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        if src_dir is not None:
            for f in TOKENIZER_FILES:
                if (Path(src_dir) / f).is_file():
                    shutil.copy2(Path(src_dir) / f, self.tmp / f)
        if self.out.exists():  # overwrite was allowed
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        self.done = True
        return self.out
