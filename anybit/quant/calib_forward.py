"""Minimal dense forward of Llama-family decoder layers, one layer at a time, for calibration.

In: a ``SafetensorsReader`` over a Hugging Face checkpoint and its config.json dict. Out: the
pieces GPTQ needs to walk the model layer by layer with bounded memory: embedding lookup,
RMSNorm, rotary (default / linear / llama3 scaling, HF ``rotate_half`` style), GQA causal
attention (Mistral's sliding window is ignored: calibration sequences are short), the SiLU MLP,
and Qwen2's q/k/v biases. Everything runs in float32 on the chosen device. Called by
quant/quantize.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LINEARS_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEARS_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    inv_freq: torch.Tensor  # [head_dim // 2] float32


def rope_inv_freq(cfg: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies with the checkpoint's rope scaling (None, linear or llama3); reads the
    transformers 4.x (``rope_scaling``, ``rope_theta``) and 5.x (``rope_parameters``) spellings."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rs = cfg.get("rope_scaling") or params
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def arch_from_config(cfg: dict) -> Arch:
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
    except KeyError as e:
        raise ValueError(f"config.json: missing field {e.args[0]!r} needed for calibration") from None
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return Arch(layers, hidden, heads, int(cfg.get("num_key_value_heads", heads)), head_dim,
                float(cfg.get("rms_norm_eps", 1e-6)), rope_inv_freq(cfg, head_dim))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LayerWeights:
    """Float32 tensors of one decoder layer (``model.layers.{i}.``) on a device."""

    def __init__(self, reader, index: int, device, prefix: str = "model.layers"):
        self.prefix = f"{prefix}.{index}."
        self.t: dict[str, torch.Tensor] = {}
        for name in reader.names():
            if name.startswith(self.prefix):
                self.t[name[len(self.prefix):]] = reader.get(name).to(device=device, dtype=torch.float32)

    def linear(self, x: torch.Tensor, module: str) -> torch.Tensor:
        """module like 'self_attn.q_proj' -> x @ W^T (+ bias)."""
        w = self.t[f"{module}.weight"]
        return F.linear(x, w, self.t.get(f"{module}.bias"))

    def module_names(self) -> list[str]:
        return [k[: -len(".weight")] for k in self.t if k.endswith(".weight") and self.t[k].dim() == 2]


def attention_context(arch: Arch, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """x ``[T, hidden]`` (already normed) -> attention output before o_proj ``[T, heads*head_dim]``."""
    T = x.shape[0]
    q = lw.linear(x, "self_attn.q_proj").view(T, arch.num_heads, arch.head_dim).transpose(0, 1)
    k = lw.linear(x, "self_attn.k_proj").view(T, arch.num_kv_heads, arch.head_dim).transpose(0, 1)
    v = lw.linear(x, "self_attn.v_proj").view(T, arch.num_kv_heads, arch.head_dim).transpose(0, 1)
    pos = torch.arange(T, device=x.device, dtype=torch.float32)
    freqs = torch.outer(pos, arch.inv_freq.to(x.device))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    rep = arch.num_heads // arch.num_kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    return o.transpose(0, 1).reshape(T, arch.num_heads * arch.head_dim)


def mlp_act(lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """x ``[T, hidden]`` (normed) -> ``silu(gate) * up`` ``[T, intermediate]`` (input of down_proj)."""
    return F.silu(lw.linear(x, "mlp.gate_proj")) * lw.linear(x, "mlp.up_proj")


def layer_forward(arch: Arch, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
    """One full decoder layer: h ``[T, hidden]`` -> ``[T, hidden]``."""
    a = attention_context(arch, lw, rms_norm(h, lw.t["input_layernorm.weight"], arch.eps))
    h = h + lw.linear(a, "self_attn.o_proj")
    m = mlp_act(lw, rms_norm(h, lw.t["post_attention_layernorm.weight"], arch.eps))
    return h + lw.linear(m, "mlp.down_proj")
