"""Packed-half tensor-core path (``path="gemm", h2_dequant=True``): the PTX per pair, checked by a
bit-level emulation here, and the kernel (plain-Triton twin in the interpreter, PTX on CUDA) vs
ref_quant_matmul for every width, group size, several M and x dtypes."""

import struct

import pytest
import torch

from anybit.kernels import quant_gemm_h2 as qg
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.rtn import QuantSpec, rtn_quantize

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _halves(u: int, bf16: bool) -> list[float]:
    hs = [(u >> s) & 0xFFFF for s in (0, 16)]
    if bf16:
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in hs]
    return [struct.unpack("<e", struct.pack("<H", h))[0] for h in hs]


def _pack(vals: list[float], bf16: bool) -> int:
    t = torch.tensor(vals, dtype=torch.float32).to(torch.bfloat16 if bf16 else torch.float16)
    return sum((int(b) & 0xFFFF) << (16 * i) for i, b in enumerate(t.view(torch.int16).tolist()))


def _emulate(asm: str, word: int, s2: int, c2: int, bf16: bool) -> list[float]:
    """Run one pair's PTX on ints (half2 arithmetic in float64, rounded once per op)."""
    regs = {"$2": word, "$3": s2, "$4": c2}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        a = [t.strip() for t in rest.split(",")]
        val = lambda t: regs[t] if t in regs else int(t, 0)  # noqa: E731
        if op == "mov.b32" and a[0].startswith("{"):
            return _halves(regs[a[-1]], bf16)
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "prmt.b32":
            by = [(val(t) >> 8 * i) & 0xFF for t in a[1:3] for i in range(4)]
            sel = int(a[3], 0)
            regs[a[0]] = sum(by[(sel >> 4 * i) & 0xF] << 8 * i for i in range(4))
        elif op in ("sub.f16x2", "fma.rn.f16x2", "fma.rn.bf16x2"):
            assert (op == "fma.rn.bf16x2") == bf16
            x, y = _halves(val(a[1]), bf16), _halves(val(a[2]), bf16)
            r = [x[i] - y[i] for i in range(2)] if op == "sub.f16x2" else \
                [x[i] * y[i] + _halves(val(a[3]), bf16)[i] for i in range(2)]
            regs[a[0]] = _pack(r, bf16)
        else:
            raise AssertionError(op)
    raise AssertionError("no output")


@pytest.mark.parametrize("bits, bf16", [(2, False), (4, False), (8, False), (2, True), (4, True)])
def test_ptx_gives_rounded_weights_of_pair(bits, bf16):
    """Pair p of a word = codes (p, p + 16/b): ``round(s (q - C) + c)`` from the shifted word."""
    P, H, C = 32 // bits, 16 // bits, 1 << (bits - 1)
    g = torch.Generator().manual_seed(bits * 2 + bf16)
    for trial in range(30):
        q = torch.randint(0, 2 ** bits, (P,), generator=g).tolist()
        if trial == 0:
            q = [2 ** bits - 1] * P  # every field at its maximum
        word = sum(c << (i * bits) for i, c in enumerate(q))
        s = float(torch.rand(1, generator=g)) * 0.05 + 1e-3
        c = (C - float(torch.randint(0, 2 ** bits, (1,), generator=g)) - 0.25) * s
        s2, c2 = _pack([s, s], bf16), _pack([c, c], bf16)
        sr, cr = _halves(s2, bf16)[0], _halves(c2, bf16)[0]
        for p in range(H):
            shift, _ = qg._pair_layout(bits, p, bf16)
            got = _emulate(qg._gemm_h2_asm(bits, p, bf16), word >> shift, s2, c2, bf16)
            want = _halves(_pack([(q[p] - C) * sr + cr, (q[p + H] - C) * sr + cr], bf16), bf16)
            assert got == want, (p, q, got, want)


def test_bf16_is_refused_for_8_bits():
    with pytest.raises(AssertionError):
        qg._gemm_h2_asm(8, 0, True)


def _packed(N, K, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, "uniform")).to(DEV)


# (M, x dtype, tolerance): bf16 codes (default for bf16 x at 2/4 bits) round the weights to bf16,
# and the interpreter's float32 -> bf16 conversion truncates
_CASES = [(2, torch.bfloat16, 1e-2), (3, torch.float16, 3e-3), (16, torch.float32, 3e-3),
          (33, torch.bfloat16, 1e-2), (64, torch.float16, 3e-3)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_gemm_h2_vs_reference(bits, group):
    K = {32: 160, 64: 192, 128: 384, -1: 160}[group]  # multiples of the group size, not of 256
    pw = _packed(80, K, bits, group, seed=bits * 7 + group)
    for M, dtype, tol in _CASES:
        x = torch.randn(M, K, device=DEV).to(dtype)
        ref = ref_quant_matmul(x.float(), pw)
        y = quant_matmul(x, pw, path="gemm", h2_dequant=True)
        assert y.dtype == dtype and y.shape == (M, 80) and torch.isfinite(y).all()
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < tol, (M, dtype, err)


@pytest.mark.parametrize("bits", [2, 4])
def test_f16_codes_for_bf16_x(bits):
    pw = _packed(96, 256, bits, 128, seed=11)
    x = (torch.randn(5, 256, device=DEV) * 300).to(torch.bfloat16)  # x / 16 -> f16: no overflow
    ref = ref_quant_matmul(x.float(), pw)
    y = quant_matmul(x, pw, path="gemm", h2_dequant=True, bf16_codes=False)
    assert float((y.float() - ref).norm() / ref.norm()) < 5e-3


def test_split_k_out_slice_blocks_and_zeroed_counters():
    pw = _packed(144, 512, 4, 64, seed=5)  # 144 columns: two column tiles, the second partial
    x = torch.randn(20, 512, device=DEV, dtype=torch.float16)
    ref = ref_quant_matmul(x.float(), pw)
    for kw in (dict(split_k=3), dict(split_k=8, block_n=64), dict(split_k=1, block_m=32), dict(block_k=64)):
        out = torch.full((20, 200), float("nan"), device=DEV, dtype=torch.float16)
        quant_matmul(x, pw, out=out[:, 30:174], path="gemm", h2_dequant=True, **kw)
        err = float((out[:, 30:174].float() - ref).norm() / ref.norm())
        assert err < 3e-3, (kw, err)
        assert torch.isnan(out[:, :30].float()).all() and torch.isnan(out[:, 174:].float()).all()
    assert all(int(b.abs().sum()) == 0 for b in qg._locks.values())  # the kernel leaves them at zero


def test_scale_table_is_cached_and_follows_in_place_updates():
    pw = _packed(64, 128, 4, 32, seed=3)
    t1 = qg.scale_table(pw, False)
    assert qg.scale_table(pw, False) is t1
    assert qg.scale_table(pw, True) is not t1
    pw.scales.mul_(2)
    t2 = qg.scale_table(pw, False)
    assert not torch.equal(t2, t1)
    s = (t2[0] & 0xFFFF).to(torch.int16).view(torch.float16)
    assert torch.equal(s, pw.scales)


def test_gemm_h2_rejects_other_formats():
    pw = rtn_quantize(torch.randn(32, 64), QuantSpec(3, 32, "uniform")).to(DEV)
    with pytest.raises(ValueError, match="h2_dequant"):
        quant_matmul(torch.randn(4, 64, device=DEV), pw, path="gemm", h2_dequant=True)
    pw = rtn_quantize(torch.randn(32, 64), QuantSpec(4, 32, "nf4")).to(DEV)
    with pytest.raises(ValueError, match="h2_dequant"):
        quant_matmul(torch.randn(4, 64, device=DEV), pw, path="gemm", h2_dequant=True)


def test_launcher_config_split_and_shared_memory():
    """tc_config / tc_split / tc_shared_bytes (launcher heuristics; numbers from the offline sm_90
    compiles in notes_quant.md, session 3)."""
    assert [qg.tc_config(m, 4)[0] for m in (2, 8, 16, 17, 32, 33, 64)] == [16, 16, 16, 32, 32, 64, 64]
    assert qg.tc_config(16, 4) == (16, 128, 4, 4)
    assert qg.tc_config(64, 8)[3] == 3 and qg.tc_config(32, 8)[3] == 3  # 4 stages would cost a program
    assert qg.tc_shared_bytes(4, 16, 128, 128, 4) == 44032  # offline compiles: 44032, 93184, 117760
    assert qg.tc_shared_bytes(4, 64, 128, 128, 4) == 93184
    assert qg.tc_shared_bytes(8, 64, 128, 128, 4) == 117760
    assert qg.tc_resident(128, 4, 44032) == 4 and qg.tc_resident(248, 4, 117760) == 1
    # one wave on 132 SMs: 4096x14336 (32 column tiles, 112 K tiles) at 4 programs / SM -> 16
    assert qg.tc_split(32, 112, 4 * 132) == 16
    assert qg.tc_split(112, 32, 4 * 132) == 4  # 14336x4096
    assert qg.tc_split(48, 32, 2 * 132) == 4  # 6144x4096 at BLOCK_M 64
    assert qg.tc_split(1002, 32, 4 * 132) == 1  # lm_head fills the GPU
    assert qg.tc_split(1, 9, 1000) == 1  # >= TC_MIN_ITERS K tiles per program


def test_bench_correctness_helper():
    """benchmarks/bench_quant_gemm_tc.py: its case list and check_case (here through the
    interpreter on small weights; on the GPU with the PTX)."""
    bench = pytest.importorskip("benchmarks.bench_quant_gemm_tc")
    cases = bench.correctness_cases()
    assert {c["bits"] for c in cases} == {2, 4, 8} and len({c["tag"] for c in cases}) == len(cases)
    assert any(c["kw"].get("h2_dequant") is False for c in cases)  # the previous kernel too
    small = [dict(c, N=80, K=256) for c in cases if c["src"] == "rtn" and c["M"] in (3, 16)
             and c["dtype"] == torch.float16 or (c["src"] == "rtn" and c["M"] == 3 and c["bits"] == 4)]
    assert small
    cache = {}
    for c in small:
        row = bench.check_case(c, DEV, _cache=cache)
        assert row["ok"], row
    bad = bench.check_case(dict(small[0], kw=dict(path="gemm", h2_dequant=True, block_n=32)), DEV)
    assert not bad["ok"] and "block_n" in bad["error"]


def test_bench_main_respects_budgets(tmp_path, monkeypatch):
    """The benchmark's driver with the GPU parts faked: sections run in order, a spent budget
    skips the rest with a note, the JSON has the schema of quant_matmul_h2.json."""
    import json
    import sys

    bench = pytest.importorskip("benchmarks.bench_quant_gemm_tc")
    calls = []

    def fake_bench_shape(N, K, ms, bits, variants, log):
        rows = []
        for M in ms:
            rows.append(dict(shape=f"{N}x{K}", M=M, method="cublas_bf16", bits=16, time_us=50.0, tbps=1.0,
                             speedup=1.0))
            rows.append(dict(shape=f"{N}x{K}", M=M, method="torch_int4pack", bits=4, time_us=40.0, tbps=1.0,
                             speedup=1.25))
            for b in bits:
                for name, _kw in variants(M, b):
                    calls.append((N, K, M, b, name))
                    rows.append(dict(shape=f"{N}x{K}", M=M, method=name, bits=b, time_us=20.0, tbps=2.0,
                                     speedup=2.5))
        return rows

    monkeypatch.setattr(bench, "bench_shape", fake_bench_shape)
    monkeypatch.setattr(bench, "check_case", lambda c, d, **kw: dict(case=c["tag"], kw=str(c["kw"]),
                                                                     rel_err=1e-3, ok=True))
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(bench.faulthandler, "dump_traceback_later", lambda *a, **k: None)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench", "--shapes", "4096x14336,14336x4096", "--jobs", "0"])
    assert bench.main() == 0
    d = json.loads((tmp_path / "quant_matmul_tc.json").read_text())
    assert {"benchmark", "title", "device", "versions", "date", "columns", "rows", "notes",
            "correctness"} <= set(d)
    assert len(d["correctness"]) == len(bench.correctness_cases())
    methods = {c[4] for c in calls}
    assert {"anybit", "anybit_h2", "anybit_h2_sk16", "anybit_h2_bn256_w8"} <= methods
    assert any(c[2] == 1024 for c in calls)  # large-M section
    # the compile plan of the parallel warm-up: every timed configuration, one call per compile
    items = bench.plan(["correctness", "main", "large", "variants"], [(4096, 14336), (14336, 4096)],
                       bench.MS, bench.BITS)
    kws = lambda M, b: bench.main_variants(M, b) + bench.alt_variants(M, b) + bench.large_variants(M, b)
    timed = {(c[0], c[1], c[3], str(kw)) for c in calls for name, kw in kws(c[2], c[3]) if name == c[4]}
    assert timed == {(it[0], it[1], it[3], str(it[4])) for it in items if it[0] != "case"}
    assert sum(it[0] == "case" for it in items) == len(bench.correctness_cases())
    assert len(items) < len(calls) + len(bench.correctness_cases())  # M = 2, 4, 8 share a compile
    assert all(r["speedup_vs_int4"] == pytest.approx(2.0) for r in d["rows"] if r["method"] == "anybit_h2")
    # no time left: the correctness cases and every kernel are skipped, with notes
    calls.clear()
    monkeypatch.setattr(sys, "argv", ["bench", "--shapes", "4096x14336", "--total", "0", "--jobs", "0"])
    assert bench.main() == 0
    d = json.loads((tmp_path / "quant_matmul_tc.json").read_text())
    assert not calls and not d["correctness"]
    assert any(n.startswith("correctness:") for n in d["notes"])
    assert any(n.startswith("main:") for n in d["notes"])
