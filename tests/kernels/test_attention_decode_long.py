"""Quantized split-K decode over long contexts (many tiles, pages and splits, odd lengths) vs ``ref_``,
with the interpreter's ``tl.dot`` replaced by a model of tensor-core accumulation.

Why the model: the H100 run of session 2 showed the int8/int4 outputs drifting with the number of
tokens per split (0.05-0.14 relative at 32k), which the interpreter's exact float32 ``np.matmul``
cannot show. Tensor cores add the products of a k-step to the float32 accumulator and truncate (round
toward zero, Fasi et al. 2021 "Numerical behavior of NVIDIA tensor cores"), so a rounding error
of up to one ulp *of the accumulator* per k-step, always in the same direction. The biased path fed
``1152 + code`` (int8) / ``1024 + code`` (int4) into the PV product and removed ``1152 * sum(p * v_scale)``
only at the end of the split: the accumulator held a value ~10^3 larger than the result and its
truncation error grew linearly with the tokens of the split. ``tensor_core_dot`` reproduces this
on CPU: exact products, float64 sums of 16-wide k chunks, each added to the accumulator with the
result truncated to float32.
"""

import numpy as np
import pytest
import torch
from kv_helpers import make_batch

from anybit.kernels.attention_decode import paged_attention_decode, ref_paged_attention_decode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only (CPU) model of the MMA")


def _to_f32_toward_zero(x: np.ndarray) -> np.ndarray:
    y = x.astype(np.float32)
    over = np.abs(y.astype(np.float64)) > np.abs(x)
    return np.where(over, np.nextafter(y, np.float32(0)), y)


def install_tensor_core_dot(monkeypatch) -> None:
    """Replace the interpreter's float32-accumulating ``tl.dot`` by the tensor-core model."""
    from triton.runtime import interpreter

    orig = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if d.data.dtype != np.float32:
            return orig(self, a, b, d, input_precision, max_num_imprecise_acc)
        a64, b64 = a.data.astype(np.float64), b.data.astype(np.float64)
        acc = d.data.astype(np.float64)
        for k0 in range(0, a64.shape[-1], 16):  # one m16n8k16 k-step: products exact, sum truncated
            acc = _to_f32_toward_zero(acc + a64[..., k0:k0 + 16] @ b64[k0:k0 + 16]).astype(np.float64)
        return interpreter.TensorHandle(acc.astype(np.float32), d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture
def tensor_core_dot(monkeypatch):
    install_tensor_core_dot(monkeypatch)


def _per_seq_rel(out, ref):
    """Worst relative error of one sequence (a batch-wide norm hides the long, small-valued ones)."""
    a, b = out.double(), ref.double()
    return max(((a[i] - b[i]).norm() / b[i].norm()).item() for i in range(a.shape[0]))


LONG = [1021, 77]  # odd lengths: partial pages and partial 64-token tiles, up to 16 tiles per split


@pytest.mark.parametrize("cache_dtype", ["int8", "int4"])
def test_decode_long_context_tensor_core_rounding(tensor_core_dot, cache_dtype):
    b = make_batch(LONG, [1] * len(LONG), 4, 1, 64, cache_dtype, seed=5)
    args = (b["query"], b["cache"], b["seq_lens"], b["block_table"], 0.09, None, b["max_seq_len"])
    ref = ref_paged_attention_decode(*args)
    outs = {}
    for splits, pfs in ((1, (0, 1, 2)), (3, (0, 2))):
        for pf in pfs:
            out = paged_attention_decode(*args, num_splits=splits, biased=True, prefetch=pf, block_n=64)
            err = _per_seq_rel(out, ref)
            # exact V accumulation: <= ~2e-5 here at any split length; session 2's kernel (bias removed
            # once per split) gave 1.4e-3 (int8) / 1.3e-2 (int4) at 1499 tokens in one split
            assert err < 1e-4, f"{cache_dtype} splits={splits} prefetch={pf}: per-sequence rel err {err:.2e}"
            outs[(splits, pf)] = out
    # prefetch changes when codes are loaded, never the arithmetic: bit-identical results
    for key in ((1, 1), (1, 2), (3, 2)):
        assert torch.equal(outs[key], outs[(key[0], 0)]), key
    # the cheaper per-tile bias removal (exact_v=False): error bounded by one tile, not by the split
    out = paged_attention_decode(*args, num_splits=1, biased=True, block_n=64, exact_v=False)
    err = _per_seq_rel(out, ref)
    assert err < 1e-3, f"exact_v=False: {err:.2e}"


@pytest.mark.parametrize("cache_dtype", ["int8", "int4"])
def test_decode_long_context_window_and_stale_max(cache_dtype):
    """Exact float32 dot (no MMA model): sliding window across split boundaries and a stale
    max_seq_len (CUDA-graph sizing) on long contexts, every prefetch depth."""
    b = make_batch([1531, 77], [1, 1], 4, 1, 64, cache_dtype, seed=9)
    for window, max_len in ((None, 600), (700, b["max_seq_len"])):
        args = (b["query"], b["cache"], b["seq_lens"], b["block_table"], 0.12, window, max_len)
        ref = ref_paged_attention_decode(*args)
        for pf in (0, 2):
            out = paged_attention_decode(*args, num_splits=4, biased=True, prefetch=pf, block_n=64)
            err = _per_seq_rel(out, ref)
            assert err < 1e-4, f"{cache_dtype} window={window} max_len={max_len} prefetch={pf}: {err:.2e}"


@pytest.mark.parametrize("cache_dtype", ["int8", "int4"])
def test_decode_batch16_default_small_programs(cache_dtype):
    """From PREFETCH_MIN_SEQS sequences the launcher's default is the small-program config of
    ``DEFAULT_PREFETCH_BY_MODE`` (1-2 warps, 32-64 tokens, prefetch 2): odd lengths across tiles
    and pages, against ref_ and against the previous 4-warp x 128-token config (same math)."""
    from anybit.kernels import attention_decode as ad

    lens = [1, 15, 16, 17, 33, 63, 64, 65, 97, 130, 150, 31, 2, 200, 5, 77][:ad.PREFETCH_MIN_SEQS]
    b = make_batch(lens, [1] * len(lens), 4, 1, 64, cache_dtype, q_dtype=torch.float16, seed=11)
    args = (b["query"], b["cache"], b["seq_lens"], b["block_table"], 0.125, None, b["max_seq_len"])
    ref = ref_paged_attention_decode(*args)
    out = paged_attention_decode(*args, biased=True)
    old = paged_attention_decode(*args, biased=True, block_n=128, num_warps=4)
    assert _per_seq_rel(out, ref) < 2e-3
    assert _per_seq_rel(out, old) < 2e-3
