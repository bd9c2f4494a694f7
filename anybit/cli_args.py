"""Engine command-line flags, made from the config dataclasses' fields.

``add_engine_args(parser)`` adds ``--dtype``, ``--block-size``, ``--kv-cache-dtype``,
``--kv-cache-memory``, ``--max-num-seqs`` ... (one per field of ModelConfig, CacheConfig,
SchedulerConfig, DeviceConfig); ``engine_config_from_args(args)`` builds the EngineConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from anybit.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig

_GROUPS = (ModelConfig, CacheConfig, SchedulerConfig, DeviceConfig)
_SKIP = {"model", "trust_remote_code", "seed"}
_HELP = {
    "dtype": "weights/activations dtype: auto, bfloat16, float16, float32",
    "max_model_len": "context length (default: the model's max_position_embeddings)",
    "block_size": "tokens per KV block",
    "kv_cache_dtype": "KV cache precision: auto, bfloat16, float16, float32, int8, int4",
    "kv_cache_memory": "KV cache size in bytes (default: a fraction of free GPU memory; 256 MiB on CPU)",
    "gpu_memory_utilization": "fraction of free GPU memory to use for weights + KV cache",
    "max_num_seqs": "max sequences per step",
    "max_num_batched_tokens": "max tokens per step (prefill chunks + decodes)",
    "device": "auto, cpu, cuda, cuda:N",
    "attention_backend": "auto, torch, triton",
    "enforce_eager": "disable CUDA graphs",
    "admit_batch": "admit waiting requests only when this many sequence slots are free",
    "cpu_threads": "torch threads on CPU (default: about one per 1024 of hidden size)",
    "async_scheduling": "launch decode step N+1 before reading step N's tokens, hiding the host work "
                        "behind the GPU (same outputs; default None = auto: on with CUDA graphs)",
}


def _parse_int_or_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for cls in _GROUPS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in _SKIP:
                continue
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = _HELP.get(f.name, f.name.replace("_", " ")) + f" (default: {default})"
            if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=help_text)
                continue
            base = int if int in typing.get_args(hint) or hint is int else (
                float if hint is float else str)
            if f.name == "kv_cache_memory":
                base = _parse_int_or_size
            group.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)


def engine_config_from_args(args: argparse.Namespace, model: str) -> EngineConfig:
    options = {}
    for cls in _GROUPS:
        for f in dataclasses.fields(cls):
            if f.name in _SKIP:
                continue
            value = getattr(args, f.name, None)
            if value is not None:
                options[f.name] = value
    return EngineConfig.create(model, **options)
