"""quant_config_from_hf, QuantMethods (mixed bits per shard), and GPTQ checkpoint import."""

import pytest
import torch

from anybit.layers.linear import Linear
from anybit.layers.quant_linear import AnyBitLinearMethod, GPTQLinearMethod, unpack_gptq_rows
from anybit.quant.config import quant_config_from_hf
from anybit.quant.format import dequantize
from anybit.quant.rtn import rtn_quantize


def test_no_quantization_config():
    assert quant_config_from_hf({"hidden_size": 8}) is None


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method"),
    ({"quant_method": "anybit", "bits": 9}, "bits"),
    ({"quant_method": "anybit", "bits": 4, "group_size": 100}, "group_size"),
    ({"quant_method": "gptq", "bits": 5, "group_size": 128}, "bits"),
    ({"quant_method": "anybit", "modules": {"a.q_proj": {"bits": 4, "format": "nf5"}}}, "modules"),
])
def test_bad_configs_name_the_field(qc, match):
    with pytest.raises(ValueError, match=match):
        quant_config_from_hf({"quantization_config": qc})


def test_mixed_bits_inside_a_fused_layer():
    mods = {"l.q_proj": {"bits": 3, "group_size": 32}, "l.k_proj": {"bits": 3, "group_size": 32},
            "l.v_proj": {"bits": 8, "group_size": 64, "format": "uniform"}}
    qc = quant_config_from_hf({"quantization_config": {"quant_method": "anybit", "modules": mods}})
    method = qc.get_quant_method(["l.q_proj", "l.k_proj", "l.v_proj"])
    assert isinstance(method, AnyBitLinearMethod)
    assert qc.get_quant_method(["lm_head"]) is None
    lin = Linear(64, [64, 32, 32], ["q", "k", "v"], bias=True, quant_method=method)
    dense = []
    for sid, n, spec in zip("qkv", [64, 32, 32], method.specs):
        pw = rtn_quantize(torch.randn(n, 64), spec)
        dense.append(dequantize(pw))
        for name in ("qweight", "scales", "zeros"):
            lin.load_weight(name, getattr(pw, name), sid)
        lin.load_weight("bias", torch.randn(n), sid)
    lin.process_after_loading()
    assert [pw.bits for _, pw in lin.quant_parts] == [3, 8]  # q+k merged, v alone
    x = torch.randn(5, 64)
    torch.testing.assert_close(lin(x), x @ torch.cat(dense).t() + lin.bias, rtol=1e-5, atol=1e-5)


def test_mixed_quantized_and_dense_fused_layer_is_rejected():
    qc = quant_config_from_hf({"quantization_config": {"quant_method": "anybit",
                                                       "modules": {"l.q_proj": {"bits": 4}}}})
    with pytest.raises(ValueError, match="mixes quantized and unquantized"):
        qc.get_quant_method(["l.q_proj", "l.k_proj"])


def test_load_errors_name_the_tensor():
    qc = quant_config_from_hf({"quantization_config": {"quant_method": "anybit", "bits": 4,
                                                       "group_size": 32}})
    lin = Linear(64, [32], quant_method=qc.get_quant_method(["m.o_proj"]))
    assert ("qweight", None) in lin.expected_tensors()
    with pytest.raises(ValueError, match="'qweight'.*shape"):
        lin.load_weight("qweight", torch.zeros(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        lin.load_weight("qweight", torch.zeros(8, 32, dtype=torch.float32))
    with pytest.raises(ValueError, match="unexpected tensor 'weight'"):
        lin.load_weight("weight", torch.zeros(32, 64))


def _gptq_pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ packing along dim 0 (reference implementation of AutoGPTQ's pack loop)."""
    codes = codes.to(torch.int64)
    R, C = codes.shape
    out = torch.zeros(R * bits // 32, C, dtype=torch.int64)
    for i in range(R):
        bit = i // 32 * 32 * bits + (i % 32) * bits
        word, off = bit // 32, bit % 32
        out[word] |= (codes[i] << off) & 0xFFFFFFFF
        if off + bits > 32:
            out[word + 1] |= codes[i] >> (32 - off)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_import(bits, desc_act):
    K, N, G = 128, 64, 32
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (K, N), generator=g)  # GPTQ orientation [K, N]
    zeros = torch.randint(1, 2 ** bits, (K // G, N), generator=g)
    scales = (torch.rand(K // G, N, generator=g) + 0.5).half()
    g_idx = torch.arange(K) // G
    if desc_act:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    W = (codes - zeros[g_idx]).float() * scales[g_idx].float()  # [K, N]
    assert torch.equal(unpack_gptq_rows(_gptq_pack_rows(codes, bits), bits), codes)
    qc = quant_config_from_hf({"quantization_config": {"quant_method": "gptq", "bits": bits,
                                                       "group_size": G, "desc_act": desc_act}})
    lin = Linear(K, [N], quant_method=qc.get_quant_method(["m.down_proj"]))
    assert isinstance(lin.quant_method, GPTQLinearMethod)
    lin.load_weight("qweight", _gptq_pack_rows(codes, bits))
    lin.load_weight("qzeros", _gptq_pack_rows((zeros - 1).t(), bits).t().contiguous())  # v1: zero - 1
    lin.load_weight("scales", scales)
    lin.load_weight("g_idx", g_idx.to(torch.int32))
    lin.process_after_loading()
    x = torch.randn(3, K)
    torch.testing.assert_close(lin(x), x @ W, rtol=1e-4, atol=1e-3)
