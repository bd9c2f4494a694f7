"""Compact training-time Llama model for the built-in default model.

Parameter names and math match Hugging Face ``LlamaForCausalLM`` exactly (RMSNorm, rotary with
``rotate_half``, grouped-query attention where query head ``h`` uses kv head ``h // n_rep``,
SiLU-gated MLP, tied embeddings), so the saved ``model.safetensors`` + ``config.json`` load in
``transformers`` and in anybit. Only torch is needed. Dropout (training only) sits on the two
residual branches; it does not exist at inference time and changes nothing in the format.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyLlamaConfig:
    """The subset of the HF Llama config this model uses."""

    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int | None = None
    dropout: float = 0.0  # training only; not part of the HF config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_config(self) -> dict:
        """The ``config.json`` of an equivalent HF ``LlamaForCausalLM``."""
        d = asdict(self)
        d.pop("dropout")
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            head_dim=self.head_dim,
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
            attention_bias=False,
            attention_dropout=0.0,
            mlp_bias=False,
            initializer_range=0.02,
            rope_scaling=None,
            pretraining_tp=1,
            use_cache=True,
        )
        return d


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(cfg: TinyLlamaConfig, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[seq_len, head_dim]`` computed in float32 like HF, cast to ``dtype``."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.cfg
        hd = c.head_dim
        q = self.q_proj(x).view(b, t, c.num_attention_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = c.num_attention_heads // c.num_key_value_heads
        if rep > 1:  # HF repeat_kv: query head h uses kv head h // rep
            k = k[:, :, None].expand(b, c.num_key_value_heads, rep, t, hd).reshape(b, -1, t, hd)
            v = v[:, :, None].expand(b, c.num_key_value_heads, rep, t, hd).reshape(b, -1, t, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class LlamaBody(nn.Module):
    """Holds ``embed_tokens``, ``layers``, ``norm`` so names read ``model.layers.N...``."""

    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TinyLlama(nn.Module):
    """Llama causal LM with tied input/output embeddings."""

    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaBody(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, mean=0.0, std=s)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids ``[batch, seq]`` -> logits ``[batch, seq, vocab]`` (positions start at 0)."""
        t = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.cfg, t, input_ids.device, torch.float32)  # cast per use
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; targets ``-100`` are ignored."""
        logits = self(input_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hf_state_dict(self, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
        """HF tensor names; the tied ``lm_head.weight`` is left out (tie_word_embeddings)."""
        return {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.state_dict().items()}


@torch.no_grad()
def greedy(model: TinyLlama, ids: list[int], max_new: int, stop_ids: set[int]) -> list[int]:
    """Greedy continuation without a KV cache (small model, short outputs)."""
    dev = next(model.parameters()).device
    out = list(ids)
    for _ in range(max_new):
        ctx = out[-model.cfg.max_position_embeddings :]
        logits = model(torch.tensor([ctx], device=dev))[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in stop_ids:
            break
    return out[len(ids) :]
