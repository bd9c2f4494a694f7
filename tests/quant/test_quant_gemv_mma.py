"""Register-operand mma.sync path (``path="mma"``, anybit/kernels/quant_gemv_mma.py). Gluon does not
run under the Triton interpreter, so on CPU: the per-word PTX by bit-level emulation (exact
``q - z`` in pair order), the launcher's rules, and an offline sm_90 compile whose loop must have
no shared memory, 16-byte word loads and HMMA. On CUDA: the kernel against ref_quant_matmul."""

import os

import pytest
import torch
from sm90_sass import (  # same folder (pytest puts it on sys.path)
    loop_bodies,
    nvdisasm,
    shared_bytes,
    sm90_sass_ptrs,
)
from test_quant_gemm_wg import _bf16_bits, _emulate_word

from anybit.kernels import quant_gemv_mma as mm
from anybit.kernels import quant_matmul as qm
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.format import SLICES
from anybit.quant.rtn import QuantSpec, rtn_quantize

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _f16_bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.float16).view(torch.int16)[0]) & 0xFFFF


def _trial_codes(g, bits: int, n: int, trial: int) -> tuple[list[int], int]:
    """n random b-bit codes and a zero point; trials 0 and 1 are the extremes (all codes 2^b - 1 with zero
    point 0, all 0 with 2^b - 1)."""
    q = torch.randint(0, 2 ** bits, (n,), generator=g).tolist()
    z = int(torch.randint(0, 2 ** bits, (1,), generator=g))
    if trial == 0:
        return [2 ** bits - 1] * n, 0
    if trial == 1:
        return [0] * n, 2 ** bits - 1
    return q, z


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_ptx_gives_exact_codes_minus_zero_in_pair_order(bits):
    """Output 2 p + h = bf16 bits of ``q_j - z`` for code j = p + h P / 2 of the word (the two
    halves of one bf16x2 hold codes P / 2 apart); W8: float16 bits, from the zero point as f16
    ``1024 + z``."""
    P = 32 // bits
    g = torch.Generator().manual_seed(bits)
    asm = mm._mma_asm(bits)
    if bits == 8:
        half, zin = _f16_bits, lambda z: _f16_bits(1024.0 + z)
    else:
        half, zin = _bf16_bits, lambda z: _bf16_bits(-(128.0 + z))
    for trial in range(60):
        q, z = _trial_codes(g, bits, P, trial)
        word = sum(c << (i * bits) for i, c in enumerate(q))
        got = _emulate_word(asm, word, zin(z))
        want = [half(float(q[p + h * P // 2] - z)) for p in range(P // 2) for h in range(2)]
        assert got == want, (trial, q, z)


@pytest.mark.parametrize("bits", sorted(mm.MMA_HB_SLICES))
@pytest.mark.parametrize("scaled", [False, True])
def test_ptx_merges_high_bits_in_pair_order(bits, scaled):
    """W3 / W5 / W6 as the lowest slice's words plus their codes' high bits (the kernel's HB): output 2 p + h
    = bf16 of ``q_j - z`` (scaled: ``s (q_j - z)`` rounded once) for code j = p + h P / 2 of the word,
    ``q_j`` = the word's lo bits + 2^lo x the high-bit input's bits hi j.., whatever sits above its hi P
    bits."""
    lo, hi = mm.MMA_HB_SLICES[bits]
    P = 32 // lo
    g = torch.Generator().manual_seed(bits + 10 * scaled)
    asm = mm._mma_hb_asm(lo, hi, scaled)
    for trial in range(80):
        q, z = _trial_codes(g, bits, P, trial)
        word = sum((c % 2 ** lo) << (lo * j) for j, c in enumerate(q))
        junk = int(torch.randint(0, 2 ** (32 - hi * P), (1,), generator=g)) << (hi * P)
        high = sum((c >> lo) << (hi * j) for j, c in enumerate(q)) | junk
        s = float(torch.tensor(float(torch.rand(1, generator=g)) * 0.02 + 0.001, dtype=torch.bfloat16))
        ins = [word, high, _bf16_bits(-(128.0 + z))] + ([_bf16_bits(s)] if scaled else [])
        got = _emulate_word(asm, *ins)
        vals = [float(q[p + h * P // 2] - z) for p in range(P // 2) for h in range(2)]
        want = [_bf16_bits(v * s if scaled else v) for v in vals]
        assert got == want, (trial, q, z)


@pytest.mark.parametrize("bits", sorted(mm.MMA_HB_SLICES))
def test_high_bits_sit_where_the_merged_kernel_reads_them(bits):
    """``pack_codes`` = the lo-bit slice (K / P word rows) then the next (hi bits a code, K / PH rows). The
    merged kernel (``_load_high_bits``) reads the high bits of lo-bit word row r of a tile at k0 from the
    hi-bit slice's row k0 / PH + r / (PH / P) (offset K / 32 lo rows), shifted right by hi P (r % (PH / P)),
    code j at bits hi j..: the bits ``pack_codes`` wrote."""
    from anybit.quant.format import pack_codes

    lo, hi = mm.MMA_HB_SLICES[bits]
    P, PH = 32 // lo, 32 // hi
    per = PH // P
    K, N = 256, 3
    q = torch.randint(0, 2 ** bits, (N, K), generator=torch.Generator().manual_seed(bits))
    words = pack_codes(q, bits).to(torch.int64) & 0xFFFFFFFF
    hi_base = K // 32 * lo
    for k0 in (0, 128):
        for r in range(128 // P):
            for n in range(N):
                lo_word = int(words[k0 // P + r, n])
                hi_word = int(words[hi_base + k0 // PH + r // per, n]) >> (hi * P * (r % per))
                for j in range(P):
                    low = (lo_word >> (lo * j)) & (2 ** lo - 1)
                    got = low | ((hi_word >> (hi * j)) & (2 ** hi - 1)) << lo
                    assert got == int(q[n, k0 + P * r + j]), (k0, r, n, j)


@pytest.mark.parametrize("bits,N,K,want_split_ks", [(6, 14336, 4096, (1, 2)), (6, 4096, 14336, (1, 8)),
                                                   (6, 28672, 4096, None), (6, 6144, 4096, None),
                                                   (6, 128256, 4096, None), (5, 14336, 4096, None)])
def test_w6_three_per_sm_grid_only_where_it_splits_k(monkeypatch, bits, N, K, want_split_ks):
    """``grid3_choice``: W6 writing y at M = 1 takes the 3-per-SM grid where its default grid does not fit 3
    per SM and that grid still splits K (the MLP shapes); not on gate_up's 28672 outputs or lm_head (one
    split, ks 1 there: s27-2), not where the default grid fits (qkv), and not for W5."""
    monkeypatch.setattr(mm, "MMA_HB_BITS", (3, 5, 6))
    _, _, split, ks = mm.mma_config(1, N, K, 128, 132, bits=bits)
    got = mm.grid3_choice(bits, N, K, 128, 132, False, mm.grid_programs(N, ks, split))
    assert (got if got is None else got[2:]) == want_split_ks
    assert mm.grid3_applies(bits, N, K, 128, 132, False, mm.grid_programs(N, ks, split)) == (got is not None)


def test_w3_merged_routes_and_register_cap():
    """Merged W3 (HB) takes M 17..32 on every shape, writing y too (other widths: pending sums on shapes up to
    MMA_WIDE_MAX_N x MMA_WIDE_MAX_K and, for MMA_WIDE_PENDING_BITS, on every shape; y for MMA_WIDE_Y_BITS); at
    BLOCK_M 8 it runs under a 128-register cap unless M = 1 and the grid fits 3 programs per SM (3-bit
    codebooks: always capped)."""
    from anybit.quant.format import PackedWeight

    def packed(bits, N, K):
        q = torch.zeros(bits * K // 32, N, dtype=torch.int32)
        s = torch.ones(K // 128, N, dtype=torch.float16)
        return PackedWeight(q, s, torch.zeros_like(s), bits, 128, K, N)

    mlp = (14336, 4096)
    for pending in (False, True):
        assert qm.mma_wide_chosen(packed(3, *mlp), 32, pending) == (qm.MMA_WIDE_AUTO and mm.MMA_W3_HB)
        w4 = pending and qm.MMA_WIDE_AUTO and 4 in qm.MMA_WIDE_PENDING_BITS  # s27-13: W4 pending sums too
        assert qm.mma_wide_chosen(packed(4, *mlp), 32, pending) == w4
        assert not qm.mma_wide_chosen(packed(8, *mlp), 32, pending)
        assert not qm.mma_wide_chosen(packed(3, *mlp), 16, pending) and not qm.mma_wide_chosen(
            packed(3, *mlp), 33, pending)
    assert qm.mma_wide_chosen(packed(6, 6144, 4096), 24, True) and not qm.mma_wide_chosen(
        packed(6, 6144, 4096), 24, False)
    sms = 132
    assert mm.bm8_register_cap(True, False, 1, 10, sms) == mm.MMA_CB3_MAX_REGISTERS
    assert mm.bm8_register_cap(False, True, 1, 384, sms) is None  # 6144x4096 at M = 1: 384 programs
    assert mm.bm8_register_cap(False, True, 1, 448, sms) == mm.MMA_W3_HB_MAX_REGISTERS  # 14336x4096
    assert mm.bm8_register_cap(False, True, 4, 384, sms) == mm.MMA_W3_HB_MAX_REGISTERS
    assert mm.bm8_register_cap(False, True, 4, 384, sms, acc=True) is None  # pending sums: as at M = 1
    assert mm.bm8_register_cap(False, True, 4, 512, sms, acc=True) == mm.MMA_W3_HB_MAX_REGISTERS
    assert mm.bm8_register_cap(False, False, 4, 10 ** 4, sms) is None
    # merged by default: W3 always; W5 / W6 from BLOCK_M 16, at BLOCK_M 8 where the grid fits 3 per SM
    if set(mm.MMA_HB_BITS) == {3, 5, 6}:
        assert mm.hb_default(3, 8, 10 ** 4, sms) and mm.hb_default(6, 16, 10 ** 4, sms)
        assert mm.hb_default(5, 8, 384, sms) and not mm.hb_default(5, 8, 448, sms)
    assert not mm.hb_default(4, 16, 1, sms) and not mm.hb_default(7, 16, 1, sms)


def test_launcher_config_and_applicability():
    assert mm.mma_config(1, 4096, 14336, 128, 132, ks=1) == (8, 128, 16, 1)  # 32 tiles x 16 splits: 4 per SM
    assert mm.mma_config(16, 4096, 14336, 64, 132)[:2] == (16, 64)  # BLOCK_K divides the group
    bm, bk, split, ks = mm.mma_config(9, 128256, 4096, 128, 132)
    assert (bm, split, ks) == (16, 1, 1)  # lm_head: 1002 tiles fill the GPU without split-K
    # K split inside the program: 128 / ks columns x ks chunks of BLOCK_K per program, ks x M <= BLOCK_M
    assert mm.mma_config(1, 14336, 4096, 128, 132)[2:] == (1, 4)  # 448 programs of 8 iterations
    assert mm.mma_config(1, 6144, 4096, 128, 132)[2:] == (1, 8)
    assert mm.mma_config(8, 6144, 4096, 128, 132)[3] == 1 and mm.mma_config(2, 6144, 4096, 128, 132)[3] <= 4
    assert mm.mma_rows(3) == 4 and mm.ks_fits(2, 3, 8, 4096, 128, 128)
    assert not mm.ks_fits(4, 3, 8, 4096, 128, 128)  # 4 chunks x 4 rows > 8 MMA columns
    assert not mm.ks_fits(8, 1, 8, 1536, 128, 128)  # K not a multiple of 8 x 128
    assert not mm.ks_fits(4, 1, 8, 4608, 192, 64)  # groups of 192 vs chunks of 256 K
    assert mm.ks_fits(8, 1, 8, 14336, 14336, 128)  # per-channel: one group per column
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    pw = rtn_quantize(torch.randn(128, 256), QuantSpec(4, 128, "uniform"))
    assert not mm.mma_applies(pw, 1, x)  # CPU tensors never take the Gluon path
    assert mm.integer_zeros(pw)
    # the whole x slice in shared memory: the smallest compiled buffer that holds the program's tiles
    assert mm.x_whole_tiles(7, 128, 8) == 8 and mm.x_whole_tiles(14, 128, 1) == 16
    assert mm.x_whole_tiles(32, 128, 1) == 0 and mm.x_whole_tiles(24, 64, 1) == 0
    with pytest.raises(ValueError, match="quant_gemv_mma"):
        mm.quant_gemv_mma(x, pw, torch.empty(1, 128, dtype=torch.bfloat16))


def _compile_loop(bits, bm, ks, **extra):
    """Offline sm_90 SASS of the kernel (split-K on) and its K loop (the longest loop body with HMMA);
    skips without nvdisasm."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    w0, wb, wc = (*SLICES[bits], 0, 0)[:3]
    options = {"num_warps": 4, **({"maxnreg": extra.pop("maxnreg")} if "maxnreg" in extra else {})}
    consts = dict(W0=w0, BLOCK_M=bm, BLOCK_K=128, SPLIT=True, PDL=True, CLUSTER=1, DIAG=0, ACC=False, WB=wb,
                  WC=wc, KS=ks, MR=bm // ks if ks > 1 else 0)
    consts.update(extra)
    lines = sm90_sass_ptrs(mm._quant_gemv_mma_kernel, consts, ptrs, options)
    return lines, max((b for b in loop_bodies(lines) if any(s.startswith("HMMA") for s in b)), key=len)


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits", sorted(mm.MMA_HB_SLICES))
@pytest.mark.parametrize("bm,ks,extra", [(8, 8, dict(XW=8)), (16, 1, dict(XW=16, U2=True)),
                                         (32, 1, dict(XS=3, SA=True, SUM_LOADS=2))])
def test_sm90_compile_high_bits_in_one_chain(bits, bm, ks, extra):
    """W3 / W5 / W6 with HB (the lowest slice's words joined with their codes' high bits): one MMA chain per
    tile (the lowest slice's HMMA count, not one per slice), no second x operand, no spills (uncapped), at
    the launcher's BLOCK_M 8 / 16 / 32 configurations."""
    lo, hi = mm.MMA_HB_SLICES[bits]
    lines, loop = _compile_loop(bits, bm, ks, W0=lo, WB=0, HB=hi, **extra)
    tiles = 2 if extra.get("U2") else 1
    ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
    assert sum(o.startswith("HMMA.16816.F32.BF16") for o in ops) == 16 * bm // 8 * tiles
    assert not any(s.split()[0].startswith(("STL", "LDL")) for s in lines if not s.startswith("//"))


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits,bm", [(4, 8), (2, 16), (3, 16), (6, 8), (7, 16)])
def test_sm90_compile_keeps_the_tile_in_registers(bits, bm):
    """The loop loads words as 16-byte vectors straight into the MMA operand registers: HMMA, no
    shared memory (the epilogue's split-K flag broadcast aside), no spills. Widths of several slices
    (3 = 2+1, 6 = 4+2, 7 = 4+2+1) run one MMA chain per slice: the x copies of the higher slices
    must land in their B operand layout without shared memory too."""
    lines, _ = _compile_loop(bits, bm, 1)
    assert sum(s.startswith("HMMA.16816.F32.BF16") for s in lines) >= 16 * len(SLICES[bits]) * bm // 8
    assert sum(s.startswith("LDG.E.128") for s in lines) >= 4
    assert not any(s.split()[0].startswith(("LDSM", "STSM", "STL", "LDL")) for s in lines)
    assert sum(s.split()[0] in ("LDS", "STS") for s in lines) <= 2


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bm,ks", [(8, 8), (16, 1)])
def test_sm90_compile_w8_runs_the_mma_in_float16(bm, ks):
    """W8 (K tiles of 64): float16 HMMA only, 16-byte word loads, no local memory; x reaches float16 by
    float32 scaling then one rounding (F2FP), never by a float16 multiply after the rounding, which
    would overflow for |x| > 65504."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    consts = dict(W0=8, BLOCK_M=bm, BLOCK_K=mm.MMA_W8_BLOCK_K, SPLIT=True, PDL=True, CLUSTER=1, DIAG=0,
                  ACC=False, WB=0, WC=0, KS=ks, MR=1 if ks > 1 else 0, XS=3 if bm == 16 else 0,
                  XW=8 if bm == 8 else 0)
    ops = [s.split()[0] for s in sm90_sass_ptrs(mm._quant_gemv_mma_kernel, consts, ptrs, {"num_warps": 4})
           if not s.startswith("//")]
    hmma = [o for o in ops if o.startswith("HMMA")]
    assert hmma and all(o == "HMMA.16816.F32" for o in hmma), set(hmma)
    assert sum(o.startswith("LDG.E.128") for o in ops) >= 4
    assert any(o.startswith("F2FP.F16.F32") for o in ops) and not any(o.startswith("HMUL2") for o in ops)
    assert not any(o.startswith(("STL", "LDL")) for o in ops)


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits,ks,mr", [(4, 8, 1), (3, 2, 4)])
def test_sm90_compile_k_split_inside_the_program(bits, ks, mr):
    """KS > 1: the same register-only loop (words still as 16-byte loads: the column offsets of the K
    chunks keep 4 adjacent columns per thread), shared memory only for the one cross-warp sum of
    the K chunks after the loop."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    w0, wb, wc = (*SLICES[bits], 0, 0)[:3]
    consts = dict(W0=w0, BLOCK_M=8, BLOCK_K=128, SPLIT=False, PDL=True, CLUSTER=1, DIAG=0, ACC=False, WB=wb,
                  WC=wc, KS=ks, MR=mr)
    lines = sm90_sass_ptrs(mm._quant_gemv_mma_kernel, consts, ptrs, {"num_warps": 4})
    ops = [s.split()[0] for s in lines if not s.startswith("//")]
    loop_end = max(i for i, o in enumerate(ops) if o.startswith("HMMA"))
    assert sum(o.startswith("HMMA.16816.F32.BF16") for o in ops) >= 16 * len(SLICES[bits])
    assert sum(o.startswith("LDG.E.128") for o in ops) >= 4 * len(SLICES[bits])
    assert not any(o.startswith(("LDS", "STS", "BAR")) for o in ops[:loop_end])
    assert any(o.startswith("BAR.SYNC") for o in ops[loop_end:])
    assert not any(o.startswith(("LDSM", "STSM", "STL", "LDL")) for o in ops)


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits,bm,ks", [(4, 16, 1), (2, 16, 1), (6, 16, 1), (4, 8, 8)])
def test_sm90_compile_x_ring(bits, bm, ks):
    """XS 3: x arrives by one 16-byte ``cp.async`` per thread and tile (LDGSTS; BLOCK_M 16: two)
    into a ring of 3 slots and is read as 16-byte shared loads; the loop's global loads are the
    words, scales and zero points only; two CTA barriers per tile (the kernel's, and the one the
    compiler adds between the ring's reads and its refill: it cannot tell the slots apart), no
    spills."""
    w0 = SLICES[bits][0]
    lines, loop = _compile_loop(bits, bm, ks, XS=3)
    ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
    assert sum(o.startswith("LDGSTS") for o in ops) == bm * 128 * 2 // 16 // 128
    assert sum(o == "LDS.128" for o in ops) >= 4 * len(SLICES[bits]) * bm // 8 // (2 if w0 == 1 else 1)
    n_words = sum(128 * w // 32 for w in SLICES[bits]) * 128 // (128 * 4 // 4) // 4  # 16-byte word loads
    assert sum(o == "LDG.E.128" for o in ops) == n_words
    # several slices read the tile after the refill's copy: one more barrier (why XS is 0 for them)
    assert sum(o.startswith("BAR.SYNC") for o in ops) == (2 if len(SLICES[bits]) == 1 else 3)
    assert not any(s.split()[0].startswith(("STL", "LDL")) for s in lines if not s.startswith("//"))


if mm.gluon is not None:
    from triton.experimental.gluon import language as gl

    @mm.gluon.jit
    def _x_ring_conflicts(out_ptr, W0: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr):
        """Compiles only if ``_x_smem_layout`` serves the x tile's reads and copies conflict-free."""
        SL: gl.constexpr = mm._x_smem_layout(W0, BK)
        smem: gl.constexpr = gl.shared_memory_descriptor_type(gl.bfloat16, [BK, BM], SL, [BK, BM])
        reads: gl.constexpr = gl.bank_conflicts(gl.distributed_type(gl.bfloat16, [BK, BM],
                                                                    mm._x_layout(BK, BM, W0)), smem)
        copies: gl.constexpr = gl.bank_conflicts(gl.distributed_type(gl.bfloat16, [BK, BM],
                                                                     mm._x_copy_layout(BK, BM)), smem)
        gl.static_assert(reads == 0, "x ring reads have bank conflicts")
        gl.static_assert(copies == 0, "x ring copies have bank conflicts")


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
def test_sm90_compile_unrolled_loop():
    """U2 (BLOCK_M 16, the whole x slice): one loop body holds two tiles' MMA chains and word loads,
    with far fewer register moves per tile than the three-buffer loop, and no spills."""
    lines, loop = _compile_loop(4, 16, 1, XW=16, U2=True)
    _, loop1 = _compile_loop(4, 16, 1, XW=16)
    ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
    ops1 = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop1 if not s.startswith("//")]
    assert sum(o.startswith("HMMA") for o in ops) == 2 * sum(o.startswith("HMMA") for o in ops1) == 64
    assert sum(o == "LDG.E.128" for o in ops) == 2 * sum(o == "LDG.E.128" for o in ops1)
    movs = sum(o.startswith("IMAD.MOV") or o == "MOV" for o in ops)
    movs1 = sum(o.startswith("IMAD.MOV") or o == "MOV" for o in ops1)
    assert movs < movs1, (movs, movs1)  # per two tiles against per tile
    assert not any(s.split()[0].startswith(("STL", "LDL")) for s in lines if not s.startswith("//"))


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits,bm,ks", [(2, 16, 1), (4, 8, 8)])
def test_sm90_compile_zero_points_and_scales_as_words(bits, bm, ks):
    """ZW 2: the loop loads the tile's zero points and scales as 32-bit words (no 16-bit loads, whose
    pairs the compiler packs where they land), splits them in registers (no shared memory besides x's),
    no spills."""
    _, loop = _compile_loop(bits, bm, ks, XW=16, ZW=2)
    ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
    assert sum(o == "LDG.E" for o in ops) == 4  # 2 words of zero points + 2 of scales per thread
    assert not any(o.startswith(("LDG.E.U16", "STS", "STL", "LDL")) for o in ops)


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block_k,block_m", [(64, 8), (128, 8), (64, 16), (128, 16)])
def test_x_ring_reads_have_no_bank_conflicts(bits, block_k, block_m):
    """``_x_smem_layout`` against ``_x_layout``'s 16-byte reads of the slice width and the copies'
    layout: no excess shared-memory wavefronts (``gl.bank_conflicts``, in an offline compile).
    Unswizzled, the reads had one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    consts = dict(W0=bits, BK=block_k, BM=block_m)
    sig = {"out_ptr": "*i32", **dict.fromkeys(consts, "constexpr")}
    src = GluonASTSource(_x_ring_conflicts, sig, consts, {})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits,bm,cluster", [(4, 8, 16), (2, 16, 4)])
def test_sm90_cluster_split_k_stays_on_chip(bits, bm, cluster):
    """Split-K as a cluster: the partials go to shared memory (the buffer must be the kernel's only
    shared allocation: ``_cluster_sum`` addresses it from offset 0), two cluster barriers, no global
    atomics or workspace, the same register-only loop."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    consts = dict(W0=bits, BLOCK_M=bm, BLOCK_K=128, SPLIT=False, PDL=True, CLUSTER=cluster, DIAG=0, ACC=False)
    lines = sm90_sass_ptrs(mm._quant_gemv_mma_kernel, consts, ptrs, {"num_warps": 4, "num_ctas": cluster})
    ops = [s.split()[0] for s in lines if not s.startswith("//")]
    assert shared_bytes(lines) == 128 * bm * 4
    assert ops.count("UCGABAR_ARV") == 2 and ops.count("UCGABAR_WAIT") == 2
    assert not any(o.startswith(("ATOM", "RED", "LDSM", "STSM", "STL", "LDL")) for o in ops)
    assert sum(o.startswith("HMMA.16816.F32.BF16") for o in ops) >= 16
    assert sum(o.startswith("LD.E") for o in ops) >= cluster * bm // 2  # reads of the other CTAs' partials


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
def test_sm90_accumulating_epilogue_is_fire_and_forget():
    """ACC (pending sums): each program's partial goes out as float reductions (RED, nothing waits
    for a result), with no counter atomic, no fence and no reads of other programs' partials."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*fp32",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    consts = dict(W0=4, BLOCK_M=8, BLOCK_K=128, SPLIT=True, PDL=True, CLUSTER=1, DIAG=0, ACC=True)
    lines = sm90_sass_ptrs(mm._quant_gemv_mma_kernel, consts, ptrs, {"num_warps": 4})
    ops = [s.split()[0] for s in lines if not s.startswith("//")]
    assert sum(o.startswith("RED") for o in ops) >= 8, [o for o in ops if "RED" in o or "ATOM" in o]
    assert not any(o.startswith(("ATOM", "MEMBAR", "LDL", "STL")) for o in ops)
    assert sum(o.startswith("HMMA.16816.F32.BF16") for o in ops) >= 16


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
def test_sm90_deferred_sum_is_a_run_time_choice_of_one_compile():
    """``defer_sum`` (split_k_sum adds the partials) is a run-time, unspecialized argument: the one compile of
    a split-K launch keeps the last-program sum (fence, counter atomic, the loop over partials) behind it, so
    the K loop is the same code either way (as a constexpr, W2's loop compiled differently and ran slower)."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    assert "defer_sum" in mm._quant_gemv_mma_kernel.do_not_specialize
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    consts = dict(W0=2, BLOCK_M=8, BLOCK_K=128, SPLIT=True, PDL=True, CLUSTER=1, DIAG=0, ACC=False)
    lines = sm90_sass_ptrs(mm._quant_gemv_mma_kernel, consts, ptrs, {"num_warps": 4})
    words = [s.split() for s in lines if s.strip() and not s.startswith("//")]
    ops = [w[1] if w[0].startswith("@") else w[0] for w in words]  # predicated: "@P0 STG.E ..."
    assert any(o.startswith("MEMBAR") for o in ops) and any(o.startswith("ATOM") for o in ops)
    assert len(loop_bodies(lines)) == 3  # the K loop, the loop over partials, the exit's spin
    assert sum(o.startswith("HMMA.16816.F32.BF16") for o in ops) >= 16


def _rtn(N, K, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, "uniform")).to("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 24, 64])
@pytest.mark.parametrize("group", [64, 128, -1])
def test_matches_reference(bits, M, group):
    N, K = 384, 1536
    pw = _rtn(N, K, bits, group, seed=M + bits)
    applies = mm.mma_applies(pw, M, torch.empty(M, K, dtype=torch.bfloat16, device="cuda"))
    if (group == 64 or M > 32) and 1 in SLICES[bits]:  # a 1-bit word holds 32 K: tiles of 128 K, groups
        assert not applies  # too; and BLOCK_M 64 with 128-K tiles spills
        return
    assert applies
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", torch.bfloat16)
    want = ref_quant_matmul(x.float(), pw)
    for split in (None, 1, 3):
        y = quant_matmul(x, pw, path="mma", split_k=split)
        err = (y.float() - want).abs().max().item()
        assert err <= 1e-2 * want.abs().max().item() + 1e-3, (split, err)
        assert torch.equal(y, quant_matmul(x, pw, path="mma", split_k=split))  # fixed split-K sum order
    for split, cluster in ((2, True), (4, True), (4, False)):  # K splits as a cluster / via workspace
        y = mm.quant_gemv_mma(x, pw, torch.empty(M, N, dtype=torch.bfloat16, device="cuda"), split_k=split,
                              cluster=cluster)
        err = (y.float() - want).abs().max().item()
        assert err <= 1e-2 * want.abs().max().item() + 1e-3, (split, cluster, err)
        if cluster:  # the same partials summed in the same order as the workspace path
            ref = mm.quant_gemv_mma(x, pw, torch.empty_like(y), split_k=split, cluster=False, ks=1)
            assert torch.equal(y, ref), (split, (y.float() - ref.float()).abs().max().item())
    for xs, xw, split in ((3, False, None), (2, False, 3), (4, False, 1), (3, False, 2), (0, True, 3),
                          (0, True, 4)):  # x through the shared ring or the whole slice: the same bits
        y = mm.quant_gemv_mma(x, pw, torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda"),
                              split_k=split, x_slots=xs, x_whole=xw)
        ref = mm.quant_gemv_mma(x, pw, torch.empty_like(y), split_k=split, x_slots=0, x_whole=False)
        assert torch.equal(y, ref), (xs, xw, split, (y.float() - ref.float()).abs().max().item())
    for split in (None, 1, 3):  # the K loop unrolled by two (odd and even tile counts): the same bits
        if len(SLICES[bits]) > 1 or M > 16:
            continue
        y = mm.quant_gemv_mma(x, pw, torch.empty(M, N, dtype=torch.bfloat16, device="cuda"), split_k=split,
                              x_slots=0, unroll2=True)
        ref = mm.quant_gemv_mma(x, pw, torch.empty_like(y), split_k=split, x_slots=0, unroll2=False)
        assert torch.equal(y, ref), ("unroll2", split)
    if bits in mm.MMA_HB_SLICES:  # the second slice merged into the first's conversion (HB) or a chain
        for hb in (False, True):
            y = mm.quant_gemv_mma(x, pw, torch.empty(M, N, dtype=torch.bfloat16, device="cuda"), high_bits=hb)
            err = (y.float() - want).abs().max().item()
            assert err <= 1e-2 * want.abs().max().item() + 1e-3, ("high_bits", hb, err)
        for split in (None, 1, 3):  # HB is one chain, so it unrolls: the same bits as the plain loop
            if M > 16:
                break
            kw = dict(split_k=split, x_slots=0, high_bits=True)
            y = mm.quant_gemv_mma(x, pw, torch.empty(M, N, dtype=torch.bfloat16, device="cuda"), unroll2=True,
                                  **kw)
            ref = mm.quant_gemv_mma(x, pw, torch.empty_like(y), unroll2=False, **kw)
            assert torch.equal(y, ref), ("high_bits unroll2", split)
    for zw in (1, 2):  # zero points (and scales) loaded as words of two f16: the same bits
        y = mm.quant_gemv_mma(x, pw, torch.empty(M, N, dtype=torch.bfloat16, device="cuda"), split_k=3,
                              zero_words=zw)
        ref = mm.quant_gemv_mma(x, pw, torch.empty_like(y), split_k=3, zero_words=0)
        assert torch.equal(y, ref), zw
    if 1 not in SLICES[bits]:  # 24 tiles of 64 K: more than the buffer holds
        with pytest.raises(ValueError, match="x_whole needs"):
            mm.quant_gemv_mma(x, pw, torch.empty(M, N, dtype=torch.bfloat16, device="cuda"), split_k=1, ks=1,
                              block_k=64, x_whole=True)
    for ks in (2, 4, 8):  # K split inside the program (M <= 4): on its own weight with K = 2048
        bk = 64 if group == 64 or bits == 8 else 128
        if not mm.ks_fits(ks, M, 8, 2048, 2048 if group == -1 else group, bk):
            continue
        pk = _rtn(N, 2048, bits, group, seed=ks)
        xk = torch.randn(M, 2048, generator=torch.Generator().manual_seed(ks)).to("cuda", torch.bfloat16)
        want_k = ref_quant_matmul(xk.float(), pk)
        for split in (None, 1, 2):
            y = mm.quant_gemv_mma(xk, pk, torch.empty(M, N, dtype=torch.bfloat16, device="cuda"),
                                  split_k=split, ks=ks)
            err = (y.float() - want_k).abs().max().item()
            assert err <= 1e-2 * want_k.abs().max().item() + 1e-3, (ks, split, err)
            for kw in (dict(x_slots=3, x_whole=False), dict(x_whole=True), dict(x_slots=0, x_whole=False)):
                y3 = mm.quant_gemv_mma(xk, pk, torch.empty_like(y), split_k=split, ks=ks, **kw)
                assert torch.equal(y3, y), (ks, split, kw)  # K chunks in shared memory (reused later)
        acc = torch.zeros(M, N, dtype=torch.float32, device="cuda")
        mm.quant_gemv_mma(xk, pk, None, acc=acc, split_k=2, ks=ks)  # pending sums (atomics)
        assert (acc - want_k).abs().max().item() <= 1e-2 * want_k.abs().max().item() + 1e-3, ks
    if qm.mma_chosen(pw, M, x):  # "auto" (M 2..8 by default)
        assert torch.equal(quant_matmul(x, pw), quant_matmul(x, pw, path="mma"))
    _, _, split1, ks1 = mm.mma_config(1, N, K, pw.group_size, qm._num_sms(x.device), bits=bits)
    m1 = qm.MMA_MODE == "1" or bits in qm.MMA_M1_BITS or (qm.MMA_M1_KS and bits in qm.MMA_M1_KS_BITS
                                                          and ks1 > 1)
    w3_m1 = (bits in mm.MMA_HB_BITS and qm.MMA_W3_M1 and qm.MMA_MODE == "2"
             and mm.grid_fits_heavy(mm.grid_programs(N, ks1, split1), qm._num_sms(x.device)))
    m1 = m1 or w3_m1
    if bits == 8 and qm.MMA_MODE == "2":
        m1 = qm.MMA_W8_M1 and ks1 > 1 and split1 == 1
    if M > 16:  # M 17..32 on outputs up to 8192: pending sums for every width, y for W2/W4/W8
        wide = qm.MMA_MODE != "0" and qm.MMA_WIDE_AUTO and M <= 32
        assert qm.mma_chosen(pw, M, x) == (wide and (bits in (2, 4, 8) or (bits == 3 and mm.MMA_W3_HB)))
        assert qm.mma_chosen(pw, M, x, pending=True) == wide
        return
    routed = qm.MMA_MODE != "0" and qm.mma_routes(bits, M)
    assert qm.mma_chosen(pw, M, x) == (routed and (M > 1 or m1) and M <= 8)
    # else the GEMV at M = 1 (pending sums: the merged-width rule for MMA_HB_PENDING_BITS only; none by
    # default)
    m1_pending = qm.MMA_MODE == "1" or bits in qm.MMA_M1_BITS or (w3_m1 and bits in qm.MMA_HB_PENDING_BITS)
    m1_pending = m1_pending or (qm.MMA_MODE == "2" and bits in qm.MMA_M1_PENDING_DOWN_BITS and K >= 2 * N)
    routed = qm.MMA_MODE != "0" and qm.mma_routes(bits, M, pending=True)
    assert qm.mma_chosen(pw, M, x, pending=True) == (routed and (M > 1 or m1_pending) and M <= 8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 5, 16, 32, 64])
def test_deferred_split_sum_gives_the_last_program_bits(bits, M):
    """defer=True (the partials added by split_k_sum's kernel after the GEMV, in split order) gives the
    bits of the tile's last program summing them (also split order), into a column slice of a wider y,
    with the launcher's split and a forced one."""
    N, K = 384, 3072
    if M > 32 and 1 in SLICES[bits]:
        return
    pw = _rtn(N, K, bits, 128, seed=M * 10 + bits)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", torch.bfloat16)
    want = ref_quant_matmul(x.float(), pw)
    for split in (None, 3, 6):
        last = mm.quant_gemv_mma(x, pw, torch.empty(M, N, dtype=torch.bfloat16, device="cuda"), split_k=split,
                                 defer=False)
        wide = torch.full((M, N + 128), float("nan"), dtype=torch.bfloat16, device="cuda")
        got = mm.quant_gemv_mma(x, pw, wide[:, 64:64 + N], split_k=split, defer=True)
        assert torch.equal(got, last), (split, (got.float() - last.float()).abs().max().item())
        assert torch.isnan(wide[:, :64].float()).all() and torch.isnan(wide[:, 64 + N:].float()).all()
        err = (last.float() - want).abs().max().item()
        assert err <= 1e-2 * want.abs().max().item() + 1e-3, (split, err)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("bits", [2, 4, 6])
@pytest.mark.parametrize("M", [33, 48, 64])
def test_pending_sums_at_block_m_64(bits, M):
    """Pending sums (float atomics into an accumulator) at M 33..64, BLOCK_M 64, the launcher's split: the
    route of o_proj-like weights (quant_matmul's MMA_SQUARE_PENDING_BITS); added onto what the accumulator
    held."""
    N, K = 512, 4096
    pw = _rtn(N, K, bits, 128, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(bits)).to("cuda", torch.bfloat16)
    want = ref_quant_matmul(x.float(), pw)
    acc = torch.ones(M, N, dtype=torch.float32, device="cuda")
    mm.quant_gemv_mma(x, pw, None, acc=acc)
    err = (acc - 1.0 - want).abs().max().item()
    assert err <= 1e-2 * want.abs().max().item() + 1e-3, err


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("path", ["mma", "tma"])
def test_output_slice_strided_x_and_non_integer_zeros(path):
    """Both mma.sync kernels (quant_gemv_mma, its TMA-ring variant quant_gemv_tma on Hopper)."""
    from anybit.kernels.quant_gemv_tma import tma_applies
    if path == "tma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA-ring kernel needs a Hopper GPU")
    applies = mm.mma_applies if path == "mma" else tma_applies
    pw = _rtn(256, 512, 4, 128)
    xs = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)[:, :512]  # row stride 1024
    fused = torch.zeros(4, 512, device="cuda", dtype=torch.bfloat16)
    quant_matmul(xs, pw, out=fused[:, 128:384], path=path)
    want = ref_quant_matmul(xs.float(), pw)
    assert (fused[:, 128:384].float() - want).abs().max() <= 1e-2 * want.abs().max() + 1e-3
    assert fused[:, :128].abs().max() == 0 and fused[:, 384:].abs().max() == 0
    pw.zeros.add_(0.5)  # fractional zero points: not this kernel's exact q - z
    assert not applies(pw, 4, xs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("magnitude", [1e5, 1e-3])
def test_w8_float16_mma_keeps_large_and_small_x(magnitude):
    """W8's MMA runs in float16 with x scaled by 2^-6: activations beyond float16's 65504 (here up to
    ~4e5) must not overflow, and small ones (mostly subnormal in float16) keep the accuracy."""
    M, N, K = 4, 256, 1024
    pw = _rtn(N, K, 8, 128, seed=5)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(5)) * magnitude).to("cuda", torch.bfloat16)
    want = ref_quant_matmul(x.float(), pw)
    y = quant_matmul(x, pw, path="mma")
    assert torch.isfinite(y).all()
    assert (y.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("bits", sorted(mm.MMA_HB_SLICES))
def test_gpu_engine_merged_slices_generate_what_separate_slices_do(tmp_path, monkeypatch, bits):
    """A uniform W3 / W5 / W6 model decoding at batch 1, 3 and 12 (pending sums on the mma.sync kernel at
    BLOCK_M 8 / 16; at M = 1 the merged kernel against the GEMV): with the second slice merged (HB,
    ``MMA_HB_BITS``) the same greedy tokens and logprobs (within 0.1) as with separate slices; what differs
    is the order of the float32 sums. From M 17 (BLOCK_M 32) the kernel rounds ``s (q - z)`` to bf16 per
    weight, once merged and per slice otherwise, which moved this random model's logprobs by up to 0.12 at
    batch 20 (H100 s26-10, every kernel within 1e-2 of the reference): that range is left to the reference
    tests."""
    from anybit import LLM, SamplingParams
    from anybit.quant.quantize import quantize_model
    from tests.model_factory import make_tiny_model

    dense = make_tiny_model(tmp_path / "llama", hidden_size=512, intermediate_size=1024,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_layers=2,
                            dtype="bfloat16")
    model = quantize_model(dense, tmp_path / f"w{bits}", bits=bits, group_size=128, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    texts = [f"Item {i}: the quick brown fox" if i % 2 else f"def f{i}(n):" for i in range(12)]
    outs = {}
    for merged in (False, True):
        on = tuple(sorted(mm.MMA_HB_SLICES)) if merged else ()
        monkeypatch.setattr(mm, "MMA_HB_BITS", on)
        monkeypatch.setattr(qm, "MMA_HB_BITS", on)
        monkeypatch.setattr(qm, "MMA_W3_HB", merged)
        llm = LLM(str(model), dtype="bfloat16", device="cuda", kv_cache_memory=64 << 20, progress=False)
        outs[merged] = [[(r.token_ids, [d[t] for t, d in zip(r.token_ids, r.logprobs, strict=True)])
                         for r in (o.outputs[0] for o in llm.generate(texts[:n], params))]
                        for n in (1, 3, 12)]
        del llm
    report = []
    for n, sep, mer in zip((1, 3, 12), outs[False], outs[True], strict=True):
        for (tok0, lp0), (tok1, lp1) in zip(sep, mer, strict=True):
            same = next((i for i, (a, b) in enumerate(zip(tok0, tok1, strict=True)) if a != b), len(tok0))
            last = min(same + 1, len(tok0))  # up to the first differing token, whose choices were near-tied
            diff = max(abs(a - b) for a, b in zip(lp0[:last], lp1[:last], strict=True))
            report.append((n, same, round(diff, 4)))
    print(f"W{bits} (batch, equal tokens, logprob diff):", report)
    assert all(same >= 2 and diff < 0.1 for _, same, diff in report), report


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
def test_w6_at_m1_on_a_three_per_sm_grid():
    """W6 at M = 1 on a weight whose default grid does not fit 3 programs per SM (14336 outputs): "auto"
    writes y with the merged kernel, unrolled, on a grid sized for 3 per SM; the result matches the reference
    and the same call with those settings spelled out."""
    N, K = 14336, 1024
    pw = _rtn(N, K, 6, 128, seed=6)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(6)).to("cuda", torch.bfloat16)
    sms = qm._num_sms(x.device)
    _, _, split0, ks0 = mm.mma_config(1, N, K, 128, sms, bits=6)
    fits = mm.grid_fits_heavy(mm.grid_programs(N, ks0, split0), sms)  # H100: 448 programs, 396 slots
    on = 6 in mm.MMA_HB_BITS and qm.MMA_W3_M1 and qm.MMA_MODE == "2"
    pending = on and fits and 6 in qm.MMA_HB_PENDING_BITS  # pending sums: the GEMV by default (s27-1/2)
    assert qm.mma_chosen(pw, 1, x) == on and qm.mma_chosen(pw, 1, x, pending=True) == pending
    want = ref_quant_matmul(x.float(), pw)
    y = quant_matmul(x, pw)
    assert (y.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item() + 1e-3
    if fits:
        return
    _, _, split, ks = mm.mma_config(1, N, K, 128, sms, per_sm={**mm.MMA_PROGRAMS_PER_SM, 8: 3}, bits=6)
    assert mm.grid_fits_heavy(mm.grid_programs(N, ks, split), sms)
    ref = mm.quant_gemv_mma(x, pw, torch.empty_like(y), ks=ks, split_k=split, unroll2=True, high_bits=True,
                            max_registers=0)
    assert torch.equal(mm.quant_gemv_mma(x, pw, torch.empty_like(y)), ref)


@pytest.mark.parametrize("bits,bm,k_tiles,split,want", [
    (3, 8, 32, 2, 4), (5, 8, 32, 2, 4), (6, 8, 32, 2, 2), (4, 8, 32, 2, 2), (2, 8, 32, 2, 2),
    (5, 8, 32, 4, 4), (3, 8, 112, 16, 16), (4, 16, 32, 1, 4), (2, 16, 32, 1, 4), (3, 16, 32, 1, 4),
    (5, 16, 32, 1, 2), (6, 16, 32, 1, 1), (4, 16, 112, 8, 8), (4, 32, 32, 1, 4), (4, 32, 112, 8, 16),
    (8, 8, 32, 2, 4), (8, 8, 112, 16, 16),
    (6, 32, 32, 1, 4), (5, 32, 32, 1, 1), (2, 32, 32, 8, 8), (3, 32, 32, 1, 1), (4, 64, 32, 1, 1)])
def test_pending_split_by_block_m(monkeypatch, bits, bm, k_tiles, split, want):
    """Pending sums take more splits where programs would be long: at BLOCK_M 8 W3 / W5 / W8 twice from 16 K
    tiles per program, at BLOCK_M 16 W2 / W3 / W4 four times and W5 twice from 32, at BLOCK_M 32 W2 / W4 / W6
    four times from 32 and twice from 12; other widths, BLOCK_M and shorter programs keep ``mma_config``'s
    split."""
    g, d, four = (32, 4), (12, 2), ((32, 4),)
    table = {8: {3: ((16, 2),), 5: ((16, 2),), 8: ((16, 2),)}, 16: {2: four, 3: four, 4: four, 5: ((32, 2),)},
             32: {2: (g, d), 4: (g, d), 6: (g, d)}}
    monkeypatch.setattr(mm, "MMA_ACC_SPLIT", table)
    assert mm.acc_split(bits, bm, k_tiles, split) == want
