"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) built from anybit.layers.

forward(input_ids [num_tokens], positions [num_tokens], kv_caches (one per layer), meta)
-> hidden states [num_tokens, hidden]; ``compute_logits(hidden [n, hidden]) -> [n, vocab]``.
``load_weights`` maps Hugging Face tensor names onto the fused QKV / gate_up layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from anybit.layers.activation import SiluAndMul
from anybit.layers.attention import Attention, AttentionBackend
from anybit.layers.attention_meta import AttentionMetadata, LayerKVCache
from anybit.layers.embedding import VocabEmbedding
from anybit.layers.linear import Linear
from anybit.layers.norm import RMSNorm
from anybit.layers.pending import PendingSum, as_tensor
from anybit.layers.rotary import RotaryEmbedding
from anybit.models.arch import ArchConfig

# HF module name -> (our fused module name, shard id)
STACKED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


def _quant(quant_config, names: list[str]):
    return quant_config.get_quant_method(names) if quant_config is not None else None


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int, rotary: RotaryEmbedding, backend: AttentionBackend,
                 dtype: torch.dtype, quant_config, prefix: str):
        super().__init__()
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.q_size, self.kv_size = nh * hd, nkv * hd
        self.qkv_proj = Linear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], ["q", "k", "v"],
                               bias=cfg.attention_bias, dtype=dtype,
                               quant_method=_quant(quant_config, [f"{prefix}.{p}" for p in
                                                                  ("q_proj", "k_proj", "v_proj")]))
        o_bias = cfg.attention_bias and cfg.architecture != "Qwen2ForCausalLM"
        self.o_proj = Linear(self.q_size, [cfg.hidden_size], bias=o_bias, dtype=dtype,
                             quant_method=_quant(quant_config, [f"{prefix}.o_proj"]))
        self.attn = Attention(nh, nkv, hd, rotary, backend, sliding_window=cfg.sliding_windows[layer_idx])

    def forward(self, positions, hidden, kv_cache: LayerKVCache, meta: AttentionMetadata):
        """The projections may stay PendingSums (anybit/layers/pending.py) where their consumer
        takes one: QKV for a backend that reads it in its rotary kernel, o_proj for the RMSNorm."""
        qkv = self.qkv_proj(hidden, pending=self.attn.accepts_pending())
        if isinstance(qkv, PendingSum):
            out = self.attn(qkv, None, None, positions, kv_cache, meta)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            out = self.attn(q, k, v, positions, kv_cache, meta)
        return self.o_proj(out, pending=True)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, quant_config, prefix: str):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, [inter, inter], ["gate", "up"], bias=cfg.mlp_bias,
                                   dtype=dtype, quant_method=_quant(
                                       quant_config, [f"{prefix}.gate_proj", f"{prefix}.up_proj"]))
        self.down_proj = Linear(inter, [cfg.hidden_size], bias=cfg.mlp_bias, dtype=dtype,
                                quant_method=_quant(quant_config, [f"{prefix}.down_proj"]))
        self.act = SiluAndMul()

    def forward(self, x):
        """gate_up and down may stay PendingSums (consumed by SiLU-and-mul and the next RMSNorm)."""
        return self.down_proj(self.act(self.gate_up_proj(x, pending=True)), pending=True)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx, rotary, backend, dtype, quant_config):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary, backend, dtype, quant_config,
                                        f"{prefix}.self_attn")
        self.mlp = LlamaMLP(cfg, dtype, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, positions, hidden, residual, kv_cache, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, rotary, backend, dtype, quant_config):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rotary, backend, dtype, quant_config)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    """The whole model. Parameters follow HF names except the fused qkv_proj / gate_up_proj."""

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, backend: AttentionBackend, max_positions: int,
                 quant_config=None):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.model = LlamaModel(cfg, self.rotary, backend, dtype, quant_config)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, [cfg.vocab_size], dtype=dtype,
                                  quant_method=_quant(quant_config, ["lm_head"]))

    def forward(self, input_ids, positions, kv_caches: list[LayerKVCache], meta: AttentionMetadata):
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.model.norm(hidden, residual)
        return as_tensor(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    # ---- loading -------------------------------------------------------------------------
    def _route(self, name: str):
        """HF tensor name -> (Linear module, tensor name, shard) or (parameter, None, None)."""
        module_path, _, tensor_name = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf in STACKED:
            fused, shard = STACKED[leaf]
            return self.get_submodule(f"{parent}.{fused}"), tensor_name, shard
        module = self.get_submodule(module_path)
        if isinstance(module, Linear):
            return module, tensor_name, None
        return getattr(module, tensor_name), None, None

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs; raises ValueError naming a mis-shaped or missing tensor."""
        expected = self.expected_tensor_names()
        loaded: set[str] = set()
        for name, tensor in tensors:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            try:
                target, tensor_name, shard = self._route(name)
            except AttributeError:
                raise ValueError(f"tensor {name!r}: the checkpoint has a tensor that does not belong to a "
                                 f"{self.cfg.architecture} with this config") from None
            try:
                if isinstance(target, Linear):
                    if tensor.is_floating_point() and tensor_name in ("weight", "bias"):
                        tensor = tensor.to(self.dtype)
                    target.load_weight(tensor_name, tensor, shard)
                else:
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected "
                                         f"{tuple(target.shape)}")
                    target.data.copy_(tensor.to(target.dtype))
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from None
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_after_loading()

    def expected_tensor_names(self) -> set[str]:
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        inverse = {(fused, shard): hf for hf, (fused, shard) in STACKED.items()}
        for module_name, module in self.named_modules():
            if isinstance(module, Linear):
                parent, _, leaf = module_name.rpartition(".")
                for tensor_name, shard in module.expected_tensors():
                    hf_leaf = inverse[(leaf, shard)] if shard is not None else leaf
                    prefix = f"{parent}.{hf_leaf}" if parent else hf_leaf
                    names.add(f"{prefix}.{tensor_name}")
            elif isinstance(module, RMSNorm) and module_name != "model.norm":
                names.add(f"{module_name}.weight")
        return names
