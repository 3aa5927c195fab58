"""W8A8 on CUDA: graphpress::quantized_linear with ``activation_bits=8`` on int8 tensor cores, in Triton.

The op's semantics (graphpress.kernels.quantized.w8a8_product): each row of x scaled to absmax 1, the whole
tensor then quantized to uint8 with one asymmetric scale and zero point (ONNX's DynamicQuantizeLinear), times
int8 weights with one scale per output channel (``int8_weight``):

    y[m, n] = (sum_k (c[m, k] - zero) * q[n, k]) * (scale * s[n]) * r[m]  (+ bias[n])

Four kernels:
    ``_row_stats_kernel``  x [M, K] (bf16/fp16/fp32) -> r[m] = max |x[m]|, and min / max of x[m] / r[m]
    ``_scale_kernel``      the tensor's scale and zero point from those (one program)
    ``_quantize_kernel``   c - 128 as int8 [M, K]
    ``_w8a8_kernel``       int8 x int8 -> int32 on the tensor cores; the epilogue adds (128 - zero) * sum_k q[n]
                           (so that c - 128 fits int8), then scales in fp32 and rounds once to x's dtype
                           (``_w8a8_tma_kernel``: the same with the operands loaded through tensor descriptors)

The weights, laid out once per tensor (``prepared``): q int8 [N, K] (K contiguous), s fp32 [N], sum_k q int32 [N].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphpress.kernels.layouts import as_rows, kept
from graphpress.kernels.quantized import int8_weight
from graphpress.kernels.tuning import Tuner, bucket

TINY = 1.1754943508222875e-38  # float32's smallest normal: the reference's floor for an all-zero row


@triton.jit
def _rint(v):
    """Round half to even, as torch.round, for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _row_stats_kernel(x_ptr, r_ptr, lo_ptr, hi_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """One row per program: r = max |x| (floored at float32's tiny), min and max of x / r (0 included)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), tl.float32)
    mn = tl.zeros((BLOCK_K,), tl.float32)
    mx = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
        mn = tl.minimum(mn, x)
        mx = tl.maximum(mx, x)
    r = tl.maximum(tl.max(amax, axis=0), 1.1754943508222875e-38)
    tl.store(r_ptr + row, r)
    tl.store(lo_ptr + row, tl.math.div_rn(tl.min(mn, axis=0), r))  # min(x / r) = min(x) / r: monotonic
    tl.store(hi_ptr + row, tl.math.div_rn(tl.max(mx, axis=0), r))


@triton.jit
def _scale_kernel(lo_ptr, hi_ptr, sz_ptr, M, BLOCK: tl.constexpr):
    """The tensor's (scale, zero point) from every row's range, as DynamicQuantizeLinear: one program."""
    lo = tl.zeros((BLOCK,), tl.float32)
    hi = tl.zeros((BLOCK,), tl.float32)
    for a0 in range(0, M, BLOCK):
        offs = a0 + tl.arange(0, BLOCK)
        lo = tl.minimum(lo, tl.load(lo_ptr + offs, mask=offs < M, other=0.0))
        hi = tl.maximum(hi, tl.load(hi_ptr + offs, mask=offs < M, other=0.0))
    low = tl.min(lo, axis=0)
    scale = tl.math.div_rn(tl.max(hi, axis=0) - low, 255.0)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(sz_ptr, scale)
    tl.store(sz_ptr + 1, _rint(tl.minimum(tl.maximum(tl.math.div_rn(-low, scale), 0.0), 255.0)))


@triton.jit
def _quantize_kernel(x_ptr, r_ptr, sz_ptr, c_ptr, K, stride_xm, stride_cm, BLOCK_K: tl.constexpr):
    """One row and BLOCK_K columns per program: c - 128 = clamp(rint(x / r / scale) + zero, 0, 255) - 128."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    r = tl.load(r_ptr + row)
    scale = tl.load(sz_ptr)
    zero = tl.load(sz_ptr + 1)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.minimum(tl.maximum(_rint(tl.math.div_rn(tl.math.div_rn(x, r), scale)) + zero, 0.0), 255.0)
    tl.store(c_ptr + row * stride_cm + cols, (c - 128.0).to(tl.int8), mask=mask)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile), GROUP_M row tiles at a time: neighbouring programs share rows of
    x and columns of q in the L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _epilogue(acc, pid_m, pid_n, qsum_ptr, ws_ptr, r_ptr, sz_ptr, b_ptr, y_ptr, M, N, stride_ym,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = (acc + (128 - zero) * sum_k q) * scale * s[n] * r[m] (+ bias), rounded once to y's dtype (the codes
    went in as c - 128)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    zero = tl.load(sz_ptr + 1).to(tl.int32)
    acc += (128 - zero) * tl.load(qsum_ptr + offs_n, mask=n_mask, other=0)[None, :]
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    r = tl.load(r_ptr + offs_m, mask=m_mask, other=0.0)
    y = acc.to(tl.float32) * (tl.load(sz_ptr) * ws)[None, :] * r[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w8a8_kernel(a_ptr, q_ptr, qsum_ptr, ws_ptr, r_ptr, sz_ptr, b_ptr, y_ptr, M, N, K,
                 stride_am, stride_qn, stride_ym, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = tl.where(offs_m < M, offs_m, 0)  # rows past the edge read row 0 (their results are not stored)
    q_rows = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    q_ptrs = q_ptr + q_rows[:, None] * stride_qn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            q = tl.load(q_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + offs_k < K)[None, :], other=0)
            q = tl.load(q_ptrs, mask=(k0 + offs_k < K)[None, :], other=0)
        acc = tl.dot(a, tl.trans(q), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
    _epilogue(acc, pid_m, pid_n, qsum_ptr, ws_ptr, r_ptr, sz_ptr, b_ptr, y_ptr, M, N, stride_ym, HAS_BIAS,
              BLOCK_M, BLOCK_N)


@triton.jit
def _w8a8_tma_kernel(a_desc, q_desc, qsum_ptr, ws_ptr, r_ptr, sz_ptr, b_ptr, y_ptr, M, N, K, stride_ym,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """``_w8a8_kernel`` with both operands brought by the tensor memory accelerator (tensor descriptors; the
    edges read as zeros)."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k0])
        q = q_desc.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(a, q.T, acc, out_dtype=tl.int32)
    _epilogue(acc, pid_m, pid_n, qsum_ptr, ws_ptr, r_ptr, sz_ptr, b_ptr, y_ptr, M, N, stride_ym, HAS_BIAS,
              BLOCK_M, BLOCK_N)


def prepared(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int, bits: int,
             group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], s fp32 [N], sum_k q int32 [N]) for the op's weight, computed once while it lives."""
    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, s = int8_weight(qweight, scales, zeros, in_features, bits, group_size)
        q = q.contiguous()
        return q, s.float().contiguous(), q.sum(1, dtype=torch.int32)

    return kept("w8a8", qweight, make)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (c - 128 int8 [M, K], r fp32 [M], (scale, zero) fp32 [2]): ``quantize_rows_uint8``."""
    m, k = x.shape
    r = torch.empty(m, dtype=torch.float32, device=x.device)
    lo, hi = torch.empty_like(r), torch.empty_like(r)
    c = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sz = torch.empty(2, dtype=torch.float32, device=x.device)
    _row_stats_kernel[(m,)](x, r, lo, hi, k, x.stride(0), BLOCK_K=1024, num_warps=4)
    _scale_kernel[(1,)](lo, hi, sz, m, BLOCK=1024, num_warps=4)
    _quantize_kernel[(m, triton.cdiv(k, 1024))](x, r, sz, c, k, x.stride(0), c.stride(0), BLOCK_K=1024, num_warps=4)
    return c, r, sz


# (loads, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); loads: "ptr" (plain) or "tma" (descriptors,
# K a multiple of 16)
CONFIGS = [("ptr", 128, 256, 128, 8, 8, 3), ("ptr", 128, 128, 128, 8, 4, 4), ("ptr", 256, 128, 128, 8, 8, 3),
           ("ptr", 64, 128, 128, 8, 4, 4), ("ptr", 128, 64, 128, 8, 4, 4),
           ("tma", 128, 256, 128, 8, 8, 3), ("tma", 128, 128, 128, 8, 8, 4), ("tma", 256, 128, 128, 8, 8, 3),
           ("tma", 128, 128, 128, 8, 4, 4), ("tma", 64, 128, 128, 8, 4, 4)]
TUNER = Tuner()


def candidates(k: int) -> list[tuple]:
    return [c for c in CONFIGS if c[0] == "ptr" or k % 16 == 0]


def launch(config: tuple, c: torch.Tensor, r: torch.Tensor, sz: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
           qsum: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    loads, bm, bn, bk, gm, warps, stages = config
    m, k = c.shape
    n = q.shape[0]
    y = torch.empty((m, n), dtype=dtype, device=c.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    b = bias if bias is not None else s
    if loads == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        _w8a8_tma_kernel[grid](
            TensorDescriptor.from_tensor(c, [bm, bk]), TensorDescriptor.from_tensor(q, [bn, bk]), qsum, s, r, sz, b,
            y, m, n, k, y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
            num_warps=warps, num_stages=stages)
    else:
        _w8a8_kernel[grid](
            c, q, qsum, s, r, sz, b, y, m, n, k, c.stride(0), q.stride(0), y.stride(0), HAS_BIAS=bias is not None,
            EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
    return y


def supports(x: torch.Tensor, activation_bits: int) -> bool:
    return x.is_cuda and activation_bits == 8 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, in_features: int, bits: int, group_size: int) -> torch.Tensor:
    """The op with ``activation_bits=8`` (module docstring); x [..., K] on the GPU, y in x's dtype."""
    x2 = as_rows(x)
    q, s, qsum = prepared(qweight, scales, zeros, in_features, bits, group_size)
    c, r, sz = quantize_rows(x2)
    key = (bucket(x2.shape[0]), q.shape[0], in_features, x.dtype, bias is not None)
    config = TUNER.choose(key, candidates(in_features), lambda cf, w: launch(cf, c, r, sz, w[0], w[1], w[2], bias, x.dtype),
                          (q, s, qsum))
    return launch(config, c, r, sz, q, s, qsum, bias, x.dtype).reshape(*x.shape[:-1], -1)

