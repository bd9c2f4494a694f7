"""Small memory-bound kernels (H100): RMSNorm, fused add + RMSNorm, SiLU-and-mul, rotary, KV write.

Run on the GPU machine: ``python benchmarks/bench_norm_act.py --out DIR``. Llama-3-8B shapes
(hidden 4096, intermediate 14336, 32 q / 8 kv heads, head_dim 128), bf16. Each Triton kernel is
checked against its ``ref_`` first, then timed with ``do_bench`` (median, L2 flushed) next to the
same math in eager torch. TB/s counts each input read once and each output written once.
Writes ``norm_act.json``. The ``rotary_and_cache`` row's torch column is the two Triton launches
(rotary_embedding + reshape_and_cache) that the fused kernel replaces, not eager torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anybit.kernels.activation import ref_silu_and_mul, silu_and_mul  # noqa: E402
from anybit.kernels.kv_cache_ops import ref_reshape_and_cache, reshape_and_cache  # noqa: E402
from anybit.kernels.rms_norm import fused_add_rms_norm, ref_fused_add_rms_norm, ref_rms_norm, rms_norm  # noqa: E402
from anybit.kernels.rope import (  # noqa: E402
    ref_rotary_and_cache,
    ref_rotary_embedding,
    rotary_and_cache,
    rotary_embedding,
)
from anybit.layers.attention_meta import LayerKVCache  # noqa: E402
from benchmarks.common import print_table, write_result  # noqa: E402

HIDDEN, INTER, NH, NKV, D = 4096, 14336, 32, 8, 128


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cases(tokens: int):
    """(name, triton fn, torch fn, bytes moved, check) for one token count."""
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, r = torch.randn(tokens, HIDDEN, **bf), torch.randn(tokens, HIDDEN, **bf)
    w = torch.rand(HIDDEN, **bf) + 0.5
    gu = torch.randn(tokens, 2 * INTER, **bf)
    qkv = torch.randn(tokens, (NH + 2 * NKV) * D, **bf)
    q = qkv[:, :NH * D].view(tokens, NH, D)
    k = qkv[:, NH * D:(NH + NKV) * D].view(tokens, NKV, D)
    v = qkv[:, (NH + NKV) * D:].view(tokens, NKV, D)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    inv = 1.0 / 500000 ** (torch.arange(0, D, 2, device="cuda").float() / D)
    f = torch.outer(torch.arange(8192, device="cuda").float(), inv)
    cs = torch.cat([f.cos(), f.sin()], -1)
    nb = triton.cdiv(tokens, 16) + 1
    cache = LayerKVCache(torch.randn(nb, 16, NKV, D, **bf), torch.randn(nb, 16, NKV, D, **bf), "bfloat16")
    slots = torch.randperm(nb * 16, device="cuda")[:tokens]
    e = x.element_size()
    return [
        ("rms_norm", lambda: rms_norm(x, w, 1e-5), lambda: ref_rms_norm(x, w, 1e-5), 2 * x.numel() * e,
         lambda: rel(rms_norm(x, w, 1e-5), ref_rms_norm(x, w, 1e-5))),
        ("fused_add_rms_norm", lambda: fused_add_rms_norm(x, r, w, 1e-5),
         lambda: ref_fused_add_rms_norm(x, r, w, 1e-5), 4 * x.numel() * e,
         lambda: rel(fused_add_rms_norm(x, r, w, 1e-5)[0], ref_fused_add_rms_norm(x, r, w, 1e-5)[0])),
        ("silu_and_mul", lambda: silu_and_mul(gu), lambda: ref_silu_and_mul(gu), 1.5 * gu.numel() * e,
         lambda: rel(silu_and_mul(gu), ref_silu_and_mul(gu))),
        # the Triton rope is in place: timing it repeatedly rotates the same buffer, which is fine
        ("rotary_embedding", lambda: rotary_embedding(pos, q, k, cs),
         lambda: ref_rotary_embedding(pos, q, k, cs), 2 * (q.numel() + k.numel()) * e,
         lambda: rel(rotary_embedding(pos, q.clone(), k.clone(), cs)[0],
                     ref_rotary_embedding(pos, q, k, cs)[0])),
        ("reshape_and_cache", lambda: reshape_and_cache(k, v, cache, slots),
         lambda: ref_reshape_and_cache(k, v, cache, slots), 4 * k.numel() * e, lambda: 0.0),
        # fused: q/k rotated in place + K/V written (one launch); vs the two Triton launches it replaces
        ("rotary_and_cache", lambda: rotary_and_cache(pos, q, k, v, cs, True, cache, slots),
         lambda: (rotary_embedding(pos, q, k, cs), reshape_and_cache(k, v, cache, slots)),
         (2 * q.numel() + 4 * k.numel() + 2 * v.numel()) * e,
         lambda: rel(rotary_and_cache(pos, q.clone(), k.clone(), v, cs, True, cache, slots)[0],
                     ref_rotary_and_cache(pos, q, k, v, cs, True, cache, slots)[0])),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    rows = []
    for tokens in (1, 64, 4096):
        for name, tri, ref, nbytes, check in cases(tokens):
            err = check()
            assert err < 2e-2, f"{name} tokens={tokens}: rel err {err:.2e}"
            t_tri, t_ref = bench(tri), bench(ref)
            rows.append({"op": name, "tokens": tokens, "triton_us": t_tri * 1e3, "torch_us": t_ref * 1e3,
                         "triton_tb_per_s": nbytes / t_tri / 1e9, "speedup_vs_torch": t_ref / t_tri,
                         "rel_err": err})
    cols = ["op", "tokens", "triton_us", "torch_us", "triton_tb_per_s", "speedup_vs_torch", "rel_err"]
    write_result("norm_act", "RMSNorm / SiLU-and-mul / rotary / KV write, Llama-3-8B shapes, bf16", cols,
                 rows, ["torch = the ref_ ops in eager torch (same math)",
                        "bytes: inputs read once, outputs once"], out_dir=a.out)
    print_table(cols, rows)


if __name__ == "__main__":
    main()
