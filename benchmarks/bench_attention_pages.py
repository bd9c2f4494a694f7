"""Decode over paged KV caches of 16-, 32- and 64-token pages (block_size) in CUDA graphs: the launcher's
default kernel for bf16, int8 and int4 caches, b8-64 x 4k-16k, each against bf16 at 16-token pages (the
engine's default) and at the same page size; outputs checked against ref_.

A quantized page of one kv head is small: 16 int4 tokens are 1 KB of K codes, 1 KB of V codes and 128 B
of scales, against 4 KB of bf16 K. Pages are placed at random, so this asks whether larger pages (longer
contiguous runs) raise the quantized kernels' streaming rate.

    python benchmarks/bench_attention_pages.py      # JSON attention_decode_pages.json to $OUT or results/
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from anybit.kernels.attention_decode import paged_attention_decode, ref_paged_attention_decode  # noqa: E402
from benchmarks import bench_attention as ba  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

CASES = [(32, 4096), (64, 4096), (8, 4096), (32, 16384), (64, 16384)]
PAGES = (16, 32, 64)


def main() -> int:
    rows = []
    default_bs = ba.BS
    for batch, ctx in CASES:
        sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, ba.NH, ba.D, device="cuda", dtype=torch.bfloat16)
        bf16_at = {}
        for bs in PAGES:
            ba.BS = bs
            for dtype in ("bfloat16", "int8", "int4"):
                cache, table = ba.paged_batch([ctx] * batch, dtype)
                ref = ref_paged_attention_decode(q[:1], cache, sl[:1], table[:1], ba.D ** -0.5, None, ctx)
                nbytes = batch * ctx * ba.NKV * 2 * ba.kv_bytes_per_token_head(dtype) + 2 * q.numel() * 2
                fn = functools.partial(paged_attention_decode, q, cache, sl, table, ba.D ** -0.5, None,
                                       max(ctx, 8192))
                err = ba.rel(fn()[:1], ref)
                t = ba.graph_time_us(fn)
                if dtype == "bfloat16":
                    bf16_at[bs] = t
                rows.append({"batch": batch, "context": ctx, "block_size": bs, "kv_dtype": dtype,
                             "time_us": t, "tb_per_s": nbytes / t / 1e6, "vs_bf16_16": bf16_at[16] / t,
                             "vs_bf16_same": bf16_at[bs] / t, "rel_err": err})
                print(f"b{batch} ctx{ctx} bs{bs} {dtype:9s} {t:8.1f} us {nbytes / t / 1e6:5.2f} TB/s "
                      f"x{bf16_at[16] / t:.2f} vs bf16@16 x{bf16_at[bs] / t:.2f} vs bf16@{bs} err {err:.1e}",
                      flush=True)
                cache = table = None
                torch.cuda.empty_cache()
        ba.BS = default_bs
    cols = ["batch", "context", "block_size", "kv_dtype", "time_us", "tb_per_s", "vs_bf16_16", "vs_bf16_same",
            "rel_err"]
    write_result("attention_decode_pages", "Decode in CUDA graphs by page size (block_size 16 / 32 / 64): "
                 "bf16, int8, int4 caches, launcher default, 32 q / 8 kv heads, d128", cols, rows,
                 ["time: CUDA graph of 20 calls, median of 15 replays / 20; max_seq_len = max(context, 8192) "
                  "as in the engine's graphs; pages in random order (paged_batch); vs_bf16_16: against the "
                  "bf16 cache at 16-token pages (the engine's default block_size) in the same case; "
                  "vs_bf16_same: against bf16 at the same page size; rel_err: first sequence vs ref_"],
                 out_dir=os.environ.get("OUT"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
