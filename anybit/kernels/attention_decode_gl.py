"""Paged decode attention over an int8 / int4 KV cache for Hopper, in Gluon: one warp per program.

Why (docs/notes_attention.md, sessions 3-10): the Triton kernel of attention_decode.py reaches
1.70-1.74x (int8) and 2.07-2.22x (int4) of our bf16-cache time at batch 32/64, against 1.94x / 3.56x
from the bytes. Its programs hold the next tile in registers (Triton's pipeliner cannot pipeline
the paged loads), which costs ~250 registers and leaves 8 warps per SM, each running a long chain
of dependent work per tile; queries padded to 16 rows waste 3/4 of every MMA and of the
accumulator.

``_decode_gl_kernel``: program = (sequence, kv head, split) on **one warp**, 16 tokens (one MMA
tile) per iteration:

1. A TMA ring of ``GL_STAGES`` slots per program (3; a constexpr): the K and V code rows of
   a 16-token chunk of one kv head (2D int32-word views of the caches, ``code_descriptor``),
   requested ``STAGES - 1`` chunks ahead; their page ids come from the block table a chunk earlier.
   The engine stores codes head-major inside a page (``kv_code_buffer``), so a chunk is one
   contiguous run of ``16 * row`` bytes; with token-major codes (also accepted) it is 16 pieces
   spread over a page that 7 other programs share, and int4 at b64 x 32k ran 2.37x bf16 instead of
   3.30x (H100 s14-4). The chunk's scales (and int4 zero points) ride in the same ring: the engine
   packs them per (page, kv head) (``kv_scale_buffers``), so one ``[count, 16]`` float box brings
   all of them (``scale_rows``). Loaded into registers only one chunk ahead, they were late whenever
   they came from DRAM (s14-1/2).
2. Swap-AB scores ``S^T = K q^T`` (``mma.sync`` m16n8k16: 16 tokens x 8 heads, G <= 8 query heads
   of the kv group padded to 8, not 16). K is the A operand with ``k_width 8``: lane ``q`` of a quad
   holds 32 head-dim values of its two token rows, which the kernel takes as 16-32 *contiguous* bytes
   of the row (one or two 16-byte shared loads): the head dimension is relabelled, and q is loaded
   with the same relabelling (``_k_memory_dim``), which leaves every dot product unchanged. K codes
   enter as biased fp16 (int8 ``1152 + code``, int4 ``1024 + code``: packed integer instructions, no
   conversions); the bias leaves each score as ``bias * sum(q)``, the scale (and zero point) after.
3. Online softmax over the 16 tokens of the chunk in registers (3 shuffles per head), ``p *
   v_scale`` to fp16 and through one layout conversion into the B operand of
3. ``O^T += V^T P^T`` (8 MMAs): V^T is the A operand (``k_width 2``: token pairs), built from the
   words of two token rows by one ``prmt`` per four codes; V codes enter exactly (int8 ``code``,
   int4 ``code - 8`` with ``8 * scale`` moved to the zero point). Output rows are relabelled head-dim
   values (``_v_memory_dim``), undone at the store.

With ``PAIR`` (the default, ``GL_PAIR``) an iteration takes two chunks: two independent K unpack /
score MMA chains, one online-softmax update per 32 tokens, two PV MMAs; an odd chunk count is rounded up
with a masked chunk read from page 0.

No barrier but the slot hand-back (a 32-thread ``bar.sync``) and no cross-warp reduction. Splits are
merged by attention_decode's reduction kernel, as for the Triton kernel, or (MERGE) by the last split of
each (sequence, kv head) to finish, through a counter.

Testing: Gluon kernels do not run under ``TRITON_INTERPRET``. On CPU the tests emulate the PTX of the
conversions bit by bit, replay the kernel's reshape / join / permute chain in torch to check the
relabelling, and compile the kernel for sm_90 (no shared-memory round trip for the operands); on
CUDA they compare with ``ref_paged_attention_decode``.
"""

from __future__ import annotations

import os

import torch

from anybit.layers import attention_meta
from anybit.layers.attention_meta import LayerKVCache

try:  # Gluon (Triton >= 3.5) is optional: CPU installs and older Triton use attention_decode's kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from anybit.kernels.quant_gemv_mma import _gdc_launch_dependents
except ImportError:  # pragma: no cover
    gluon = None

CHUNK = 16  # tokens per iteration (one MMA tile)
# TMA ring slots per program by mode (chunks requested STAGES - 1 ahead). Measured (H100 s14-9, CUDA
# graphs, int4 at b8-64 x 1k-32k): 4 slots were 0-4% slower than 3, so more bytes in flight do not
# help; int8 at 4 slots would also fit only 12 programs per SM.
GL_STAGES = {1: 3, 2: 3}
# Two chunks per iteration (PAIR): each warp runs two independent unpack -> MMA chains and one online-softmax
# update (one max / sum reduction and one rescale of O) per 32 tokens. Session 16's profile (b32 x 4k int4:
# ~7.5 warps per SM, ~0.3 instructions per warp and cycle) says each warp waits on its chunk's dependent
# chain; a second chunk in the same iteration gives the scheduler independent work. Ring slots with pairs:
# GL_PAIR_STAGES (one pair in flight ahead at 4). Env ANYBIT_GL_PAIR=0/1 overrides GL_PAIR. H100 s18-1
# (attention_decode_splits_pair_s18_1, CUDA graphs, b8-64 x 1k-32k): never slower, +0.5-3.5% at b32/b64,
# +7-12% at b8 x 1k-4k and b32 x 1k (int4); 6 slots were slower than 4. Offline: int4 456 -> 394
# instructions per chunk, int8 413 -> 348, <= 126 registers.
GL_PAIR = {1: True, 2: True}
GL_PAIR_STAGES = {1: 4, 2: 4}
GL_MAX_GROUP = 8  # query heads per kv head (the MMA's N)
# Splits hold whole multiples of this many tokens (the kernel's DYN_SPLIT granularity too): with
# 16-token slices a short context in a graph sized for long ones ran ~60 one-chunk programs per head
# and merged ~60 partials (H100 s13-2: b1 ctx 1000 10.2 us against the Triton kernel's 7.4).
GL_SPLIT_MIN = 128
# Registers per thread of the compiled kernel (offline sm_90, d128; tests/kernels check them) and
# shared memory per program: they size the split count (resident programs per SM).
GL_REGS = {1: 128, 2: 128}

# --- PTX of the conversions (tests/kernels/test_attention_decode_gl.py emulates them) -------------
# K int8 word (4 codes) -> 4 halves ``1152 + code`` in memory order.
PTX_K_I8 = "\n".join([
    "{", ".reg .b32 u, t0, t1;",
    "xor.b32 u, $4, 0x80808080;",
    "prmt.b32 t0, u, 0x64646464, 0x4140;",
    "prmt.b32 t1, u, 0x64646464, 0x4342;",
    "mov.b32 {$0, $1}, t0;", "mov.b32 {$2, $3}, t1;", "}"])
# K int4 word (8 codes, code j at bits 4j) -> 8 halves ``1024 + code`` in the order of codes
# 0, 4, 1, 5, 2, 6, 3, 7 (K_I4_ORDER).
PTX_K_I4 = "\n".join([
    "{", ".reg .b32 s, t0, t1, t2, t3;",
    "lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;",
    "shr.u32 s, $8, 4;", "lop3.b32 t1, s, 0x000F000F, 0x64006400, 0xEA;",
    "shr.u32 s, $8, 8;", "lop3.b32 t2, s, 0x000F000F, 0x64006400, 0xEA;",
    "shr.u32 s, $8, 12;", "lop3.b32 t3, s, 0x000F000F, 0x64006400, 0xEA;",
    "mov.b32 {$0, $1}, t0;", "mov.b32 {$2, $3}, t1;", "mov.b32 {$4, $5}, t2;", "mov.b32 {$6, $7}, t3;", "}"])
K_I4_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
# V int8: the words of an even and an odd token row ($8, $9) -> 8 halves ``code``: (even, odd) of
# code 0, then of code 1, 2, 3.
PTX_V_I8 = "\n".join([
    "{", ".reg .b32 ue, uo, x0, x1, h0, h1, h2, h3, k;",
    "xor.b32 ue, $8, 0x80808080;", "xor.b32 uo, $9, 0x80808080;",
    "prmt.b32 x0, ue, uo, 0x5140;",  # even c0, odd c0, even c1, odd c1
    "prmt.b32 x1, ue, uo, 0x7362;",  # the same for codes 2, 3
    "prmt.b32 h0, x0, 0x64646464, 0x4140;", "prmt.b32 h1, x0, 0x64646464, 0x4342;",
    "prmt.b32 h2, x1, 0x64646464, 0x4140;", "prmt.b32 h3, x1, 0x64646464, 0x4342;",
    "mov.b32 k, 0x64806480;",
    "sub.f16x2 h0, h0, k;", "sub.f16x2 h1, h1, k;", "sub.f16x2 h2, h2, k;", "sub.f16x2 h3, h3, k;",
    "mov.b32 {$0, $1}, h0;", "mov.b32 {$2, $3}, h1;", "mov.b32 {$4, $5}, h2;", "mov.b32 {$6, $7}, h3;", "}"])


def _ptx_v_i4() -> str:
    """V int4: the words of an even and an odd token row ($16, $17) -> 16 halves ``code - 8``:
    (even, odd) of code 0, then of codes 1..7."""
    lines = ["{", ".reg .b32 x, y, s, t, k;", "mov.b32 k, 0x64086408;",
             "prmt.b32 x, $16, $17, 0x5410;",  # low halves: codes 0-3 of each row
             "prmt.b32 y, $16, $17, 0x7632;"]  # high halves: codes 4-7
    out = 0
    for src in ("x", "y"):
        for shift in (0, 4, 8, 12):
            s = src
            if shift:
                lines.append(f"shr.u32 s, {src}, {shift};")
                s = "s"
            lines += [f"lop3.b32 t, {s}, 0x000F000F, 0x64006400, 0xEA;", "sub.f16x2 t, t, k;",
                      f"mov.b32 {{${out}, ${out + 1}}}, t;"]
            out += 2
    return "\n".join(lines + ["}"])


PTX_V_I4 = _ptx_v_i4()


def k_memory_dim(d: torch.Tensor, mode: int, head_dim: int) -> torch.Tensor:
    """Byte-code position in a cached row of the K operand's (relabelled) head-dim index d: lane q
    of a quad holds d = 32 c + 8 q + i (c < head_dim / 32, i < 8) and reads codes
    ``head_dim / 4 * q + 8 c + order(i)`` (order: the conversion's; identity for int8)."""
    i = d & 7
    if mode == 2:
        i = (i >> 1) + 4 * (i & 1)  # K_I4_ORDER
    return head_dim // 4 * ((d >> 3) & 3) + 8 * (d >> 5) + i


def v_memory_dim(d: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Code position of the V operand's (relabelled) output row d: lane r (d % 8) reads the
    ``head_dim / 8`` contiguous codes from ``head_dim / 8 * r``."""
    return head_dim // 8 * (d & 7) + (d >> 3)


if gluon is not None:
    _PTX_K_I8: gl.constexpr = gl.constexpr(PTX_K_I8)
    _PTX_K_I4: gl.constexpr = gl.constexpr(PTX_K_I4)
    _PTX_V_I8: gl.constexpr = gl.constexpr(PTX_V_I8)
    _PTX_V_I4: gl.constexpr = gl.constexpr(PTX_V_I4)

    @gluon.constexpr_function
    def _k_word_layout(words):
        """K words ``[16 tokens, words]`` in memory order: lane (token row % 8, quad lane q) holds the
        words ``[q words / 4, (q + 1) words / 4)`` of rows r and r + 8."""
        return gl.BlockedLayout([1, words // 4], [8, 4], [1, 1], [1, 0])

    @gluon.constexpr_function
    def _v_word_layout(words):
        """V words ``[16 tokens, words]`` in memory order: lane (quad lane q, r) holds the words
        ``[r words / 8, (r + 1) words / 8)`` of token rows 2q, 2q + 1, 2q + 8, 2q + 9."""
        per = words // 8
        regs = [[1, 0]] + [[0, 1 << i] for i in range(per.bit_length() - 1)] + [[8, 0]]
        lanes = [[2, 0], [4, 0], [0, per], [0, 2 * per], [0, 4 * per]]
        return gl.DistributedLinearLayout(regs, lanes, [], [], [16, words])

    @gluon.jit
    def _join4(o0, o1, o2, o3):
        """``[..., 4]`` with o_k at index k."""
        return gl.join(gl.join(o0, o2), gl.join(o1, o3))

    @gluon.jit
    def _join8(o0, o1, o2, o3, o4, o5, o6, o7):
        """``[..., 2, 2, 2]`` with o_k at flat index k."""
        return gl.join(gl.join(gl.join(o0, o4), gl.join(o2, o6)), gl.join(gl.join(o1, o5), gl.join(o3, o7)))

    @gluon.jit
    def _k_operand(words, MODE: gl.constexpr, HEAD_DIM: gl.constexpr, AL: gl.constexpr):
        """K words ``[16, W]`` (``_k_word_layout``) -> the biased fp16 A operand ``[16, HEAD_DIM]`` with
        the head dimension relabelled as ``k_memory_dim``."""
        if MODE == 1:
            h0, h1, h2, h3 = gl.inline_asm_elementwise(_PTX_K_I8, "=h,=h,=h,=h,r", [words],
                                                       dtype=(gl.float16,) * 4, is_pure=True, pack=1)
            x = _join4(h0, h1, h2, h3)
        else:
            h0, h1, h2, h3, h4, h5, h6, h7 = gl.inline_asm_elementwise(
                _PTX_K_I4, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], dtype=(gl.float16,) * 8, is_pure=True,
                pack=1)
            x = _join8(h0, h1, h2, h3, h4, h5, h6, h7)
        x = gl.reshape(x, [16, 4, HEAD_DIM // 32, 8])  # (row, q, c, i): f = HEAD_DIM / 4 * q + 8 c + i
        x = gl.reshape(gl.permute(x, (0, 2, 1, 3)), [16, HEAD_DIM])  # d = 32 c + 8 q + i
        return gl.convert_layout(x, AL)

    @gluon.jit
    def _v_operand(words, MODE: gl.constexpr, HEAD_DIM: gl.constexpr, AL: gl.constexpr):
        """V words ``[16, W]`` (``_v_word_layout``) -> the exact fp16 A operand ``V^T`` ``[HEAD_DIM, 16]``
        with the head dimension relabelled as ``v_memory_dim``."""
        W: gl.constexpr = words.shape[1]
        w3 = gl.permute(gl.reshape(words, [8, 2, W]), (0, 2, 1))
        we, wo = gl.split(w3)  # [8, W]: the even and odd token rows
        if MODE == 1:
            e0, o0, e1, o1, e2, o2, e3, o3 = gl.inline_asm_elementwise(
                _PTX_V_I8, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [we, wo], dtype=(gl.float16,) * 8, is_pure=True,
                pack=1)
            x = _join4(gl.join(e0, o0), gl.join(e1, o1), gl.join(e2, o2), gl.join(e3, o3))  # [8, W, 2, 4]
            NK: gl.constexpr = 4
        else:
            (e0, o0, e1, o1, e2, o2, e3, o3, e4, o4, e5, o5, e6, o6, e7, o7) = gl.inline_asm_elementwise(
                _PTX_V_I4, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,r", [we, wo],
                dtype=(gl.float16,) * 16, is_pure=True, pack=1)
            x = _join8(gl.join(e0, o0), gl.join(e1, o1), gl.join(e2, o2), gl.join(e3, o3), gl.join(e4, o4),
                       gl.join(e5, o5), gl.join(e6, o6), gl.join(e7, o7))  # [8, W, 2, 2, 2, 2]
            NK: gl.constexpr = 8
        x = gl.permute(gl.reshape(x, [8, W, 2, NK]), (0, 2, 1, 3))  # (pair, parity, word, code)
        x = gl.reshape(x, [16, 8, HEAD_DIM // 8])  # token, r, j: memory position HEAD_DIM / 8 * r + j
        x = gl.reshape(gl.permute(x, (0, 2, 1)), [16, HEAD_DIM])  # d = 8 j + r
        return gl.convert_layout(gl.permute(x, (1, 0)), AL)

    @gluon.jit
    def _issue_chunk(k_desc, v_desc, s_desc, k_smem, v_smem, s_smem, bars, j, page, tok, kvh, nkv,
                     PAGE: gl.constexpr, HEAD_MAJOR: gl.constexpr, pred):
        """TMA of chunk j (first token tok, in page ``page``) of kv head kvh into ring slot j % STAGES: its
        K and V code rows and its ``[count, 16]`` scales / zero points. HEAD_MAJOR: the code views
        are ``[blocks * kv_heads * PAGE, W]`` (``code_descriptor``), else ``[blocks * PAGE,
        kv_heads * W]``."""
        W: gl.constexpr = k_desc.block_type.shape[1]
        COUNT: gl.constexpr = s_desc.block_type.shape[0]
        slot = j % k_smem.shape[0]
        bar = bars.index(slot)
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes + s_desc.block_type.nbytes, pred=pred)
        if HEAD_MAJOR:
            row = (page * nkv + kvh) * PAGE + tok % PAGE
            col = 0
        else:
            row = page * PAGE + tok % PAGE
            col = kvh * W
        tma.async_copy_global_to_shared(k_desc, [row, col], bar, k_smem.index(slot), pred=pred)
        tma.async_copy_global_to_shared(v_desc, [row, col], bar, v_smem.index(slot), pred=pred)
        tma.async_copy_global_to_shared(s_desc, [(page * nkv + kvh) * COUNT, tok % PAGE], bar,
                                        s_smem.index(slot).slice(0, COUNT), pred=pred)

    @gluon.constexpr_function
    def _slot_rows(count, dtype):
        """Rows of a ring slot for ``count`` scale rows of 16 values: at least 128 bytes per slot, since
        a TMA copy's shared-memory destination must be 128-byte aligned (int8's two float16 rows are
        64 bytes: padded to 4 rows)."""
        return max(count, 64 // dtype.primitive_bitwidth)

    @gluon.jit
    def _chunk_scale(s_slot, i: gl.constexpr, TOK: gl.constexpr):
        """Row i ``[16]`` (layout TOK) of a ring slot's ``[count, 16]`` scales, as float32 (the box is
        unswizzled: row i is 16 consecutive values of the cache's scale type)."""
        COUNT: gl.constexpr = s_slot.shape[0]
        flat = s_slot._reinterpret(s_slot.dtype, [COUNT * 16], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        return flat.slice(16 * i, 16).load(TOK).to(gl.float32)

    @gluon.jit
    def _chunk_scores(k_slot, s_slot, q, kbias, qsum, qk_scale, tok, lo, end, MODE: gl.constexpr,
                      HEAD_DIM: gl.constexpr, KWL: gl.constexpr, KA: gl.constexpr, MMA: gl.constexpr,
                      TOK: gl.constexpr):
        """Scores ``S^T [16 tokens, 8 heads]`` (log2 units, -inf outside [lo, end)) of the chunk whose
        first token is tok, from a ring slot's K codes and scales; and the tokens' in-slice mask."""
        t = tok + gl.arange(0, 16, layout=TOK)
        ok = (t >= lo) & (t < end)
        ks = _chunk_scale(s_slot, 0, TOK) * qk_scale
        ka = _k_operand(k_slot.load(KWL), MODE, HEAD_DIM, KA)
        s = mma_v2(ka, q, gl.zeros([16, 8], gl.float32, MMA))  # S^T [tokens, heads]
        s = (s - kbias[None, :]) * ks[:, None]
        if MODE == 2:
            s += (_chunk_scale(s_slot, 2, TOK) * qk_scale)[:, None] * qsum[None, :]
        return gl.where(ok[:, None], s, float("-inf")), ok

    @gluon.jit
    def _chunk_v_weights(s_slot, ok, MODE: gl.constexpr, TOK: gl.constexpr):
        """A chunk's value scales ``[16]`` (0 outside the slice: the codes there may be anything finite)
        and each token's weight in the zero-point sum: int4's centred V codes carry ``z + 8 s``
        (unused for int8)."""
        vs = gl.where(ok, _chunk_scale(s_slot, 1, TOK), 0.0)
        zw = vs
        if MODE == 2:
            zw = gl.where(ok, _chunk_scale(s_slot, 3, TOK), 0.0) + 8.0 * vs
        return vs, zw

    @gluon.jit
    def _chunk_pv(v_slot, p, vs, acc, MODE: gl.constexpr, HEAD_DIM: gl.constexpr, VWL: gl.constexpr,
                  VA: gl.constexpr, PB: gl.constexpr):
        """``acc [HEAD_DIM, 8] + V^T (p * v_scale)^T`` for one chunk (p ``[16, 8]``, vs ``[16]``: 0 outside
        the slice)."""
        pb = gl.convert_layout((p * vs[:, None]).to(gl.float16), PB)
        va = _v_operand(v_slot.load(VWL), MODE, HEAD_DIM, VA)
        return mma_v2(va, pb, acc)

    @gluon.constexpr_function
    def _pow2_at_least(n):
        """The smallest power of two >= n."""
        return 1 << (int(n) - 1).bit_length()

    @gluon.jit
    def _merge_partials(mid_o_ptr, mid_lse_ptr, out_seq_ptr, stride_oh, head0, base, num_splits, n_splits,
                        G: gl.constexpr, HEAD_DIM: gl.constexpr, MB: gl.constexpr):
        """The G query heads head0.. of one kv group: each head's n_splits partial softmaxes at rows
        ``base + g num_splits + split`` of mid_o ``[.., HEAD_DIM]`` / mid_lse (log2-sum-exp2, -inf for
        an empty slice) merged into out rows head0 + g, MB splits per round (all their loads in flight
        together) with a running max, in split order (the same bits every call)."""
        G_P2: gl.constexpr = _pow2_at_least(G)
        L3: gl.constexpr = gl.BlockedLayout([MB, 1, HEAD_DIM // 32], [1, 1, 32], [1, 1, 1], [2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(2, L3)  # [MB, G_P2]
        LO: gl.constexpr = gl.SliceLayout(0, L3)  # [G_P2, HEAD_DIM]
        ks = gl.arange(0, MB, layout=gl.SliceLayout(1, LW))
        gs = gl.arange(0, G_P2, layout=gl.SliceLayout(0, LW))
        ds = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LO))
        d3 = gl.expand_dims(gl.expand_dims(ds, 0), 0)  # [1, 1, HEAD_DIM]
        rows = base + gs * num_splits
        mx = gl.full([G_P2], float("-inf"), gl.float32, gl.SliceLayout(0, LW))
        wsum = gl.zeros([G_P2], gl.float32, gl.SliceLayout(0, LW))
        acc = gl.zeros([G_P2, HEAD_DIM], gl.float32, LO)
        for k0 in range(0, n_splits, MB):
            m2 = ((k0 + ks) < n_splits)[:, None] & (gs < G)[None, :]
            idx = rows[None, :] + (k0 + ks)[:, None]
            lse = gl.load(mid_lse_ptr + idx, mask=m2, other=float("-inf"), cache_modifier=".cg")
            o = gl.load(mid_o_ptr + idx[:, :, None] * HEAD_DIM + d3, mask=m2[:, :, None],
                        other=0.0, cache_modifier=".cg")
            mx_new = gl.maximum(mx, gl.max(lse, axis=0))
            alpha = gl.where(mx_new > float("-inf"), gl.exp2(mx - mx_new), 1.0)
            w = gl.where(lse > float("-inf"), gl.exp2(lse - mx_new[None, :]), 0.0)
            acc = (acc * gl.convert_layout(alpha, gl.SliceLayout(1, LO))[:, None]
                   + gl.sum(w[:, :, None] * o, axis=0))
            wsum = wsum * alpha + gl.sum(w, axis=0)
            mx = mx_new
        res = acc / gl.convert_layout(gl.where(wsum > 0.0, wsum, 1.0), gl.SliceLayout(1, LO))[:, None]
        go = gl.arange(0, G_P2, layout=gl.SliceLayout(1, LO))
        gl.store(out_seq_ptr + (head0 + go)[:, None] * stride_oh + ds[None, :],
                 res.to(out_seq_ptr.dtype.element_ty), mask=(go < G)[:, None])

    @gluon.jit(do_not_specialize=["window", "tokens_per_split"])
    def _decode_gl_kernel(q_ptr, k_desc, v_desc, s_desc, bt_ptr, seq_lens_ptr,
                          out_ptr, mid_o_ptr, mid_lse_ptr, count_ptr, qk_scale, window, tokens_per_split,
                          stride_qs, stride_qh, stride_os, stride_oh, stride_bt,
                          G: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE: gl.constexpr,
                          HEAD_MAJOR: gl.constexpr, MODE: gl.constexpr, SPLIT_OUT: gl.constexpr,
                          DYN_SPLIT: gl.constexpr, SPLIT_MIN: gl.constexpr = 128, STAGES: gl.constexpr = 3,
                          TRIGGER: gl.constexpr = False, PAIR: gl.constexpr = False,
                          MERGE: gl.constexpr = False, MERGE_BLOCK: gl.constexpr = 4):
        """Grid (num_seqs, num_kv_heads, num_splits), one warp. Same contract as attention_decode's
        ``_decode_kernel`` (split slices of ``tokens_per_split`` tokens, DYN_SPLIT, partials to mid
        buffers when SPLIT_OUT, splits past the context return at once). Descriptors: the K / V
        codes as int32 words (``code_descriptor``, block ``[16, W]``, W = words per head row);
        the packed scales ``[num_blocks * kv_heads * count, PAGE]`` float16 or float32 (block
        ``[count, 16]``; rows key scale, value scale, then int4's key and value zero points).
        TRIGGER: let the next kernel of the stream (the split merge, launched with PDL) start now; it
        waits for this grid. MERGE (with SPLIT_OUT): the last split of each (sequence, kv head) to store
        its partial (``count_ptr`` int32 counters, zero before the launch and left at zero) merges all
        of them into ``out``, ``MERGE_BLOCK`` splits per round; no merge kernel. MERGE with one working
        split (short contexts): it writes ``out`` itself (b32 x 16 tokens 7.8 -> 5.4 us per call, H100
        s28-1)."""
        if TRIGGER:
            _gdc_launch_dependents()
        W: gl.constexpr = k_desc.block_type.shape[1]
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                      instr_shape=[16, 8])
        KA: gl.constexpr = gl.DotOperandLayout(0, MMA, 8)
        QB: gl.constexpr = gl.DotOperandLayout(1, MMA, 8)
        VA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        PB: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
        TOK: gl.constexpr = gl.SliceLayout(1, MMA)  # per token of a chunk (rows of S^T)
        HEAD: gl.constexpr = gl.SliceLayout(0, MMA)  # per query head (columns of S^T and O^T)
        seq = gl.program_id(0).to(gl.int64)
        kvh = gl.program_id(1)
        split = gl.program_id(2)
        num_splits = gl.num_programs(2)
        seq_len = gl.load(seq_lens_ptr + seq)
        if DYN_SPLIT:  # attention_decode._split_len with BLOCK_N = GL_SPLIT_MIN
            per = gl.cdiv(gl.cdiv(gl.maximum(seq_len, 1), num_splits), SPLIT_MIN) * SPLIT_MIN
            tokens_per_split = gl.minimum(tokens_per_split, gl.maximum(per, SPLIT_MIN))
        n_need = gl.minimum(gl.cdiv(gl.maximum(seq_len, 1), tokens_per_split), num_splits)
        if split >= n_need:
            return
        start = split * tokens_per_split
        end = gl.minimum(start + tokens_per_split, seq_len)
        if split == num_splits - 1:
            end = seq_len
        lo = start
        if window > 0:
            lo = gl.maximum(start, seq_len - window)
        c0 = lo - lo % 16
        n_it = gl.cdiv(end - c0, 16)

        # query heads of the group as the B operand [HEAD_DIM, 8] (head dim relabelled like K)
        dq = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, QB))
        hq = gl.arange(0, 8, layout=gl.SliceLayout(0, QB))
        iq = dq & 7
        if MODE == 2:
            iq = (iq >> 1) + 4 * (iq & 1)
        mq = HEAD_DIM // 4 * ((dq >> 3) & 3) + 8 * (dq >> 5) + iq
        q = gl.load(q_ptr + seq * stride_qs + (kvh * G + hq)[None, :] * stride_qh + mq[:, None],
                    mask=(hq < G)[None, :], other=0.0).to(gl.float16)
        qsum = gl.convert_layout(gl.sum(q.to(gl.float32), axis=0), HEAD)
        if MODE == 1:
            kbias = 1152.0 * qsum
        else:
            kbias = 1024.0 * qsum

        COUNT: gl.constexpr = s_desc.block_type.shape[0]
        nkv = gl.num_programs(1)
        k_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 16, W], k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 16, W], v_desc.layout)
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES, _slot_rows(COUNT, s_desc.dtype), 16],
                                           s_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        bt_row = bt_ptr + seq * stride_bt
        # prologue: chunks 0 .. AHEAD - 1 requested (AHEAD = STAGES - 1, or STAGES - 2 for pairs, whose
        # chunk count is rounded up to even: the extra one reads page 0 and is masked), the page ids
        # of the next chunk(s) kept
        AHEAD: gl.constexpr = STAGES - 2 if PAIR else STAGES - 1
        n_req = 2 * gl.cdiv(n_it, 2) if PAIR else n_it
        for j in gl.static_range(AHEAD):
            pg = gl.load(bt_row + (c0 + 16 * j) // PAGE, mask=n_it > j, other=0)
            _issue_chunk(k_desc, v_desc, s_desc, k_smem, v_smem, s_smem, bars, j, pg, c0 + 16 * j, kvh, nkv,
                         PAGE, HEAD_MAJOR, n_req > j)
        pg_next = gl.load(bt_row + (c0 + 16 * AHEAD) // PAGE, mask=n_it > AHEAD, other=0)
        pg_next2 = pg_next
        if PAIR:
            pg_next2 = gl.load(bt_row + (c0 + 16 * (AHEAD + 1)) // PAGE, mask=n_it > AHEAD + 1, other=0)

        KWL: gl.constexpr = _k_word_layout(W)
        VWL: gl.constexpr = _v_word_layout(W)
        m = gl.full([8], float("-inf"), gl.float32, HEAD)
        l_sum = gl.zeros([8], gl.float32, HEAD)
        zsum = gl.zeros([8], gl.float32, HEAD)
        acc = gl.zeros([HEAD_DIM, 8], gl.float32, MMA)
        if PAIR:
            # two chunks per iteration (the second of the last pair may be a dummy: page 0, masked);
            # one pair in flight ahead at STAGES 4
            n_pairs = gl.cdiv(n_it, 2)
            n_ch = 2 * n_pairs
            for it2 in range(n_pairs):
                j0 = 2 * it2
                tok = c0 + 16 * j0
                slot0 = j0 % STAGES
                slot1 = (j0 + 1) % STAGES
                mbarrier.wait(bars.index(slot0), (j0 // STAGES) & 1)
                mbarrier.wait(bars.index(slot1), ((j0 + 1) // STAGES) & 1)
                gl.thread_barrier()  # every lane is done with the previous pair's slots
                ahead = j0 + STAGES - 2
                _issue_chunk(k_desc, v_desc, s_desc, k_smem, v_smem, s_smem, bars, ahead, pg_next,
                             tok + 16 * (STAGES - 2), kvh, nkv, PAGE, HEAD_MAJOR, ahead < n_ch)
                _issue_chunk(k_desc, v_desc, s_desc, k_smem, v_smem, s_smem, bars, ahead + 1, pg_next2,
                             tok + 16 * (STAGES - 1), kvh, nkv, PAGE, HEAD_MAJOR, ahead + 1 < n_ch)
                pg_next = gl.load(bt_row + (tok + 16 * STAGES) // PAGE, mask=ahead + 2 < n_it, other=0)
                pg_next2 = gl.load(bt_row + (tok + 16 * (STAGES + 1)) // PAGE, mask=ahead + 3 < n_it, other=0)
                s0, ok0 = _chunk_scores(k_smem.index(slot0), s_smem.index(slot0), q, kbias, qsum, qk_scale,
                                        tok, lo, end, MODE, HEAD_DIM, KWL, KA, MMA, TOK)
                s1, ok1 = _chunk_scores(k_smem.index(slot1), s_smem.index(slot1), q, kbias, qsum, qk_scale,
                                        tok + 16, lo, end, MODE, HEAD_DIM, KWL, KA, MMA, TOK)
                m_new = gl.maximum(m, gl.max(gl.maximum(s0, s1), axis=0))
                alpha = gl.exp2(m - m_new)
                p0 = gl.exp2(s0 - m_new[None, :])
                p1 = gl.exp2(s1 - m_new[None, :])
                l_sum = l_sum * alpha + gl.sum(p0 + p1, axis=0)
                vs0, zw0 = _chunk_v_weights(s_smem.index(slot0), ok0, MODE, TOK)
                vs1, zw1 = _chunk_v_weights(s_smem.index(slot1), ok1, MODE, TOK)
                if MODE == 2:
                    zsum = zsum * alpha + gl.sum(p0 * zw0[:, None] + p1 * zw1[:, None], axis=0)
                acc = _chunk_pv(v_smem.index(slot0), p0, vs0, acc * alpha[None, :], MODE, HEAD_DIM, VWL, VA,
                                PB)
                acc = _chunk_pv(v_smem.index(slot1), p1, vs1, acc, MODE, HEAD_DIM, VWL, VA, PB)
                m = m_new
        else:
            for it in range(n_it):
                slot = it % STAGES
                tok = c0 + 16 * it
                mbarrier.wait(bars.index(slot), (it // STAGES) & 1)
                gl.thread_barrier()  # every lane is done with slot (it - 1) % STAGES (chunk it - 1)
                ahead = it + STAGES - 1
                _issue_chunk(k_desc, v_desc, s_desc, k_smem, v_smem, s_smem, bars, ahead, pg_next,
                             tok + 16 * (STAGES - 1), kvh, nkv, PAGE, HEAD_MAJOR, ahead < n_it)
                pg_next = gl.load(bt_row + (tok + 16 * STAGES) // PAGE, mask=ahead + 1 < n_it, other=0)
                s_slot = s_smem.index(slot)
                s, ok = _chunk_scores(k_smem.index(slot), s_slot, q, kbias, qsum, qk_scale, tok, lo, end,
                                      MODE, HEAD_DIM, KWL, KA, MMA, TOK)
                vs, zw = _chunk_v_weights(s_slot, ok, MODE, TOK)
                m_new = gl.maximum(m, gl.max(s, axis=0))
                alpha = gl.exp2(m - m_new)
                p = gl.exp2(s - m_new[None, :])
                l_sum = l_sum * alpha + gl.sum(p, axis=0)
                if MODE == 2:
                    zsum = zsum * alpha + gl.sum(p * zw[:, None], axis=0)
                acc = _chunk_pv(v_smem.index(slot), p, vs, acc * alpha[None, :], MODE, HEAD_DIM, VWL, VA,
                                PB)
                m = m_new
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        l_safe = gl.where(l_sum > 0.0, l_sum, 1.0)
        o = (acc + zsum[None, :]) / l_safe[None, :]
        do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, MMA))
        ho = gl.arange(0, 8, layout=HEAD)
        mo = HEAD_DIM // 8 * (do & 7) + (do >> 3)
        omask = (ho < G)[None, :]
        heads = kvh * G + ho
        out_ptrs = out_ptr + seq * stride_os + heads[None, :] * stride_oh + mo[:, None]
        if SPLIT_OUT:
            if MERGE and n_need == 1:  # the only working split: no partial, no counter
                gl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=omask)
            else:
                # mid_o [num_seqs, num_heads, num_splits, HEAD_DIM], mid_lse [num_seqs, num_heads, num_splits]
                mrow = (seq * (gl.num_programs(1) * G) + heads) * num_splits + split
                gl.store(mid_o_ptr + mrow[None, :] * HEAD_DIM + mo[:, None], o, mask=omask)
                gl.store(mid_lse_ptr + mrow, gl.where(l_sum > 0.0, m + gl.log2(l_safe), float("-inf")),
                         mask=ho < G)
                if MERGE:
                    gl.thread_barrier()  # every lane's partial stores precede the release below
                    counter = count_ptr + seq * nkv + kvh
                    if gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_need - 1:  # the last split
                        _merge_partials(mid_o_ptr, mid_lse_ptr, out_ptr + seq * stride_os, stride_oh, kvh * G,
                                        (seq * (nkv * G) + kvh * G) * num_splits, num_splits, n_need, G,
                                        HEAD_DIM, MERGE_BLOCK)
                        gl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zero for the next call
        else:
            gl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=omask)


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def gl_decode_applies(query: torch.Tensor, kv_cache: LayerKVCache) -> bool:
    """This kernel's conditions: a Hopper GPU with Gluon, an int8 / int4 cache of head_dim 64 or 128,
    block_size a multiple of 16, at most 8 query heads per kv head, 16-byte-aligned code caches stored
    token- or head-major (``code_layout``), packed scales (``scale_rows``); not under the interpreter
    and not switched off (``ANYBIT_DECODE_GL=0``)."""
    if gluon is None or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get("ANYBIT_DECODE_GL", "1") == "0" or kv_cache.dtype not in ("int8", "int4"):
        return False
    hd = query.shape[-1]
    g = query.shape[1] // max(kv_cache.num_kv_heads, 1)
    kc, vc = kv_cache.key, kv_cache.value
    return (hd in (64, 128) and kv_cache.block_size % CHUNK == 0 and 1 <= g <= GL_MAX_GROUP
            and query.dtype in (torch.bfloat16, torch.float16) and query.stride(-1) == 1
            and code_layout(kc) is not None and code_layout(kc) == code_layout(vc) and kc.data_ptr() % 16 == 0
            and vc.data_ptr() % 16 == 0 and scale_rows(kv_cache) is not None and _is_hopper(query.device))


def code_layout(codes: torch.Tensor) -> str | None:
    """"token" for a contiguous code cache ``[num_blocks, block_size, kv_heads, row]``, "head" for
    one stored ``[num_blocks, kv_heads, block_size, row]`` (``kv_code_buffer``), else None."""
    if codes.is_contiguous():
        return "token"
    return "head" if codes.permute(0, 2, 1, 3).is_contiguous() else None


def scale_rows(kv_cache: LayerKVCache) -> torch.Tensor | None:
    """The packed scales (``kv_scale_buffers`` layout "packed") as float16 / float32 rows ``[num_blocks
    * kv_heads * count, block_size]`` (row ``(page * kv_heads + head) * count + i``: i = key scale,
    value scale, int4's key and value zero points), or None when the cache's scales are not packed
    that way (the Triton kernel reads any layout)."""
    arrays = [kv_cache.key_scale, kv_cache.value_scale]
    if kv_cache.dtype == "int4":
        arrays += [kv_cache.key_zero, kv_cache.value_zero]
    nb, bs, nkv, count = kv_cache.num_blocks, kv_cache.block_size, kv_cache.num_kv_heads, len(arrays)
    base = arrays[0]
    if base is None or base.dtype not in (torch.float16, torch.float32):
        return None
    size_of = base.element_size()
    for i, a in enumerate(arrays):
        if (a is None or a.dtype != base.dtype or tuple(a.shape) != (nb, bs, nkv)
                or a.stride() != (nkv * count * bs, 1, count * bs)
                or a.data_ptr() != base.data_ptr() + size_of * i * bs):
            return None
    size = nb * nkv * count * bs
    if base.data_ptr() % 16 or base.untyped_storage().nbytes() < size_of * (base.storage_offset() + size):
        return None
    return torch.as_strided(base, (nb * nkv * count, bs), (bs, 1))


def gl_pair(mode: int) -> bool:
    """Whether the kernel runs two chunks per iteration for this cache mode (``GL_PAIR``, env
    ``ANYBIT_GL_PAIR``)."""
    env = os.environ.get("ANYBIT_GL_PAIR")
    return env == "1" if env in ("0", "1") else bool(GL_PAIR.get(mode, False))


def gl_stages(mode: int) -> int:
    """TMA ring slots of the kernel for this cache mode: ``GL_PAIR_STAGES`` with pairs, else ``GL_STAGES``."""
    return GL_PAIR_STAGES[mode] if gl_pair(mode) else GL_STAGES[mode]


def gl_pair_fits(mode: int, head_dim: int, programs: int, sms: int) -> bool:
    """Whether a launch of ``programs`` runs two chunks per iteration: ``gl_pair`` and every program
    resident at once with the pair ring (int8's 4-slot pair ring, 18 KB, fits 12 per SM; int4's 16).
    Past one wave the pairs did not pay on the H100: the offline workload (~180 sequences x 8 kv heads
    x 2 splits per decode launch) ran its decode steps 6% (int8, s18-7/8) and 3% (int4, s18-9) faster
    in one chunk per iteration, relative to bf16 in the same run; the kernel-level A/B there was mixed
    (b192 x 4k int4 single 2.7% faster, b192 x 1k pairs 2.8% faster;
    attention_decode_splits_pair_large_s18_8)."""
    return gl_pair(mode) and programs <= gl_programs_per_sm(mode, head_dim, GL_PAIR_STAGES[mode]) * sms


def gl_programs_per_sm(mode: int, head_dim: int, stages: int | None = None) -> int:
    """Resident one-warp programs per SM: registers (``GL_REGS``), shared memory (``stages`` ring slots,
    default ``gl_stages``, of K and V codes and scales, ~1 KB of layout-conversion scratch) and Hopper's
    32 blocks per SM."""
    regs = (GL_REGS.get(mode, 168) + 7) // 8 * 8
    row_bytes = head_dim if mode == 1 else head_dim // 2
    # a slot's scales: 2 (int8) or 4 (int4) rows of CHUNK values, at least 128 bytes (_slot_rows)
    scale_slot = max(128, attention_meta.KV_SCALE_DTYPE.itemsize * 2 * mode * CHUNK)
    smem = (stages or gl_stages(mode)) * (2 * row_bytes * CHUNK + scale_slot + 8) + 1024
    return max(1, min(32, 65536 // (regs * 32), (227 * 1024) // smem))


def code_descriptor(codes: torch.Tensor):
    """The TMA descriptor of a code cache ``[num_blocks, block_size, kv_heads, row bytes]`` as int32
    words, block ``[16, words]``: ``[num_blocks * kv_heads * block_size, words]`` for head-major
    storage (``code_layout`` "head"), ``[num_blocks * block_size, kv_heads * words]`` for token-major."""
    nb, bs, nkv, row = codes.shape
    words = row // 4
    if code_layout(codes) == "head":
        flat = codes.permute(0, 2, 1, 3).view(torch.int32).reshape(nb * nkv * bs, words)
    else:
        flat = codes.view(torch.int32).view(nb * bs, nkv * words)
    layout = gl.NVMMASharedLayout.get_default_for([CHUNK, words], gl.int32)
    return TensorDescriptor(flat, list(flat.shape), [flat.shape[1], 1], [CHUNK, words], layout)


def scale_descriptor(rows: torch.Tensor, count: int):
    """The TMA descriptor of ``scale_rows``: block ``[count, 16]``, unswizzled (the kernel reads
    each row as 16 consecutive floats)."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * rows.element_size(), rank=2)
    return TensorDescriptor(rows, list(rows.shape), [rows.shape[1], 1], [count, CHUNK], layout)


def launch_decode_gl(query: torch.Tensor, kv_cache: LayerKVCache, seq_lens: torch.Tensor,
                     block_table: torch.Tensor, out: torch.Tensor, mid_o: torch.Tensor, mid_lse: torch.Tensor,
                     qk_scale: float, window: int, tokens_per_split: int, splits: int,
                     dyn_split: bool, trigger: bool = False, sms: int = 132,
                     counters: torch.Tensor | None = None) -> None:
    """Launch ``_decode_gl_kernel`` on grid (num_seqs, kv heads, splits); attention_decode's
    ``paged_attention_decode`` sizes the splits. ``counters`` (int32, >= num_seqs * kv heads, zero):
    the kernel merges its splits itself (MERGE) and leaves them zero; None: a merge kernel follows.
    ``trigger``: the kernel lets the next one (a PDL launch) start at once. ``sms``: the GPU's SM count
    (``gl_pair_fits``)."""
    from anybit.kernels.kv_cache_ops import kv_mode

    mode = kv_mode(kv_cache.dtype)
    rows = scale_rows(kv_cache)
    if rows is None:
        raise ValueError("launch_decode_gl: the cache's scales must be packed (kv_scale_buffers 'packed')")
    num_seqs, num_heads, head_dim = query.shape
    nkv = kv_cache.num_kv_heads
    pair = gl_pair_fits(mode, head_dim, num_seqs * nkv * splits, sms)
    merge = counters is not None and splits > 1
    if merge and (counters.dtype != torch.int32 or counters.numel() < num_seqs * nkv):
        raise ValueError(f"launch_decode_gl: counters must be int32 with >= {num_seqs * nkv} entries")
    g = num_heads // nkv
    _decode_gl_kernel[(num_seqs, nkv, splits)](
        query, code_descriptor(kv_cache.key), code_descriptor(kv_cache.value),
        scale_descriptor(rows, 2 * mode), block_table, seq_lens, out, mid_o, mid_lse,
        counters if merge else mid_lse, qk_scale, window,
        tokens_per_split, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        block_table.stride(0), G=g, HEAD_DIM=head_dim, PAGE=kv_cache.block_size,
        HEAD_MAJOR=code_layout(kv_cache.key) == "head", MODE=mode,
        STAGES=GL_PAIR_STAGES[mode] if pair else GL_STAGES[mode],
        SPLIT_OUT=splits > 1, DYN_SPLIT=bool(dyn_split), SPLIT_MIN=GL_SPLIT_MIN, TRIGGER=bool(trigger),
        PAIR=pair, MERGE=merge, MERGE_BLOCK=merge_block(splits, g, head_dim), num_warps=1)


def merge_block(splits: int, group: int, head_dim: int) -> int:
    """Splits per round of the in-kernel merge: a power of two <= the split count whose partials of
    the group's heads (padded to a power of two) stay within 64 float32 registers per lane."""
    g_p2 = 1 << (group - 1).bit_length()
    block = 1
    while block * 2 <= splits and block * 2 * g_p2 * head_dim <= 64 * 32:
        block *= 2
    return block


