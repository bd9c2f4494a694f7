"""One-warp Gluon decode kernel for int8 / int4 KV caches (anybit/kernels/attention_decode_gl.py).

Gluon does not run under the Triton interpreter, so on CPU: the conversions' PTX by bit-level
emulation, the kernel's reshape / join / permute chain replayed in torch (which cached code lands at
which relabelled head-dim index), and an offline sm_90 compile (no spills, no shared-memory round
trip for the MMA operands). On a Hopper GPU: the kernel against ``ref_paged_attention_decode``."""

import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "quant"))
from kv_helpers import make_batch, rel_err  # noqa: E402
from sm90_sass import loop_bodies, shared_bytes, sm90_sass_ptrs  # noqa: E402
from test_quant_gemm_wg import _emulate_word, _f16_halves  # noqa: E402

from anybit.kernels import attention_decode_gl as agl  # noqa: E402
from anybit.kernels.attention_decode import paged_attention_decode, ref_paged_attention_decode  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _halves(regs: list[int]) -> list[float]:
    return [float(torch.tensor([r], dtype=torch.int32).to(torch.int16).view(torch.float16)) for r in regs]


def _word(codes: list[int], bits: int) -> int:
    return sum((c & (2 ** bits - 1)) << bits * j for j, c in enumerate(codes))


def test_ptx_conversions_emulated():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        c8 = torch.randint(-128, 128, (2, 4), generator=g).tolist()
        c4 = torch.randint(0, 16, (2, 8), generator=g).tolist()
        # K int8: 1152 + code, memory order
        assert _halves(_emulate_word(agl.PTX_K_I8, _word(c8[0], 8))) == [1152.0 + c for c in c8[0]]
        # K int4: 1024 + code in K_I4_ORDER
        got = _halves(_emulate_word(agl.PTX_K_I4, _word(c4[0], 4)))
        assert got == [1024.0 + c4[0][j] for j in agl.K_I4_ORDER]
        # V: (even, odd) token pairs per code, exact codes (int4 centred)
        got = _halves(_emulate_word(agl.PTX_V_I8, _word(c8[0], 8), _word(c8[1], 8)))
        assert got == [float(c8[t][j]) for j in range(4) for t in (0, 1)]
        got = _halves(_emulate_word(agl.PTX_V_I4, _word(c4[0], 4), _word(c4[1], 4)))
        assert got == [float(c4[t][j] - 8) for j in range(8) for t in (0, 1)]
    assert _f16_halves(0x3C00BC00) == [-1.0, 1.0]


def _join(a, b):
    return torch.stack([a, b], -1)  # gl.join


def _join4(o0, o1, o2, o3):
    return _join(_join(o0, o2), _join(o1, o3))


def _join8(o0, o1, o2, o3, o4, o5, o6, o7):
    return _join(_join(_join(o0, o4), _join(o2, o6)), _join(_join(o1, o5), _join(o3, o7)))


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_relabelling_matches_the_kernels_chain(mode, head_dim):
    """The torch replay of ``_k_operand`` / ``_v_operand`` (same reshapes, joins and permutes; the
    conversion outputs as the emulated PTX orders them) puts at relabelled index d the code at
    ``k_memory_dim(d)`` / ``v_memory_dim(d)``: the contract the query load and the output store use."""
    per_word = 4 if mode == 1 else 8
    words = head_dim // per_word
    code = torch.arange(16 * head_dim).view(16, head_dim)  # "code" = token * head_dim + position
    w = code.view(16, words, per_word)  # a word's codes, memory order
    # K: the conversion emits the codes of each word in this order
    order = list(range(4)) if mode == 1 else list(agl.K_I4_ORDER)
    outs = [w[:, :, j] for j in order]
    x = _join4(*outs) if mode == 1 else _join8(*outs)
    x = x.reshape(16, 4, head_dim // 32, 8).permute(0, 2, 1, 3).reshape(16, head_dim)
    d = torch.arange(head_dim)
    assert torch.equal(x, code[:, agl.k_memory_dim(d, mode, head_dim)])
    # V: word pairs of even / odd token rows -> (even, odd) per code, in memory order
    w3 = w.view(8, 2, words, per_word).permute(0, 2, 1, 3)  # [pair, word, parity, code]
    pairs = [_join(w3[:, :, 0, j], w3[:, :, 1, j]) for j in range(per_word)]
    x = _join4(*pairs) if mode == 1 else _join8(*pairs)
    x = x.reshape(8, words, 2, per_word).permute(0, 2, 1, 3).reshape(16, 8, head_dim // 8)
    x = x.permute(0, 2, 1).reshape(16, head_dim).permute(1, 0)  # [d, token]
    assert torch.equal(x, code[:, agl.v_memory_dim(d, head_dim)].T)


@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("mode", [1, 2])
def test_sm90_compile_loop(mode, pair):
    """One warp, no spills, registers within GL_REGS (they size the splits), and in the loop no
    shared-memory stores or local memory: the operands' layout conversions are register renames.
    PAIR: two chunks per iteration (32 MMAs, 6 TMA copies), fewer instructions per chunk."""
    row = 128 if mode == 1 else 64
    desc = f"desc:int32:1024x{8 * row // 4}:16x{row // 4}"
    ptrs = {"q_ptr": "*bf16", "out_ptr": "*bf16", "k_desc": desc, "v_desc": desc, "qk_scale": "fp32",
            "s_desc": f"desc:float16:{1024 * 8 * 2 * mode}x16:{2 * mode}x16:0"}
    ptrs.update({n: "*fp32" for n in ("mid_o_ptr", "mid_lse_ptr")})
    ptrs.update({"bt_ptr": "*i32", "seq_lens_ptr": "*i32"})
    stages = agl.GL_PAIR_STAGES[mode] if pair else agl.GL_STAGES[mode]
    consts = dict(G=4, HEAD_DIM=128, PAGE=16, MODE=mode, SPLIT_OUT=True, DYN_SPLIT=True, HEAD_MAJOR=True,
                  STAGES=stages, PAIR=pair)
    lines = sm90_sass_ptrs(agl._decode_gl_kernel, consts, ptrs, {"num_warps": 1})
    chunks = 2 if pair else 1
    main = [b for b in loop_bodies(lines) if sum("HMMA" in s for s in b) == 16 * chunks and
            not any(s.startswith("STG") for s in b)]
    assert main, f"no loop with the {16 * chunks} MMAs of {chunks} chunk(s)"
    body = main[0]
    assert sum("UTMALDG" in s for s in body) == 3 * chunks  # K and V codes, scales
    assert not [s for s in body if s.startswith(("STS", "STL", "LDL"))], "shared-memory round trip or spills"
    assert not [s for s in lines if s.startswith(("STL", "LDL"))], "spills"
    regs = max(int(r) for s in lines for r in re.findall(r"\bR(\d+)\b", s)) + 1
    assert regs <= agl.GL_REGS[mode], regs
    assert shared_bytes(lines) <= stages * (2 * 16 * row + 2 * mode * 64 + 8) + 1024
    if pair:  # single-chunk loops: int8 413, int4 456 instructions (Triton 3.6 ptxas)
        assert len(body) / 2 < {1: 380, 2: 420}[mode], len(body)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_scale_rows_only_for_packed_scales(dtype):
    """scale_rows views the packed buffer as the TMA rows (page, head, array); other layouts: None."""
    from kv_helpers import make_cache

    cache = make_cache(dtype, 5, 32, 3, 64, device="cpu")
    rows = agl.scale_rows(cache)
    arrays = [cache.key_scale, cache.value_scale]
    arrays += [cache.key_zero, cache.value_zero] if dtype == "int4" else []
    assert rows.shape == (5 * 3 * len(arrays), 32)
    for i, a in enumerate(arrays):
        for page, head in ((0, 0), (4, 2), (2, 1)):
            assert torch.equal(rows[(page * 3 + head) * len(arrays) + i], a[page, :, head])
    for layout in ("head", "token"):
        assert agl.scale_rows(make_cache(dtype, 5, 32, 3, 64, device="cpu", scale_layout=layout)) is None
    assert agl.code_layout(cache.key) == "head"
    assert agl.code_layout(make_cache(dtype, 5, 32, 3, 64, device="cpu", code_layout="token").key) == "token"


def test_programs_per_sm(monkeypatch):
    """Single-chunk rings (3 slots): 16 per SM (registers); the int8 pair ring (4 slots, 18 KB) fits 12."""
    monkeypatch.delenv("ANYBIT_GL_PAIR", raising=False)
    assert agl.gl_programs_per_sm(1, 128, stages=3) == 16
    assert agl.gl_programs_per_sm(2, 128, stages=3) == 16
    monkeypatch.setattr(agl, "GL_PAIR", {1: True, 2: True})
    assert agl.gl_programs_per_sm(1, 128) == 12
    assert agl.gl_programs_per_sm(2, 128) == 16


def test_pairs_only_while_every_program_is_resident(monkeypatch):
    """int8's pair ring fits 12 programs per SM (the single ring 16): beyond 12 x SMs programs the launch
    runs one chunk per iteration; int4's fits 16 per SM, and past 16 x SMs it runs single chunks too."""
    monkeypatch.delenv("ANYBIT_GL_PAIR", raising=False)
    monkeypatch.setattr(agl, "GL_PAIR", {1: True, 2: True})
    assert agl.gl_pair_fits(1, 128, 12 * 132, 132) and not agl.gl_pair_fits(1, 128, 12 * 132 + 1, 132)
    assert agl.gl_pair_fits(2, 128, 16 * 132, 132) and not agl.gl_pair_fits(2, 128, 16 * 132 + 1, 132)
    monkeypatch.setattr(agl, "GL_PAIR", {1: False, 2: True})
    assert not agl.gl_pair_fits(1, 128, 1, 132)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Hopper GPU")
@pytest.mark.parametrize("pair,merge", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("nh,nkv,hd,bs", [(32, 8, 128, 16), (8, 8, 128, 32), (16, 2, 64, 16),
                                         (14, 2, 128, 64)])
def test_gl_decode_vs_ref(dtype, nh, nkv, hd, bs, pair, merge, monkeypatch):
    """Odd and even chunk counts (PAIR rounds them up with a masked chunk of page 0), windows, splits
    merged by a second kernel or in-kernel (MERGE, whose counters must be left at zero; contexts of one
    working split, 1-128 tokens here, write out directly)."""
    from anybit.kernels.quant_gemm_h2 import _lock_buffer
    monkeypatch.setattr(agl, "GL_PAIR", {1: pair, 2: pair})
    monkeypatch.setenv("ANYBIT_GL_MERGE", str(int(merge)))  # any split count (7 and the rule's)
    monkeypatch.delenv("ANYBIT_GL_PAIR", raising=False)
    seq = [1, 15, 16, 17, 129, 300, 1030]
    b = make_batch(seq, [1] * len(seq), nh, nkv, hd, dtype, block_size=bs, q_dtype=torch.bfloat16)
    q, cache = b["query"], b["cache"]
    assert agl.gl_decode_applies(q, cache)
    for win in (None, 100):
        args = (q, cache, b["seq_lens"], b["block_table"], hd ** -0.5, win, max(seq))
        ref = ref_paged_attention_decode(*args)
        for splits in (None, 1, 7):
            for dyn in (True, False):
                out = paged_attention_decode(*args, num_splits=splits, dyn_split=dyn, gl=True)
                e = rel_err(out, ref)
                assert e < 1e-2, (win, splits, dyn, e)
        tri = paged_attention_decode(*args, gl=False)
        assert rel_err(out, tri) < 1e-2
    if merge:
        assert not _lock_buffer(q.device, len(seq) * nkv, "decode_gl").any()


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Hopper GPU")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("code_layout,scale_layout", [("token", "packed"), ("head", "token")])
def test_other_cache_layouts(dtype, code_layout, scale_layout):
    """Token-major codes run on this kernel too; scales not packed per (page, kv head) do not apply
    (gl=True falls back to the Triton kernel, which follows any strides). Either way: right."""
    seq = [1, 17, 300, 1030]
    b = make_batch(seq, [1] * len(seq), 32, 8, 128, dtype, q_dtype=torch.bfloat16, code_layout=code_layout,
                   scale_layout=scale_layout)
    assert agl.gl_decode_applies(b["query"], b["cache"]) == (scale_layout == "packed")
    args = (b["query"], b["cache"], b["seq_lens"], b["block_table"], 128 ** -0.5, None, max(seq))
    ref = ref_paged_attention_decode(*args)
    assert rel_err(paged_attention_decode(*args, num_splits=3, gl=True), ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Hopper GPU")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_gl_decode_long_context_one_split(dtype):
    """32k tokens in one accumulator: no drift (the V codes enter exactly). Session 19 tried V codes
    biased like K's (1024 + code, the bias removed before each pair's MMAs, 15% fewer instructions per
    chunk): no faster on the H100 (s19-1) and 3.7% off here for int4, so not kept."""
    seq = [32768]
    b = make_batch(seq, [1], 32, 8, 128, dtype, q_dtype=torch.bfloat16)
    args = (b["query"], b["cache"], b["seq_lens"], b["block_table"], 128 ** -0.5, None, seq[0])
    ref = ref_paged_attention_decode(*args)
    assert rel_err(paged_attention_decode(*args, num_splits=1, gl=True), ref) < 1e-2


def test_split_count_fills_half_the_resident_slots(monkeypatch):
    """``_paged_decode_gl`` sizes its splits for GL_WAVE_FILL of the resident programs (half: b32 x 8k
    on 132 SMs takes 4 splits of 2048 tokens, 1024 programs, not 8) and merges them in a second kernel
    (launched with PDL where the GPU has it; never on CPU). Launches stubbed: the sizing only."""
    from anybit.kernels import attention_decode as ad
    seen = {}
    monkeypatch.setattr(ad, "launch_decode_gl", lambda *a, **k: seen.update(
        gl=a, trigger=k.get("trigger"), counters=k.get("counters")))
    monkeypatch.setenv("ANYBIT_GL_MERGE", "0")

    class _Reduce:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.update(reduce_grid=grid, reduce_kw=k)

    monkeypatch.setattr(ad, "_decode_reduce_kernel", _Reduce())
    monkeypatch.setattr(ad, "_num_sms", lambda device: 132)
    from anybit.layers.attention_meta import new_layer_kv_cache
    cache = new_layer_kv_cache(2, 16, 8, 128, "int4", torch.device("cpu"))  # contents unused
    seq_lens, table = torch.full((32,), 8192, dtype=torch.int32), torch.zeros(32, 512, dtype=torch.int32)
    q = torch.randn(32, 32, 128, dtype=torch.bfloat16)
    ad._paged_decode_gl(q, cache, seq_lens, table, 128 ** -0.5, None, 8192, None, None, True)
    tps, splits = seen["gl"][-3], seen["gl"][-2]  # (..., tokens_per_split, splits, dyn_split)
    slots = int(agl.gl_programs_per_sm(2, 128) * ad.GL_WAVE_FILL) * 132
    assert splits == ad.choose_splits(32 * 8, 8192, slots) and splits * tps >= 8192
    if ad.GL_WAVE_FILL == 0.5 and agl.gl_programs_per_sm(2, 128) == 16:
        assert (splits, tps) == (4, 2048)
    assert seen["reduce_grid"] == (32, 32) and seen["trigger"] is False
    assert "launch_pdl" not in seen["reduce_kw"]  # CPU: no programmatic dependent launch
    assert seen["counters"] is None
    # in-kernel merge: counters for every (sequence, kv head), no merge kernel
    seen.clear()
    monkeypatch.setenv("ANYBIT_GL_MERGE", "1")
    ad._paged_decode_gl(q, cache, seq_lens, table, 128 ** -0.5, None, 8192, None, None, True)
    assert "reduce_grid" not in seen and seen["counters"].numel() >= 32 * 8
    assert seen["counters"].dtype == torch.int32 and not seen["counters"].any()


def test_in_kernel_merge_up_to_8_splits(monkeypatch):
    """The in-kernel merge by default from 2 to GL_MERGE_MAX_SPLITS splits (b32/b64 at 4 / 2); the env
    forces it either way, never for one split."""
    from anybit.kernels import attention_decode as ad
    monkeypatch.delenv("ANYBIT_GL_MERGE", raising=False)
    assert ad.GL_MERGE and ad.GL_MERGE_MAX_SPLITS == 8
    assert [ad.gl_merge(n) for n in (1, 2, 4, 8, 9, 13)] == [False, True, True, True, False, False]
    monkeypatch.setenv("ANYBIT_GL_MERGE", "1")
    assert ad.gl_merge(13) and not ad.gl_merge(1)
    monkeypatch.setenv("ANYBIT_GL_MERGE", "0")
    assert not ad.gl_merge(4)


def test_merge_block_keeps_the_partials_in_64_registers():
    """Splits per round of the in-kernel merge: a power of two <= splits, G_P2 * head_dim * block <= 2048."""
    assert agl.merge_block(4, 4, 128) == 4
    assert agl.merge_block(7, 4, 128) == 4
    assert agl.merge_block(4, 8, 128) == 2
    assert agl.merge_block(3, 1, 64) == 2
    assert agl.merge_block(16, 1, 64) == 16
    assert agl.merge_block(2, 7, 128) == 2
