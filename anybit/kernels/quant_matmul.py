"""y = x @ dequant(W)^T for any-bit packed weights (anybit/quant/format.py), in Triton.

Two kernels, chosen by M (rows of x) in ``quant_matmul``:

- ``_quant_gemv_kernel`` (small M, memory-bound): one program per (row m, BLOCK_N columns,
  K split); CUDA cores only. A tile of codes ``[BLOCK_K, BLOCK_N]`` lies inside one scale group
  (BLOCK_K divides G), so scale and zero factor out of the K sum:
  ``sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k)``: per code one shift, one mask
  (per slice), an int->float conversion through the 2^23 magic number, and one FMA.
  Split-K fills the GPU when N / BLOCK_N is small; partial sums are added in float32.
- ``_quant_gemm_kernel`` (larger M): dequantizes a ``[BLOCK_K, BLOCK_N]`` tile to x's dtype in
  registers and runs ``tl.dot`` on tensor cores (Marlin / GPTQ-Triton style), with split-K for
  small M.

Codes of a slice of width w are read as whole int32 words: row ``k // (32//w)`` of the slice,
shifted by ``(k % (32//w)) * w`` (the repeated words of a tile come from L1).
"""

from __future__ import annotations

import torch

from anybit.quant.format import SLICES, PackedWeight, dequantize

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def ref_quant_matmul(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch oracle. x ``[M, K]`` float -> y ``[M, N]`` in x.dtype (float32 math)."""
    _check_inputs(x, packed, out)
    y = (x.float() @ dequantize(packed, torch.float32).to(x.device).t()).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def _check_inputs(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"x: expected [M, {packed.in_features}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor, got {x.dtype}")
    if out is not None and (tuple(out.shape) != (x.shape[0], packed.out_features) or out.dtype != x.dtype
                            or out.stride(1) != 1):
        raise ValueError(f"out: expected {x.dtype} [{x.shape[0]}, {packed.out_features}] with unit column "
                         f"stride, got {out.dtype} {tuple(out.shape)} stride {out.stride()}")


if triton is not None:

    @triton.jit
    def _load_codes(q_ptr, stride_qk, offs_k, offs_n, mask_n, K,
                    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
        """codes ``[BLOCK_K, BLOCK_N]`` int32 of up to three bit-plane slices (widths W0, W1, W2)."""
        P0: tl.constexpr = 32 // W0
        ptr = q_ptr + (offs_k[:, None] // P0) * stride_qk + offs_n[None, :]
        w = tl.load(ptr, mask=mask_n[None, :], other=0)
        q = (w >> ((offs_k[:, None] % P0) * W0)) & ((1 << W0) - 1)
        if W1 > 0:
            P1: tl.constexpr = 32 // W1
            row = (K * W0) // 32 + offs_k // P1
            w1 = tl.load(q_ptr + row[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
            q |= ((w1 >> ((offs_k[:, None] % P1) * W1)) & ((1 << W1) - 1)) << W0
        if W2 > 0:
            P2: tl.constexpr = 32 // W2
            row = (K * (W0 + W1)) // 32 + offs_k // P2
            w2 = tl.load(q_ptr + row[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
            q |= ((w2 >> ((offs_k[:, None] % P2) * W2)) & ((1 << W2) - 1)) << (W0 + W1)
        return q

    @triton.jit
    def _codes_to_float(q):
        """Exact int -> float32 for 0 <= q < 2^23: (2^23 + q) as bits, minus 2^23."""
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, cb_ptr, y_ptr, N, K, G,
                           stride_xm, stride_qk, stride_sg, stride_ym, stride_ys, k_per_split,
                           W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                           IS_CB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           ITERS: tl.constexpr):
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        k_start = pid_k * k_per_split
        for i in range(0, ITERS):  # ITERS * BLOCK_K = k_per_split, which divides K
            k0 = k_start + i * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)
            q = _load_codes(q_ptr, stride_qk, offs_k, offs_n, mask_n, K, W0, W1, W2)
            g = k0 // G
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if IS_CB:
                v = tl.load(cb_ptr + q)
                acc += s * tl.sum(x[:, None] * v, axis=0)
            else:
                z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                qf = _codes_to_float(q)
                acc += s * (tl.sum(x[:, None] * qf, axis=0) - z * tl.sum(x, axis=0))
        y_ptrs = y_ptr + pid_k * stride_ys + m * stride_ym + offs_n
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _quant_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, cb_ptr, y_ptr, M, N, K, G,
                           stride_xm, stride_qk, stride_sg, stride_ym, stride_ys, k_per_split,
                           W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, IS_CB: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, ITERS: tl.constexpr):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n  # grouped order: programs that share weight tiles run together
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * k_per_split
        for i in range(0, ITERS):  # ITERS * BLOCK_K = k_per_split, which divides K
            k0 = k_start + i * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None],
                        other=0.0)
            q = _load_codes(q_ptr, stride_qk, offs_k, offs_n, mask_n, K, W0, W1, W2)
            g = k0 // G
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if IS_CB:
                w = tl.load(cb_ptr + q) * s[None, :]
            else:
                z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                w = (_codes_to_float(q) - z[None, :]) * s[None, :]
            acc = tl.dot(x, w.to(x.dtype), acc)
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _pick_block_k(G: int, K: int, want: int) -> int:
    for bk in (want, 128, 64, 32):
        if bk <= want and G % bk == 0 and K % bk == 0:
            return bk
    raise ValueError(f"group_size {G} / in_features {K}: need a common divisor in 32, 64, 128")


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def quant_matmul(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None = None, *,
                 path: str = "auto", block_n: int | None = None, block_k: int | None = None,
                 block_m: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ nothing). x ``[M, K]`` fp16/bf16/fp32, packed ``PackedWeight``
    for ``W [N, K]`` -> y ``[M, N]`` in x.dtype (written into ``out`` when given, e.g. a column
    slice of a fused output). ``path``: "auto" (GEMV for M <= 2, tensor cores above), "gemv",
    "gemm"; the block/split keywords override the heuristics (benchmarks)."""
    if triton is None:
        raise RuntimeError("quant_matmul needs triton; use ref_quant_matmul")
    _check_inputs(x, packed, out)
    M, K = x.shape
    N, G = packed.out_features, packed.group_size
    if packed.qweight.device != x.device:
        raise ValueError(f"packed weight on {packed.qweight.device}, x on {x.device}")
    if packed.perm is not None:
        x = x[:, packed.perm]
    x = x.contiguous()
    widths = SLICES[packed.bits] + (0, 0)
    is_cb = packed.fmt != "uniform"
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    cb = packed.codebook if packed.codebook is not None else packed.scales
    if path == "auto":
        path = "gemv" if M <= 2 else "gemm"
    sms = _num_sms(x.device)
    if path == "gemv":
        BN = block_n or 64
        BK = _pick_block_k(G, K, block_k or 128)
        tiles_n = triton.cdiv(N, BN) * M
        warps, stages = num_warps or 4, num_stages or 3
    elif path == "gemm":
        BM = block_m or (16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128)
        BN = block_n or (64 if M <= 64 else 128)
        BK = _pick_block_k(G, K, block_k or (128 if M <= 64 else 64))
        tiles_n = triton.cdiv(N, BN) * triton.cdiv(M, BM)
        warps, stages = num_warps or (4 if M <= 64 else 8), num_stages or (4 if M <= 64 else 3)
    else:
        raise ValueError(f"path: got {path!r}, allowed: auto, gemv, gemm")
    k_tiles = K // BK
    if split_k is None:
        split_k = max(1, min(k_tiles, (4 * sms + tiles_n - 1) // tiles_n)) if tiles_n < 2 * sms else 1
    per = next(d for d in range(triton.cdiv(k_tiles, max(1, split_k)), k_tiles + 1) if k_tiles % d == 0)
    split_k = k_tiles // per
    k_per_split = per * BK
    if split_k == 1:
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        stride_ys = 0
    else:
        y = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        stride_ys = y.stride(0)
    stride_ym = y.stride(-2)
    args = (x, packed.qweight, packed.scales, zeros, cb, y)
    if path == "gemv":
        grid = (M, triton.cdiv(N, BN), split_k)
        _quant_gemv_kernel[grid](*args, N, K, G, x.stride(0), packed.qweight.stride(0),
                                 packed.scales.stride(0), stride_ym, stride_ys, k_per_split,
                                 widths[0], widths[1], widths[2], is_cb, BN, BK, per,
                                 num_warps=warps, num_stages=stages)
    else:
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), split_k)
        _quant_gemm_kernel[grid](*args, M, N, K, G, x.stride(0), packed.qweight.stride(0),
                                 packed.scales.stride(0), stride_ym, stride_ys, k_per_split,
                                 widths[0], widths[1], widths[2], is_cb, BM, BN, BK, 8, per,
                                 num_warps=warps, num_stages=stages)
    if split_k > 1:
        total = y.sum(0).to(x.dtype)
        if out is not None:
            out.copy_(total)
            return out
        return total
    return y
