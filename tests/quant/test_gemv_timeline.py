"""The mma.sync GEMV's timeline stamps (the kernel's TS, benchmarks only) and bench_gemv_timeline.py's
summary.

On CPU: the summary of synthetic stamps (phases relative to the previous call's last program), and an offline
sm_90 compile with TS on: five global-timer reads and one SM-id read, and the same K loop as without stamps
(they sit outside it)."""

import os

import pytest
import torch
from sm90_sass import loop_bodies, nvdisasm, sm90_sass_ptrs  # same folder (pytest puts it on sys.path)

from anybit.kernels import quant_gemv_mma as mm
from benchmarks.bench_gemv_timeline import call_summary, timer_step_ns


def _stamps(calls: int, programs: int, period: int = 10_000) -> torch.Tensor:
    """``[calls, 64, 8]`` stamps in ns from each call's base (calls ``period`` apart): program p starts at
    -500 + 10 p, passes the wait at +300, has x at +900, ends its loop at +8000 + 50 p and its stores 200 ns
    later, on SM p % 3; rows past ``programs`` stay zero."""
    s = torch.zeros(calls, 64, 8, dtype=torch.int64)
    for c in range(calls):
        base = 1_000_000 + c * period
        for p in range(programs):
            s[c, p, :5] = torch.tensor([base - 500 + 10 * p, base + 300, base + 900, base + 8000 + 50 * p,
                                        base + 8200 + 50 * p])
            s[c, p, 7] = p % 3
    return s


def test_call_summary_phases_relative_to_the_previous_call():
    """Each call's phases are taken from the previous call's last ``end`` (call 0 has none and is left out);
    programs per SM come from the SM ids; rows of zeros (no program) are ignored."""
    q = call_summary(_stamps(4, 10))
    last_end = 8200 + 50 * 9 - 10_000  # the previous call's last end, relative to this call's base
    assert q["programs"] == 10
    assert q["early"] == 0.0  # every start is after the previous call's last end here
    assert q["start_min"] == pytest.approx((-500 - last_end) / 1e3)
    assert q["waited_p50"] == pytest.approx((300 - last_end) / 1e3)
    assert q["x_us"] == pytest.approx(0.6) and q["store_us"] == pytest.approx(0.2)
    assert q["loop_us"] == pytest.approx((8000 + 50 * 4.5 - 900) / 1e3)  # the median of 10 (two middle ones)
    assert q["end_max"] == q["period_us"] == pytest.approx(10.0)
    assert (q["per_sm_min"], q["per_sm_max"]) == (3, 4)
    assert timer_step_ns(_stamps(2, 10)) == 10.0
    # here the later a program starts, the later it ends: the last tenth are late starters
    assert q["corr_end_start"] == pytest.approx(1.0) and q["last_late_start"] == 1.0
    assert q["last_smload"] == 4.0 and q["mean_smload"] == pytest.approx(3.4)


def test_call_summary_counts_programs_that_start_early():
    """A call whose programs start before the previous call's last end counts them as early."""
    q = call_summary(_stamps(3, 10, period=8000))  # the calls overlap: starts precede the previous end
    assert q["early"] == 1.0 and q["start_max"] < 0


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
def test_sm90_compile_stamps_outside_the_loop():
    """TS adds five global-timer reads and one SM-id read and leaves the K loop as it is (W4, BLOCK_M 8, KS 8,
    the whole x slice: the launcher's M = 1 configuration on 6144x4096)."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    consts = dict(W0=4, BLOCK_M=8, BLOCK_K=128, SPLIT=False, PDL=True, CLUSTER=1, DIAG=0, ACC=False, WB=0,
                  WC=0, KS=8, MR=1, XW=8)
    loops = {}
    for ts in (False, True):
        lines = sm90_sass_ptrs(mm._quant_gemv_mma_kernel, dict(consts, TS=ts),
                               dict(ptrs, ts_ptr="*i64") if ts else ptrs, {"num_warps": 4})
        loops[ts] = max((b for b in loop_bodies(lines) if any(s.startswith("HMMA") for s in b)), key=len)
        assert sum("SR_GLOBALTIMER" in s.upper() for s in lines) == (5 if ts else 0)
        assert sum("SR_VIRTID" in s.upper() or "SMID" in s.upper() for s in lines) == (1 if ts else 0)
    assert len(loops[True]) == len(loops[False])
