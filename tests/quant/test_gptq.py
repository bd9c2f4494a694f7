"""GPTQ beats RTN (synthetic correlated inputs and a small random Llama); Hessian accumulation."""

import os
from pathlib import Path

import pytest
import torch

from anybit.quant.calib_forward import LayerWeights, arch_from_config, layer_forward
from anybit.quant.checkpoint import SafetensorsReader, load_hf_config
from anybit.quant.format import PackedWeight, dequantize
from anybit.quant.gptq import HessianAccumulator, gptq_quantize
from anybit.quant.quantize import quantize_model
from anybit.quant.rtn import QuantSpec, rtn_quantize


def test_hessian_accumulator_matches_batch_formula():
    x = torch.randn(50, 16)
    acc = HessianAccumulator(16)
    for chunk in x.split(7):
        acc.add(chunk)
    torch.testing.assert_close(acc.H, 2 / 50 * x.t() @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    g = torch.Generator().manual_seed(bits)
    K, N = 128, 64
    X = torch.randn(512, 16, generator=g) @ torch.randn(16, K, generator=g)
    X = X + 0.1 * torch.randn(512, K, generator=g)
    W = torch.randn(N, K, generator=g)
    acc = HessianAccumulator(K)
    acc.add(X)
    spec = QuantSpec(bits, 32, act_order=act_order)
    err_g = ((X @ (dequantize(gptq_quantize(W, acc.H, spec)) - W).t()).norm() / (X @ W.t()).norm()).item()
    err_r = ((X @ (dequantize(rtn_quantize(W, spec)) - W).t()).norm() / (X @ W.t()).norm()).item()
    assert err_g < 0.8 * err_r, (err_g, err_r)


def test_gptq_shape_errors():
    with pytest.raises(ValueError, match="H: expected"):
        gptq_quantize(torch.randn(8, 64), torch.eye(32), QuantSpec(4, 32))


def _layer_outputs(model_dir, ids, quantized_dir=None):
    """Outputs of every decoder layer (calib_forward) fed with the dense model's hidden states;
    the layer's weights are replaced by the dequantized ones of ``quantized_dir`` when given."""
    reader = SafetensorsReader(model_dir)
    cfg = load_hf_config(model_dir)
    arch = arch_from_config(cfg)
    q = SafetensorsReader(quantized_dir) if quantized_dir else None
    qcfg = load_hf_config(quantized_dir)["quantization_config"] if quantized_dir else None
    h = reader.get("model.embed_tokens.weight")[ids]
    outs = []
    for i in range(arch.num_layers):
        lw = LayerWeights(reader, i, "cpu")
        if q is not None:
            for mod, spec in qcfg["modules"].items():
                pre = f"model.layers.{i}."
                if mod.startswith(pre):
                    w = lw.t[mod[len(pre):] + ".weight"]
                    pw = PackedWeight(q.get(mod + ".qweight"), q.get(mod + ".scales"), q.get(mod + ".zeros"),
                                      spec["bits"], spec["group_size"], w.shape[1], w.shape[0],
                                      perm=q.get(mod + ".perm").long() if spec.get("act_order") else None)
                    lw.t[mod[len(pre):] + ".weight"] = dequantize(pw)
        outs.append(layer_forward(arch, lw, h))
        h = layer_forward(arch, LayerWeights(reader, i, "cpu"), h)
    return outs


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_beats_rtn_on_a_small_model(tmp_path, bits):
    from model_factory import CORPUS, make_tiny_model

    model = Path(make_tiny_model(tmp_path / "m", hidden_size=64, intermediate_size=128, num_layers=2))
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS * 4))
    rtn = quantize_model(model, tmp_path / "rtn", bits=bits, group_size=32, method="rtn", progress=False)
    gptq = quantize_model(model, tmp_path / "gptq", bits=bits, group_size=32, method="gptq",
                          calib=str(calib), nsamples=8, seqlen=64, progress=False)
    from tokenizers import Tokenizer

    text = "Paged attention stores keys and values in fixed-size blocks. The quick brown fox."
    ids = torch.tensor(Tokenizer.from_file(str(model / "tokenizer.json")).encode(text).ids)
    ref = _layer_outputs(model, ids)
    err = {k: [float((o - r).norm() / r.norm()) for o, r in zip(_layer_outputs(model, ids, d), ref)]
           for k, d in (("rtn", rtn), ("gptq", gptq))}
    assert all(g < r for g, r in zip(err["gptq"], err["rtn"])), err
    assert os.path.exists(gptq / "tokenizer.json")
