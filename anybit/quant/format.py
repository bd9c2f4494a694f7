"""Packed any-bit weight format: bit-plane slices of power-of-two widths, group-wise scales.

A quantized weight ``W [N, K]`` (N = out_features, K = in_features) is stored as

- ``qweight`` int32 ``[bits * K // 32, N]``: the b-bit codes ``q[n, k]`` split into *slices* of
  power-of-two widths (``SLICES``: 3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; 1, 2, 4, 8 are one slice),
  widest slice first, low bits first. A slice of width ``w`` holds ``P = 32 // w`` codes per
  int32 word, packed along K: rows ``[off, off + w*K/32)`` of ``qweight`` belong to the slice,
  and code bits ``[shift, shift+w)`` of ``q[n, k]`` sit in word ``off + k // P`` (column n) at
  bit ``(k % P) * w``. ``off`` is ``K * (sum of the widths of the earlier slices) // 32``.
- ``scales`` float16 ``[K // group_size, N]``, ``zeros`` float16 ``[K // group_size, N]``:
  ``W[n, k] = (q[n, k] - zeros[k // G, n]) * scales[k // G, n]`` (uniform, asymmetric).
- codebook formats (``nf4``, ``fp4``, ``learned``): ``codebook`` float32 ``[2 ** bits]`` and
  ``W[n, k] = codebook[q[n, k]] * scales[k // G, n]`` (zeros are not stored).

Why this layout (see docs/notes_quant.md): every slice is read as whole aligned int32 words
(16-byte vectors along N, coalesced across a warp), the extraction of a code is one shift and
one mask per slice with compile-time constants, and the 2/4/8-bit slices are bit for bit the
GPTQ ``qweight`` layout, so GPTQ checkpoints of those widths load without repacking.
``group_size`` may be 32, 64, 128, ... or ``K`` (one group per output channel; ``-1`` in configs).
K must be a multiple of 32 and of the group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
SLICES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
FORMATS = ("uniform", "nf4", "fp4", "learned")

# NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalized to [-1, 1].
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# FP4 e2m1 values {0, .5, 1, 1.5, 2, 3, 4, 6} with sign (+0 and -0 both kept), divided by 6
# (absmax scaling), sorted ascending so nearest-value search is a bucketize.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_TABLE = tuple(sorted([-v / 6.0 for v in _E2M1] + [v / 6.0 for v in _E2M1]))


def check_bits(bits: int, field: str = "bits") -> int:
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{field}: got {bits!r}, allowed: {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def check_format(fmt: str, bits: int, field: str = "format") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"{field}: got {fmt!r}, allowed: {', '.join(FORMATS)}")
    if fmt in ("nf4", "fp4") and bits != 4:
        raise ValueError(f"{field}: {fmt!r} is a 4-bit codebook, got bits={bits}")
    return fmt


def resolve_group_size(group_size: int, in_features: int, field: str = "group_size") -> int:
    """-1 / 0 / None -> in_features (per output channel); else must divide in_features."""
    if group_size in (-1, 0, None):
        return in_features
    if not isinstance(group_size, int) or group_size < 32 or group_size % 32:
        raise ValueError(f"{field}: got {group_size!r}, allowed: a multiple of 32 (32, 64, 128, ...) "
                         f"or -1 for one group per output channel")
    if in_features % group_size:
        raise ValueError(f"{field}: {group_size} does not divide in_features={in_features}")
    return group_size


def builtin_codebook(fmt: str, bits: int) -> torch.Tensor | None:
    """The fixed table of a codebook format ([2**bits] float32), None for uniform/learned."""
    if fmt == "nf4":
        return torch.tensor(NF4_TABLE, dtype=torch.float32)
    if fmt == "fp4":
        return torch.tensor(FP4_TABLE, dtype=torch.float32)
    return None


@dataclass(slots=True)
class PackedWeight:
    """One quantized weight ``[N, K]`` in the layout described in this module's docstring.

    qweight int32 ``[bits*K//32, N]``; scales float16 ``[K//G, N]``; zeros float16 ``[K//G, N]``
    (None for codebook formats); codebook float32 ``[2**bits]`` (None for uniform); perm int64
    ``[K]`` or None: when set, the kernel uses ``x[..., perm]`` (act-order GPTQ imports).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    fmt: str = "uniform"
    codebook: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    def __post_init__(self):
        self.validate()

    @property
    def slices(self) -> tuple[int, ...]:
        return SLICES[self.bits]

    def validate(self) -> None:
        check_bits(self.bits)
        check_format(self.fmt, self.bits)
        K, N, G = self.in_features, self.out_features, self.group_size
        if K % 32:
            raise ValueError(f"in_features: {K} must be a multiple of 32")
        resolve_group_size(G, K)
        want = (self.bits * K // 32, N)
        if self.qweight.dtype != torch.int32 or tuple(self.qweight.shape) != want:
            raise ValueError(f"qweight: expected int32 {want}, got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        if tuple(self.scales.shape) != (K // G, N):
            raise ValueError(f"scales: expected {(K // G, N)}, got {tuple(self.scales.shape)}")
        if self.fmt == "uniform":
            if self.zeros is None or tuple(self.zeros.shape) != (K // G, N):
                got = None if self.zeros is None else tuple(self.zeros.shape)
                raise ValueError(f"zeros: expected {(K // G, N)}, got {got}")
        elif self.codebook is None or tuple(self.codebook.shape) != (2 ** self.bits,):
            got = None if self.codebook is None else tuple(self.codebook.shape)
            raise ValueError(f"codebook: expected {(2 ** self.bits,)} for format {self.fmt!r}, got {got}")
        if self.perm is not None and tuple(self.perm.shape) != (K,):
            raise ValueError(f"perm: expected ({K},), got {tuple(self.perm.shape)}")

    def to(self, device) -> PackedWeight:
        mv = lambda t: None if t is None else t.to(device)
        return PackedWeight(mv(self.qweight), mv(self.scales), mv(self.zeros), self.bits,
                            self.group_size, self.in_features, self.out_features, self.fmt,
                            mv(self.codebook), mv(self.perm))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.qweight, self.scales, self.zeros, self.codebook, self.perm) if t is not None)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``q [N, K]`` (integers in [0, 2**bits)) -> qweight int32 ``[bits*K//32, N]``."""
    check_bits(bits)
    N, K = q.shape
    if K % 32:
        raise ValueError(f"in_features: {K} must be a multiple of 32 to pack")
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) for bits={bits}")
    qt = q.t().contiguous()  # [K, N]
    parts, shift = [], 0
    for w in SLICES[bits]:
        P = 32 // w
        v = ((qt >> shift) & ((1 << w) - 1)).view(K // P, P, N)
        word = torch.zeros(K // P, N, dtype=torch.int64)
        for j in range(P):
            word |= v[:, j, :] << (j * w)
        parts.append(word)
        shift += w
    packed = torch.cat(parts, 0)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # two's complement int32
    return packed.to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: qweight ``[bits*K//32, N]`` -> codes int32 ``[N, K]``."""
    check_bits(bits)
    K = in_features
    if qweight.shape[0] != bits * K // 32:
        raise ValueError(f"qweight: {qweight.shape[0]} rows, expected bits*K/32 = {bits * K // 32}")
    N = qweight.shape[1]
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    q = torch.zeros(K, N, dtype=torch.int64, device=qweight.device)
    off, shift = 0, 0
    for w in SLICES[bits]:
        P = 32 // w
        rows = words[off:off + K // P]  # [K/P, N]
        j = torch.arange(P, device=qweight.device) * w
        v = (rows[:, None, :] >> j[None, :, None]) & ((1 << w) - 1)  # [K/P, P, N]
        q |= v.reshape(K, N) << shift
        off += K // P
        shift += w
    return q.t().contiguous().to(torch.int32)


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PackedWeight -> dense ``W [N, K]`` in ``dtype`` (computed in float32)."""
    q = unpack_codes(pw.qweight, pw.bits, pw.in_features)  # [N, K]
    G = pw.group_size
    s = pw.scales.float().t().repeat_interleave(G, dim=1)  # [N, K]
    if pw.fmt == "uniform":
        z = pw.zeros.float().t().repeat_interleave(G, dim=1)
        w = (q.float() - z) * s
    else:
        w = pw.codebook.float().to(q.device)[q.long()] * s
    if pw.perm is not None:  # column k of the stored weight multiplies x[perm[k]]
        out = torch.empty_like(w)
        out[:, pw.perm.long()] = w
        w = out
    return w.to(dtype)
