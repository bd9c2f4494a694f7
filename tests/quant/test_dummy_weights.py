"""load_format="dummy" (speed benchmarks): quantized layers get integer zero points, as RTN and
GPTQ produce, so the benchmarks time the kernels real checkpoints run (the folded-zero GEMV
needs integer zeros; fractional ones fall back to slower paths)."""

import torch

from anybit import LLM
from anybit.kernels.quant_gemv_h2 import gemv_table
from benchmarks.bench_e2e import make_folder, quant_config


def test_dummy_quantized_weights_have_integer_zeros(tmp_path):
    make_folder("tiny", tmp_path, with_weights=False, quant=quant_config("tiny", 3))
    llm = LLM(str(tmp_path), load_format="dummy", device="cpu", dtype="float32")
    modules = llm.engine.runner.model.modules()
    parts = [pw for m in modules for _, pw in (getattr(m, "quant_parts", None) or [])]
    assert parts
    for pw in parts:
        z = pw.zeros.float()
        assert torch.equal(z, z.round()) and int(z.min()) >= 0 and int(z.max()) < 2 ** pw.bits
        assert gemv_table(pw) is not None
