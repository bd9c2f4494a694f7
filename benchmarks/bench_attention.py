"""Attention kernel benchmark (H100): paged prefill vs SDPA flash / cuDNN, split-K paged decode.

Run on the GPU machine: ``python benchmarks/bench_attention.py --out DIR``. Checks every kernel
against its ``ref_`` on the benchmark's own shapes first, then times with ``triton.testing.do_bench``
(median, L2 flushed between calls). Writes ``attention_prefill.json`` and ``attention_decode.json``.
``--variants`` instead runs only the quantized-decode variant sweep (``DECODE_VARIANTS``: bf16, the
int8/int4 defaults and the register-prefetch / register-cap variants, each checked against ``ref_``
on the GPU first, plus a 1 x 32k drift check with one split) at batch 1/32/64 x context 4k/16k/32k,
~3-4 minutes on one H100 with compiles; writes ``attention_decode_variants.json``.

Prefill FLOPs (causal): ``2 * num_heads * head_dim * sum(L_i^2)`` (two matmuls, half the square).
Decode bytes: K and V of every context token (codes + scales/zeros) + query + output.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anybit.kernels.attention_decode import paged_attention_decode, ref_paged_attention_decode  # noqa: E402
from anybit.kernels.attention_prefill import paged_attention_prefill, ref_paged_attention_prefill  # noqa: E402
from anybit.layers import attention_meta  # noqa: E402
from anybit.layers.attention_meta import LayerKVCache, new_layer_kv_cache  # noqa: E402
from benchmarks.common import print_table, write_result  # noqa: E402

NH, NKV, D, BS = 32, 8, 128, 16


def bench(fn) -> float:
    """Median milliseconds (do_bench flushes L2 before each call)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_cache(dtype: str, num_blocks: int, nkv: int = NKV, d: int = D,
               layout: str = "head/packed") -> LayerKVCache:
    """Random (never zero) cache contents: speed does not depend on the values. layout:
    "CODE/SCALE" of kv_code_buffer / kv_scale_buffers ("head/packed" = the engine's; "token/token" =
    the layout before session 14)."""
    code_layout, scale_layout = layout.split("/")
    c = new_layer_kv_cache(num_blocks, BS, nkv, d, dtype, "cuda", code_layout, scale_layout)
    for t in (c.key, c.value):
        if dtype == "bfloat16":
            t.normal_()
        else:
            lo, hi = (-127, 128) if dtype == "int8" else (0, 256)
            t.copy_(torch.randint(lo, hi, t.shape, device="cuda", dtype=t.dtype))
    for i, t in enumerate((c.key_scale, c.value_scale, c.key_zero, c.value_zero)):
        if t is not None:  # int8 scales, int4 scales, int4 zero points
            t.uniform_(*((0.005, 0.025) if dtype == "int8" else (0.05, 0.25) if i < 2 else (-2.0, -1.0)))
    return c


def paged_batch(seq_lens: list[int], dtype: str, nkv: int = NKV, d: int = D, layout: str = "head/packed"):
    """A cache holding exactly these contexts, pages shuffled; returns (cache, block_table)."""
    nbs = [triton.cdiv(s, BS) for s in seq_lens]
    perm = torch.randperm(sum(nbs), device="cuda").to(torch.int32)
    table = torch.zeros(len(seq_lens), max(nbs), dtype=torch.int32, device="cuda")
    used = 0
    for i, nb in enumerate(nbs):
        table[i, :nb] = perm[used:used + nb]
        used += nb
    return make_cache(dtype, sum(nbs), nkv, d, layout), table


def kv_bytes_per_token_head(dtype: str, d: int = D) -> int:
    """Bytes of one K or V row with its scale (int8) or scale and zero point (int4, KV_SCALE_DTYPE)."""
    sb = attention_meta.KV_SCALE_DTYPE.itemsize
    return {"bfloat16": 2 * d, "int8": d + sb, "int4": d // 2 + 2 * sb}[dtype]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------------
def check_correctness(notes: list[str]) -> None:
    torch.manual_seed(0)
    for dtype in ("bfloat16", "int8", "int4"):
        seq = [1, 17, 300, 1030]
        cache, table = paged_batch(seq, dtype)
        q = torch.randn(len(seq), NH, D, device="cuda", dtype=torch.bfloat16)
        sl = torch.tensor(seq, dtype=torch.int32, device="cuda")
        for win in (None, 100):
            ref = ref_paged_attention_decode(q, cache, sl, table, D ** -0.5, win, max(seq))
            for splits in (None, 1, 7):
                out = paged_attention_decode(q, cache, sl, table, D ** -0.5, win, max(seq), num_splits=splits)
                e = rel(out, ref)
                assert e < 1e-2, f"decode {dtype} window={win} splits={splits}: rel err {e:.2e}"
        if dtype in ("int8", "int4"):
            ref = ref_paged_attention_decode(q, cache, sl, table, D ** -0.5, None, max(seq))
            for biased in (True, False):
                out = paged_attention_decode(q, cache, sl, table, D ** -0.5, None, max(seq), biased=biased)
                e = rel(out, ref)
                notes.append(f"{dtype} decode biased={biased}: rel err vs ref_ (bf16 q, out) {e:.2e}")
        if dtype == "int8":
            for flags in ({"int8_qk": True}, {"int8_qk": True, "int8_pv": True}):
                e = rel(paged_attention_decode(q, cache, sl, table, D ** -0.5, None, max(seq), **flags), ref)
                notes.append(f"int8 decode {flags}: rel err vs ref_ (int8 cache, exact math) {e:.2e}")
                assert e < 2e-2, notes[-1]
        qlens = [1, 17, 129, 700]
        qs = torch.randn(sum(qlens), NH, D, device="cuda", dtype=torch.bfloat16)
        qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device="cuda")
        for win in (None, 100):
            args = (qs, cache, qsl, sl, table, D ** -0.5, win, max(qlens), max(seq))
            e = rel(paged_attention_prefill(*args), ref_paged_attention_prefill(*args))
            assert e < 1e-2, f"prefill {dtype} window={win}: rel err {e:.2e}"
    notes.append("correctness (bf16 query): decode (splits auto/1/7, window none/100) and prefill "
                 "(prefix hits, window) vs ref_ on GPU for bf16/int8/int4 caches: all rel err < 1e-2")


# ------------------------------------------------------------------------------------------------
def prefill_case(seq_lens, sweep=None, layout="head/packed"):
    cache, table = paged_batch(seq_lens, "bfloat16", layout=layout)
    q = torch.randn(sum(seq_lens), NH, D, device="cuda", dtype=torch.bfloat16)
    qsl = torch.tensor([0] + list(torch.tensor(seq_lens).cumsum(0)), dtype=torch.int32, device="cuda")
    sl = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    args = (q, cache, qsl, sl, table, D ** -0.5, None, max(seq_lens), max(seq_lens))
    return (lambda **kw: paged_attention_prefill(*args, **kw)), args


def sdpa_times(seq_lens):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, length = len(seq_lens), seq_lens[0]
    q = torch.randn(b, NH, length, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, NKV, length, D, device="cuda", dtype=torch.bfloat16).repeat_interleave(NH // NKV, 1)
    v = torch.randn_like(k)
    res = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: B023
                fn()
                res[name] = bench(fn)
        except Exception as e:  # noqa: BLE001 - a missing backend is a note, not a failure
            res[name] = float("nan")
            print(f"sdpa {name} failed: {e}")
    return res


def bench_prefill(notes, out_dir):
    sweep_cfgs = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                  (128, 64, 8, 4), (128, 128, 8, 2)]
    fn, _ = prefill_case([8192])
    best, best_t = None, float("inf")
    for bm, bn, w, s in sweep_cfgs:
        try:
            t = bench(lambda: fn(block_m=bm, block_n=bn, num_warps=w, num_stages=s))  # noqa: B023
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
            print(f"prefill cfg {(bm, bn, w, s)} failed: {type(e).__name__}")
            continue
        tf = 2 * NH * D * 8192 ** 2 / t / 1e9
        print(f"prefill sweep L=8192 cfg={(bm, bn, w, s)}: {t:.3f} ms {tf:.1f} TFLOP/s")
        notes.append(f"sweep L=8192 (block_m, block_n, warps, stages)={(bm, bn, w, s)}: {tf:.0f} TFLOP/s")
        if t < best_t:
            best, best_t = (bm, bn, w, s), t
    rows = []
    shapes = [[1024], [2048], [4096], [8192], [16384], [2048] * 8]
    for seq_lens in shapes:
        fn, _ = prefill_case(seq_lens)
        flops = 2 * NH * D * sum(s * s for s in seq_lens)
        t_def = bench(fn)
        bm, bn, w, s = best
        t_best = bench(lambda: fn(block_m=bm, block_n=bn, num_warps=w, num_stages=s))  # noqa: B023
        base = sdpa_times(seq_lens)
        tf = lambda ms, f=flops: f / ms / 1e9  # noqa: E731
        rows.append({"seqs": f"{len(seq_lens)}x{seq_lens[0]}", "tokens": sum(seq_lens),
                     "ours_ms": t_def, "ours_tflops": tf(t_def), "best_cfg_tflops": tf(t_best),
                     "flash_tflops": tf(base["flash"]), "cudnn_tflops": tf(base["cudnn"]),
                     "vs_flash": base["flash"] / t_def, "vs_cudnn": base["cudnn"] / t_def})
        torch.cuda.empty_cache()
    notes.append(f"best swept config {best}; ours_* columns use the launcher's default config")
    cols = ["seqs", "tokens", "ours_ms", "ours_tflops", "best_cfg_tflops", "flash_tflops", "cudnn_tflops",
            "vs_flash", "vs_cudnn"]
    write_result("attention_prefill", "Paged causal prefill, d128, 32 q / 8 kv heads, bf16 (TFLOP/s)", cols,
                 rows, notes, out_dir=out_dir)
    return cols, rows


# ------------------------------------------------------------------------------------------------
VARIANTS = {"bfloat16": ("bfloat16", {}), "bfloat16-hf": ("bfloat16", {"heads_first": True}),
            "int8": ("int8", {}), "int4": ("int4", {}),
            "int8-seqfirst": ("int8", {"heads_first": False}),
            "int4-seqfirst": ("int4", {"heads_first": False}),
            "int8-exact": ("int8", {"biased": False, "heads_first": False}),
            "int4-exact": ("int4", {"biased": False, "heads_first": False}),
            "int8+qk8+pv8": ("int8", {"int8_qk": True, "int8_pv": True})}


def decode_case(batch, ctx, variant):
    dtype, flags = VARIANTS[variant]
    cache, table = paged_batch([ctx] * batch, dtype)
    q = torch.randn(batch, NH, D, device="cuda", dtype=torch.bfloat16)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    nbytes = batch * ctx * NKV * 2 * kv_bytes_per_token_head(dtype) + 2 * q.numel() * 2
    return (lambda **kw: paged_attention_decode(q, cache, sl, table, D ** -0.5, None, ctx, **flags, **kw)), \
        nbytes


def bench_decode(notes, out_dir):
    quant = [(128, 4, 3), (128, 4, 1), (128, 4, 1, 128), (128, 4, 2, 128), (64, 4, 3, 128)]
    sweeps = {"bfloat16": [(64, 4, 3), (128, 4, 3)], "bfloat16-hf": [(64, 4, 3), (128, 4, 3)],
              "int8": quant, "int4": quant, "int8-seqfirst": [(128, 4, 3)], "int4-seqfirst": [(128, 4, 3)],
              "int8-exact": [(128, 4, 3)], "int4-exact": [(128, 4, 3)], "int8+qk8+pv8": [(128, 4, 3)]}
    best = {}
    for dtype, cfgs in sweeps.items():
        fn, nbytes = decode_case(32, 8192, dtype)
        best_t = float("inf")
        for cfg in cfgs:
            bn, w, s, nreg = (*cfg, None)[:4]
            try:
                t = bench(lambda: fn(block_n=bn, num_warps=w, num_stages=s, max_registers=nreg))  # noqa: B023
            except Exception as e:  # noqa: BLE001
                print(f"decode cfg {dtype} {cfg} failed: {type(e).__name__}")
                continue
            print(f"decode sweep b32 ctx8k {dtype} cfg={cfg}: {t * 1e3:.1f} us "
                  f"{nbytes / t / 1e9:.2f} TB/s")
            notes.append(f"sweep b32 ctx8k {dtype} (block_n, warps, stages[, maxnreg])={cfg}: "
                         f"{nbytes / t / 1e9:.2f} TB/s")
            if t < best_t:
                best[dtype], best_t = (bn, w, s, nreg), t
        # split count: the launcher picks it from whole waves of resident programs (choose_splits)
        if dtype in ("bfloat16", "int8", "int4"):
            for batch in (32, 64):
                fn, nbytes = decode_case(batch, 8192, dtype)
                for splits in (1, 2, 3, 4, 6):
                    t = bench(lambda: fn(num_splits=splits))  # noqa: B023
                    notes.append(f"sweep b{batch} ctx8k {dtype} splits={splits}: {nbytes / t / 1e9:.2f} TB/s")
                    print(notes[-1])
        fn = None
        torch.cuda.empty_cache()
    rows = []
    bf16_t = {}
    for batch in (1, 32, 64):
        for ctx in (4096, 8192, 16384, 32768):
            for dtype in VARIANTS:
                fn, nbytes = decode_case(batch, ctx, dtype)
                t = bench(fn)
                bn, w, s, nreg = best[dtype]
                t_best = bench(lambda: fn(block_n=bn, num_warps=w, num_stages=s, max_registers=nreg))  # noqa: B023
                if dtype == "bfloat16":
                    bf16_t[(batch, ctx)] = t
                rows.append({"batch": batch, "context": ctx, "kv_dtype": dtype, "time_us": t * 1e3,
                             "tb_per_s": nbytes / t / 1e9, "best_cfg_tb_per_s": nbytes / t_best / 1e9,
                             "speedup_vs_bf16": bf16_t[(batch, ctx)] / t, "mbytes": nbytes / 1e6})
                fn = None
                torch.cuda.empty_cache()
    notes.append(f"best swept configs (block_n, warps, stages, maxnreg): {best}; time_us/tb_per_s use the "
                 "defaults")
    notes.append("bytes = K+V codes and scales/zeros of every context token + q + out; L2 flushed per call")
    cols = ["batch", "context", "kv_dtype", "time_us", "tb_per_s", "best_cfg_tb_per_s", "speedup_vs_bf16",
            "mbytes"]
    notes.append("kv_dtype int8/int4: default path (biased fp16 codes by packed PTX, bias/scales folded into "
                 "scores and probabilities, grid heads-first); -seqfirst: same, grid (seqs, kv heads, "
                 "splits); -exact: previous per-element path, seq-first grid; bfloat16-hf: bf16 with the "
                 "heads-first grid; int8+qk8+pv8: "
                 "query and p * v_scale quantized to int8 for int8 MMAs (approximation, opt-in)")
    write_result("attention_decode", "Split-K paged decode, 32 q / 8 kv heads, d128 (effective TB/s)", cols,
                 rows, notes, out_dir=out_dir)
    return cols, rows


# ------------------------------------------------------------------------------------------------
# Quantized decode variant sweep (--variants): name -> (cache dtype, paged_attention_decode kwargs).
# Session 3: V codes enter the PV MMA unbiased (exact_v, default); at batch >= 16 the launcher now
# picks prefetch 2 for int8 (no register cap) and int4 (cap 168). "-s2def" = session 2's default
# config at batch >= 16 (int8: no prefetch; int4: pf2 cap 168) with the fixed V path;
# "-tilebias" = the cheaper per-tile bias removal (exact_v=False).
DECODE_VARIANTS = {
    "bf16": ("bfloat16", {}),
    "int8": ("int8", {}),                                                # launcher default
    "int8-pf0": ("int8", {"prefetch": 0}),                               # session 2's int8 default
    "int8-tilebias": ("int8", {"exact_v": False}),
    "int8-pf2-cap168": ("int8", {"prefetch": 2, "max_registers": 168}),  # spills (30 LDL in the loop)
    "int8-pf0-s1r128": ("int8", {"prefetch": 0, "num_stages": 1, "max_registers": 128}),
    "int8+qk8+pv8": ("int8", {"int8_qk": True, "int8_pv": True}),       # opt-in approximation
    "int4": ("int4", {}),
    "int4-pf0": ("int4", {"prefetch": 0}),
    "int4-tilebias": ("int4", {"exact_v": False}),
    "int4-pf2-nocap": ("int4", {"prefetch": 2, "max_registers": 0}),
    # the batch >= 16 defaults before session 10 (4 warps x 128 tokens)
    "int8-s9def": ("int8", {"prefetch": 2, "max_registers": 0, "block_n": 128, "num_warps": 4}),
    "int4-s9def": ("int4", {"prefetch": 2, "max_registers": 168, "block_n": 128, "num_warps": 4}),
    # session 10: smaller programs (1-2 warps) -> more of them per SM and cheaper barriers
    "int8-w1b32": ("int8", {"block_n": 32, "num_warps": 1, "num_stages": 2, "prefetch": 0}),
    "int8-w1b32-pf2": ("int8", {"block_n": 32, "num_warps": 1, "prefetch": 2, "max_registers": 0}),
    "int8-w2b64": ("int8", {"block_n": 64, "num_warps": 2, "num_stages": 2, "prefetch": 0}),
    "int8-w2b64-pf2": ("int8", {"block_n": 64, "num_warps": 2, "prefetch": 2, "max_registers": 0}),
    "int4-w1b32": ("int4", {"block_n": 32, "num_warps": 1, "num_stages": 2, "prefetch": 0}),
    "int4-w1b32-pf2": ("int4", {"block_n": 32, "num_warps": 1, "prefetch": 2, "max_registers": 0}),
    "int4-w2b64": ("int4", {"block_n": 64, "num_warps": 2, "num_stages": 2, "prefetch": 0}),
    "int4-w2b64-pf2": ("int4", {"block_n": 64, "num_warps": 2, "prefetch": 2, "max_registers": 0}),
    "int8-w1b16-pf2": ("int8", {"block_n": 16, "num_warps": 1, "prefetch": 2, "max_registers": 0}),
    "int8-w2b32-pf2": ("int8", {"block_n": 32, "num_warps": 2, "prefetch": 2, "max_registers": 0}),
    "int8-w4b64-pf2": ("int8", {"block_n": 64, "num_warps": 4, "prefetch": 2, "max_registers": 0}),
    "int4-w1b16-pf2": ("int4", {"block_n": 16, "num_warps": 1, "prefetch": 2, "max_registers": 0}),
    "int4-w2b32-pf2": ("int4", {"block_n": 32, "num_warps": 2, "prefetch": 2, "max_registers": 0}),
    "int4-w4b64-pf2": ("int4", {"block_n": 64, "num_warps": 4, "prefetch": 2, "max_registers": 0}),
    # session 13: the launcher default on Hopper is attention_decode_gl's one-warp Gluon kernel;
    # "-triton" = this module's Triton kernel with its own defaults (the previous default)
    "int8-triton": ("int8", {"gl": False}),
    "int4-triton": ("int4", {"gl": False}),
}
VARIANT_CONTEXTS = (4096, 16384, 32768)


def long_context_errors(notes: list[str], variants: dict) -> dict[str, float]:
    """Drift check at the benchmark's longest context: one 32k sequence, one split (all tokens in
    one accumulator) and the launcher's split count, every variant vs ref_ (bf16 query)."""
    torch.manual_seed(2)
    ctx = max(VARIANT_CONTEXTS)
    sl = torch.full((1,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(1, NH, D, device="cuda", dtype=torch.bfloat16)
    errs: dict[str, float] = {}
    for dtype in ("bfloat16", "int8", "int4"):
        cache, table = paged_batch([ctx], dtype)
        ref = ref_paged_attention_decode(q, cache, sl, table, D ** -0.5, None, ctx)
        for name, (dt, kw) in variants.items():
            if dt != dtype:
                continue
            worst = 0.0
            for splits in (1, None):
                out = paged_attention_decode(q, cache, sl, table, D ** -0.5, None, ctx, num_splits=splits,
                                             **kw)
                worst = max(worst, rel(out, ref))
            errs[name] = worst
            notes.append(f"variant {name}: rel err vs ref_ at 1 x {ctx} (splits 1 / auto) {worst:.2e}")
            print(notes[-1])
        cache = table = None
        torch.cuda.empty_cache()
    return errs


def check_variants(notes: list[str], variants: dict) -> dict[str, float]:
    """Every variant vs ref_ on the GPU (bf16 query): odd lengths, windows, split counts, GQA 32/8."""
    torch.manual_seed(1)
    seq = [1, 17, 129, 300, 1030, 4097]
    sl = torch.tensor(seq, dtype=torch.int32, device="cuda")
    q = torch.randn(len(seq), NH, D, device="cuda", dtype=torch.bfloat16)
    errs: dict[str, float] = {}
    for dtype in ("bfloat16", "int8", "int4"):
        cache, table = paged_batch(seq, dtype)
        refs = {win: ref_paged_attention_decode(q, cache, sl, table, D ** -0.5, win, max(seq))
                for win in (None, 100)}
        for name, (dt, kw) in variants.items():
            if dt != dtype:
                continue
            worst = 0.0
            try:
                for win in (None, 100):
                    for splits in (None, 1, 7):
                        out = paged_attention_decode(q, cache, sl, table, D ** -0.5, win, max(seq),
                                                     num_splits=splits, **kw)
                        worst = max(worst, rel(out, refs[win]))
            except Exception as e:  # noqa: BLE001 - a broken variant is reported, the sweep goes on
                notes.append(f"variant {name}: FAILED to run: {type(e).__name__}: {e}")
                print(notes[-1])
                worst = float("inf")
            errs[name] = worst
            notes.append(f"variant {name}: max rel err vs ref_ (bf16 q/out, window none/100, "
                         f"splits auto/1/7) {worst:.2e}")
            print(notes[-1])
    return errs


def bench_decode_variants(notes, out_dir, only=None, batches=(1, 32, 64), contexts=VARIANT_CONTEXTS,
                          result_name="attention_decode_variants"):
    """``only``: variant names to run (each dtype's launcher default is always kept)."""
    keep = set(only or DECODE_VARIANTS) | {"bf16", "int8", "int4"}
    variants = {k: v for k, v in DECODE_VARIANTS.items() if k in keep}
    errs = check_variants(notes, variants)
    long_errs = long_context_errors(notes, variants)
    from anybit.kernels import attention_decode as ad

    notes.append(f"launcher defaults in this run: DEFAULT_PREFETCH={ad.DEFAULT_PREFETCH} (batch < "
                 f"{ad.PREFETCH_MIN_SEQS}), DEFAULT_PREFETCH_BY_MODE (prefetch, maxnreg; 0 = no cap) "
                 f"{ad.DEFAULT_PREFETCH_BY_MODE} at batch >= {ad.PREFETCH_MIN_SEQS} "
                 "(session 10: + block_n, num_warps)")
    rows = []
    for batch in batches:
        for ctx in contexts:
            sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, NH, D, device="cuda", dtype=torch.bfloat16)
            t_bf16 = None
            for dtype in ("bfloat16", "int8", "int4"):
                cache, table = paged_batch([ctx] * batch, dtype)
                nbytes = batch * ctx * NKV * 2 * kv_bytes_per_token_head(dtype) + 2 * q.numel() * 2
                base = None
                for name, (dt, kw) in variants.items():
                    if dt != dtype or errs.get(name, 0.0) > 2e-2:
                        continue
                    fn = functools.partial(paged_attention_decode, q, cache, sl, table, D ** -0.5, None, ctx,
                                           **kw)
                    out = fn()
                    base = out if base is None else base  # the dtype's launcher default comes first
                    t = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                    if dtype == "bfloat16":
                        t_bf16 = t
                    rows.append({"batch": batch, "context": ctx, "variant": name, "kv_dtype": dtype,
                                 "time_us": t * 1e3, "tb_per_s": nbytes / t / 1e9,
                                 "floor_us": nbytes / 3.0e12 * 1e6,
                                 "speedup_vs_bf16": t_bf16 / t, "vs_default": None,
                                 "diff_vs_default": rel(out, base), "check_err": errs.get(name),
                                 "err_32k": long_errs.get(name)})
                    print(f"b{batch} ctx{ctx} {name:16s} {t * 1e3:8.1f} us {nbytes / t / 1e9:5.2f} TB/s "
                          f"x{t_bf16 / t:.2f} vs bf16")
                cache = table = base = None
                torch.cuda.empty_cache()
            for r in rows:
                if r["batch"] == batch and r["context"] == ctx:
                    d = next(x for x in rows if x["batch"] == batch and x["context"] == ctx
                             and x["variant"] == r["kv_dtype"].replace("bfloat16", "bf16"))
                    r["vs_default"] = d["time_us"] / r["time_us"]
    notes.append("bytes = K+V codes and scales/zeros of every context token + q + out; L2 flushed per call; "
                 "do_bench warmup 10 ms, rep 40 ms, median")
    notes.append("vs_default: speedup over the same dtype's launcher default in the same run; "
                 "diff_vs_default: rel diff of the outputs (bf16 q/out); check_err: worst rel err vs ref_ "
                 "in check_variants")
    notes.append("variants: -pf0/-pf2 register prefetch depth (2: whole next tile one iteration ahead); "
                 "-cap168 maxnreg 168, -nocap none; -s1r128: no prefetch, num_stages 1, maxnreg 128; "
                 "-tilebias: exact_v=False (per-tile bias removal); int8+qk8+pv8: int8 MMAs (approximation, "
                 "opt-in); floor_us: bytes / 3.0 TB/s; err_32k: rel err vs ref_ at 1 x 32k, splits 1 / auto")
    cols = ["batch", "context", "variant", "time_us", "floor_us", "tb_per_s", "speedup_vs_bf16", "vs_default",
            "diff_vs_default", "check_err", "err_32k"]
    write_result(result_name,
                 "Quantized split-K paged decode variants, 32 q / 8 kv heads, d128", cols, rows, notes,
                 out_dir=out_dir)
    return cols, rows


def graph_time_us(fn, reps: int = 20) -> float:
    """GPU time of one call: a CUDA graph of ``reps`` calls (no host launch overhead, as in the
    engine's decode graphs), median of 15 replays / reps."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def bench_decode_merge(out_dir):
    """Split merge inside the decode kernel (default) vs the reduction kernel (merge_max=0), with
    the split count sized as in the engine's CUDA graphs (max_seq_len = max(context, 8192), the
    Llama-3 max_model_len), timed inside a CUDA graph; each output checked against ref_."""
    rows = []
    for batch in (1, 32):
        for ctx in (200, 1000, 4096, 32768):
            sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, NH, D, device="cuda", dtype=torch.bfloat16)
            for dtype in ("bfloat16", "int8", "int4"):
                cache, table = paged_batch([ctx] * batch, dtype)
                ref = ref_paged_attention_decode(q[:1], cache, sl[:1], table[:1], D ** -0.5, None, ctx)
                t = {}
                for name, kw in (("merge", {}), ("reduce", {"merge_max": 0})):
                    fn = functools.partial(paged_attention_decode, q, cache, sl, table, D ** -0.5, None,
                                           max(ctx, 8192), **kw)
                    err = rel(fn()[:1], ref)
                    t[name] = graph_time_us(fn)
                    rows.append({"batch": batch, "context": ctx, "kv_dtype": dtype, "method": name,
                                 "time_us": t[name], "rel_err": err})
                rows[-2]["speedup_vs_reduce"] = t["reduce"] / t["merge"]
                print(f"b{batch} ctx{ctx} {dtype:9s} merge {t['merge']:7.1f} us reduce {t['reduce']:7.1f} us "
                      f"x{t['reduce'] / t['merge']:.2f} err {rows[-2]['rel_err']:.1e}", flush=True)
                cache = table = None
                torch.cuda.empty_cache()
    cols = ["batch", "context", "kv_dtype", "method", "time_us", "speedup_vs_reduce", "rel_err"]
    write_result("attention_decode_merge", "Decode split merge in the kernel vs a reduction kernel "
                 "(graph-sized splits), 32 q / 8 kv heads, d128", cols, rows,
                 ["time: CUDA graph of 20 calls, median of 15 replays / 20; max_seq_len = max(context, "
                  "8192) sizes the splits as the engine's decode graphs do (max_model_len); merge = the "
                  "decode kernel's last split merges the partials (DECODE_MERGE_MAX at a time); reduce = "
                  "merge_max=0 (a second kernel); rel_err: first sequence vs ref_ (bf16 query and output)"],
                 out_dir=out_dir)
    return cols, rows


def bench_decode_gl_graph(out_dir, name="attention_decode_gl_graph", batches=(1, 8, 32, 64),
                          contexts=(200, 1000, 4096, 16384, 32768), layouts=("head/packed",)):
    """Quantized decode in CUDA graphs, as the engine runs it (no host launch cost; splits sized from
    max_seq_len = max(context, 8192) as in the engine's graphs): the launcher default ("int8",
    "int4"), the Gluon one-warp kernel ("-gl", attention_decode_gl) and the Triton kernel
    ("-triton"), against the bf16 cache in the same run; every output checked against ref_.
    layouts: "CODE/SCALE" cache layouts (make_cache); the first is the reference for bf16 and
    unsuffixed, others suffix the variant ("@token/token")."""
    rows = []
    runs = (("bf16", "bfloat16", None), ("int8", "int8", None), ("int8-gl", "int8", True),
            ("int8-triton", "int8", False), ("int4", "int4", None), ("int4-gl", "int4", True),
            ("int4-triton", "int4", False))
    caches = [(dt, lay) for dt in ("bfloat16", "int8", "int4") for lay in layouts]
    for batch in batches:
        for ctx in contexts:
            sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, NH, D, device="cuda", dtype=torch.bfloat16)
            t_bf16 = None
            for dtype, layout in caches:
                cache, table = paged_batch([ctx] * batch, dtype, layout=layout)
                ref = ref_paged_attention_decode(q[:1], cache, sl[:1], table[:1], D ** -0.5, None, ctx)
                nbytes = batch * ctx * NKV * 2 * kv_bytes_per_token_head(dtype) + 2 * q.numel() * 2
                for base, dt, use_gl in runs:
                    if dt != dtype:
                        continue
                    variant = base + ("" if layout == layouts[0] else "@" + layout)
                    fn = functools.partial(paged_attention_decode, q, cache, sl, table, D ** -0.5, None,
                                           max(ctx, 8192), gl=use_gl)
                    err = rel(fn()[:1], ref)
                    t = graph_time_us(fn)
                    t_bf16 = t if variant == "bf16" else t_bf16
                    rows.append({"batch": batch, "context": ctx, "variant": variant, "time_us": t,
                                 "tb_per_s": nbytes / t / 1e6, "speedup_vs_bf16": t_bf16 / t, "rel_err": err})
                    print(f"b{batch} ctx{ctx} {variant:12s} {t:8.1f} us {nbytes / t / 1e6:5.2f} TB/s "
                          f"x{t_bf16 / t:.2f} vs bf16 err {err:.1e}", flush=True)
                cache = table = None
                torch.cuda.empty_cache()
    cols = ["batch", "context", "variant", "time_us", "tb_per_s", "speedup_vs_bf16", "rel_err"]
    write_result(name, "Quantized decode in CUDA graphs: launcher default, Gluon one-warp kernel, Triton "
                 "kernel vs bf16 cache, 32 q / 8 kv heads, d128", cols, rows,
                 ["time: CUDA graph of 20 calls, median of 15 replays / 20; max_seq_len = max(context, 8192) "
                  "sizes the splits as the engine's decode graphs do; tb_per_s: K+V codes and scales of the "
                  "context + q + out per time; rel_err: first sequence vs ref_ (bf16 query and output); "
                  "int8 / int4 = the launcher default (paged_attention_decode, gl=None), -gl = "
                  "attention_decode_gl forced, -triton = gl=False; unsuffixed: the cache in layout "
                  f"{layouts[0]} (codes by kv_code_buffer / scales by kv_scale_buffers), '@CODE/SCALE' = "
                  "another layout (head/packed is the engine's since session 14, token/token the one "
                  "before); speedup_vs_bf16 against the unsuffixed bf16 row"],
                 out_dir=out_dir)
    return cols, rows


def bench_prefill_layouts(out_dir, shapes=((1024,), (2048,), (8192,), (2048,) * 8), rounds=3):
    """Prefill over a bf16 cache in the engine's head-major layout vs token-major codes, timed in
    alternation (A B A B ...) so drift between the two shows; median per layout and shape."""
    rows = []
    for seq_lens in shapes:
        fns = {lay: prefill_case(list(seq_lens), layout=lay)[0] for lay in ("head/packed", "token/token")}
        times = {lay: [] for lay in fns}
        for _ in range(rounds):
            for lay, fn in fns.items():
                times[lay].append(bench(fn))
        med = {lay: sorted(ts)[len(ts) // 2] for lay, ts in times.items()}
        flops = 2 * NH * D * sum(s * s for s in seq_lens)
        rows.append({"seqs": f"{len(seq_lens)}x{seq_lens[0]}", "head_ms": med["head/packed"],
                     "token_ms": med["token/token"], "head_tflops": flops / med["head/packed"] / 1e9,
                     "head_vs_token": med["token/token"] / med["head/packed"],
                     "head_all_ms": times["head/packed"], "token_all_ms": times["token/token"]})
        print(rows[-1], flush=True)
    cols = ["seqs", "head_ms", "token_ms", "head_tflops", "head_vs_token"]
    write_result("attention_prefill_layouts", "Paged causal prefill over a bf16 cache: head-major codes "
                 "(engine) vs token-major, d128, 32 q / 8 kv heads", cols, rows,
                 [f"do_bench medians (L2 flushed), {rounds} alternating rounds per layout; "
                  "head_vs_token > 1: head-major faster"], out_dir=out_dir)
    return cols, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--profile", default=None, help="only run this decode variant at b32/8k (for ncu)")
    ap.add_argument("--variants", action="store_true",
                    help="only the quantized-decode variant sweep (attention_decode_variants.json)")
    ap.add_argument("--only", default=None, help="--variants: comma list of variant names (defaults kept)")
    ap.add_argument("--batches", default="1,32,64", help="--variants: batch sizes")
    ap.add_argument("--contexts", default=None, help="--variants: context lengths (default 4096,16384,32768)")
    ap.add_argument("--name", default="attention_decode_variants", help="--variants: result name")
    ap.add_argument("--merge", action="store_true",
                    help="only the split-merge comparison (attention_decode_merge.json)")
    ap.add_argument("--gl-graph", action="store_true",
                    help="only the Gluon vs Triton quantized decode comparison in CUDA graphs")
    ap.add_argument("--layouts", default="head/packed",
                    help="--gl-graph: comma list of CODE/SCALE cache layouts (kv_code_buffer / "
                         "kv_scale_buffers), the first the reference")
    ap.add_argument("--prefill-layouts", action="store_true",
                    help="only the prefill A/B of the cache code layouts (attention_prefill_layouts.json)")
    a = ap.parse_args()
    if a.prefill_layouts:
        print_table(*bench_prefill_layouts(a.out))
        return
    if a.gl_graph:
        ints = lambda v: tuple(int(x) for x in v.split(","))  # noqa: E731
        print_table(*bench_decode_gl_graph(a.out, a.name if a.name != "attention_decode_variants"
                                           else "attention_decode_gl_graph", ints(a.batches),
                                           ints(a.contexts) if a.contexts else (200, 1000, 4096, 16384,
                                                                                32768),
                                           tuple(a.layouts.split(","))))
        return
    if a.merge:
        print_table(*bench_decode_merge(a.out))
        return
    if a.variants:
        ints = lambda v: tuple(int(x) for x in v.split(","))  # noqa: E731
        cols, rows = bench_decode_variants([], a.out, a.only.split(",") if a.only else None, ints(a.batches),
                                           ints(a.contexts) if a.contexts else VARIANT_CONTEXTS, a.name)
        if rows:
            print_table(cols, rows)
        return
    if a.profile:
        fn, _ = decode_case(32, 8192, a.profile)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return
    notes: list[str] = []
    src = torch.randn(512 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e9
    notes.append(f"device-to-device copy (read + write) measured in this run: {copy_tbs:.2f} TB/s")
    print(notes[-1])
    src = dst = None
    n0 = len(notes)
    check_correctness(notes)
    print("\n".join(notes[n0:]))
    tables = []
    if not a.skip_prefill:
        tables.append(bench_prefill(list(notes), a.out))
    if not a.skip_decode:
        tables.append(bench_decode(list(notes), a.out))
    for cols, rows in tables:
        print()
        print_table(cols, rows)


if __name__ == "__main__":
    main()
