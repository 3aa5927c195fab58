"""W4A16 on CUDA: graphpress::quantized_linear's 4-bit weights times bf16, fp16 or fp32 activations, in Triton.

    x        [M, K]               bf16, fp16 or fp32 (leading dims flattened into M)
    qweight  [N, ceil(G * g / 2)] uint8, the op's layout (graphpress.kernels.quantized); the GEMV kernel
                                  reads a copy laid out for it (``gpu_layout``, kept while the tensor lives)
    scales   [N, G]               any float dtype
    zeros    [N, ceil(G / 2)]     uint8, packed like the codes; None: 8 (symmetric)
    bias     [N] or None
    y        [M, N] = x @ ((code - zero) * scale)^T + bias, accumulated in fp32, rounded once to x's dtype

In graphpress.kernels.layouts.gpu_layout each nibble position of a 32-bit word covers a contiguous run of
columns, so the GEMV kernel reads the activations it multiplies with contiguous loads. (The tensor-core kernel
reading that layout too, with x put in the bytes' order by a permute in registers, crashed Triton 3.6's
dot-operand optimization; it reads the op's own layout.)

Two kernels, the faster chosen per shape by timing (graphpress.kernels.tuning):

- ``_gemv_kernel`` (M <= 8, no tensor cores): a nibble becomes a float with one logical op and no conversion
  instruction: (word & 0xF << 4j) | 0x4B000000 is the fp32 2^23 + code * 16^j, and subtracting
  2^23 + zero * 16^j leaves (code - zero) * 16^j exactly; the activations are pre-scaled by 16^-j (exact).
  Per weight: about one integer op, one subtraction and one fused multiply-add per token; the group's scale
  multiplies each thread's partial sums once per 8 weights.
- ``_mma_kernel`` (tensor cores, decode and prefill; the op's layout): the codes are the dot's left operand
  and the tokens its right one (a decode step's 1-16 tokens sit on the narrow side); nibbles become bf16/fp16 by ``prmt``/``and``/
  ``or`` (``nibble_asm``), code - zero (-15..15) is exact in bf16/fp16 and the tile's sums are scaled in fp32.
  fp32 activations are split into two bf16 parts (x = hi + lo to ~16 bits), two products each.

Both split K over programs (``SPLIT_K`` > 1, partial sums in an fp32 workspace [SPLIT_K, M, N] that one
reduction adds) so that a few channels over a long K still fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphpress.kernels.layouts import as_rows, gpu_layout, kept
from graphpress.kernels.tuning import Tuner, bucket


def laid_out(qweight: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
    """``gpu_layout`` of ``qweight``, computed once and kept while the tensor lives and is not modified."""
    return kept("w4 gemv", qweight, lambda: gpu_layout(qweight, groups, group_size))


def nibble_asm(high: bool, bf16: bool) -> str:
    """PTX for four bytes (one 32-bit register) -> their low (or high) nibbles n plus a bias, as four bf16
    (128 + n) or fp16 (1024 + n) in two registers: ``prmt`` spreads the bytes over 16-bit halves, ``and`` keeps
    the nibble and ``or`` writes it into the bias's mantissa, instead of an integer-to-float conversion per
    value. For ``tl.inline_asm_elementwise(..., pack=4)`` on uint8."""
    magic = "0x43004300" if bf16 else "0x64006400"
    shift = "shr.b32 t0, t0, 4; shr.b32 t1, t1, 4; " if high else ""
    return ("{ .reg .b32 t0, t1, zero; mov.b32 zero, 0; "
            "prmt.b32 t0, $2, zero, 0x4140; prmt.b32 t1, $2, zero, 0x4342; " + shift +
            "and.b32 t0, t0, 0x000F000F; and.b32 t1, t1, 0x000F000F; "
            f"or.b32 $0, t0, {magic}; or.b32 $1, t1, {magic}; }}")


@triton.jit
def _nibble(src, mask: tl.constexpr, bias):
    """(code - zero) * 16^j in fp32 for the nibble that ``mask`` selects; ``bias`` = 2^23 + zero * 16^j."""
    return ((src & mask) | 0x4B000000).to(tl.float32, bitcast=True) - bias


@triton.jit
def _token_sum(x_row, cols, K, W: tl.constexpr, d0, d1, d2, d3, d4, d5, d6, d7):
    """sum over the 8 nibbles of d_j * x[column of nibble j] / 16^e_j: one token's [BN, BG, W] partial sums."""
    p = d0 * tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)[None]
    p += d1 * (tl.load(x_row + cols + W, mask=cols + W < K, other=0.0).to(tl.float32) * 0.0625)[None]
    p += d2 * (tl.load(x_row + cols + 2 * W, mask=cols + 2 * W < K, other=0.0).to(tl.float32) * 0.00390625)[None]
    p += d3 * (tl.load(x_row + cols + 3 * W, mask=cols + 3 * W < K, other=0.0).to(tl.float32)
               * 0.000244140625)[None]
    p += d4 * (tl.load(x_row + cols + 4 * W, mask=cols + 4 * W < K, other=0.0).to(tl.float32)
               * 0.0000152587890625)[None]
    p += d5 * (tl.load(x_row + cols + 5 * W, mask=cols + 5 * W < K, other=0.0).to(tl.float32) * 0.00390625)[None]
    p += d6 * (tl.load(x_row + cols + 6 * W, mask=cols + 6 * W < K, other=0.0).to(tl.float32)
               * 0.000244140625)[None]
    p += d7 * (tl.load(x_row + cols + 7 * W, mask=cols + 7 * W < K, other=0.0).to(tl.float32)
               * 0.0000152587890625)[None]
    return p


@triton.jit
def _gemv_store(acc, y_ptr, offs_n, mask, bias):
    tl.store(y_ptr + offs_n, (tl.sum(tl.sum(acc, axis=2), axis=1) + bias).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G,
                 stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, stride_ys,
                 GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr):
    W: tl.constexpr = GROUP // 8
    pid_n = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, BLOCK_G)
    offs_w = tl.arange(0, W)
    tiles = tl.cdiv(G, BLOCK_G)
    per_split = tl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, tiles)
    acc0 = tl.zeros((BLOCK_N, BLOCK_G, W), tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_G, W), tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_G, W), tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_G, W), tl.float32)
    rows = q_ptr + offs_n[:, None, None] * stride_qn + offs_w[None, None, :]
    gi = first * BLOCK_G + offs_g
    words = tl.load(rows + (gi * W)[None, :, None], mask=(n_mask[:, None] & (gi < G)[None, :])[:, :, None], other=0)
    for t in range(first, last):
        gi = t * BLOCK_G + offs_g
        nm = n_mask[:, None] & (gi < G)[None, :]
        gn = gi + BLOCK_G  # the next tile's words are in flight while this one is summed
        upcoming = tl.load(rows + (gn * W)[None, :, None], mask=(n_mask[:, None] & (gn < G)[None, :] & (t + 1 < last))[:, :, None], other=0)
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + gi[None, :], mask=nm, other=0.0).to(tl.float32)[:, :, None]
        if HAS_ZEROS:
            zb = tl.load(z_ptr + offs_n[:, None] * stride_zn + (gi // 2)[None, :], mask=nm, other=0)
            z = ((zb >> ((gi % 2) * 4)[None, :]) & 15).to(tl.float32)[:, :, None]
        else:
            z = tl.full((1, 1, 1), 8.0, tl.float32)
        lo = words.to(tl.uint32, bitcast=True)
        hi = lo >> 12  # nibbles 5..7 at bits 8..19: below the exponent
        d0 = _nibble(lo, 0xF, 8388608.0 + z)
        d1 = _nibble(lo, 0xF0, 8388608.0 + z * 16.0)
        d2 = _nibble(lo, 0xF00, 8388608.0 + z * 256.0)
        d3 = _nibble(lo, 0xF000, 8388608.0 + z * 4096.0)
        d4 = _nibble(lo, 0xF0000, 8388608.0 + z * 65536.0)
        d5 = _nibble(hi, 0xF00, 8388608.0 + z * 256.0)
        d6 = _nibble(hi, 0xF000, 8388608.0 + z * 4096.0)
        d7 = _nibble(hi, 0xF0000, 8388608.0 + z * 65536.0)
        cols = (gi * GROUP)[:, None] + offs_w[None, :]
        x_row = x_ptr + m0 * stride_xm
        acc0 += s * _token_sum(x_row, cols, K, W, d0, d1, d2, d3, d4, d5, d6, d7)
        if BLOCK_M > 1:
            k1 = tl.where(m0 + 1 < M, K, 0)  # a row past M reads nothing
            acc1 += s * _token_sum(x_row + stride_xm, cols, k1, W, d0, d1, d2, d3, d4, d5, d6, d7)
        if BLOCK_M > 2:
            k2 = tl.where(m0 + 2 < M, K, 0)
            acc2 += s * _token_sum(x_row + 2 * stride_xm, cols, k2, W, d0, d1, d2, d3, d4, d5, d6, d7)
            k3 = tl.where(m0 + 3 < M, K, 0)
            acc3 += s * _token_sum(x_row + 3 * stride_xm, cols, k3, W, d0, d1, d2, d3, d4, d5, d6, d7)
        words = upcoming
    bias = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_BIAS:  # added once: by the first slice
        bias = tl.load(b_ptr + offs_n, mask=n_mask & (pid_k == 0), other=0.0).to(tl.float32)
    out = y_ptr + pid_k * stride_ys + m0 * stride_ym
    _gemv_store(acc0, out, offs_n, n_mask & (m0 < M), bias)
    if BLOCK_M > 1:
        _gemv_store(acc1, out + stride_ym, offs_n, n_mask & (m0 + 1 < M), bias)
    if BLOCK_M > 2:
        _gemv_store(acc2, out + 2 * stride_ym, offs_n, n_mask & (m0 + 2 < M), bias)
        _gemv_store(acc3, out + 3 * stride_ym, offs_n, n_mask & (m0 + 3 < M), bias)


@triton.jit
def _mma_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KP,
                stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, stride_ys,
                GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr,
                SPLIT_X: tl.constexpr, ASM_LOW: tl.constexpr, ASM_HIGH: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    tiles = tl.cdiv(KP, BLOCK_K)  # KP = G * g: whole groups, the padding dequantizes to 0
    per_split = tl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, tiles)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(first, last):
        k0 = t * BLOCK_K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=m_mask[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        # byte j of the tile holds column 2j (low nibble) and 2j + 1 (high): x is split into its even and odd
        # columns (in registers) rather than the codes interleaved, and each half gets its own product
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
        packed = tl.load(q_ptr + offs_n[:, None] * stride_qn + (k0 // 2 + offs_b)[None, :], mask=n_mask[:, None],
                         other=0)
        g = k0 // GROUP
        if HAS_ZEROS:
            zb = tl.load(z_ptr + offs_n * stride_zn + g // 2, mask=n_mask, other=0)
            z = ((zb >> ((g % 2) * 4)) & 15).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 8.0, tl.float32)
        wdt = tl.bfloat16 if BF16 else tl.float16
        if BF16:  # the nibbles' bias and the zero point, subtracted exactly
            bias_z = (z + 128.0).to(wdt)[:, None]
        else:
            bias_z = (z + 1024.0).to(wdt)[:, None]
        # code - zero lies in -15..15, exact in bf16/fp16: the scale is applied to the tile's sums, in fp32
        low = tl.inline_asm_elementwise(ASM_LOW, "=r,=r,r", [packed], dtype=wdt, is_pure=True, pack=4) - bias_z
        high = tl.inline_asm_elementwise(ASM_HIGH, "=r,=r,r", [packed], dtype=wdt, is_pure=True, pack=4) - bias_z
        if SPLIT_X:  # fp32 activations: x = hi + lo, each part in bf16
            a_even = x_even.to(tl.bfloat16)
            a_odd = x_odd.to(tl.bfloat16)
            part = tl.dot(low, tl.trans(a_even))
            part = tl.dot(high, tl.trans(a_odd), part)
            part = tl.dot(low, tl.trans((x_even - a_even.to(tl.float32)).to(tl.bfloat16)), part)
            part = tl.dot(high, tl.trans((x_odd - a_odd.to(tl.float32)).to(tl.bfloat16)), part)
        else:
            part = tl.dot(low, tl.trans(x_even))
            part = tl.dot(high, tl.trans(x_odd), part)
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += s[:, None] * part
    if HAS_BIAS:  # added once: by the first slice
        acc += tl.load(b_ptr + offs_n, mask=n_mask & (pid_k == 0), other=0.0).to(tl.float32)[:, None]
    out = y_ptr + pid_k * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _sum_splits_kernel(ws_ptr, y_ptr, SPLITS, COUNT, BLOCK: tl.constexpr):
    """y = the sum of the split-K partial sums [SPLITS, COUNT] (fp32), rounded once to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < COUNT
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws_ptr + s * COUNT + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ("gemv", BLOCK_N, BLOCK_G, SPLIT_K, num_warps); BLOCK_M: the tokens' power of two, up to 4 (more: more programs)
GEMV = [("gemv", bn, 1, sk, w) for bn, w in ((32, 4), (64, 4), (64, 8), (128, 8)) for sk in (1, 2, 4, 8)]
# ("mma", BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
DECODE = [("mma", 16, bn, bk, sk, 4, 2) for bn in (64, 128) for bk in (64, 128) for sk in (1, 2, 4)]
PREFILL = [("mma", bm, bn, bk, 1, w, 3) for bm, bn in ((64, 128), (128, 128), (128, 64)) for bk in (64, 128)
           for w in (4, 8)]
GEMV_MAX_M = 8
TUNER = Tuner()


def candidates(m: int, group_size: int) -> list[tuple]:
    """The configurations the tuner times for M tokens (each valid for ``group_size``)."""
    found = []
    if m <= GEMV_MAX_M:
        found += [c for c in GEMV if (group_size // 8) * c[1] * c[2] >= 32 * c[4]]
    found += [c for c in (DECODE if m <= 16 else PREFILL) if group_size % c[3] == 0]
    return found


def launch(config: tuple, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           bias: torch.Tensor | None, in_features: int, group_size: int) -> torch.Tensor:
    """One call with ``config``: x [M, K] (unit stride along K), the codes in the op's layout (the GEMV kernel
    reads them in ``gpu_layout``, made on its first call and kept)."""
    m, n = x.shape[0], qweight.shape[0]
    groups = scales.shape[1]
    sk = config[3] if config[0] == "gemv" else config[4]
    if sk == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        stride_ys = 0
    else:
        y = torch.empty((sk, m, n), dtype=torch.float32, device=x.device)
        stride_ys = y.stride(0)
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    common = dict(GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
    if config[0] == "gemv":
        _, bn, bg, _, warps = config
        bm = min(4, bucket(m))
        layout = laid_out(qweight, groups, group_size)
        _gemv_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), sk)](
            x, layout, scales, z, b, y, m, n, in_features, groups, x.stride(0), layout.stride(0), scales.stride(0),
            zeros.stride(0) if zeros is not None else 0, n, stride_ys,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=bg, SPLIT_K=sk, num_warps=warps, **common)
    else:
        _, bm, bn, bk, _, warps, stages = config
        bf16 = x.dtype != torch.float16
        _mma_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), sk)](
            x, qweight, scales, z, b, y, m, n, in_features, groups * group_size, x.stride(0), qweight.stride(0),
            scales.stride(0), zeros.stride(0) if zeros is not None else 0, n, stride_ys,
            BF16=bf16, SPLIT_X=x.dtype == torch.float32, ASM_LOW=nibble_asm(False, bf16),
            ASM_HIGH=nibble_asm(True, bf16), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=warps,
            num_stages=stages, **common)
    if sk == 1:
        return y
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](y, out, sk, m * n, BLOCK=1024, num_warps=4)
    return out


def supports(x: torch.Tensor, bits: int, group_size: int, activation_bits: int) -> bool:
    """Whether the kernels run this call of graphpress::quantized_linear (else the reference does)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and bits == 4
            and activation_bits == 0 and group_size in (64, 128, 256))


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, in_features: int, group_size: int) -> torch.Tensor:
    """y = x @ w^T (+ bias) for 4-bit weights in the op's layout (module docstring); x [..., K] on the GPU."""
    groups = scales.shape[1]
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 2 < groups * group_size:
        raise ValueError(f"w4a16: qweight must be uint8 [N, {groups * group_size // 2}], "
                         f"not {qweight.dtype} {list(qweight.shape)}")
    x2 = as_rows(x)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    m = x2.shape[0]
    key = (bucket(m), qweight.shape[0], in_features, group_size, x.dtype, zeros is not None, bias is not None)
    config = TUNER.choose(key, candidates(m, group_size),
                          lambda c, w: launch(c, x2, w[0], w[1], w[2] if zeros is not None else None, bias,
                                              in_features, group_size),
                          (qweight, scales) + ((zeros,) if zeros is not None else ()))
    return launch(config, x2, qweight, scales, zeros, bias, in_features, group_size).reshape(*x.shape[:-1], -1)
