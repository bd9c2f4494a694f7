"""Benchmark: any-bit quant_matmul vs cuBLAS bf16 (F.linear) and torch int4 (_weight_int4pack_mm).

Llama-3-8B shapes (N x K): 4096x14336 (down), 14336x4096 (gate/up), 6144x4096 (QKV),
128256x4096 (lm_head); M = 1 .. 1024; bits 2..8 at group 128. Each measurement is a CUDA graph
of R calls over R different weight copies and fresh inputs (R chosen so the copies exceed the
50 MB L2 three times over), replayed 20 times; the median graph time / R is reported.

    python benchmarks/bench_quant_matmul.py --out benchmarks/results/quant_matmul.json
    python benchmarks/bench_quant_matmul.py --mode explore   # block-size / path variants
    python benchmarks/bench_quant_matmul.py --mode tc        # tensor-core path, M = 2..64 (< ~3 min)

Writes JSON in the repository's benchmark schema (benchmark, title, device, versions, date,
columns, rows, notes) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from anybit.kernels import split_k_sum  # noqa: E402
from anybit.kernels.quant_gemm_rws import quant_gemm_rws  # noqa: E402
from anybit.kernels.quant_gemm_ws import quant_gemm_ws  # noqa: E402
from anybit.kernels.quant_gemv_h2 import quant_gemv_h2  # noqa: E402
from anybit.kernels.quant_gemv_mma import MMA_BITS, quant_gemv_mma  # noqa: E402
from anybit.kernels.quant_gemv_tma import quant_gemv_tma  # noqa: E402
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul  # noqa: E402
from anybit.quant.format import PackedWeight, dequantize  # noqa: E402
from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (6144, 4096), (128256, 4096)]
MS = [1, 4, 16, 64, 256, 1024]
BITS = [2, 3, 4, 5, 6, 8]
COPY_TBPS = 3.0


def random_packed(N: int, K: int, bits: int, G: int = 128, device="cuda") -> PackedWeight:
    q = torch.randint(-2 ** 31, 2 ** 31 - 1, (bits * K // 32, N), dtype=torch.int32, device=device)
    s = (torch.rand(K // G, N, device=device) * 0.01 + 0.001).half()
    z = torch.randint(0, 2 ** bits, (K // G, N), device=device).half()
    return PackedWeight(q, s, z, bits, G, K, N)


def graph_time_us(calls, reps: int = 20) -> float:
    """calls: list of closures (one per weight copy). Median time per call in microseconds."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del g
    return statistics.median(times)


def copies_for(nbytes: int, cap: int = 24) -> int:
    return max(2, min(cap, math.ceil(150e6 / max(nbytes, 1))))


def check_correctness(log) -> list[dict]:
    """Kernel vs float dequantization on fresh random data (bf16 and fp16 x), both paths."""
    rows = []
    torch.manual_seed(0)
    cases = [(b, "uniform", 128) for b in range(1, 9)] + [(4, "nf4", 64), (4, "fp4", 128), (3, "learned", 32),
                                                         (4, "uniform", -1)]
    for bits, fmt, g in cases:
        W = torch.randn(384, 1152, device="cuda")
        pw = rtn_quantize(W.cpu(), QuantSpec(bits, g, fmt)).to("cuda")
        for M in (1, 5, 16, 100, 300):
            for dtype in (torch.bfloat16, torch.float16) if M == 5 else (torch.bfloat16,):
                x = torch.randn(M, 1152, device="cuda", dtype=dtype)
                ref = ref_quant_matmul(x.float(), pw)
                for path in ("gemv", "gemm", "dequant"):
                    out = torch.full((M, 384), float("nan"), device="cuda", dtype=dtype)
                    try:
                        y = quant_matmul(x, pw, out=out, path=path)
                        err = float((y.float() - ref).norm() / ref.norm())
                    except Exception as e:  # noqa: BLE001
                        log(f"ERROR bits={bits} fmt={fmt} M={M} {path}: {type(e).__name__}: {str(e)[:200]}")
                        y, err = out, float("inf")
                    ok = bool(torch.isfinite(y).all()) and err < 1e-2
                    rows.append(dict(bits=bits, fmt=fmt, group=g, M=M, dtype=str(dtype), path=path,
                                     rel_err=err, ok=ok))
                    if not ok:
                        log(f"FAIL bits={bits} fmt={fmt} M={M} {dtype} {path}: rel err {err:.3e}")
    log(f"correctness: {sum(r['ok'] for r in rows)}/{len(rows)} ok, max rel err "
        f"{max(r['rel_err'] for r in rows):.2e}")
    return rows


def bench_shape(N: int, K: int, ms, bits_list, variants, log) -> list[dict]:
    rows = []
    dev = "cuda"
    wbytes_bf16 = N * K * 2
    R = copies_for(wbytes_bf16)
    Ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(R)]
    int4 = None
    try:
        G = 128
        packs = []
        for _ in range(copies_for(N * K // 2)):
            w = torch.randint(0, 16, (N, K), dtype=torch.int32, device=dev)
            u8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
            wp = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
            sz = torch.rand(K // G, N, 2, device=dev, dtype=torch.bfloat16) * 0.01
            packs.append((wp, sz))
        int4 = packs
    except Exception as e:  # noqa: BLE001
        log(f"int4pack unavailable: {type(e).__name__}: {e}")
    packed = {b: [random_packed(N, K, b) for _ in range(copies_for(b * N * K // 8))] for b in bits_list}
    for M in ms:
        xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(24)]
        io_bytes = M * K * 2 + M * N * 2
        t_cublas = graph_time_us([lambda x=xs[i % 24], w=Ws[i]: F.linear(x, w) for i in range(R)])
        row = dict(shape=f"{N}x{K}", M=M, method="cublas_bf16", bits=16, time_us=t_cublas,
                   tbps=(wbytes_bf16 + io_bytes) / t_cublas / 1e6, speedup=1.0)
        rows.append(row)
        if int4 is not None:
            try:
                t = graph_time_us([lambda x=xs[i % 24], p=p: torch.ops.aten._weight_int4pack_mm(
                    x, p[0], 128, p[1]) for i, p in enumerate(int4)])
                nb = N * K // 2 + (K // 128) * N * 4
                rows.append(dict(shape=f"{N}x{K}", M=M, method="torch_int4pack", bits=4, time_us=t,
                                 tbps=(nb + io_bytes) / t / 1e6, speedup=t_cublas / t))
            except Exception as e:  # noqa: BLE001
                log(f"int4pack M={M}: {type(e).__name__}: {e}")
        for b in bits_list:
            pws = packed[b]
            nb = pws[0].nbytes()
            for name, kw in variants(M, b):
                try:
                    t = graph_time_us([lambda x=xs[i % 24], p=p, kw=kw: run_variant(x, p, kw)
                                       for i, p in enumerate(pws)])
                except Exception as e:  # noqa: BLE001
                    log(f"{name} b={b} M={M}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append(dict(shape=f"{N}x{K}", M=M, method=name, bits=b, time_us=t,
                                 tbps=(nb + io_bytes) / t / 1e6, speedup=t_cublas / t))
        best = {}
        for r in rows:
            mine = r["shape"] == f"{N}x{K}" and r["M"] == M and r["method"].startswith("anybit")
            if mine and (r["bits"] not in best or r["time_us"] < best[r["bits"]]["time_us"]):
                best[r["bits"]] = r
        log(f"{N}x{K} M={M}: cublas {t_cublas:.1f}us | " + " ".join(
            f"W{b}:{r['time_us']:.1f}us({r['speedup']:.2f}x,{r['method'][7:]})"
            for b, r in sorted(best.items())))
    del Ws, packed, int4
    torch.cuda.empty_cache()
    return rows


def check_cases(cases, call, log, tol: float = 1e-2) -> list[dict]:
    """Correctness rows of ``cases`` [(tag, packed, M, kw)]: ``call(x, pw, out, kw)`` (into a
    NaN-filled ``out``) against the float32 dequantization (relative error < tol), and a second
    call into a fresh buffer must give the same bits (split-K counters reset, fixed sum order)."""
    rows = []
    for tag, pw, M, kw in cases:
        x = torch.randn(M, pw.in_features, device="cuda", dtype=torch.bfloat16)
        ref = ref_quant_matmul(x.float(), pw)
        out = torch.full((M, pw.out_features), float("nan"), device="cuda", dtype=torch.bfloat16)
        try:
            y = call(x, pw, out, kw)
            y2 = call(x, pw, torch.empty_like(out), kw)
            err = float((y.float() - ref).norm() / ref.norm())
            same = bool(torch.equal(y, y2))
        except Exception as e:  # noqa: BLE001
            log(f"ERROR {tag} {kw}: {type(e).__name__}: {str(e)[:300]}")
            err, same = float("inf"), False
        ok = err < tol and same
        rows.append(dict(case=tag, kw=str(kw), rel_err=err, repeat_equal=same, ok=ok))
        if not ok:
            log(f"FAIL {tag} {kw}: rel err {err:.3e} repeat_equal {same}")
    log(f"correctness: {sum(r['ok'] for r in rows)}/{len(rows)} ok, max rel err "
        f"{max(r['rel_err'] for r in rows):.2e}")
    return rows


def run_variant(x, pw, kw, out=None):
    """quant_matmul with kw, or (kw["direct_h2"]) the packed-half GEMV launcher with its own
    keywords (fuse_x, programs_per_sm), or (kw["direct_ws"]) the warp-specialized GEMM with its own
    (a_stages, nconv, registers), or (kw["direct_rws"]) the warp-specialized register-A GEMM with its own
    (cons_regs, max_regs), or (kw["direct_mma"]) the mma.sync kernel with its own (pdl,
    diag), or (kw["direct_tma"]) its TMA-ring variant with its own (ks, stages, pdl), which
    quant_matmul does not forward."""
    if kw.get("split_sum"):  # the launcher's route with split_k_sum.SPLIT_SUM_MODE set ("kernel", "last")
        before, split_k_sum.SPLIT_SUM_MODE = split_k_sum.SPLIT_SUM_MODE, kw["split_sum"]
        try:
            return run_variant(x, pw, {k: v for k, v in kw.items() if k != "split_sum"}, out)
        finally:
            split_k_sum.SPLIT_SUM_MODE = before
    if kw.get("pending"):
        kw = {k: v for k, v in kw.items() if k != "pending"}
        fn = quant_gemv_h2 if kw.pop("direct_h2", False) else quant_gemv_tma if kw.pop("direct_tma", False) \
            else quant_gemv_mma
        kw.pop("direct_mma", None)
        return fn(x, pw, None, acc=_pending_acc(x, pw), **kw)
    if kw.get("direct_h2"):
        y = out if out is not None else x.new_empty(x.shape[0], pw.out_features)
        return quant_gemv_h2(x, pw, y, **{k: v for k, v in kw.items() if k != "direct_h2"})
    if kw.get("direct_ws"):
        y = out if out is not None else x.new_empty(x.shape[0], pw.out_features)
        return quant_gemm_ws(x, pw, y, **{k: v for k, v in kw.items() if k != "direct_ws"})
    if kw.get("direct_rws"):
        y = out if out is not None else x.new_empty(x.shape[0], pw.out_features)
        return quant_gemm_rws(x, pw, y, **{k: v for k, v in kw.items() if k != "direct_rws"})
    if kw.get("direct_mma"):
        y = out if out is not None else x.new_empty(x.shape[0], pw.out_features)
        return quant_gemv_mma(x, pw, y, **{k: v for k, v in kw.items() if k != "direct_mma"})
    if kw.get("direct_tma"):
        y = out if out is not None else x.new_empty(x.shape[0], pw.out_features)
        return quant_gemv_tma(x, pw, y, **{k: v for k, v in kw.items() if k != "direct_tma"})
    return quant_matmul(x, pw, out=out, **kw)


def full_variants(M, b):
    return [("anybit", {})]


def explore_variants(M, b):
    """Alternatives to the launcher's choice (recorded to explain the heuristics); W2, W3, W4."""
    v = [("anybit", {})]
    if b not in (2, 3, 4):
        return v
    if M <= 4:
        v += [("anybit_gemv_bn64", dict(path="gemv", block_n=64)),
              ("anybit_gemv_w8", dict(path="gemv", num_warps=8)),
              ("anybit_gemv_sk_hi", dict(path="gemv", split_k=28))]
    if M <= 64:
        v += [("anybit_gemm_swap", dict(path="gemm", swap=True)),
              ("anybit_gemm_swap_fast", dict(path="gemm", swap=True, fast_dequant=True)),
              ("anybit_gemm_noswap", dict(path="gemm", swap=False)),
              ("anybit_gemm_swap_bn64", dict(path="gemm", swap=True, block_n=64))]
    if M >= 64:
        gm = lambda bm, bn, bk, **kw: dict(path="gemm", block_m=bm, block_n=bn, block_k=bk, **kw)
        v += [("anybit_dequant_cublas", dict(path="dequant")),
              ("anybit_gemm_s_128x128x64", gm(128, 128, 64, swap=True, num_warps=8)),
              ("anybit_gemm_n_128x128x64", gm(128, 128, 64, swap=False, num_warps=8)),
              ("anybit_gemm_s_256x128x64", gm(256, 128, 64, swap=True, num_warps=8)),
              ("anybit_gemm_s_128x256x64", gm(128, 256, 64, swap=True, num_warps=8))]
    return v


H2_BITS_BENCH = (2, 3, 4, 5, 6, 8)
H2_SLICE_BENCH = (3, 5, 6)  # two-slice widths: folded zero only, fewer variants (run time)


def check_one(rows: list, log, tag: str, pw, x, ref, kw: dict) -> None:
    """One kernel-vs-reference check (output written into a NaN-filled buffer): appends
    {case, kw, rel_err, ok} to rows, logs errors and failures (rel err >= 1e-2 or non-finite)."""
    out = torch.full((x.shape[0], pw.out_features), float("nan"), device="cuda", dtype=x.dtype)
    try:
        y = run_variant(x, pw, kw, out=out)
        torch.cuda.synchronize()
        err = float((y.float() - ref).norm() / ref.norm())
    except Exception as e:  # noqa: BLE001
        log(f"ERROR {tag} {kw}: {type(e).__name__}: {str(e)[:300]}")
        y, err = out, float("inf")
    ok = bool(torch.isfinite(y).all()) and err < 1e-2
    rows.append(dict(case=tag, kw=str(kw), rel_err=err, ok=ok))
    if not ok:
        log(f"FAIL {tag} {kw}: rel err {err:.3e}")


def check_correctness_h2(log) -> list[dict]:
    """Packed-half GEMV (PTX and its plain-Triton twin), the old GEMV and the tensor-core paths
    vs a float32 dequantization, fresh random data: RTN weights (bits 2..8, group 128, 32 and per
    channel), bf16 and fp16 x at scale 1 and 300, plus M=1 on the 4096x14336 shape (random codes)."""
    rows = []
    torch.manual_seed(1)

    def one(tag, pw, x, ref, kw):
        check_one(rows, log, tag, pw, x, ref, kw)

    for bits, g in [(2, 128), (3, 128), (4, 128), (8, 128), (4, -1), (8, 32), (5, 128), (6, 128), (3, 32),
                    (5, -1)]:
        W = torch.randn(384, 1152, device="cuda")
        pw = rtn_quantize(W.cpu(), QuantSpec(bits, g, "uniform")).to("cuda")
        for M in (1, 16):
            for dtype in (torch.bfloat16, torch.float16):
                for scale in ((1.0, 300.0) if M == 1 else (1.0,)):
                    x = (torch.randn(M, 1152, device="cuda") * scale).to(dtype)
                    ref = ref_quant_matmul(x.float(), pw)
                    tag = f"b{bits} g{g} M{M} {str(dtype)[6:]} x*{scale:g}"
                    kws = [dict(), dict(path="gemv"), dict(path="gemm")]
                    if bits in H2_SLICE_BENCH:  # dict() is the two-slice kernel at M = 1 (few compiles)
                        kws += [dict(path="gemv_h2", use_asm=False), dict(path="gemv_h2", words_per_asm=1),
                                dict(direct_h2=True, block_n=256, num_warps=8)]
                    elif bits in H2_BITS_BENCH:
                        kws += [dict(path="gemv_h2"), dict(path="gemv_h2", words_per_asm=1),
                                dict(path="gemv_h2", use_asm=False), dict(direct_h2=True, zfold=False),
                                dict(direct_h2=True, zfold=True, block_n=256, num_warps=8),
                                dict(direct_h2=True, zfold=True, block_n=512, num_warps=4),
                                dict(direct_h2=True, zfold=True, stages=2)]
                    for kw in kws:
                        one(tag, pw, x, ref, kw)
    for bits in H2_BITS_BENCH:  # a real shape, random codes, K = 14336
        pw = random_packed(4096, 14336, bits)
        Wd = dequantize(pw, torch.float32)
        x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ Wd.t()
        del Wd
        alt = dict(path="gemv_h2", words_per_asm=1) if bits in H2_SLICE_BENCH else \
            dict(direct_h2=True, zfold=False)
        for kw in (dict(), dict(path="gemv_h2", use_asm=False), alt):
            one(f"b{bits} 4096x14336 M1 random codes", pw, x, ref, kw)
    log(f"correctness (h2 set): {sum(r['ok'] for r in rows)}/{len(rows)} ok, max rel err "
        f"{max(r['rel_err'] for r in rows):.2e}")
    return rows


def defer_variants(M, b):
    """The launcher's choice (split_k_sum.defer_default) against its route with the split-K sum in each
    tile's last program (fence, counter atomic, reload; "last") and with the partials always added by
    split_k_sum's second kernel (PDL; "defer")."""
    return [("anybit", {}), ("anybit_last", dict(split_sum="last")),
            ("anybit_defer", dict(split_sum="kernel"))]


def route_variants(M, b):
    """The launcher's choice against each path that applies (wgmma, warp-specialized, generic
    tensor-core, dequantize + cuBLAS): to check the routing of a width at small and mid M."""
    return [("anybit", {}), ("anybit_wg", dict(path="wg")), ("anybit_ws", dict(path="ws")),
            ("anybit_gemm", dict(path="gemm")), ("anybit_dequant", dict(path="dequant"))]


_PENDING_ACCS: dict = {}


def _pending_acc(x, pw) -> torch.Tensor:
    """A float32 ``[M, N]`` accumulator per shape for the pending-sum variants (allocated by the
    warm-up call, before graph capture; never zeroed: the timing does not depend on its values)."""
    key = (x.shape[0], pw.out_features)
    if key not in _PENDING_ACCS:
        _PENDING_ACCS[key] = torch.zeros(key, device=x.device, dtype=torch.float32)
    return _PENDING_ACCS[key]


def m1_variants(M, b):
    """M = 1 by kernel: the launcher's choice, the packed-half GEMV and the mma.sync kernel writing y,
    both adding into a pending float32 sum (the decode step's form), and the mma.sync kernel without
    its split-K ending (DIAG 2: wrong results, timing only)."""
    v = [("anybit", {}), ("anybit_h2", dict(path="gemv_h2")),
         ("anybit_h2_acc", dict(direct_h2=True, pending=True))]
    if b in MMA_BITS:
        v += [("anybit_mma", dict(path="mma")), ("anybit_mma_acc", dict(direct_mma=True, pending=True)),
              ("anybit_mma_diag2", dict(direct_mma=True, diag=2))]
        if DIAG_LOOP:  # the loop without the weight stream (diag 4) and without the ending too (6)
            v += [("anybit_mma_diag4", dict(direct_mma=True, diag=4)),
                  ("anybit_mma_diag6", dict(direct_mma=True, diag=6)),
                  ("anybit_mma_diag7", dict(direct_mma=True, diag=7))]
    return v


DIAG_LOOP = os.environ.get("BENCH_DIAG_LOOP", "0") == "1"


def wide_variants(M, b):
    """M 17..64: the launcher's choice against the mma.sync kernel at BLOCK_M 32 / 64 (scales in the
    conversion, session 23), its pending-sum form, and rws."""
    return [("anybit", {}), ("anybit_mma", dict(path="mma")),
            ("anybit_mma_acc", dict(direct_mma=True, pending=True)), ("anybit_rws", dict(path="rws"))]


def w8_variants(M, b):
    """The mma.sync kernel against the launcher's choice at M 1..16 (W8's float16 MMA, session 23): writing
    y, and adding into a pending float32 sum; M = 1 also the packed-half GEMV's pending form, M > 1 the
    wgmma kernel (W8's route before)."""
    v = [("anybit", {})]
    if b in MMA_BITS:
        v += [("anybit_mma", dict(path="mma")), ("anybit_mma_acc", dict(direct_mma=True, pending=True))]
    if M == 1:
        v += [("anybit_h2", dict(path="gemv_h2")), ("anybit_h2_acc", dict(direct_h2=True, pending=True))]
    elif b in (2, 4, 8):
        v.append(("anybit_wg", dict(path="wg")))
    return v


def small_k_variants(M, b):
    """M 9..16 on shapes with few K tiles per program (qkv, o_proj): the launcher's choice against the
    mma.sync kernel by split-K (its rule skips it below 8 K tiles per program), its TMA-ring variant (1/2/4
    bits), rws and the wgmma kernel (2/4/8 bits)."""
    v = [("anybit", {}), ("anybit_rws", dict(path="rws"))]
    if b in (2, 4, 8):
        v.append(("anybit_wg", dict(path="wg")))
    if b <= 7:
        v += [(f"anybit_mma_sk{sk}", dict(direct_mma=True, split_k=sk)) for sk in (1, 2, 4, 8)]
    if b in (1, 2, 4):
        v += [(f"anybit_tma_sk{sk}", dict(direct_tma=True, split_k=sk)) for sk in (1, 2, 4, 8)]
    return v


def h2_split_variants(M, b):
    """The packed-half GEMV writing y at M = 1 by BLOCK_N and split-K (None: its one-wave rule), against
    the launcher's choice: how much of its time is the split-K ending."""
    v = [("anybit", {})]
    for bn in (32, 64, 128, 256):
        for sk in (None, 1, 2, 4, 8):
            v.append((f"anybit_h2_bn{bn}_sk{sk or 'auto'}", dict(direct_h2=True, block_n=bn, split_k=sk)))
    return v


def h2_acc_variants(M, b):
    """The packed-half GEMV at M = 1 as pending sums (the decode step's form) by split-K (None: its one-wave
    rule), against the GEMV writing y and the mma.sync kernel's pending form."""
    v = [("anybit_h2", dict(path="gemv_h2")), ("anybit_h2_acc", dict(direct_h2=True, pending=True)),
         ("anybit_mma_acc", dict(direct_mma=True, pending=True))]
    v += [(f"anybit_h2_acc_sk{sk}", dict(direct_h2=True, pending=True, split_k=sk))
          for sk in (1, 2, 4, 8, 16)]
    return v


def h2_acc_bn_variants(M, b):
    """The packed-half GEMV's pending form at M = 1 by BLOCK_N and split-K (None: the launcher's rule)."""
    v = [("anybit_h2_acc", dict(direct_h2=True, pending=True))]
    for bn in (32, 64, 128, 256, 512) if b == 8 else (64, 128, 256, 512):
        v += [(f"anybit_h2_acc_bn{bn}_sk{sk or 'auto'}",
               dict(direct_h2=True, pending=True, block_n=bn, split_k=sk)) for sk in (None, 8, 16)]
    return v


def mma_acc_variants(M, b):
    """The mma.sync kernel's pending form (the decode step's at M 2..16) by split-K (None: mma_config's
    one-wave rule)."""
    if b not in MMA_BITS:
        return []
    v = [("anybit", {})] if M > 16 else []  # the launcher writing y (rws on the MLP shapes)
    v += [("anybit_mma_acc", dict(direct_mma=True, pending=True))] + [
        (f"anybit_mma_acc_sk{sk}", dict(direct_mma=True, pending=True, split_k=sk)) for sk in (2, 4, 8, 16)]
    if M > 8 and b in (1, 2, 4):  # the TMA-ring variant (quant_gemv_tma) as pending sums, by split-K too
        v += [("anybit_tma_acc", dict(direct_tma=True, pending=True))] + [
            (f"anybit_tma_acc_sk{sk}", dict(direct_tma=True, pending=True, split_k=sk)) for sk in (4, 8)]
    return v


def mma_split_variants(M, b):
    """Writing y at M 2..16: the launcher's choice against the mma.sync kernel (and the TMA ring, 1/2/4
    bits) by split-K (None: mma_config's one-wave rule)."""
    v = [("anybit", {})]
    if b not in MMA_BITS:
        return v
    v += [("anybit_mma", dict(direct_mma=True))] + [
        (f"anybit_mma_sk{sk}", dict(direct_mma=True, split_k=sk)) for sk in (1, 2, 4, 8, 16)]
    if M > 8 and b in (1, 2, 4):
        v += [("anybit_tma", dict(direct_tma=True))] + [
            (f"anybit_tma_sk{sk}", dict(direct_tma=True, split_k=sk)) for sk in (2, 4, 8)]
    return v


def h2_variants(M, b):
    """The run of the packed-half GEMV: launcher choice plus the old GEMV and the h2 alternatives."""
    v = [("anybit", {})]
    if b not in H2_BITS_BENCH:
        return v
    if b in H2_SLICE_BENCH:  # two-slice (session 3): the old GEMV, and block / warps / slice-1 words per PTX
        if M == 1:
            alts = {3: ((128, 4, None), (256, 4, 1)), 5: ((128, 4, None), (256, 4, 1)),
                    6: ((128, 4, None), (256, 8, None))}[b]
            v.append(("anybit_gemv", dict(path="gemv")))
            v += [(f"anybit_h2s_bn{bn}_w{w}" + (f"_nv{nv}" if nv else ""),
                   dict(direct_h2=True, block_n=bn, num_warps=w, words_per_asm=nv)) for bn, w, nv in alts]
        return v
    if M == 1:  # session 3: zero point folded into the code conversion (zfold) by block size and warps
        v.append(("anybit_h2_nofold", dict(direct_h2=True, zfold=False)))
        for bn, w in ((128, 4), (128, 8), (256, 4), (256, 8), (512, 4), (512, 8)):
            for pps in (None, 4):
                v.append((f"anybit_h2_z_bn{bn}_w{w}" + (f"_pps{pps}" if pps else ""),
                          dict(direct_h2=True, zfold=True, block_n=bn, num_warps=w, programs_per_sm=pps,
                               pdl=False)))
        v.append(("anybit_h2_z_s2", dict(direct_h2=True, zfold=True, stages=2, pdl=False)))
        v.append(("anybit_h2_z_pdl", dict(direct_h2=True, zfold=True, pdl=True)))
    elif M <= 64:
        v += [("anybit_gemm_swap_fast", dict(path="gemm", swap=True, fast_dequant=True))]
    return v


TC_SHAPES = [(4096, 14336), (14336, 4096), (6144, 4096), (128256, 4096)]
TC_MS = [2, 4, 8, 16, 32, 64]
TC_BITS = [2, 4, 8]
TC_BUDGET_S = 150.0  # alternatives are dropped once the mode has run this long (one GPU, < ~3 min)
_tc_t0 = [0.0]
_tc_shape = [(0, 0)]


def check_correctness_tc(log) -> list[dict]:
    """Packed-half tensor-core kernel (h2_dequant) and its variants vs a float32 dequantization on
    fresh random data: RTN bits 2/4/8, group 128 / 32 / per channel, M = 2, 16, 33, 64, bf16 and
    fp16 x (x * 300 once); plus 4096x14336 with random codes at M = 16 and 64."""
    rows = []
    torch.manual_seed(2)

    def one(tag, pw, x, ref, kw):
        check_one(rows, log, tag, pw, x, ref, kw)

    for bits, g in [(2, 128), (4, 128), (8, 128), (4, -1), (2, 32), (8, 32)]:
        W = torch.randn(384, 1152, device="cuda")
        pw = rtn_quantize(W.cpu(), QuantSpec(bits, g, "uniform")).to("cuda")
        for M in (2, 16, 33, 64):
            for dtype in (torch.bfloat16, torch.float16):
                for scale in ((1.0, 300.0) if M == 16 else (1.0,)):
                    x = (torch.randn(M, 1152, device="cuda") * scale).to(dtype)
                    ref = ref_quant_matmul(x.float(), pw)
                    tag = f"b{bits} g{g} M{M} {str(dtype)[6:]} x*{scale:g}"
                    kws = [dict()]  # the launcher: h2 for these M (variants once per width: compile time)
                    if g == 128 and M == 16 and scale == 1.0 and dtype == torch.bfloat16:
                        h2 = lambda **kw: dict(path="gemm", h2_dequant=True, **kw)  # noqa: E731
                        kws += [h2(use_asm=False), h2(split_k=5), h2(block_n=256, num_warps=8),
                                h2(block_n=64), dict(path="gemm", h2_dequant=False)]
                        if bits != 8:
                            kws.append(h2(bf16_codes=False))
                    for kw in kws:
                        one(tag, pw, x, ref, kw)
    for bits in TC_BITS:  # a real shape, random codes, K = 14336
        pw = random_packed(4096, 14336, bits)
        Wd = dequantize(pw, torch.float32)
        for M in (16, 64):
            x = torch.randn(M, 14336, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ Wd.t()
            one(f"b{bits} 4096x14336 M{M} random codes", pw, x, ref, dict())
        del Wd
    log(f"correctness (tc set): {sum(r['ok'] for r in rows)}/{len(rows)} ok, max rel err "
        f"{max(r['rel_err'] for r in rows):.2e}")
    return rows


def tc_variants(M, b):
    """The run of the packed-half tensor-core kernel: the launcher's choice ("anybit" = h2 for
    2 <= M <= 64) everywhere; the old tensor-core kernel (swap-AB, default and fast_dequant) at
    M = 2, 16, 64 on the first two shapes; block / warp / stage / split alternatives for W4 (W2 for
    the f16 codes) at M = 16 and 64 on 4096x14336 -- each only while the mode is inside TC_BUDGET_S
    (every distinct configuration is a Triton compile of a few seconds)."""
    h2 = lambda **kw: dict(path="gemm", h2_dequant=True, **kw)  # noqa: E731
    v = [("anybit", {})]
    if time.time() - _tc_t0[0] > TC_BUDGET_S:
        return v
    if M in (2, 16, 64) and _tc_shape[0] in TC_SHAPES[:2]:
        v += [("anybit_gemm_old", dict(path="gemm", h2_dequant=False, swap=True)),
              ("anybit_gemm_old_fast", dict(path="gemm", h2_dequant=False, swap=True, fast_dequant=True))]
    if M in (16, 64) and _tc_shape[0] == TC_SHAPES[0]:
        if b == 4:
            v += [("anybit_h2_bn256_w8", h2(block_n=256, num_warps=8)),
                  ("anybit_h2_bn64", h2(block_n=64)),
                  ("anybit_h2_s3", h2(num_stages=3)),
                  ("anybit_h2_s6", h2(num_stages=6)),
                  ("anybit_h2_sk4", h2(split_k=4)),
                  ("anybit_h2_sk16", h2(split_k=16))]
            if M == 64:
                v.append(("anybit_h2_bm32", h2(block_m=32)))
        if b in (2, 4):
            v.append(("anybit_h2_f16codes", h2(bf16_codes=False)))
    return v


def main_tc(args) -> int:
    """--mode tc: the packed-half tensor-core kernel (M = 2..64) -> quant_matmul_tc.json."""
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    _tc_t0[0] = t0 = time.time()
    bits = [int(b) for b in args.bits.split(",")] if args.bits else TC_BITS
    ms = [int(m) for m in args.ms.split(",")] if args.ms else TC_MS
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else TC_SHAPES)
    corr = check_correctness_tc(log)
    log(f"correctness done: {time.time() - t0:.0f}s")
    rows = []
    out = args.out or os.path.join(os.environ.get("OUT", "."), "quant_matmul_tc.json")

    def dump():
        result = {
            "benchmark": "quant_matmul_tc",
            "title": "any-bit quant_matmul tensor cores (M = 2..64, group 128) vs cuBLAS bf16, torch int4",
            "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "columns": ["shape", "M", "method", "bits", "time_us", "tbps", "speedup"],
            "rows": rows,
            "notes": [
                "time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB) and 24 "
                "rotating bf16 inputs, divided by R; tbps counts weights (+scales/zeros) + x + y bytes; "
                "speedup = cuBLAS time / time; 'anybit' is the launcher's choice (h2_dequant for "
                "2 <= M <= 64), anybit_gemm_old* the previous tensor-core kernel, anybit_h2_* alternatives",
                f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} kernel-vs-dequant checks passed "
                f"(rel err < 1e-2), max {max(r['rel_err'] for r in corr):.2e}"],
            "correctness": corr,
            "log": logs,
        }
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    for N, K in shapes:
        _tc_shape[0] = (N, K)
        rows += bench_shape(N, K, ms, bits, tc_variants, log)
        dump()
        log(f"after {N}x{K}: {time.time() - t0:.0f}s")
    cub = {(r["shape"], r["M"]): r["time_us"] for r in rows if r["method"] == "cublas_bf16"}
    i4 = {(r["shape"], r["M"]): r["time_us"] for r in rows if r["method"] == "torch_int4pack"}
    keys = {(r["shape"], r["M"], r["bits"]) for r in rows if r["method"].startswith("anybit")}
    for shp, M, b in sorted(keys):
        cells = [f"{r['method'][7:] or 'auto'}={r['time_us']:.1f}({r['speedup']:.2f}x)" for r in rows
                 if (r["shape"], r["M"], r["bits"]) == (shp, M, b) and r["method"].startswith("anybit")]
        print(f"{shp} M{M} W{b} cublas={cub[(shp, M)]:.1f} int4={i4.get((shp, M), float('nan')):.1f} "
              + " ".join(cells))
    dump()
    return 0


# modes whose result file is named after them and whose table lists every variant
NAMED_MODES = ("routes", "defer", "m1", "h2split", "h2acc", "h2accbn", "mmaacc", "mmasplit", "smallk", "w8",
               "wide")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = ["full", "explore", "h2", "tc", *NAMED_MODES]
    ap.add_argument("--mode", default="full", choices=modes)
    ap.add_argument("--skip-correctness", action="store_true",
                    help="no kernel-vs-dequant checks first (when a run of the same code did them)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--bits", default=None, help="comma list, default 2,3,4,5,6,8")
    ap.add_argument("--ms", default=None)
    ap.add_argument("--shapes", default=None, help="e.g. 4096x14336,14336x4096")
    ap.add_argument("--explore-shape", default=None, help="also time the alternative variants on this shape")
    args = ap.parse_args()
    if args.mode == "tc":
        return main_tc(args)
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    h2 = args.mode == "h2"
    bits = [int(b) for b in args.bits.split(",")] if args.bits else [2, 3, 4, 5, 6, 8] if h2 else BITS
    ms = [int(m) for m in args.ms.split(",")] if args.ms else [1, 16] if h2 else MS
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    t0 = time.time()
    corr = [] if args.skip_correctness else check_correctness_h2(log) if h2 else check_correctness(log)
    rows = []
    named = args.mode in ("explore", *NAMED_MODES)
    name = "quant_matmul_h2" if h2 else f"quant_matmul_{args.mode}" if named else "quant_matmul"
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"{name if h2 else 'quant_matmul'}.json")

    def dump():
        result = {
            "benchmark": name,
            "title": "any-bit quant_matmul (group 128) vs cuBLAS bf16 and torch int4, Llama-3-8B shapes",
            "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "columns": ["shape", "M", "method", "bits", "time_us", "tbps", "speedup"],
            "rows": rows,
            "notes": [f"time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB) "
                      f"and 24 rotating inputs, divided by R; tbps counts weights (+scales/zeros) + x + y "
                      f"bytes; copy bandwidth ~{COPY_TBPS} TB/s (H100); speedup = cuBLAS time / time; "
                      f"method 'anybit' is the launcher's own choice, anybit_* rows are alternatives",
                      f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} kernel-vs-dequant checks "
                      f"passed (rel err < 1e-2), max {max(r['rel_err'] for r in corr):.2e}" if corr else
                      "correctness: not checked in this run (--skip-correctness)"],
            "correctness": corr,
        }
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    for N, K in shapes:
        explore = args.mode == "explore" or (args.explore_shape and f"{N}x{K}" == args.explore_shape)
        variants = h2_variants if h2 else route_variants if args.mode == "routes" else \
            m1_variants if args.mode == "m1" else defer_variants if args.mode == "defer" else \
            h2_split_variants if args.mode == "h2split" else \
            h2_acc_variants if args.mode == "h2acc" else \
            h2_acc_bn_variants if args.mode == "h2accbn" else mma_acc_variants if args.mode == "mmaacc" else \
            mma_split_variants if args.mode == "mmasplit" else \
            small_k_variants if args.mode == "smallk" else w8_variants if args.mode == "w8" else \
            wide_variants if args.mode == "wide" else \
            explore_variants if explore else full_variants
        rows += bench_shape(N, K, ms, bits, variants, log)
        dump()
        log(f"after {N}x{K}: {time.time() - t0:.0f}s")
    if args.mode in ("h2acc", "h2accbn"):  # programs per SM of each compiled GEMV configuration (registers)
        from anybit.kernels.quant_gemv_h2 import _RESIDENT
        log("resident programs per SM (bits, BN, BK, wpt, xkind, warps, asm, stages, table, nv, acc): "
            + "; ".join(f"{k}: {v}" for k, v in _RESIDENT.items()))
    if h2:  # compact: one line per (shape, M, bits), us and x cuBLAS per variant
        cub = {(r["shape"], r["M"]): r["time_us"] for r in rows if r["method"] == "cublas_bf16"}
        keys = sorted({(r["shape"], r["M"], r["bits"]) for r in rows if r["method"].startswith("anybit")},
                      key=lambda k: (SHAPES.index(tuple(int(v) for v in k[0].split("x"))), k[1], k[2]))
        for shp, M, b in keys:
            cells = [f"{r['method'][7:] or 'auto'}={r['time_us']:.1f}({r['speedup']:.2f}x)" for r in rows
                     if (r["shape"], r["M"], r["bits"]) == (shp, M, b) and r["method"].startswith("anybit")]
            print(f"{shp} M{M} W{b} cublas={cub[(shp, M)]:.1f} " + " ".join(cells))
        return 0
    print(f"{'shape':>12} {'M':>5} {'method':>28} {'bits':>4} {'us':>8} {'TB/s':>6} {'x cuBLAS':>8}")
    for r in rows:
        every = args.mode in NAMED_MODES
        if r["method"] in ("cublas_bf16", "torch_int4pack", "anybit") or every:
            print(f"{r['shape']:>12} {r['M']:>5} {r['method']:>28} {r['bits']:>4} {r['time_us']:8.1f} "
                  f"{r['tbps']:6.2f} {r['speedup']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
