"""W4A16 on CUDA: graphpress::quantized_linear's 4-bit weights times bf16 or fp16 activations, one Triton kernel.

    x        [M, K]               bf16 or fp16 (leading dims flattened into M)
    qweight  [N, ceil(G * g / 2)] uint8, the op's layout: codes along K, two per byte, the even index in the
                                  low nibble, the last group padded with its zero point
    scales   [N, G]               any float dtype
    zeros    [N, ceil(G / 2)]     uint8, packed like the codes; None: 8 (symmetric)
    bias     [N] or None
    y        [M, N] = x @ ((code - zero) * scale)^T + bias, accumulated in fp32, rounded once to x's dtype

Each program computes BLOCK_N output channels for BLOCK_M tokens over a slice of K. The codes are the dot's
left operand and the tokens its right one: a decode step's 1-16 tokens sit on the tensor cores' narrow side
instead of padding the wide one. The dot takes code - zero (-15..15, exact in bf16/fp16) and each
tile's sums are scaled in fp32, once per channel and group, not once per weight. BLOCK_K divides g, so a tile reads one scale and one zero point per channel. Split-K (``SPLIT_K`` > 1, for few channels over a long K) writes each
slice's partial sums to an fp32 workspace [SPLIT_K, M, N] that one reduction sums.

The configuration (tile sizes, split, stages, warps) is chosen per shape on first use by timing the
candidates (``_tuned``), then kept for the process: run a shape once before capturing a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _w4a16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KP,
                  stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, stride_ys,
                  GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr,
                  ASM_LOW: tl.constexpr, ASM_HIGH: tl.constexpr,
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
        if BF16:  # the nibbles' bias and the zero point, subtracted exactly
            bias_z = (z + 128.0).to(x.dtype)[:, None]
        else:
            bias_z = (z + 1024.0).to(x.dtype)[:, None]
        # code - zero lies in -15..15, exact in bf16/fp16: the scale is applied to the tile's sums, in fp32
        low = tl.inline_asm_elementwise(ASM_LOW, "=r,=r,r", [packed], dtype=x.dtype, is_pure=True, pack=4)
        high = tl.inline_asm_elementwise(ASM_HIGH, "=r,=r,r", [packed], dtype=x.dtype, is_pure=True, pack=4)
        part = tl.dot(low - bias_z, tl.trans(x_even))
        part = tl.dot(high - bias_z, tl.trans(x_odd), part)
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += s[:, None] * part
    if HAS_BIAS:  # added once: by the first slice
        acc += tl.load(b_ptr + offs_n, mask=n_mask & (pid_k == 0), other=0.0).to(tl.float32)[:, None]
    out = y_ptr + pid_k * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
DECODE = [(16, bn, bk, sk, 4, st) for bn in (16, 32, 64, 128) for bk in (64, 128) for sk in (1, 2, 4)
          for st in (2, 4)]
PREFILL = [(bm, bn, bk, 1, w, st) for bm, bn in ((64, 128), (128, 128), (128, 64)) for bk in (64, 128)
           for w in (4, 8) for st in (3,)]
_CHOSEN: dict[tuple, tuple[int, ...]] = {}
L2_OVERFLOW = 240_000_000  # bytes of weight copies cycled while tuning: 4x an H100/H200's 60 MB L2


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def _launch(config: tuple[int, ...], x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, group_size: int
            ) -> torch.Tensor:
    bm, bn, bk, sk, warps, stages = config
    m, n = x.shape[0], qweight.shape[0]
    kp = scales.shape[1] * group_size
    if sk == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        stride_ys = 0
    else:
        y = torch.empty((sk, m, n), dtype=torch.float32, device=x.device)
        stride_ys = y.stride(0)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), sk)
    bf16 = x.dtype == torch.bfloat16
    _w4a16_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else qweight, bias if bias is not None else scales, y,
        m, n, in_features, kp, x.stride(0), qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, n, stride_ys,
        GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, BF16=bf16,
        ASM_LOW=nibble_asm(False, bf16), ASM_HIGH=nibble_asm(True, bf16),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=warps, num_stages=stages,
    )
    return y if sk == 1 else y.sum(0).to(x.dtype)  # partial sums added in fp32


def _graph_us(fn, calls: int) -> float:  # noqa: ANN001
    """Microseconds per call of ``fn(i)`` for i < calls, captured in one CUDA graph and replayed."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * calls)


def _tuned(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           bias: torch.Tensor | None, in_features: int, group_size: int) -> tuple[int, ...]:
    """The fastest configuration for this shape (M rounded up to a power of two), timed on first use as a model
    runs it: by graph replay, cycling through copies of the weights that overflow the L2 cache (a layer's
    weights are read from memory, not from cache, when the whole model runs)."""
    m = x.shape[0]
    key = (_bucket(m), qweight.shape[0], in_features, group_size, x.dtype, zeros is not None, bias is not None)
    if key not in _CHOSEN:
        copies = max(1, min(64, -(-L2_OVERFLOW // qweight.numel())))
        weights = [qweight] + [qweight.clone() for _ in range(copies - 1)]
        times = {}
        for c in (c for c in (DECODE if m <= 16 else PREFILL) if group_size % c[2] == 0):
            try:
                times[c] = _graph_us(lambda i, c=c: _launch(c, x, weights[i], scales, zeros, bias, in_features,
                                                            group_size), copies)
            except triton.runtime.errors.OutOfResources:
                continue
        _CHOSEN[key] = min(times, key=times.get)
    return _CHOSEN[key]


def supports(x: torch.Tensor, bits: int, group_size: int, activation_bits: int) -> bool:
    """Whether the kernel runs this call of graphpress::quantized_linear (else the reference does)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and bits == 4 and activation_bits == 0
            and group_size % 64 == 0)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, in_features: int, group_size: int) -> torch.Tensor:
    """y = x @ w^T (+ bias) for 4-bit weights in the op's layout (module docstring); x [..., K] on the GPU."""
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 2 < scales.shape[1] * group_size:
        raise ValueError(f"w4a16: qweight must be uint8 [N, {scales.shape[1] * group_size // 2}], "
                         f"not {qweight.dtype} {list(qweight.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    config = _tuned(x2, qweight, scales, zeros, bias, in_features, group_size)
    return _launch(config, x2, qweight, scales, zeros, bias, in_features, group_size).reshape(*lead, -1)
