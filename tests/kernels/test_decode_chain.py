"""Options of the decode chain that change when work runs, never the result: the early PDL trigger of
the short kernels (anybit/kernels/pdl.py ``pdl_early``; on sm_90 the trigger, PREEXIT, comes first, before
any load and the wait, ACQBULK, with EARLY, and is absent without). On the GPU those kernels consume
pending sums right either way, and a bf16 W4 model generates the same with it on and off."""

import os
import sys

import pytest
import torch

from anybit.kernels.activation import _silu_and_mul_kernel
from anybit.kernels.rms_norm import _rms_norm_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "quant"))
from sm90_sass import nvdisasm, sm90_sass_ptrs  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("which", ["rms_norm", "silu_and_mul"])
def test_sm90_trigger_before_or_after_the_wait(which, early):
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    if which == "rms_norm":
        kernel, consts = _rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096, PDL=True, EARLY=early)
        ptrs = {n: "*bf16" for n in ("x_ptr", "r_ptr", "w_ptr", "y_ptr", "newr_ptr")}
    else:
        kernel, consts = _silu_and_mul_kernel, dict(BLOCK=2048, PDL=True, EARLY=early)
        ptrs = {"x_ptr": "*bf16", "y_ptr": "*bf16"}
    lines = sm90_sass_ptrs(kernel, consts, ptrs, {"num_warps": 4, "plain_triton": True})
    ops = [s.split()[0] for s in lines if not s.startswith("//")]
    assert ops.count("ACQBULK") == 1
    if early:  # the trigger first, before any load
        assert ops.count("PREEXIT") == 1 and ops.index("PREEXIT") < ops.index("ACQBULK")
        assert not [o for o in ops[:ops.index("PREEXIT")] if o.startswith("LDG")]
    else:  # no trigger at all (one after loads broke accumulator reads on the H100, s28-12)
        assert "PREEXIT" not in ops


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("M", [3, 17, 40, 128])
def test_gpu_short_kernels_consume_pending_sums(monkeypatch, M, early):
    """RMSNorm with residual and SiLU-and-mul reading and zeroing a float32 accumulator, PDL-launched, with
    the early trigger on and off: the torch result, the accumulator left zero. With the trigger placed
    after the weight's load and the wait (the off setting before session 28) 17+ rows read wrong x."""
    from anybit.kernels import activation, rms_norm
    from anybit.kernels.pdl import pdl_enabled
    from anybit.layers.pending import new_pending
    monkeypatch.setattr(rms_norm, "pdl_early", lambda d: early and pdl_enabled(d))
    monkeypatch.setattr(activation, "pdl_early", lambda d: early and pdl_enabled(d))
    g = torch.Generator(device="cuda").manual_seed(M)
    H, dev = 512, torch.device("cuda")
    w = torch.randn(H, device=dev, generator=g).to(torch.bfloat16)
    for _ in range(3):
        p = new_pending(M, H, torch.bfloat16, (M, H), dev)
        src = torch.randn(M, H, device=dev, generator=g)
        p.acc.copy_(src)
        r = torch.randn(M, H, device=dev, generator=g).to(torch.bfloat16)
        y, new_r = rms_norm.fused_add_rms_norm(p, r, w, 1e-5)
        xs = (src.to(torch.bfloat16).float() + r.float()).to(torch.bfloat16)
        ref = (xs.float() * torch.rsqrt(xs.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
        assert torch.equal(new_r, xs) and not p.acc.any()
        assert (y.float() - ref.float() * w.float()).abs().max().item() < 0.05
        p = new_pending(M, 2 * H, torch.bfloat16, (M, 2 * H), dev)
        src = torch.randn(M, 2 * H, device=dev, generator=g)
        p.acc.copy_(src)
        y = activation.silu_and_mul(p)
        a, b = src.to(torch.bfloat16).float().chunk(2, dim=-1)
        want = (torch.nn.functional.silu(a).to(torch.bfloat16).float() * b).to(torch.bfloat16)
        assert (y.float() - want.float()).abs().max().item() <= 0.02 * want.abs().max().item()
        assert not p.acc.any()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_engine_generates_the_same_with_and_without_early_trigger(tmp_path, monkeypatch):
    """A bf16 W4 model through CUDA graphs (packed-half GEMVs, PDL-launched): the same generation with the
    early trigger on and off. The two prompts' prefill (36 tokens) adds into pending sums with float
    atomics (order not fixed), so the check is ``_agree``'s, not bit equality."""
    from anybit import LLM, SamplingParams
    from anybit.quant.quantize import quantize_model
    from tests.model_factory import make_tiny_model

    dense = make_tiny_model(tmp_path / "llama", hidden_size=512, intermediate_size=1024,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_layers=2,
                            dtype="bfloat16")
    model = quantize_model(dense, tmp_path / "w4", bits=4, group_size=128, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    prompts = ["def fibonacci(n):", "The quick brown fox jumps over the lazy dog"]
    outs = {}
    for early in ("0", "1"):
        monkeypatch.setenv("ANYBIT_PDL_EARLY", early)
        llm = LLM(str(model), dtype="bfloat16", device="cuda", kv_cache_memory=64 << 20, progress=False)
        res = llm.generate(prompts, params)
        assert llm.engine.runner.graph_runner is not None and llm.engine.runner.graph_runner.captured
        outs[early] = [(c.token_ids, [d[t] for t, d in zip(c.token_ids, c.logprobs, strict=True)])
                       for c in (o.outputs[0] for o in res)]
        del llm
    _agree(outs["0"], outs["1"])


def _agree(outs_a, outs_b, min_same: int = 4, tol: float = 0.1) -> None:
    """Two greedy generations (per prompt: token ids, their logprobs) agree: the same tokens for at least
    ``min_same`` steps, then (at a near-tie a bf16 rounding can flip) logprobs within ``tol`` up to and
    including the first step that differs."""
    for (tok0, lp0), (tok1, lp1) in zip(outs_a, outs_b, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(tok0, tok1, strict=True)) if a != b), len(tok0))
        assert same >= min_same, (tok0, tok1)
        last = min(same + 1, len(tok0))
        assert max(abs(a - b) for a, b in zip(lp0[:last], lp1[:last], strict=True)) < tol, (lp0, lp1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kv_cache_dtype,prompts", [("auto", 1), ("int8", 1), ("auto", 3), ("auto", 24),
                                                    ("auto", 40)])
def test_gpu_engine_pending_sums_generate_what_ordered_sums_do(tmp_path, monkeypatch, kv_cache_dtype,
                                                              prompts):
    """Decode of a bf16 W4 model at batch 1 (packed-half GEMVs), 3 (mma.sync kernel), 24 (its BLOCK_M 32
    pending sums) and 40 (the shipped routes; with MMA_SQUARE_PENDING_BITS on, BLOCK_M 64 pending sums on
    every weight, which fail this test in CUDA graphs with PDL, H100 s29-4..9): the GEMVs
    leave float32 PendingSums that the
    rotary, RMSNorm and SiLU kernels finish (ANYBIT_GEMV_ACC=1) or sum their splits in order (0).
    Every sum is consumed and zeroed. The float32 sums differ from the ordered ones only in the
    order (and, where the two kernel variants size their splits differently, the grouping) of the
    partials, so a bf16 rounding flips rarely. With a bf16 cache s9-3 saw equal logprobs bit for
    bit. An int8 cache re-quantizes K/V, so one flip can move a code (~1% of a head's range): up
    to 0.03 in the logprobs. On this random model a flip can also change a greedy token where two
    tokens are near-tied (s9-5: token 11 of 24, bf16 cache). So the check is: logprobs agree
    within 0.1 up to the first differing token, and there (a near-tie) the two chosen tokens'
    logprobs agree within 0.1 too; a broken sum would move them by far more."""
    from anybit import LLM, SamplingParams
    from anybit.layers import pending
    from anybit.quant.quantize import quantize_model
    from tests.model_factory import make_tiny_model

    dense = make_tiny_model(tmp_path / "llama", hidden_size=512, intermediate_size=1024,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_layers=2,
                            dtype="bfloat16")
    model = quantize_model(dense, tmp_path / "w4", bits=4, group_size=128, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    outs = {}
    for acc in ("0", "1"):
        monkeypatch.setenv("ANYBIT_GEMV_ACC", acc)
        pending._ACCS.clear()
        llm = LLM(str(model), dtype="bfloat16", device="cuda", kv_cache_memory=64 << 20, progress=False,
                  kv_cache_dtype=kv_cache_dtype)
        texts = (["def fibonacci(n):", "The quick brown fox", "import os\nimport sys"] * 14)[:prompts]
        outs[acc] = [(r.token_ids, [d[t] for t, d in zip(r.token_ids, r.logprobs, strict=True)])
                     for r in (o.outputs[0] for o in llm.generate(texts, params))]
        used = {k[2] for k in pending._ACCS}
        assert used == ({1024, 512, 2048} if acc == "1" else set())  # qkv, o / down, gate_up
        assert all(slot[1] is None and not slot[0].any() for slot in pending._ACCS.values())
        del llm
    _agree(outs["0"], outs["1"])
