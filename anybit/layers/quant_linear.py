"""QuantMethods for any-bit quantized Linear layers (our format and imported GPTQ checkpoints).

Checkpoint tensors per (HF module, shard): ``qweight`` int32 ``[bits*K//32, n]``, ``scales``
float16 ``[K//G, n]``, ``zeros`` float16 ``[K//G, n]`` (uniform) or ``codebook`` float32
``[2**bits]`` (nf4/fp4/learned); see anybit/quant/format.py. GPTQ imports: ``qweight``,
``qzeros`` int32 ``[K//G, n*bits//32]``, ``scales``, and ``g_idx`` int32 ``[K]`` (act-order).

After loading, consecutive shards with the same format are concatenated along N into one
``PackedWeight`` (one kernel launch); shards with different bit widths keep their own and
write their column range of the output. ``apply`` runs ``quant_matmul`` on CUDA and
``ref_quant_matmul`` on other devices (which caches the dense weight: the CPU path is for tests
and small models).
"""

from __future__ import annotations

import torch

from anybit.layers.linear import Linear, QuantMethod
from anybit.layers.pending import PendingSum, gemv_acc_enabled, new_pending
from anybit.quant.format import PackedWeight, resolve_group_size
from anybit.quant.rtn import QuantSpec


def _suffix(shard_id: str | None) -> str:
    return "" if shard_id is None else f"_{shard_id}"


def _merge(parts: list[PackedWeight]) -> PackedWeight:
    if len(parts) == 1:
        return parts[0]
    p0 = parts[0]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=1).contiguous()
    return PackedWeight(cat([p.qweight for p in parts]), cat([p.scales for p in parts]),
                        cat([p.zeros for p in parts]), p0.bits, p0.group_size, p0.in_features,
                        sum(p.out_features for p in parts), p0.fmt, p0.codebook, p0.perm)


def _same_format(a: PackedWeight, b: PackedWeight) -> bool:
    same_cb = (a.codebook is None and b.codebook is None) or (
        a.codebook is not None and b.codebook is not None and torch.equal(a.codebook, b.codebook))
    same_perm = (a.perm is None and b.perm is None) or (
        a.perm is not None and b.perm is not None and torch.equal(a.perm, b.perm))
    return (a.bits, a.group_size, a.fmt) == (b.bits, b.group_size, b.fmt) and same_cb and same_perm


class _PackedMethodBase(QuantMethod):
    """Shared: tensor registration with shape checks, shard merging and apply."""

    def _register(self, layer: Linear, name: str, shard_id, shape, dtype) -> None:
        layer.register_buffer(name + _suffix(shard_id), torch.empty(shape, dtype=dtype), persistent=False)

    def _expected_shape(self, layer: Linear, name: str, shard_id) -> torch.Tensor:
        buf = getattr(layer, name + _suffix(shard_id), None)
        if buf is None:
            raise ValueError(f"unexpected tensor {name!r} for a {type(self).__name__} layer; expected "
                             f"{sorted({n for n, _ in self.expected_tensors(layer)})}")
        return buf

    def load_weight(self, layer: Linear, name: str, tensor: torch.Tensor, shard_id: str | None) -> None:
        layer.shard_range(shard_id)  # raises for an unknown shard
        buf = self._expected_shape(layer, name, shard_id)
        if tuple(tensor.shape) != tuple(buf.shape):
            raise ValueError(f"tensor {name!r} (shard {shard_id!r}): shape {tuple(tensor.shape)} does not "
                             f"match the expected {tuple(buf.shape)} (in_features={layer.in_features})")
        if buf.dtype == torch.int32 and tensor.dtype != torch.int32:
            raise ValueError(f"tensor {name!r} (shard {shard_id!r}): dtype {tensor.dtype}, expected int32")
        if buf.dtype != torch.int32 and not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} (shard {shard_id!r}): dtype {tensor.dtype}, expected float")
        buf.copy_(tensor)

    def _finish(self, layer: Linear, packed: list[PackedWeight]) -> None:
        """Merge runs of same-format shards; keep (column start, PackedWeight) on the layer.
        The per-shard checkpoint buffers are dropped afterwards (the merged or converted tensors
        replace them), so a fused layer holds its weights once."""
        groups: list[tuple[int, list[PackedWeight]]] = []
        start = 0
        for pw in packed:
            if groups and _same_format(groups[-1][1][-1], pw):
                groups[-1][1].append(pw)
            else:
                groups.append((start, [pw]))
            start += pw.out_features
        layer.quant_parts = [(s, _merge(ps)) for s, ps in groups]
        layer._dense_cache = None
        bases = ("qweight", "scales", "zeros", "codebook", "perm", "qzeros", "g_idx")
        for name in list(layer._buffers):
            if any(name == b or name.startswith(b + "_") for b in bases):
                del layer._buffers[name]
        for i, (_, pw) in enumerate(layer.quant_parts):  # keep them visible to state_dict / .to()
            for field in ("qweight", "scales", "zeros", "codebook", "perm"):
                t = getattr(pw, field)
                if t is not None:
                    layer.register_buffer(f"part{i}_{field}", t, persistent=False)

    def apply(self, layer: Linear, x: torch.Tensor, pending: bool = False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        kernels = _pending_kernels(layer, x2) if pending and layer.bias is None else None
        if kernels:
            return _apply_pending(layer, x2, shape, kernels)
        if x2.is_cuda:
            from anybit.kernels.quant_matmul import quant_matmul
            if len(layer.quant_parts) == 1:
                y = quant_matmul(x2, layer.quant_parts[0][1])
            else:
                y = torch.empty(x2.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
                for start, pw in layer.quant_parts:
                    quant_matmul(x2, pw, out=y[:, start:start + pw.out_features])
        else:
            if layer._dense_cache is None or layer._dense_cache.device != x.device:
                from anybit.quant.format import dequantize
                layer._dense_cache = torch.cat(
                    [dequantize(pw, torch.float32) for _, pw in layer.quant_parts], 0).to(x.device)
            y = (x2.float() @ layer._dense_cache.t()).to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*shape[:-1], layer.out_features)


def _pending_kernel(pw: PackedWeight, x2: torch.Tensor):
    """The kernel that adds this part's partials into an accumulator, as quant_matmul's "auto"
    routes pending sums: the mma.sync kernel (``mma_chosen``, M 2..32; up to 64 on small weights with
    MMA_SQUARE_PENDING_BITS, off by default) or the packed-half GEMV (one row), else None."""
    from anybit.kernels.quant_gemv_h2 import gemv_h2_applies, quant_gemv_h2
    from anybit.kernels.quant_matmul import mma_chosen, quant_gemv_mma
    if mma_chosen(pw, x2.shape[0], x2, pending=True):
        return quant_gemv_mma
    return quant_gemv_h2 if gemv_h2_applies(pw, x2.shape[0], x2.dtype, True) else None


def _pending_kernels(layer: Linear, x2: torch.Tensor) -> list | None:
    """One accumulating kernel per part of the layer (fp16/bf16 x, CUDA), or None where some part
    has none."""
    if not x2.is_cuda or not gemv_acc_enabled():
        return None
    from anybit.kernels.quant_matmul import _INTERPRET
    kernels = [] if _INTERPRET else [_pending_kernel(pw, x2) for _, pw in layer.quant_parts]
    return kernels if kernels and all(k is not None for k in kernels) else None


def _apply_pending(layer: Linear, x2: torch.Tensor, shape, kernels: list) -> PendingSum:
    """Every part's GEMV (``kernels``, one per part) adding into one float32 accumulator (pending.py)."""
    pending = new_pending(x2.shape[0], layer.out_features, x2.dtype, (*shape[:-1], layer.out_features),
                          x2.device)
    for (start, pw), kernel in zip(layer.quant_parts, kernels, strict=True):
        xp = (x2.index_select(1, pw.perm) if pw.perm is not None else x2).contiguous()
        kernel(xp, pw, None, acc=pending.acc[:, start:start + pw.out_features])
    return pending


def _check_perm(perm: torch.Tensor, sid) -> torch.Tensor:
    K = perm.numel()
    if not torch.equal(torch.sort(perm.long().cpu()).values, torch.arange(K)):
        raise ValueError(f"tensor 'perm' (shard {sid!r}) is not a permutation of 0..{K - 1}")
    return perm.long()


class AnyBitLinearMethod(_PackedMethodBase):
    """Our format; ``specs`` has one QuantSpec per shard (bit widths may differ per shard)."""

    def __init__(self, specs: list[QuantSpec]):
        self.specs = list(specs)

    def _spec(self, layer: Linear, shard_id) -> QuantSpec:
        return self.specs[layer.shard_ids.index(shard_id)]

    def create_weights(self, layer: Linear) -> None:
        if len(self.specs) != len(layer.shard_ids):
            raise ValueError(f"{len(self.specs)} quant specs for {len(layer.shard_ids)} shards "
                             f"{layer.shard_ids}")
        K = layer.in_features
        if K % 32:
            raise ValueError(f"in_features: {K} must be a multiple of 32 for a quantized layer")
        for sid, n, spec in zip(layer.shard_ids, layer.output_sizes, self.specs):
            G = resolve_group_size(spec.group_size, K, f"group_size of shard {sid!r}")
            self._register(layer, "qweight", sid, (spec.bits * K // 32, n), torch.int32)
            self._register(layer, "scales", sid, (K // G, n), torch.float16)
            if spec.fmt == "uniform":
                self._register(layer, "zeros", sid, (K // G, n), torch.float16)
            else:
                self._register(layer, "codebook", sid, (2 ** spec.bits,), torch.float32)
            if spec.act_order:
                self._register(layer, "perm", sid, (K,), torch.int32)

    def expected_tensors(self, layer: Linear) -> list[tuple[str, str | None]]:
        out = []
        for sid, spec in zip(layer.shard_ids, self.specs):
            extra = "zeros" if spec.fmt == "uniform" else "codebook"
            out += [("qweight", sid), ("scales", sid), (extra, sid)]
            if spec.act_order:
                out.append(("perm", sid))
        return out

    def process_after_loading(self, layer: Linear) -> None:
        if getattr(layer, "quant_parts", None) is not None:
            return  # already processed
        packed = []
        for sid, n, spec in zip(layer.shard_ids, layer.output_sizes, self.specs):
            sfx = _suffix(sid)
            uniform = spec.fmt == "uniform"
            packed.append(PackedWeight(
                getattr(layer, "qweight" + sfx), getattr(layer, "scales" + sfx),
                getattr(layer, "zeros" + sfx) if uniform else None, spec.bits,
                resolve_group_size(spec.group_size, layer.in_features), layer.in_features, n, spec.fmt,
                None if uniform else getattr(layer, "codebook" + sfx),
                _check_perm(getattr(layer, "perm" + sfx), sid) if spec.act_order else None))
        self._finish(layer, packed)


def unpack_gptq_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ packing along dim 0: int32 ``[R*bits//32, C]`` -> codes int64 ``[R, C]``.

    2/4/8 bits: ``32//bits`` codes per word, low bits first. 3 bits: 32 codes in 3 consecutive
    words read as one 96-bit little-endian integer."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    rows = w.shape[0] * 32 // bits
    out = torch.empty(rows, w.shape[1], dtype=torch.int64, device=w.device)
    mask = (1 << bits) - 1
    for i in range(32):  # code i of every 32-code chunk
        bit = i * bits
        word, off = bit // 32, bit % 32
        chunk = w[word::bits]  # [R/32, C] word `word` of each chunk of `bits` words
        v = chunk >> off
        if off + bits > 32:
            v = v | (w[word + 1::bits] << (32 - off))
        out[i::32] = v & mask
    return out


class GPTQLinearMethod(_PackedMethodBase):
    """Imported GPTQ checkpoints (2/3/4/8 bits), repacked once into our layout."""

    def __init__(self, spec: QuantSpec, desc_act: bool = False, zero_offset: int = 1):
        self.spec = spec
        self.desc_act = desc_act
        self.zero_offset = zero_offset

    def create_weights(self, layer: Linear) -> None:
        K, b = layer.in_features, self.spec.bits
        G = resolve_group_size(self.spec.group_size, K)
        for sid, n in zip(layer.shard_ids, layer.output_sizes):
            if (n * b) % 32:
                raise ValueError(f"GPTQ qzeros need out_features*bits % 32 == 0, shard {sid!r} has {n}")
            self._register(layer, "qweight", sid, (b * K // 32, n), torch.int32)
            self._register(layer, "qzeros", sid, (K // G, n * b // 32), torch.int32)
            self._register(layer, "scales", sid, (K // G, n), torch.float16)
            self._register(layer, "g_idx", sid, (K,), torch.int32)
            getattr(layer, "g_idx" + _suffix(sid)).copy_(torch.arange(K) // G)

    def expected_tensors(self, layer: Linear) -> list[tuple[str, str | None]]:
        names = ["qweight", "qzeros", "scales"] + (["g_idx"] if self.desc_act else [])
        return [(nm, sid) for sid in layer.shard_ids for nm in names]

    def process_after_loading(self, layer: Linear) -> None:
        from anybit.quant.format import pack_codes

        if getattr(layer, "quant_parts", None) is not None:
            return  # already processed
        K, b = layer.in_features, self.spec.bits
        G = resolve_group_size(self.spec.group_size, K)
        packed = []
        for sid, n in zip(layer.shard_ids, layer.output_sizes):
            sfx = _suffix(sid)
            qweight = getattr(layer, "qweight" + sfx)
            zeros = unpack_gptq_rows(getattr(layer, "qzeros" + sfx).t(), b).t() + self.zero_offset
            g_idx = getattr(layer, "g_idx" + sfx).long()
            perm = None
            if not torch.equal(g_idx.cpu(), torch.arange(K) // G):
                perm = torch.argsort(g_idx, stable=True)
                if not torch.equal(g_idx[perm].cpu(), torch.arange(K) // G):
                    raise ValueError(f"g_idx of shard {sid!r}: groups must each hold {G} columns")
            if b == 3 or perm is not None:  # repack into our slices (2/4/8-bit GPTQ == our layout)
                codes = unpack_gptq_rows(qweight, b)  # [K, n]
                if perm is not None:
                    codes = codes[perm.to(codes.device)]
                qweight = pack_codes(codes.t().cpu(), b).to(qweight.device)
            packed.append(PackedWeight(qweight.contiguous(), getattr(layer, "scales" + sfx),
                                       zeros.to(torch.float16).contiguous(), b, G, K, n, "uniform",
                                       None, perm))
        self._finish(layer, packed)
