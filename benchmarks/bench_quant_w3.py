"""Uniform W3 (2 + 1 slices; W5 4 + 1 and W6 4 + 2 with --bits) on the mma.sync kernel: the second slice's
bits merged into the first's conversion (the kernel's HB: one MMA chain, one x operand) against the slices as
separate chains, with cuBLAS bf16 and the launcher's choice, on Llama-3-8B layer shapes.

    python benchmarks/bench_quant_w3.py                  # -> $OUT/quant_w3.json
    python benchmarks/bench_quant_w3.py --ms 1,16 --shapes 14336x4096 --bits 5

Every row: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB), divided by R (the
timing of bench_quant_matmul.py). Correctness first: every variant against ``ref_quant_matmul`` on fresh
data (relative error < 1e-2, a second call gives the same bits).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anybit.kernels.quant_gemv_mma import quant_gemv_mma  # noqa: E402
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul  # noqa: E402
from anybit.quant.rtn import QuantSpec, rtn_quantize  # noqa: E402
from benchmarks.bench_quant_codebook import (  # noqa: E402
    SHAPES,
    _unrolled_3sm,
    bf16_weights,
    check_call,
    correctness_note,
    grid_args,
    grid_parser,
)
from benchmarks.bench_quant_matmul import _pending_acc, copies_for, graph_time_us, random_packed  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

MS = [1, 4, 8, 16, 24, 32]  # SHAPES: the codebook benchmark's layer shapes
COLUMNS = ["shape", "M", "bits", "cublas_us", "auto_us", "auto_x", "two_us", "hb_us", "hb_nocap_us",
           "hb_u2_us", "hb_cap128_us", "hb_3sm_us", "hb_u2_3sm_us", "acc_hb_u2_3sm_us", "acc_two_us",
           "acc_hb_us", "acc_hb_nocap_us", "hb_vs_two", "acc_hb_vs_two"]


def _y(x, p):
    return torch.empty(x.shape[0], p.out_features, dtype=x.dtype, device=x.device)


def variants(M: int):
    """(name, call(x, pw)): the launcher; the mma.sync kernel with the two slices as two chains (two) or
    merged (hb), merged without the launcher's register cap (M <= 8, ``bm8_register_cap``), merged and
    unrolled (M <= 16, x from global memory); adding into a pending float32 sum (acc_*)."""
    v = [("auto", lambda x, p: quant_matmul(x, p)),
         ("two", lambda x, p: quant_gemv_mma(x, p, _y(x, p), high_bits=False)),
         ("hb", lambda x, p: quant_gemv_mma(x, p, _y(x, p), high_bits=True)),
         ("acc_two", lambda x, p: quant_gemv_mma(x, p, None, acc=_pending_acc(x, p), high_bits=False)),
         ("acc_hb", lambda x, p: quant_gemv_mma(x, p, None, acc=_pending_acc(x, p), high_bits=True))]
    if M == 1:  # merged, ks and split for 3 programs per SM (uncapped: 164-168 registers), plain / unrolled
        v += [("hb_3sm", lambda x, p: _unrolled_3sm(x, p, unroll2=False, high_bits=True, max_registers=0)),
              ("hb_u2_3sm", lambda x, p: _unrolled_3sm(x, p, high_bits=True, max_registers=0)),
              ("acc_hb_u2_3sm", lambda x, p: _unrolled_3sm(x, p, high_bits=True, max_registers=0,
                                                           acc=_pending_acc(x, p)))]
    if M <= 8:
        v += [("hb_nocap", lambda x, p: quant_gemv_mma(x, p, _y(x, p), high_bits=True, max_registers=0)),
              ("hb_cap128", lambda x, p: quant_gemv_mma(x, p, _y(x, p), high_bits=True, max_registers=128)),
              ("acc_hb_nocap", lambda x, p: quant_gemv_mma(x, p, None, acc=_pending_acc(x, p), high_bits=True,
                                                           max_registers=0))]
    if M <= 16:
        v.append(("hb_u2", lambda x, p: quant_gemv_mma(x, p, _y(x, p), high_bits=True, unroll2=True,
                                                       x_slots=0)))
    return v


def check(log, bits: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for K in (1152, 2048):
        pw = rtn_quantize(torch.randn(384, K), QuantSpec(bits, 128)).to("cuda")
        for M in (1, 3, 8, 16, 24, 32):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = ref_quant_matmul(x.float(), pw)
            for name, call in variants(M):
                if name.startswith("acc"):
                    continue
                err, same, ok = check_call(log, f"K{K} M{M} {name}", call, x, pw, ref)
                rows.append(dict(K=K, M=M, variant=name, rel_err=err, repeat_equal=same, ok=ok))
    log(correctness_note(rows))
    return rows


def compact(detail: list[dict], bits: int) -> list[dict]:
    t = {(r["shape"], r["M"], r["method"]): r["time_us"] for r in detail}
    out = []
    for shape, M in dict.fromkeys((r["shape"], r["M"]) for r in detail):
        def g(m, shape=shape, M=M):
            return t.get((shape, M, m))
        cub = g("cublas_bf16")
        out.append(dict(shape=shape, M=M, bits=bits, cublas_us=cub, auto_us=g("auto"), auto_x=cub / g("auto"),
                        two_us=g("two"), hb_us=g("hb"), hb_nocap_us=g("hb_nocap"), hb_u2_us=g("hb_u2"),
                        hb_cap128_us=g("hb_cap128"), hb_3sm_us=g("hb_3sm"),
                        hb_u2_3sm_us=g("hb_u2_3sm"), acc_hb_u2_3sm_us=g("acc_hb_u2_3sm"),
                        acc_two_us=g("acc_two"), acc_hb_us=g("acc_hb"), acc_hb_nocap_us=g("acc_hb_nocap"),
                        hb_vs_two=g("two") / g("hb"),
                        acc_hb_vs_two=g("acc_two") / g("acc_hb")))
    return out


def main() -> int:
    ap = grid_parser(__doc__)
    ap.add_argument("--bits", type=int, default=3, choices=(3, 5, 6))
    args = ap.parse_args()
    bits = args.bits
    ms, shapes, out = grid_args(args, MS, SHAPES, "quant_w3.json")

    def log(msg):
        print(msg, flush=True)

    t0 = time.time()
    corr = check(log, bits)
    detail = []
    for N, K in shapes:
        Ws = bf16_weights(N, K)
        w3 = [random_packed(N, K, bits) for _ in range(copies_for(N * K * bits // 8))]
        shape = f"{N}x{K}"
        for M in ms:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(24)]
            t_cub = graph_time_us([lambda x=xs[i % 24], w=w: F.linear(x, w) for i, w in enumerate(Ws)])
            detail.append(dict(shape=shape, M=M, method="cublas_bf16", time_us=t_cub))
            for name, call in variants(M):
                try:
                    t = graph_time_us([lambda x=xs[i % 24], p=p, c=call: c(x, p) for i, p in enumerate(w3)])
                except Exception as e:  # noqa: BLE001
                    log(f"{shape} M{M} {name}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                detail.append(dict(shape=shape, M=M, method=name, time_us=t))
            log(f"{shape} M{M} " + " ".join(f"{r['method']}={r['time_us']:.1f}" for r in detail
                                           if r["shape"] == shape and r["M"] == M))
        del Ws, w3
        torch.cuda.empty_cache()
        log(f"after {shape}: {time.time() - t0:.0f}s")
    notes = ["time: median of 20 CUDA-graph replays of R calls over R weight copies (> 150 MB) and 24 "
             "rotating inputs, divided by R; auto = quant_matmul's choice; two / hb = quant_gemv_mma with "
             "the second slice as its own chain / merged (high_bits); *_nocap: merged without the launcher's "
             "BLOCK_M 8 register cap; hb_3sm / hb_u2_3sm (M = 1): merged with ks and split for 3 programs "
             "per SM, loop plain / unrolled (acc_hb_u2_3sm: as pending sums); hb_cap128: merged under a "
             "128-register cap; hb_u2: merged, loop "
             "unrolled by two, x from global memory; acc_*: adding into a pending float32 sum; *_vs_two = "
             "two's time / hb's",
             correctness_note(corr)]
    title = (f"uniform W{bits} g128: the second slice merged into the first's conversion (HB) vs separate "
             "slices and cuBLAS bf16")
    write_result(Path(out).stem, title, COLUMNS, compact(detail, bits), notes, out_dir=str(Path(out).parent),
                 detail=detail, correctness=corr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
