"""Warp-specialized Gluon path (``path="ws"``, anybit/kernels/quant_gemm_ws.py). Gluon does not run
under the Triton interpreter: on CPU the launcher's rules and an offline sm_90 compile whose SASS
must show the partitions (register reallocation, mbarrier hand-offs, async wgmma kept in flight,
TMA); the per-word PTX is quant_gemm_wg's, emulated in test_quant_gemm_wg.py. On CUDA (Hopper):
the kernel against ref_quant_matmul."""

import os

import pytest
import torch
from sm90_sass import nvdisasm, sm90_sass  # same folder (pytest puts it on sys.path)

from anybit.kernels import quant_gemm_ws as ws
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.rtn import QuantSpec, rtn_quantize

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_launcher_config_and_split():
    assert ws.ws_config(1, 4096, 14336, 128, 4)["block_m"] == 8  # M = 1..8: wgmma N = 8
    assert ws.ws_config(16, 4096, 14336, 128, 4)["block_k"] == 128
    assert ws.ws_config(16, 4096, 14336, 64, 4)["block_k"] == 64  # BLOCK_K divides the group
    assert ws.ws_config(1000, 4096, 14336, 128, 4)["block_m"] == 64  # larger M: several row tiles
    for M in (1, 16, 64):  # the defaults fit 2 programs per SM: shared memory and 12 warps x 80 registers
        c = ws.ws_config(M, 4096, 14336, 128, 4)
        assert ws.ws_shared_bytes(c["block_m"], 64, c["block_k"], c["stages"], c["a_stages"], 4) <= 113 * 1024
        assert c["max_regs"] * 12 * 32 * 2 <= 65536
    # one wave of 2 programs per SM: 64 tiles x 4 splits = 256 <= 264 programs, 56 K tiles each
    assert ws.ws_split(16, 4096, 14336, 16, 64, 64, 132) == 4
    assert ws.ws_split(16, 14336, 4096, 16, 64, 64, 132) == 1  # 224 tiles already fill a wave
    assert ws.ws_split(1, 4096, 512, 8, 64, 64, 132) == 1  # >= 8 K tiles per program
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    pw = rtn_quantize(torch.randn(128, 256), QuantSpec(4, 128, "uniform"))
    with pytest.raises(ValueError, match="quant_gemm_ws"):  # CPU tensors never take the Gluon path
        ws.quant_gemm_ws(x, pw, torch.empty(16, 128, dtype=torch.bfloat16))


@pytest.mark.skipif(ws.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("nconv", [1, 2])
def test_sm90_compile_has_the_partitions(nconv):
    """Register reallocation between the partitions (``USETMAXREG``), the converters' hand-off by
    mbarrier arrive, the wgmma loop that leaves one group in flight, TMA loads; no local-memory
    spills."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    consts = dict(W0=4, STAGES=6, A_STAGES=3, NCONV=nconv, CONV_REGS=152 if nconv == 1 else 104, SPLIT=True,
                  num_warps=4, DIAG=0)
    lines = sm90_sass(ws._quant_gemm_ws_kernel, consts, 16, 64, 128, 4, {"num_warps": 4, "maxnreg": 80})
    assert any("USETMAXREG" in s for s in lines)
    assert sum("SYNCS.ARRIVE" in s for s in lines) >= 2
    assert any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in s for s in lines)
    assert sum("HGMMA" in s for s in lines) >= 4 and any("UTMALDG" in s for s in lines)
    assert not any(s.startswith(("STL", "LDL")) for s in lines)


def _rtn(N, K, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, "uniform")).to("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("M", [1, 3, 8, 16, 40, 130])
def test_ws_vs_reference(bits, group, M):
    pw = _rtn(384, 1152, bits, group, seed=bits + M)
    x = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    y = quant_matmul(x, pw, path="ws")
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("kw", [dict(split_k=3), dict(stages=3, a_stages=2), dict(block_k=64),
                                dict(nconv=2, conv_regs=104, max_regs=80), dict(block_n=128, stages=4),
                                dict(block_m=64, max_regs=96, conv_regs=128)])
def test_ws_variants_and_out_slice(kw):
    """Forced split-K (counters left at zero: a second call gives the same result), ring depths, two
    converter partitions, 128 weight rows (two wgmma warpgroups), register budgets; the output
    written into a column slice of a wider tensor."""
    pw = _rtn(384, 1152, 4, 128, seed=7)
    M = 24
    x = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    wide = torch.zeros(M, 384 + 128, device="cuda", dtype=torch.bfloat16)
    y = ws.quant_gemm_ws(x, pw, wide[:, 64:448], **kw)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    again = ws.quant_gemm_ws(x, pw, torch.empty(M, 384, device="cuda", dtype=torch.bfloat16), **kw)
    assert torch.equal(again, y)
    assert wide[:, :64].abs().sum() == 0 and wide[:, 448:].abs().sum() == 0
