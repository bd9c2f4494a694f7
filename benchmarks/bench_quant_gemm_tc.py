"""Benchmark: the packed-half tensor-core kernel (quant_gemm_h2, ``h2_dequant=True``) at M = 2..64.

Compared in the same run, Llama-3-8B shapes N x K (out x in features, as bench_quant_matmul.py
names them: 4096x14336 down_proj, 14336x4096 gate/up, 6144x4096 QKV, 128256x4096 lm_head):
``anybit_h2`` (the tensor-core kernel with the launcher's own config), ``anybit`` (quant_matmul's
"auto" choice: the previous tensor-core kernel while GEMM_H2_AUTO is False), ``anybit_old`` (the
previous kernel, timed separately only once "auto" picks h2), cuBLAS bf16 ``F.linear`` and torch's
``_weight_int4pack_mm``; M = 256 / 1024 (W4) through the launcher's large-M path (dequantize +
cuBLAS) and through the h2 kernel; block / split / stage alternatives of the h2 kernel (mostly W4)
on 4096x14336 at M = 16 and 64. Timing is bench_quant_matmul.py's (``bench_shape``: CUDA graphs
over rotating weight copies, median of 20 replays). Compiles dominate (~1-2 s each, ~130 calls
planned): ``--jobs`` worker processes compile the whole plan in parallel into Triton's on-disk
cache first. Every section has a wall-clock budget; what does not fit is skipped and named in the
JSON's notes; a hard limit (faulthandler) ends the process if anything hangs.

    python benchmarks/bench_quant_gemm_tc.py              # H100: ~4 min; JSON to $OUT or results/
    python benchmarks/bench_quant_gemm_tc.py --sections variants   # what a cut first run skipped

Writes quant_matmul_tc.json (schema of quant_matmul_h2.json: benchmark, title, device, versions,
date, columns, rows, notes, correctness).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anybit.kernels import quant_matmul as qm  # noqa: E402
from anybit.kernels.quant_gemm_h2 import GEMM_H2_BITS, tc_config  # noqa: E402
from anybit.quant.format import dequantize  # noqa: E402
from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402
from benchmarks.bench_quant_matmul import bench_shape, random_packed, run_variant  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (6144, 4096), (128256, 4096)]  # N x K
MS = [2, 4, 8, 16, 32, 64]
LARGE_MS = [256, 1024]
BITS = [2, 4, 8]
# seconds per section (main: what TOTAL leaves; variants run last, on what is left); HARD: the process
# exits with a traceback (faulthandler) if it is still running then, whatever it is doing
BUDGET = {"correctness": 50.0, "large": 25.0, "variants": 45.0}
TOTAL, HARD = 240.0, 330.0
WARM_S = 100.0  # parallel compile workers (--jobs) before the timed run; counted in TOTAL
METHODS_NOTE = (
    "methods: anybit_h2 = quant_matmul(path='gemm', h2_dequant=True) with the launcher's config (tc_config: "
    "BLOCK_M 16/32/64, BLOCK_N 128, 4 warps, 4 stages (3 for W8 at BLOCK_M >= 32), one-wave split-K); "
    "anybit = the 'auto' choice (GEMM_H2_AUTO={flag}: {auto} for M <= 64, dequantize + cuBLAS for "
    "M >= 128); anybit_old = the previous kernel (timed only when auto is h2); anybit_h2_* = "
    "alternatives (sk = split-K, s = stages, bn / bm = block sizes, w8 = 8 warps, f16codes = f16 weights "
    "with x / 16); the variants and large sections time cuBLAS / int4 again (rows repeat)")
TOL = 1e-2  # relative Frobenius error vs the float32 dequantization (bf16 output rounding ~2e-3)


def h2(**kw) -> dict:
    return dict(path="gemm", h2_dequant=True, **kw)


def old_kw(M: int, bits: int) -> dict:
    """The previous tensor-core kernel as "auto" runs it with GEMM_H2_AUTO off."""
    return dict(path="gemm", h2_dequant=False,
                fast_dequant=bits in qm.FAST_DEQUANT_BITS and M <= qm.FAST_DEQUANT_MAX_M)


def auto_is_h2(M: int, bits: int) -> bool:
    return qm.GEMM_H2_AUTO and qm.GEMM_H2_MIN_M <= M <= qm.GEMM_H2_MAX_M and bits in GEMM_H2_BITS


def correctness_cases(small=(384, 1152)) -> list[dict]:
    """Few cases, few compiles: per width (2/4/8), an RTN weight on a small shape (group 128) at M
    = 3 and 40 (block_m 16 / 64 of the launcher), bf16 x, plus fp16 x and x * 300 at M = 16 and
    the previous kernel at M = 16; then group 32 (block_k 32) with an explicit split-K of 3, and
    random codes on 4096x14336 at M = 16 and 64 (the launcher's split-K; the same compiles as the
    timed runs). Each case: tag, bits, group, shape, M, x dtype, x scale, quant_matmul keywords."""
    N, K = small
    cases = []
    for bits in BITS:
        for M, dtype, scale, kw in [(3, torch.bfloat16, 1.0, h2()), (40, torch.bfloat16, 1.0, h2()),
                                    (16, torch.float16, 1.0, h2()), (16, torch.bfloat16, 300.0, h2()),
                                    (16, torch.bfloat16, 1.0, old_kw(16, bits))]:
            cases.append(dict(src="rtn", bits=bits, group=128, N=N, K=K, M=M, dtype=dtype, scale=scale,
                              kw=kw))
    cases.append(dict(src="rtn", bits=4, group=32, N=N, K=K, M=16, dtype=torch.bfloat16, scale=1.0,
                      kw=h2(split_k=3)))
    for bits in BITS:
        for M in (16, 64):
            cases.append(dict(src="random", bits=bits, group=128, N=4096, K=14336, M=M, dtype=torch.bfloat16,
                              scale=1.0, kw=h2()))
    for c in cases:
        c["tag"] = (f"b{c['bits']} g{c['group']} {c['N']}x{c['K']} M{c['M']} {str(c['dtype'])[6:]} "
                    f"x*{c['scale']:g} {c['src']}")
    return cases


def check_case(case: dict, device, seed: int = 0, _cache: dict | None = None) -> dict:
    """Kernel (through quant_matmul, into a NaN-filled buffer) vs x @ dequant(W)^T in float32 on
    fresh random data -> {case, kw, rel_err, ok}; an exception counts as a failure (rel_err inf)."""
    cache = _cache if _cache is not None else {}
    key = (case["src"], case["bits"], case["group"], case["N"], case["K"])
    if key not in cache:
        torch.manual_seed(seed + case["bits"])
        if case["src"] == "random":
            pw = random_packed(case["N"], case["K"], case["bits"], case["group"], device=device)
        else:
            W = torch.randn(case["N"], case["K"])
            pw = rtn_quantize(W, QuantSpec(case["bits"], case["group"], "uniform")).to(device)
        cache.clear()  # one weight at a time (the 4096x14336 ones are large)
        cache[key] = (pw, dequantize(pw, torch.float32))
    pw, wd = cache[key]
    x = (torch.randn(case["M"], case["K"], device=device) * case["scale"]).to(case["dtype"])
    ref = x.float() @ wd.t()
    out = torch.full((case["M"], case["N"]), float("nan"), device=device, dtype=case["dtype"])
    try:
        y = run_variant(x, pw, case["kw"], out=out)
        err = float((y.float() - ref).norm() / ref.norm())
        ok = bool(torch.isfinite(y).all()) and err < TOL
    except Exception as e:  # noqa: BLE001
        err, ok = float("inf"), False
        case = dict(case, error=f"{type(e).__name__}: {str(e)[:300]}")
    row = dict(case=case["tag"], kw=str(case["kw"]), rel_err=err, ok=ok)
    if "error" in case:
        row["error"] = case["error"]
    return row


def main_variants(M: int, b: int) -> list:
    v = [("anybit_h2", h2()), ("anybit", {})]
    if auto_is_h2(M, b):
        v.append(("anybit_old", old_kw(M, b)))
    return v


def alt_variants(M: int, b: int) -> list:
    """Alternatives to the h2 launcher's config (W4; f16 codes for W2 too), at M = 16 and 64."""
    bm = tc_config(M, b)[0]
    v = []
    if b == 4:
        v += [("anybit_h2_sk4", h2(split_k=4)), ("anybit_h2_sk8", h2(split_k=8)),
              ("anybit_h2_sk16", h2(split_k=16)),
              ("anybit_h2_s3", h2(num_stages=3)), ("anybit_h2_s6", h2(num_stages=6)),
              ("anybit_h2_bn256_w8", h2(block_n=256, num_warps=8)), ("anybit_h2_bn64", h2(block_n=64)),
              ("anybit_h2_bn128_w8", h2(num_warps=8))]
        if bm == 64:
            v.append(("anybit_h2_bm32", h2(block_m=32)))
    if b in (2, 4):
        v.append(("anybit_h2_f16codes", h2(bf16_codes=False)))
    if b in (2, 8):
        v.append(("anybit_h2_bn256_w8", h2(block_n=256, num_warps=8)))
    return v


def large_variants(M: int, b: int) -> list:
    """M >= 256: the launcher (dequantize + cuBLAS) and the h2 kernel beyond its "auto" range
    (BLOCK_M 64, M / 64 row tiles reading the same weight tile about together, from L2)."""
    return [("anybit", {}), ("anybit_h2", h2())]


def add_int4_ratio(rows: list) -> None:
    i4 = {(r["shape"], r["M"]): r["time_us"] for r in rows if r["method"] == "torch_int4pack"}
    for r in rows:
        t = i4.get((r["shape"], r["M"]))
        r["speedup_vs_int4"] = t / r["time_us"] if t else None


def summary(rows: list) -> list[str]:
    """One line per (shape, M, bits) and the goal lines (W4, h2 on 4096x14336 and the rest)."""
    lines = []
    cub = {(r["shape"], r["M"]): r["time_us"] for r in rows if r["method"] == "cublas_bf16"}
    i4 = {(r["shape"], r["M"]): r["time_us"] for r in rows if r["method"] == "torch_int4pack"}
    keys = sorted({(r["shape"], r["M"], r["bits"]) for r in rows if r["method"].startswith("anybit")},
                  key=lambda k: ([f"{n}x{k_}" for n, k_ in SHAPES].index(k[0]) if k[0] in
                                 [f"{n}x{k_}" for n, k_ in SHAPES] else 9, k[1], k[2]))
    for shp, M, b in keys:
        cells = [f"{r['method'][7:] or 'auto'}={r['time_us']:.1f}({r['speedup']:.2f}x)" for r in rows
                 if (r["shape"], r["M"], r["bits"]) == (shp, M, b) and r["method"].startswith("anybit")]
        lines.append(f"{shp} M{M} W{b} cublas={cub.get((shp, M), float('nan')):.1f} "
                     f"int4={i4.get((shp, M), float('nan')):.1f} " + " ".join(cells))
    for M, goal in [(16, 3.0), (64, 2.0), (256, 0.9), (1024, 0.9)]:
        for meth in ("anybit_h2", "anybit") if M > 64 else ("anybit_h2",):
            got = [f"{r['shape']} {r['speedup']:.2f}x" for r in rows if r["M"] == M and r["bits"] == 4
                   and r["method"] == meth]
            if got:
                lines.append(f"goal W4 M={M} {meth} >= {goal}x cuBLAS: " + ", ".join(got))
    return lines


def plan(sections, shapes, ms, bits) -> list:
    """Every kernel call the sections will make, one per compile: ("case", case) for the
    correctness set, (N, K, M, bits, kw) for the timed ones (M = 2 / 4 / 8 share a compile)."""
    items, seen = [], set()
    if "correctness" in sections:
        items += [("case", c) for c in correctness_cases() if c["bits"] in bits]
    todo = []
    if "main" in sections:
        todo += [(N, K, M, b, main_variants) for N, K in shapes for M in ms for b in bits]
    if "large" in sections:
        todo += [(N, K, M, b, large_variants) for N, K in shapes for M in LARGE_MS
                 for b in ([b for b in bits if b == 4] or bits[:1])]
    if "variants" in sections and SHAPES[0] in shapes:
        todo += [(*SHAPES[0], M, b, alt_variants) for M in (16, 64) if M in ms for b in bits]
    for N, K, M, b, variants in todo:
        for _, kw in variants(M, b):
            key = (N, K, b, tc_config(M, b)[0] if M <= 64 else M, M % 16 == 0, str(kw))
            if key not in seen:
                seen.add(key)
                items.append((N, K, M, b, kw))
    return items


def warm(items) -> None:
    """Run each planned call once (no timing): its compile lands in Triton's on-disk cache, where
    the timed run finds it. Failures are left for the timed run to report."""
    pw, key = None, None
    for it in items:
        try:
            if it[0] == "case":
                check_case(it[1], "cuda")
                continue
            N, K, M, b, kw = it
            if key != (N, K, b):
                pw = None  # free the previous weight first
                pw, key = random_packed(N, K, b), (N, K, b)
            run_variant(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), pw, kw)
        except Exception:  # noqa: BLE001
            continue
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def warm_parallel(argv: list, jobs: int, timeout: float, log) -> None:
    """Compile the plan in ``jobs`` worker processes at once (a compile is single-threaded,
    ~1-2 s; about 100 of them), then return; workers still running at ``timeout`` are stopped."""
    t = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--warm-worker", f"{i}/{jobs}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(jobs)]
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.time() - t)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    log(f"warm-up: {jobs} compile workers, {time.time() - t:.0f}s, exit codes {codes}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=None, help="N x K list, e.g. 4096x14336,14336x4096")
    ap.add_argument("--bits", default=None, help="comma list, default 2,4,8")
    ap.add_argument("--ms", default=None, help="comma list, default 2,4,8,16,32,64")
    ap.add_argument("--total", type=float, default=TOTAL, help="seconds for all sections together")
    ap.add_argument("--sections", default="correctness,main,large,variants",
                    help="comma list of: correctness, main, large, variants (run in that order)")
    ap.add_argument("--jobs", type=int, default=min(8, max(0, (os.cpu_count() or 2) // 2)),
                    help="processes compiling the kernels in parallel before the timed run (0: none)")
    ap.add_argument("--warm-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(HARD + args.total - TOTAL, exit=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    bits = [int(b) for b in args.bits.split(",")] if args.bits else BITS
    ms = [int(m) for m in args.ms.split(",")] if args.ms else MS
    sections = args.sections.split(",")
    if args.warm_worker:  # a compile worker of warm_parallel: its share of the plan, then exit
        i, n = (int(v) for v in args.warm_worker.split("/"))
        warm(plan(sections, shapes, ms, bits)[i::n])
        return 0
    t0 = time.time()
    logs, notes, rows, corr = [], [], [], []

    def log(msg):
        line = f"[{time.time() - t0:6.1f}s] {msg}"
        print(line, flush=True)
        logs.append(line)

    def dump():
        add_int4_ratio(rows)
        ok = sum(r["ok"] for r in corr)
        path = write_result(
            "quant_matmul_tc", "any-bit tensor-core path with packed-half dequantization (M = 2..64, "
            "group 128) vs cuBLAS bf16 and torch int4, Llama-3-8B shapes",
            ["shape", "M", "method", "bits", "time_us", "tbps", "speedup", "speedup_vs_int4"], rows,
            ["time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB) and 24 "
             "rotating bf16 inputs, divided by R (bench_quant_matmul.bench_shape); tbps counts weights "
             "(+scales/zeros) + x + y; speedup = cuBLAS bf16 time / time, speedup_vs_int4 = "
             "_weight_int4pack_mm time / time; shapes are N x K (out x in features)",
             METHODS_NOTE.format(auto="h2" if qm.GEMM_H2_AUTO else "the previous tensor-core kernel, "
                                 "fast_dequant for W2/W4 at M <= 16", flag=qm.GEMM_H2_AUTO),
             f"correctness: {ok}/{len(corr)} kernel-vs-dequant checks passed (rel err < {TOL:g})"
             + (f", max {max(r['rel_err'] for r in corr):.2e}" if corr else "")] + notes,
            out_dir=os.environ.get("OUT") or None, correctness=corr, log=logs)
        return path

    def over(section_t0, section):
        cap = BUDGET.get(section)
        return time.time() - t0 > args.total or (cap is not None and time.time() - section_t0 > cap)

    def skipped(section, what):  # one note per section: where its budget ran out
        if not any(n.startswith(f"{section}:") for n in notes):
            notes.append(f"{section}: {what}")
            log(notes[-1])

    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}; shapes {shapes} M {ms} bits {bits}")
    if args.jobs > 0:
        warm_parallel(list(sys.argv[1:]), args.jobs, WARM_S, log)
    # 1. correctness
    s0 = time.time()
    cache: dict = {}
    for case in correctness_cases() if "correctness" in sections else []:
        if case["bits"] not in bits:
            continue
        if over(s0, "correctness"):
            skipped("correctness", f"budget {BUDGET['correctness']:.0f}s reached at {case['tag']}: "
                                   "the rest skipped")
            break
        row = check_case(case, "cuda", _cache=cache)
        corr.append(row)
        if not row["ok"]:
            log(f"FAIL {row['case']} {row['kw']}: rel err {row['rel_err']:.3e} {row.get('error', '')}")
    cache.clear()
    torch.cuda.empty_cache()
    log(f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} ok"
        + (f", max rel err {max(r['rel_err'] for r in corr):.2e}" if corr else ""))
    dump()

    def run_shapes(section, shape_list, m_list, bit_list, variants):
        s0 = time.time()

        def guarded(M, b):
            if over(s0, section):
                skipped(section, f"budget reached at M={M} W{b}: its kernels not timed from there on "
                                 "(cuBLAS / int4 still are)")
                return []
            return variants(M, b)

        for N, K in shape_list:
            if over(s0, section):
                skipped(section, f"budget reached before {N}x{K}: that shape and the rest skipped")
                continue
            rows.extend(bench_shape(N, K, m_list, bit_list, guarded, log))
            dump()
            log(f"{section} {N}x{K} done")

    # 2. every shape (the headline one first), the large-M path, then the h2 alternatives
    if "main" in sections:
        run_shapes("main", shapes, ms, bits, main_variants)
    if "large" in sections:
        run_shapes("large", shapes, LARGE_MS, [b for b in bits if b == 4] or bits[:1], large_variants)
    if "variants" in sections and SHAPES[0] in shapes:
        run_shapes("variants", [SHAPES[0]], [m for m in (16, 64) if m in ms], bits, alt_variants)
    for line in summary(rows):
        print(line, flush=True)
        logs.append(line)
    path = dump()
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
