"""Bad model folders fail with errors that name the file or tensor; pickles are never loaded;
sharded checkpoints and dtypes load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anybit import LLM, SamplingParams
from tests.model_factory import make_tiny_model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return Path(make_tiny_model(tmp_path_factory.mktemp("base"), arch="qwen2"))


@pytest.fixture
def model_copy(base_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(base_dir, dst)
    return dst


def load(path, **kw):
    kw.setdefault("dtype", "float32")
    return LLM(str(path), device="cpu", progress=False, **kw)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path / "empty")


def test_unknown_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*not supported"):
        load(model_copy)


def test_only_pickled_weights_is_refused(model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled weights.*pytorch_model.bin.*never loads pickles"):
        load(model_copy)


def test_no_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load(model_copy)


def test_missing_tensor_is_named(model_copy):
    tensors = load_file(str(model_copy / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_copy / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        load(model_copy)


def test_misshaped_tensor_is_named(model_copy):
    tensors = load_file(str(model_copy / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, str(model_copy / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight.*shape"):
        load(model_copy)


def test_unexpected_tensor_is_named(model_copy):
    tensors = load_file(str(model_copy / "model.safetensors"))
    tensors["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(model_copy / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.7.self_attn.q_proj.weight"):
        load(model_copy)


def test_corrupt_safetensors_is_named(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load(model_copy)


def test_missing_tokenizer_is_named(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load(model_copy)


def test_sharded_checkpoint_and_missing_shard(base_dir, model_copy):
    tensors = load_file(str(model_copy / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(model_copy / fname))
        weight_map.update({k: fname for k in keys})
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = SamplingParams(temperature=0.0, max_tokens=8)
    want = load(base_dir).generate("def fibonacci(n):", params)[0].outputs[0].token_ids
    assert load(model_copy).generate("def fibonacci(n):", params)[0].outputs[0].token_ids == want
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load(model_copy)


def test_bf16_and_fp16_compute(base_dir):
    for dtype in ("bfloat16", "float16"):
        llm = LLM(str(base_dir), dtype=dtype, device="cpu", progress=False)
        out = llm.generate("def fibonacci(n):", SamplingParams(temperature=0.0, max_tokens=4))[0]
        assert len(out.outputs[0].token_ids) == 4
        assert llm.engine.runner.kv_caches[0].key.dtype == getattr(torch, dtype)


def test_bad_engine_options(base_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        load(base_dir, kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="block_size"):
        load(base_dir, block_size=7)
    with pytest.raises(ValueError, match="dtype"):
        load(base_dir, dtype="float8")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        load(base_dir, kv_cache_memory=100)


def test_bf16_checkpoint_loads_in_every_compute_dtype(tmp_path):
    path = make_tiny_model(tmp_path / "bf16", arch="llama", dtype="bfloat16")
    outs = {}
    for dtype in ("float32", "bfloat16"):
        llm = load(path, dtype=dtype)
        outs[dtype] = llm.generate("def fibonacci(n):", SamplingParams(temperature=0.0, max_tokens=4))[0]
        assert llm.engine.runner.model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    assert len(outs["float32"].outputs[0].token_ids) == 4
