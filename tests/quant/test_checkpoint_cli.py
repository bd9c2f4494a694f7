"""anybit quantize end to end: output folder layout, loading into the engine, atomic writes and
clear errors for bad arguments and corrupt or mismatched checkpoints."""

import argparse
import json
import os

import pytest
import torch

from anybit.quant import quantize as quantize_mod
from anybit.quant.checkpoint import SafetensorsReader
from anybit.quant.cli import add_quantize_arguments, run_quantize
from anybit.quant.quantize import parse_bits_map, quantize_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from model_factory import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", hidden_size=64, intermediate_size=128,
                           num_layers=2)


def _args(*argv):
    p = argparse.ArgumentParser()
    add_quantize_arguments(p)
    return p.parse_args([str(a) for a in argv])


def test_rtn_checkpoint_layout_and_engine_load(tiny, tmp_path):
    out = tmp_path / "q"
    assert run_quantize(_args(tiny, out, "--bits", "4", "--group-size", "32", "--bits-map",
                              "*.down_proj=8,lm_head=8")) == 0
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "anybit"
    assert qc["modules"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert qc["modules"]["model.layers.1.self_attn.q_proj"]["bits"] == 4
    assert qc["modules"]["lm_head"]["bits"] == 8
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    names = set(SafetensorsReader(out).names())
    assert "model.layers.0.self_attn.q_proj.qweight" in names and "model.embed_tokens.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".q.tmp")]

    from anybit import LLM, SamplingParams

    sp = SamplingParams(max_tokens=6, temperature=0.0)
    got = LLM(str(out)).generate(["The quick brown"], sp)[0].outputs[0].token_ids
    assert len(got) == 6


def test_quantized_model_matches_dequantized_reference(tiny, tmp_path):
    """8-bit weights: the engine's logits stay close to the dense model's."""
    from anybit import LLM, SamplingParams

    out = quantize_model(tiny, tmp_path / "q8", bits=8, group_size=32, progress=False)
    sp = SamplingParams(max_tokens=5, temperature=0.0)
    dense = LLM(str(tiny)).generate(["Paged attention stores"], sp)[0].outputs[0].token_ids
    quant = LLM(str(out)).generate(["Paged attention stores"], sp)[0].outputs[0].token_ids
    assert dense == quant


def test_interrupted_quantization_leaves_nothing(tiny, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = quantize_mod.rtn_quantize

    def flaky(W, spec):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(W, spec)

    monkeypatch.setattr(quantize_mod, "rtn_quantize", flaky)
    out = tmp_path / "q"
    assert run_quantize(_args(tiny, out, "--bits", "3", "--group-size", "32")) == 130
    assert not out.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, match", [
    (["--bits", "9"], "bits"),
    (["--group-size", "48"], "group_size"),
    (["--group-size", "256"], "does not divide in_features="),
    (["--method", "gptq"], "--calib"),
    (["--bits-map", "lm_head"], "GLOB=BITS"),
    (["--bits-map", "*.k_proj=16"], "fused partners"),
    (["--format", "nf4", "--bits", "3"], "4-bit codebook"),
])
def test_bad_arguments(tiny, tmp_path, capsys, argv, match):
    out = tmp_path / "q"
    assert run_quantize(_args(tiny, out, *argv)) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_not_overwritten(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    assert run_quantize(_args(tiny, out)) == 2
    assert "already exists" in capsys.readouterr().err


def test_bits_map_parsing():
    assert parse_bits_map("lm_head=8, *.down_proj=16") == [("lm_head", 8), ("*.down_proj", None)]
    with pytest.raises(ValueError, match="bits"):
        parse_bits_map("x=12")


def test_corrupt_and_mismatched_checkpoints(tiny, tmp_path):
    out = quantize_model(tiny, tmp_path / "q", bits=4, group_size=32, progress=False)
    # mismatched: a qweight with the wrong number of rows
    from safetensors.torch import load_file, save_file

    from anybit import LLM

    tensors = load_file(str(out / "model.safetensors"))
    bad = dict(tensors)
    bad["model.layers.0.mlp.up_proj.qweight"] = bad["model.layers.0.mlp.up_proj.qweight"][:-1].clone()
    save_file(bad, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj.qweight"):
        LLM(str(out))
    # missing tensor
    del bad["model.layers.0.mlp.up_proj.qweight"]
    save_file(bad, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj.qweight"):
        LLM(str(out))
    # corrupt file
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(Exception, match="safetensors|header|model.safetensors"):
        LLM(str(out))
    with pytest.raises(ValueError, match="cannot read safetensors"):
        SafetensorsReader(out)


def test_gptq_cli_with_calibration(tiny, tmp_path):
    from model_factory import CORPUS

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CORPUS * 3))
    out = tmp_path / "g"
    assert run_quantize(_args(tiny, out, "--method", "gptq", "--calib", calib, "--bits", "3",
                              "--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--act-order",
                              "--bits-map", "*.v_proj=5")) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.0.self_attn.v_proj"] == {"bits": 5, "group_size": 32,
                                                               "format": "uniform", "act_order": True}
    perm = SafetensorsReader(out).get("model.layers.0.self_attn.q_proj.perm")
    assert torch.equal(torch.sort(perm.long()).values, torch.arange(64))
    from anybit import LLM, SamplingParams

    assert len(LLM(str(out)).generate(["def f"], SamplingParams(max_tokens=3))[0].outputs[0].token_ids) == 3
