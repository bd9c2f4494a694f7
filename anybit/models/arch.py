"""Normalized architecture description read from a Hugging Face ``config.json``.

Handles the spellings of transformers 4.x (``rope_scaling``, ``rope_theta``, ``torch_dtype``)
and 5.x (``rope_parameters``, ``dtype``). Raises ValueError naming the missing or bad field.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _require(cfg: dict, key: str):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json: required field {key!r} is missing")
    return cfg[key]


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # one entry per layer
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @staticmethod
    def from_hf(cfg: dict) -> ArchConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json: field 'architectures' is missing; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"config.json: architecture {arch!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported; allowed: silu")
        hidden = int(_require(cfg, "hidden_size"))
        num_heads = int(_require(cfg, "num_attention_heads"))
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_layers = int(_require(cfg, "num_hidden_layers"))
        rope_params = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        windows = _sliding_windows(arch, cfg, num_layers)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ArchConfig(
            architecture=arch,
            vocab_size=int(_require(cfg, "vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(_require(cfg, "intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_windows=windows,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _sliding_windows(arch: str, cfg: dict, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if arch == "MistralForCausalLM":
        return (int(window),) * num_layers if window else (None,) * num_layers
    if arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window") and window:
        first = int(cfg.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    layer_types = cfg.get("layer_types")
    if layer_types and window:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers
