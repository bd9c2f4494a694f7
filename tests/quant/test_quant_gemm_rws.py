"""Warp-specialized register-A wgmma path (``path="rws"``, anybit/kernels/quant_gemm_rws.py). Gluon does
not run under the Triton interpreter, so on CPU: the launcher's rules and an offline sm_90 compile (both
consumer loops feed the wgmma from registers with no hazard and no spill; the loader and the consumers
meet only at mbarriers). On CUDA (Hopper): against ref_quant_matmul and bit-equal to path="ra"."""

import os

import pytest
import torch
from sm90_sass import loop_bodies, nvdisasm, sm90_sass, wgmma_register_a_hazards  # same folder
from test_quant_gemm_ra import _rtn

from anybit.kernels import quant_gemm_rws as rws
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.format import SLICES
from anybit.quant.rtn import QuantSpec, rtn_quantize

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_launcher_config_and_applicability():
    assert rws.rws_config(1024) == (256, 64, 6, 240)  # 6 stages of 37 KB fit in 227 KB
    ms = (2, 64, 100, 128, 200, 256, 300)
    assert [rws.rws_config(M)[0] for M in ms] == [64, 64, 128, 128, 256, 256, 256]
    assert rws.rws_config(256, 14336, 132)[0] == 256  # 112 tiles of 256 rows: 85% of the SMs
    assert rws.rws_config(256, 4096, 132)[0] == 256  # 32 tiles of 256 rows: each in 4 equal parts
    assert rws.rws_config(256, 6144, 132)[0] == 256  # 48 tiles: halves
    assert rws.rws_config(300, 4096, 132)[0] == 128  # 256 would pad 300 rows to 512, 128 to 384
    assert rws.rws_config(256, 10240, 132)[0] == 128  # 80 tiles: more than half a wave, less than 3/4
    assert rws.rws_config(1024, 6144, 132)[0] == 256
    for M in (64, 128, 256, 1024):
        bm, bk, st, _ = rws.rws_config(M)
        assert rws.rws_shared_bytes(bm, bk, st) <= 227 * 1024
        assert st == 6 or rws.rws_shared_bytes(bm, bk, st + 1) > 227 * 1024
    assert rws.rws_programs(1024, 14336, 4096, 256, 64, 132) == 128  # 448 tiles: 3 waves of 128, then halves
    assert rws.rws_programs(1024, 6144, 4096, 256, 64, 132) == 128  # 192 tiles: a wave of 128, then halves
    assert rws.rws_programs(1024, 128256, 4096, 256, 64, 132) == 132  # 4008 tiles: no such split: stream-K
    assert rws.rws_programs(64, 14336, 4096, 64, 64, 132) == 112  # whole tiles: one wave, 85% full
    assert rws.rws_programs(1024, 4096, 14336, 256, 64, 132) == 128
    assert rws.rws_programs(256, 4096, 14336, 256, 64, 132) == 128  # 32 tiles: quarters
    assert rws.rws_programs(256, 6144, 4096, 256, 64, 132) == 96  # 48 tiles: halves
    assert rws.rws_programs(256, 10240, 4096, 256, 64, 132) == 132  # 80 tiles: stream-K over every SM
    assert rws.rws_programs(64, 4096, 4096, 64, 64, 132) == 128  # 32 tiles at 64: quarters on 128 SMs
    assert rws.rws_programs(64, 6144, 4096, 64, 64, 132) == 132  # 48 at 64: halves would leave 36 SMs idle
    assert rws.rws_programs(64, 256, 512, 64, 64, 132) == 4  # 2 tiles of 8 K tiles: halves (>= 4 K tiles)
    assert rws.rws_programs(2, 128, 256, 64, 64, 132) == 1  # one tile
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    pw = rtn_quantize(torch.randn(128, 256), QuantSpec(4, 128, "uniform"))
    with pytest.raises(ValueError, match="quant_gemm_rws"):  # CPU tensors never take the Gluon path
        rws.quant_gemm_rws(x, pw, torch.empty(16, 128, dtype=torch.bfloat16))


def _pieces(total: int, k_tiles: int, P: int, base: int = 0):
    """The kernel's work split in Python (``_program_range``, ``_segment``, ``_piece_slot``): each program's
    pieces (tile, k_lo, n) in order, and the slot each piece is stored in."""
    pieces = []
    rem, dp = total - base, base // P
    for p in range(P):
        cur, end = 0, dp + (p + 1) * rem // P - p * rem // P
        while cur < end:
            g = base + p * rem // P + cur - dp
            tile, k_lo = divmod(g, k_tiles)
            n = min(k_tiles - k_lo, end - cur)
            if cur < dp:
                tile, k_lo, n = (cur // k_tiles) * P + p, 0, k_tiles
            slot = 2 * p + int((base + p * rem // P) // k_tiles != tile)
            pieces.append((p, tile, k_lo, n, slot))
            cur += n
    return pieces


@pytest.mark.parametrize("tiles,k_tiles,P,waves", [(448, 64, 132, 0), (32, 224, 132, 0), (3, 18, 13, 0),
                                                   (5, 7, 5, 0), (1, 4, 1, 0), (96, 64, 132, 0),
                                                   (4008, 64, 132, 0), (448, 64, 132, 3), (448, 64, 132, 2),
                                                   (192, 64, 132, 1), (4008, 64, 132, 29), (30, 7, 4, 7),
                                                   (30, 7, 4, 6), (8, 5, 4, 2), (48, 64, 96, 0),
                                                   (96, 64, 128, 0), (48, 64, 132, 0), (448, 64, 128, 3),
                                                   (192, 64, 128, 1)])
def test_stream_k_pieces_cover_each_tile_once(tiles, k_tiles, P, waves):
    """Every tile-step is computed by exactly one piece; the first ``waves`` waves are whole tiles w P + p
    of program p; a stream-K tile's pieces come from programs first..last of the kernel's formulas, in
    order; no two pieces share a slot; a tile in one piece is stored directly (no slot)."""
    total = tiles * k_tiles
    base = waves * P * k_tiles
    rem = total - base
    pieces = _pieces(total, k_tiles, P, base)
    seen = {}
    for p, tile, k_lo, n, slot in pieces:
        seen.setdefault(tile, []).append((k_lo, n, p, slot))
    slots = [slot for p, tile, k_lo, n, slot in pieces if n < k_tiles]
    assert len(slots) == len(set(slots))
    for tile in range(tiles):
        parts = sorted(seen[tile])
        assert [k for k, n, *_ in parts] == [sum(n for _, n, *_ in parts[:i]) for i in range(len(parts))]
        assert sum(n for _, n, *_ in parts) == k_tiles
        if tile < waves * P:
            assert parts == [(0, k_tiles, tile % P, parts[0][3])]
            continue
        first = ((tile * k_tiles - base + 1) * P - 1) // rem
        last = (((tile + 1) * k_tiles - base) * P - 1) // rem
        assert [p for _, _, p, _ in parts] == list(range(first, last + 1))
        for q in range(first, last + 1):  # the slot the fix-up reads for program q is the one q wrote
            q_slot = 2 * q + int((base + q * rem // P) // k_tiles != tile)
            assert any(p == q and slot == q_slot for _, _, p, slot in parts)
        assert last - first + 1 <= rws.rws_max_pieces(tiles, k_tiles, P, base)
        if rem // P >= k_tiles:  # ranges of >= K tiles: at most two pieces
            assert last - first <= 1
        if rws.rws_max_pieces(tiles, k_tiles, P, base) <= 2:  # DUO: the other piece is first + last - p's
            for _, _, p, _ in parts:
                assert first + last - p in (first, last) and (last == first or first + last - p != p)
    assert rws.rws_max_pieces(tiles, k_tiles, P, base) == max(
        [len(v) for t, v in seen.items() if t >= waves * P] or [1])
    if rws.rws_swap(tiles, k_tiles, P, base, 132):  # fixed roles: each program's stream-K range is one half
        halves = [(p, k_lo, n) for p, tile, k_lo, n, _ in pieces if tile >= waves * P]
        assert len(halves) == P and all(n * 2 == k_tiles for _, _, n in halves)
        assert sorted(p for p, _, _ in halves) == list(range(P))
        assert all(len(v) == 2 for t, v in seen.items() if t >= waves * P)


def test_swap_rule(monkeypatch):
    """rws_swap: two-piece tiles take fixed roles only where every program's stream-K range is one half tile
    (halves of few tiles; a wave of whole tiles then halves), every program is resident (<= the SMs) and
    RWS_SWAP is on."""
    cases = ((48, 64, 96, 0), (192, 64, 128, 64 * 128), (448, 64, 128, 3 * 64 * 128), (32, 64, 128, 0),
             (48, 64, 132, 0), (192, 64, 128, 0), (12, 36, 24, 0), (200, 64, 200, 0))
    assert [rws.rws_swap(t, k, P, b, 132) for t, k, P, b in cases] == [True, True, True, False, False, False,
                                                                       True, False]
    monkeypatch.setattr(rws, "RWS_SWAP", False)
    assert not rws.rws_swap(48, 64, 96, 0, 132)


def test_dp_waves_rule(monkeypatch):
    """rws_dp_waves: none ("0"), every whole wave ("all"), all but one ("keep1", the default); never with less
    than two waves except "all"; every wave where the tiles left give each program one equal part."""
    assert rws.RWS_DP in ("0", "all", "keep1")
    for env, want in (("0", (0, 0, 0)), ("all", (3, 1, 0)), ("keep1", (2, 0, 0))):
        monkeypatch.setattr(rws, "RWS_DP", env)
        assert (rws.rws_dp_waves(448, 132), rws.rws_dp_waves(192, 132), rws.rws_dp_waves(96, 132)) == want
        # the tiles left after the whole waves split into one equal part per program: every wave, any RWS_DP
        assert (rws.rws_dp_waves(448, 128), rws.rws_dp_waves(192, 128), rws.rws_dp_waves(4008, 132)) == (
            3, 1, {"0": 0, "all": 30, "keep1": 29}[env])
    cases = ((448, 128), (192, 128), (448, 132), (96, 128))
    assert [rws.rws_parts_after_waves(t, P) for t, P in cases] == [2, 2, 0, 0]


@pytest.mark.skipif(rws.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits,bm,nc", [(4, 64, 2), (4, 128, 2), (4, 256, 2), (4, 64, 4), (3, 256, 2),
                                         (6, 256, 2), (7, 256, 2), (2, 128, 2), (1, 64, 2), (5, 64, 2),
                                         (8, 64, 2), (8, 256, 2)])
def test_sm90_consumers_feed_wgmma_from_registers(bits, bm, nc):
    """Every consumer K loop (the default partition's and the workers'): 4 HGMMA per 64-wide K tile with A
    in registers, no spills, no write to an in-flight A register, no shared-memory store or shuffle (the
    slices' words reach the register-A layout in registers), and no CTA-wide barrier (only the warpgroup's
    own 128-thread named barriers); the worker consumers ask for their registers."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    bk = 64
    epi = bm in rws.RWS_EPI_BM  # the launcher's default: whole tiles through a TMA store at these BLOCK_M
    stages = rws.rws_stages(bm, bk, nc, bits, epi)
    regs, maxreg = (240, 168) if nc == 2 else (112, 96)
    consts = dict(BITS=bits, STAGES=stages, NC=nc, CONS_REGS=regs, num_warps=4, EPI=epi, DUO=bm >= 128)
    lines = sm90_sass(rws._quant_gemm_rws_kernel, consts, bm, rws.HALF_N, bk, bits,
                      {"num_warps": 4, "maxnreg": maxreg})
    loops = sorted((b for b in loop_bodies(lines) if any("HGMMA" in s for s in b)), key=len)[:nc]
    assert len(loops) == nc and all(len(b) < 300 for b in loops), [len(b) for b in loops]  # one per consumer
    for loop in loops:
        mma = [s for s in loop if "HGMMA" in s]
        assert len(mma) == 4 and all(s.split()[2].startswith("R") for s in mma)
        ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
        assert not any(op.startswith(("STS", "STL", "LDL", "SHFL")) for op in ops)
        assert wgmma_register_a_hazards(loop) == []
        bars = [s for s in loop if s.startswith("BAR.")]
        assert bars and all(s.rstrip().endswith("0x80") for s in bars), bars  # 128 threads, not the CTA
    assert any(f"TRY_ALLOC.CTAPOOL UP0, {hex(regs)}" in s for s in lines)
    slices = len(SLICES[bits])  # x, then per block the words of each slice and two table rows
    assert sum("UTMALDG" in s for s in lines) >= 1 + (2 + slices) * nc
    assert (sum("UTMASTG" in s for s in lines) >= nc) == epi  # one TMA store per consumer's whole tile
    assert int(lines[-1].split()[-1]) <= 227 * 1024  # the kernel's shared memory (with EPI's buffers)
    if bm >= 128:  # DUO: a piece leaves / returns in register order (8 bytes per thread); no spills
        assert not any(("STL" in s or "LDL" in s) for s in lines)  # anywhere, DUO's sum included
        assert sum(s.split()[0].startswith("STG.E.64") for s in lines) >= nc * 64 * bm // 256
        assert sum(s.split()[0].startswith("LDG.E.64") for s in lines) >= nc * 64 * bm // 256


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("M", [2, 40, 64, 130, 300])
def test_rws_vs_reference_and_ra(group, M):
    pw = _rtn(384, 1152, group, seed=M)
    x = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    y = quant_matmul(x, pw, path="rws")
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    bm = rws.rws_config(M)[0]
    y_ra = quant_matmul(x, pw, path="ra", block_m=bm, split_k=1)  # same weights, products and K order
    tiles = -(-M // bm) * 384 // 128
    whole = rws.quant_gemm_rws(x, pw, torch.empty_like(y), block_m=bm, programs=tiles)  # one program per tile
    assert torch.equal(whole, y_ra)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 7, 8])
@pytest.mark.parametrize("M,group,kw", [(12, 128, {}), (16, 64, {}), (40, 64, {}), (130, 128, {}),
                                        (300, 64, {}), (64, 128, dict(programs=7)),
                                        (200, 128, dict(block_m=256, stages=2))])
def test_rws_sliced_widths(bits, M, group, kw):
    """Every width of 1..8 bits (their slices converted in registers, ra_slices): against ref_quant_matmul,
    whole tiles and stream-K pieces, BLOCK_M 64-256, M 12-16 (routed here for widths without a wgmma
    kernel where the mma.sync kernel is not chosen); a repeated call gives the same bits."""
    g = torch.Generator().manual_seed(bits * 1000 + M)
    pw = rtn_quantize(torch.randn(384, 1152, generator=g), QuantSpec(bits, group, "uniform")).to("cuda")
    x = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    y = rws.quant_gemm_rws(x, pw, torch.empty(M, 384, device="cuda", dtype=torch.bfloat16), **kw)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(rws.quant_gemm_rws(x, pw, torch.empty_like(y), **kw), y)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("kw", [dict(programs=5), dict(programs=7), dict(block_m=256, stages=3),
                                dict(block_m=64, stages=2, programs=13), dict(block_m=128, programs=132),
                                dict(block_m=64, max_regs=80, cons_regs=104),
                                dict(block_m=64, programs=5, dp_waves=1),
                                dict(block_m=64, programs=5, dp_waves=2), dict(block_k=128),
                                dict(block_k=128, block_m=16, programs=5), dict(block_k=128, pdl=False),
                                dict(pdl=False, programs=7)])
def test_rws_variants_and_out_slice(kw):
    """Stream-K with pieces of 1-3 programs per tile (counters left at zero: a second call gives the same
    bits), BLOCK_M 16-256, 2-3 stages, two programs per SM, whole-tile waves before the stream-K part (12
    tiles of 36 K tiles on 5 programs: one wave leaves ranges of 50 tile-steps, DUO; two leave 14, three
    pieces per tile), 128-wide K tiles, a plain launch (the default is PDL); the output written into a column
    slice of a wider tensor."""
    pw = _rtn(384, 1152 * 2, 128, seed=7)
    M = 200
    x = torch.randn(M, 1152 * 2, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    wide = torch.zeros(M, 384 + 128, device="cuda", dtype=torch.bfloat16)
    y = rws.quant_gemm_rws(x, pw, wide[:, 64:448], **kw)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    fresh = torch.empty(M, 384, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(rws.quant_gemm_rws(x, pw, fresh, **kw), y)
    assert wide[:, :64].abs().sum() == 0 and wide[:, 448:].abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("kw", [dict(block_m=256), dict(block_m=256, programs=3),
                                dict(block_m=128, programs=5), dict(block_m=64),
                                dict(block_m=64, consumers=4), dict(block_m=256, programs=16),
                                dict(block_m=128, programs=24), dict(block_m=128, programs=8, dp_waves=1)])
@pytest.mark.parametrize("col", [64, 65])
def test_rws_turns_and_tma_epilogue_keep_the_bits(kw, col):
    """The consumers taking turns (ping), whole tiles leaving through a TMA store (epi) and two-piece tiles
    summed in registers (duo; programs 3 at BLOCK_M 256 and 5 at 128 have ranges >= k_tiles; 16 at 256, 24 at
    128 and a wave of 8 then 8 halves split every tile in halves, where duo's roles are fixed, swap, unless
    turned off), alone and together, on whole tiles and stream-K pieces: the same bits as none, into a column
    slice of a wider output (at column 65 the rows are not 16-byte aligned, so epi falls back to the plain
    stores), and the columns around the slice untouched."""
    pw = _rtn(512, 1152 * 2, 128, seed=col)
    M = 300
    x = torch.randn(M, 1152 * 2, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    base = rws.quant_gemm_rws(x, pw, torch.empty(M, 512, device="cuda", dtype=torch.bfloat16), ping=False,
                              epi=False, duo=False, **kw)
    assert float((base.float() - ref).norm() / ref.norm()) < 1e-2
    for ping, epi, duo, swap in ((True, False, False, None), (False, True, False, None),
                                 (True, True, False, None), (False, False, True, None),
                                 (False, True, True, None), (False, True, True, False)):
        wide = torch.zeros(M, 512 + 128, device="cuda", dtype=torch.bfloat16)
        y = rws.quant_gemm_rws(x, pw, wide[:, col:col + 512], ping=ping, epi=epi, duo=duo, swap=swap, **kw)
        assert torch.equal(y, base), (ping, epi, duo, swap)
        assert wide[:, :col].abs().sum() == 0 and wide[:, col + 512:].abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("kw", [dict(programs=7), dict(programs=5, block_m=256), {}])
def test_rws_pdl_chain_in_a_graph(kw):
    """Four dependent calls (each x the previous call's y; the stream-K counters and pieces reused from call
    to call) as programmatic dependent launches captured in a CUDA graph, each requesting its first words
    before its wait: the same bits as plain launches run eagerly, on every replay."""
    pw = _rtn(1152, 1152, 128, seed=11)
    M = 200
    x0 = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16) * 0.1

    def chain(outs, pdl):
        x = x0
        for y in outs:
            x = rws.quant_gemm_rws(x, pw, y, pdl=pdl, **kw)
        return outs

    plain = chain([torch.empty(M, 1152, device="cuda", dtype=torch.bfloat16) for _ in range(4)], False)
    assert all(torch.isfinite(y.float()).all() for y in plain)
    outs = [torch.empty(M, 1152, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    chain(outs, True)  # compiled and the scale table cached outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(outs, True)
    for _ in range(3):
        for y in outs:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, plain))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("M,kw", [(40, {}), (64, dict(programs=9)), (200, {}), (64, dict(block_m=32))])
def test_rws_four_consumers(M, kw):
    """Four consumer warpgroups (256 weight rows per tile, BLOCK_M 64): against the reference, and bit-equal
    to two consumers when both run whole tiles (the same K order per column)."""
    pw = _rtn(512, 1152, 128, seed=M)
    x = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    y = rws.quant_gemm_rws(x, pw, torch.empty(M, 512, device="cuda", dtype=torch.bfloat16), consumers=4,
                           **{"block_m": 64, **kw})
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    bm = kw.get("block_m", 64)
    t4, t2 = -(-M // bm) * 2, -(-M // bm) * 4
    y4 = rws.quant_gemm_rws(x, pw, torch.empty_like(y), consumers=4, block_m=bm, programs=t4)
    y2 = rws.quant_gemm_rws(x, pw, torch.empty_like(y), consumers=2, block_m=bm, programs=t2)
    assert torch.equal(y4, y2)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_rws_random_codes_real_shape():
    """Layer shapes with uniformly random codes against the float32 dequantization: 4096 x 14336 (W4 at M 64
    and 1024, W3 at M 64, W6 at M 1024, W8 at M 256: quarters at 64, whole tiles at 1024) and 6144 x 4096 (W4
    and W2 at M 1024: a wave of 128 whole tiles, then each of the 64 left in halves, summed by DUO)."""
    from anybit.quant.format import dequantize
    from benchmarks.bench_quant_matmul import random_packed
    mlp, qkv = (4096, 14336), (6144, 4096)
    for bits, ms, (N, K) in ((4, (64, 1024), mlp), (3, (64,), mlp), (6, (1024,), mlp), (8, (256,), mlp),
                             (4, (1024,), qkv), (2, (1024,), qkv)):
        pw = random_packed(N, K, bits)
        wd = dequantize(pw, torch.float32)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y = quant_matmul(x, pw, path="rws")
            ref = x.float() @ wd.t()
            assert float((y.float() - ref).norm() / ref.norm()) < 1e-2, (bits, M)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("bits", [3, 6])
def test_engine_batch_through_rws_matches_previous_route(tmp_path, monkeypatch, bits):
    """A quantized bf16 model (every linear at ``bits``, group 64) generates 20 prompts at once on CUDA: the
    prefill and each decode step (M = 20) take quant_gemm_rws (counted). Against the same engine with rws off
    (the previous routes: Triton GEMM / dequantize + cuBLAS), at every step up to and including the first
    one where the greedy tokens differ (the same context in both runs) the greedy token's log-probability
    (the largest one) agrees within 0.1; at least half the sequences are identical (bf16 near-ties on a
    random model let some diverge: 15 of 20 in s21-7)."""
    from model_factory import make_tiny_model

    from anybit import LLM, SamplingParams
    from anybit.kernels import quant_matmul as qm
    from anybit.quant.quantize import quantize_model

    dense = make_tiny_model(tmp_path / "m", hidden_size=128, intermediate_size=256, num_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    out = quantize_model(dense, tmp_path / "q", bits=bits, group_size=64, progress=False)
    prompts = [f"Request {i}: the paged cache keeps" + " token" * (i % 7) for i in range(20)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    calls = []
    real = qm.quant_gemm_rws
    monkeypatch.setattr(qm, "quant_gemm_rws", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(qm, "RWS_AUTO", on)
        llm = LLM(str(out), dtype="bfloat16", device="cuda", kv_cache_memory=64 << 20, progress=False)
        n0 = len(calls)
        runs[on] = [o.outputs[0] for o in llm.generate(prompts, sp)]
        assert (len(calls) > n0) == on  # rws ran only when on
        del llm
    same = [a.token_ids == b.token_ids for a, b in zip(runs[True], runs[False])]
    assert sum(same) >= 10, same
    for a, b in zip(runs[True], runs[False]):
        for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
            assert abs(la[ta] - lb[tb]) < 0.1, (a.token_ids, b.token_ids, la, lb)
            if ta != tb:
                break  # the contexts differ from here on
