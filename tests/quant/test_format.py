"""Packed layout: pack -> unpack exact, validation errors, quantization error per bit."""

import pytest
import torch

from anybit.quant.format import SLICES, PackedWeight, dequantize, pack_codes, unpack_codes
from anybit.quant.rtn import QuantSpec, learn_codebook, rtn_quantize


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_exact(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2 ** bits, (48, 160), generator=g)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (bits * 160 // 32, 48)
    assert torch.equal(unpack_codes(packed, bits, 160), q.int())
    # every slice is a power of two and the widths add up
    assert sum(SLICES[bits]) == bits and all(w in (1, 2, 4, 8) for w in SLICES[bits])


def test_layout_is_gptq_compatible_for_4_bits():
    q = torch.randint(0, 16, (8, 64))
    packed = pack_codes(q, 4)
    k, n = 13, 5  # code (n, k) sits in word k // 8 at bit 4 * (k % 8)
    assert ((int(packed[k // 8, n]) >> (4 * (k % 8))) & 15) == int(q[n, k])


def test_pack_rejects_bad_codes_and_shapes():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.full((4, 32), 8), 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(4, 48, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(4, 32, dtype=torch.long), 9)


def test_packed_weight_validation_names_the_tensor():
    pw = rtn_quantize(torch.randn(32, 64), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="qweight"):
        PackedWeight(pw.qweight[:-1], pw.scales, pw.zeros, 4, 32, 64, 32)
    with pytest.raises(ValueError, match="scales"):
        PackedWeight(pw.qweight, pw.scales[:1], pw.zeros, 4, 32, 64, 32)
    with pytest.raises(ValueError, match="zeros"):
        PackedWeight(pw.qweight, pw.scales, None, 4, 32, 64, 32)
    with pytest.raises(ValueError, match="does not divide"):
        PackedWeight(pw.qweight, pw.scales, pw.zeros, 4, 96, 64, 32)


@pytest.mark.parametrize("kwargs, match", [(dict(bits=9), "bits"), (dict(bits=0), "bits"),
                                           (dict(group_size=48), "group_size"),
                                           (dict(bits=3, fmt="nf4"), "4-bit codebook"),
                                           (dict(fmt="int4"), "format")])
def test_spec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match="does not divide in_features=160"):
        rtn_quantize(torch.randn(8, 160), QuantSpec(4, 128))


def test_gaussian_error_halves_per_bit():
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    errs = {}
    for bits in range(2, 9):
        pw = rtn_quantize(W, QuantSpec(bits, 128))
        errs[bits] = float((dequantize(pw) - W).norm() / W.norm())
    for b in range(2, 8):
        ratio = errs[b] / errs[b + 1]
        assert 1.6 < ratio < 2.9, (b, errs)


@pytest.mark.parametrize("fmt, bits", [("nf4", 4), ("fp4", 4), ("learned", 3), ("learned", 4)])
def test_codebook_formats_roundtrip(fmt, bits):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    pw = rtn_quantize(W, QuantSpec(bits, 64, fmt))
    assert pw.codebook.shape == (2 ** bits,) and pw.zeros is None
    err = float((dequantize(pw) - W).norm() / W.norm())
    uniform = float((dequantize(rtn_quantize(W, QuantSpec(bits, 64))) - W).norm() / W.norm())
    assert err < 1.3 * uniform  # a table fitted to Gaussians is about as good as uniform or better


def test_learned_codebook_is_sorted_and_fits_data():
    W = torch.randn(64, 256)
    t = learn_codebook(W, 3, 64)
    assert t.shape == (8,) and torch.all(t[1:] >= t[:-1]) and float(t[0]) >= -1.0 and float(t[-1]) <= 1.0


def test_per_channel_group():
    W = torch.randn(16, 96)
    pw = rtn_quantize(W, QuantSpec(8, -1))
    assert pw.group_size == 96 and pw.scales.shape == (1, 16)
    assert float((dequantize(pw) - W).norm() / W.norm()) < 0.02
