"""Quantized weights as data: one op family, target-neutral, with differentiable PyTorch references.

Every quantized weight in a program is the same four things, whatever runs it later:

    qweight  [N, ceil(G * g * bits / 8)] uint8   codes along K, packed: 8 bits one per byte; 4 bits two per
                                                 byte, the even index in the low nibble; the last group padded
                                                 with the zero point (dequantizes to exactly 0)
    scales   [N, G] float                        one per output row and group of g columns (G = ceil(K / g))
    zeros    [N, ceil(G * bits / 8)] uint8       zero points packed like the codes; None: 2^(bits-1)
                                                 (symmetric)
    w[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g]      for k < K (``in_features``)

with g = ``group_size`` (K for one group per row). Nothing here knows a runtime: block layouts, compute
precision, kernels and scale storage are lowering choices (graphpress.lowering.onnxruntime_rules and its
target options).

    graphpress::quantized_linear(x, qweight, scales, zeros, bias, in_features, bits, group_size,
                                 activation_bits=0)
        y = x @ w^T (+ bias). activation_bits=8: the model itself quantizes activations (W8A8): each row of x
        to 8 bits on the fly (``graphpress.quant.int8.quantize_rows_uint8``) against int8 weights per output
        channel (``int8_weight``), the product of the rounded values in float (int8 kernels sum integers, which
        differs only in float rounding, ``w8a8_product``); the gradient passes straight through the rounding.
    graphpress::quantized_embedding(qweight, scales, zeros, indices, bits, group_size, hidden)
        rows w[indices] of a table [V, H] stored as above (a tied output head reads the same tensors)
    graphpress::fake_quantize(w, scales, zeros, bits, group_size, int8_rows=False)
        w rounded onto the grid of ``scales`` / ``zeros`` (float, unpacked [N, G]) and back: training a
        program to be quantized (QAT). Gradient: straight through where w is inside the grid, 0 outside;
        the scales get the LSQ gradient, scaled by 1 / sqrt(g * (2^bits - 1)) as LSQ prescribes (Esser et al.
        2020), so that one learning rate suits weights and scales. int8_rows: then requantized to int8 per
        row as ``int8_weight`` does (the weight a quantized_linear with activation_bits=8 multiplies).
    graphpress::fake_quantize_activations(x)
        x rounded as quantized_linear with activation_bits=8 rounds its input (``quantize_rows_uint8``), in
        x's dtype; gradient straight through. linear(fake_quantize_activations(x), fake_quantize(w, ...,
        int8_rows=True)) computes what quantized_linear(x, ..., activation_bits=8) computes.

Each op has a backward (``register_autograd``): programs that hold them can be trained.
"""

from __future__ import annotations

import torch

from graphpress.quant.int8 import fake_quantize_rows, quantize_rows_uint8


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [..., ceil(count * bits / 8)] -> float codes [..., count] (4 bits: low nibble first).

    Written in float arithmetic (exact for bytes) rather than shifts and masks: it is also what lowering
    traces for a rule that unpacks at session start, and every exporter and runtime types float ops alike.
    """
    p = packed.float()
    if bits == 8:
        return p[..., :count]
    if bits == 4:
        high = torch.floor(p / 16)
        return torch.stack((p - high * 16, high), dim=-1).flatten(-2)[..., :count]
    raise ValueError(f"quantized weights have 4 or 8 bits, not {bits}")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int,
               bits: int, group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] that the tensors stand for."""
    n, groups = scales.shape
    codes = unpack_codes(qweight, bits, groups * group_size).reshape(n, groups, group_size)
    zp = float(1 << (bits - 1)) if zeros is None else unpack_codes(zeros, bits, groups)[..., None]
    w = (codes - zp) * scales.float()[..., None]
    return w.reshape(n, groups * group_size)[:, :in_features]


def unpack_uint8(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [..., ceil(count * bits / 8)] -> uint8 codes [..., count] (4 bits: low nibble first)."""
    if bits == 8:
        return packed[..., :count]
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)[..., :count]


def int8_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int,
                bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as int8 codes [N, K] and one float32 scale per row ~r / 127 (r = max |w| of the row), for int8
    products: the codes themselves for 8-bit symmetric weights with one group per row (exact), else
    q = round((code - zero) * scale / step) with step >= r / 127 (``row_requantization``), the weight requantized
    symmetric per row (an error ~1/8 of a 4-bit step)."""
    n, groups = scales.shape
    if bits == 8 and zeros is None and groups == 1:
        return (qweight[:, :in_features].to(torch.int16) - 128).to(torch.int8), scales[:, 0].float()
    codes, zp = grouped_codes(qweight, zeros, bits, groups, group_size)
    q, step = requantize_rows(codes, zp, scales)
    return q.to(torch.int8).reshape(n, groups * group_size)[:, :in_features], step


def grouped_codes(qweight: torch.Tensor, zeros: torch.Tensor | None, bits: int, groups: int, group_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes as uint8 [N, G, g] and the zero points as int16 [N, G] (2^(bits-1) where ``zeros`` is None)."""
    n = qweight.shape[0]
    codes = unpack_uint8(qweight, bits, groups * group_size).reshape(n, groups, group_size)
    zp = (torch.full((n, groups), 1 << (bits - 1), dtype=torch.int16) if zeros is None
          else unpack_uint8(zeros, bits, groups).to(torch.int16))
    return codes, zp


def row_requantization(codes: torch.Tensor, zp: torch.Tensor, scales: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """For requantizing grouped weights to int8 per row: each group's factor s / step [N, G], so that
    q = round((code - zero) * factor), and each row's step [N]: r / 127 for the row's max |w| r (1 / 127 for an
    all-zero row), rounded up to a float16 value (``up_to_float16``: a file stores it in half the bytes, and no
    code passes 127). The range of each group comes from its codes' min and max, so nothing [N, K] is made in
    float."""
    z = zp.float()  # [N, G]
    reach = torch.maximum(codes.amax(-1).float() - z, z - codes.amin(-1).float())  # max |code - zero|
    s = scales.float()
    r = (s * reach).abs().amax(-1)
    r = torch.where(r > 0, r, 1.0)  # an all-zero row: any scale is exact
    step = up_to_float16(r / 127.0)
    return s / step[:, None], step


def up_to_float16(x: torch.Tensor) -> torch.Tensor:
    """Each float32 of ``x`` raised to the nearest float16 value at or above it (at most 2^-10 relative) where
    float16's normal numbers reach it (2^-14 to 65504; elsewhere x unchanged); the gradient passes straight
    through."""
    half = x.detach().to(torch.float16)
    up = torch.where(half.float() < x.detach(), torch.nextafter(half, torch.full_like(half, torch.inf)), half)
    normal = (x.detach() >= 2.0 ** -14) & (x.detach() <= 65504.0)
    return torch.where(normal, x + (up.float() - x).detach(), x)


def requantize_rows(codes: torch.Tensor, zp: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped codes [N, G, g] (any dtype holding integers) with zero points [N, G] requantized to int8 per row:
    (q [N, G, g] float holding integers in [-127, 127], the row's step [N], ``row_requantization``)."""
    factor, step = row_requantization(codes, zp, scales)
    q = torch.round((codes.float() - zp.float()[..., None]) * factor[..., None])
    return q, step


def w8a8_product(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] float, int8 weight q [N, K] with row scales s [N]: x's rows quantized per token
    (``quantize_rows_uint8``), the integer product computed exactly (float64 is exact for
    |acc| <= 255 * 128 * K < 2^53 and runs on BLAS, unlike an int64 matmul), rounded once to float32, then
    scaled in the order the lowering scales it."""
    codes, scale, zero, rows = quantize_rows_uint8(x)
    acc = ((codes.double() - zero.double()) @ q.double().T).float()
    return acc * (scale * s) * rows[..., None]


def quantized_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    in_features: int,
    bits: int,
    group_size: int,
    activation_bits: int = 0,
) -> torch.Tensor:
    if activation_bits == 8:  # in float, as a fake-quantized program computes it (w8a8_product: integer sums)
        q, s = int8_weight(qweight, scales, zeros, in_features, bits, group_size)
        w = q.float() * s[:, None]
        return torch.nn.functional.linear(fake_quantize_rows(x), w, None if bias is None else bias.float()).to(x.dtype)
    if activation_bits:
        raise ValueError(f"quantized_linear: activation_bits is 0 (float) or 8, not {activation_bits}")
    w = dequantize(qweight, scales, zeros, in_features, bits, group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def quantized_embedding_reference(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    indices: torch.Tensor,
    bits: int,
    group_size: int,
    hidden: int,
) -> torch.Tensor:
    """Only the gathered rows are unpacked."""
    groups = scales.shape[1]
    codes = unpack_codes(qweight[indices], bits, groups * group_size).unflatten(-1, (groups, group_size))
    s = scales[indices].float()  # [..., G]
    zp = float(1 << (bits - 1)) if zeros is None else unpack_codes(zeros[indices], bits, groups)[..., None]
    y = (codes - zp) * s[..., None]
    return y.flatten(-2)[..., :hidden].to(scales.dtype)


def grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes before clamping, clamped codes, zero points), each [N, G, g] float32, padded."""
    n, k = w.shape
    groups = scales.shape[1]
    wg = torch.nn.functional.pad(w.float(), (0, groups * group_size - k)).reshape(n, groups, group_size)
    z = zeros.float()[..., None]
    raw = torch.round(wg / scales.float()[..., None]) + z
    return raw, raw.clamp(0, (1 << bits) - 1), z


def fake_quantize_reference(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                            group_size: int, int8_rows: bool = False) -> torch.Tensor:
    _, codes, z = grid(w, scales, zeros, bits, group_size)
    if int8_rows:  # int8_weight's arithmetic, on the float codes
        q, step = requantize_rows(codes, z[..., 0], scales)
        y = q * step[:, None, None]
    else:
        y = (codes - z) * scales.float()[..., None]
    return y.reshape(w.shape[0], -1)[:, : w.shape[1]].to(w.dtype)


def fake_quantize_activations_reference(x: torch.Tensor) -> torch.Tensor:
    return fake_quantize_rows(x).to(x.dtype)


quantized_linear = torch.library.custom_op("graphpress::quantized_linear", quantized_linear_reference,
                                           mutates_args=())
quantized_embedding = torch.library.custom_op("graphpress::quantized_embedding", quantized_embedding_reference,
                                              mutates_args=())
fake_quantize = torch.library.custom_op("graphpress::fake_quantize", fake_quantize_reference, mutates_args=())
fake_quantize_activations = torch.library.custom_op("graphpress::fake_quantize_activations",
                                                    fake_quantize_activations_reference, mutates_args=())


@quantized_linear.register_fake
def _(x, qweight, scales, zeros, bias, in_features, bits, group_size, activation_bits=0):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


@quantized_embedding.register_fake
def _(qweight, scales, zeros, indices, bits, group_size, hidden):  # noqa: ANN001, ANN202
    return scales.new_empty((*indices.shape, hidden))


@fake_quantize.register_fake
def _(w, scales, zeros, bits, group_size, int8_rows=False):  # noqa: ANN001, ANN202
    return torch.empty_like(w)


@fake_quantize_activations.register_fake
def _(x):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


# --- gradients -------------------------------------------------------------------------------------------


def _group_sum(g: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
    """[..., K] -> [..., G]: sums over each group of columns (the last one padded)."""
    pad = groups * group_size - g.shape[-1]
    return torch.nn.functional.pad(g, (0, pad)).unflatten(-1, (groups, group_size)).sum(-1)


def _linear_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, qweight, scales, zeros, bias, in_features, bits, group_size, *rest = inputs
    ctx.save_for_backward(x, qweight, scales, zeros)
    ctx.args = (in_features, bits, group_size)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):  # noqa: ANN001, ANN202
    """d/dx = grad @ w (straight through an activation rounding), d/dbias = sum, d/dscales = sum over each
    group of (grad^T x) * (code - zero); codes and zero points are integers: no gradient."""
    x, qweight, scales, zeros = ctx.saved_tensors
    in_features, bits, group_size = ctx.args
    w = dequantize(qweight, scales, zeros, in_features, bits, group_size)
    g = grad.float()
    grad_x = (g @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_bias = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    grad_scales = None
    if ctx.needs_input_grad[2]:
        grad_w = g.reshape(-1, g.shape[-1]).T @ x.float().reshape(-1, x.shape[-1])  # [N, K]
        unit = dequantize(qweight, torch.ones_like(scales), zeros, in_features, bits, group_size)
        grad_scales = _group_sum(grad_w * unit, scales.shape[1], group_size).to(scales.dtype)
    return grad_x, None, grad_scales, None, grad_bias, None, None, None, None


def _embedding_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    qweight, scales, zeros, indices, bits, group_size, hidden = inputs
    ctx.save_for_backward(qweight, scales, zeros, indices)
    ctx.args = (bits, group_size, hidden)


def _embedding_backward(ctx, grad):  # noqa: ANN001, ANN202
    """Only the scales are differentiable: each gathered row adds grad * (code - zero) to its row's scales."""
    qweight, scales, zeros, indices = ctx.saved_tensors
    bits, group_size, hidden = ctx.args
    grad_scales = None
    if ctx.needs_input_grad[1]:
        unit = quantized_embedding_reference(qweight, torch.ones_like(scales), zeros, indices, bits, group_size,
                                             hidden).float()
        per_row = _group_sum(grad.float() * unit, scales.shape[1], group_size).reshape(-1, scales.shape[1])
        grad_scales = torch.zeros_like(scales, dtype=torch.float32).index_add_(0, indices.reshape(-1), per_row)
        grad_scales = grad_scales.to(scales.dtype)
    return None, grad_scales, None, None, None, None, None


def _fake_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    w, scales, zeros, bits, group_size, *_ = inputs
    ctx.save_for_backward(w, scales, zeros)
    ctx.args = (bits, group_size)


def _fake_backward(ctx, grad):  # noqa: ANN001, ANN202
    """Straight-through estimator: d/dw = grad where w's code lies inside [0, 2^bits - 1], else 0.
    d/dscales (LSQ): grad * (clamped code - zero - w / scale), summed over each group, times LSQ's
    1 / sqrt(g * (2^bits - 1)). The int8 requantization passes the gradient straight through."""
    w, scales, zeros = ctx.saved_tensors
    bits, group_size = ctx.args
    n, k = w.shape
    raw, codes, z = grid(w, scales, zeros, bits, group_size)
    g = torch.nn.functional.pad(grad.float(), (0, raw.shape[1] * group_size - k)).reshape(raw.shape)
    inside = (raw >= 0) & (raw <= (1 << bits) - 1)
    grad_w = (g * inside).reshape(n, -1)[:, :k].to(w.dtype) if ctx.needs_input_grad[0] else None
    grad_scales = None
    if ctx.needs_input_grad[1]:
        wg = torch.nn.functional.pad(w.float(), (0, raw.shape[1] * group_size - k)).reshape(raw.shape)
        s = scales.float()[..., None]
        step = torch.where(inside, codes - z - wg / s, codes - z)
        lsq = ((1 << bits) - 1) * group_size
        grad_scales = ((g * step).sum(-1) / lsq**0.5).to(scales.dtype)
    return grad_w, grad_scales, None, None, None, None


def _straight_through(ctx, grad):  # noqa: ANN001, ANN202
    return grad


quantized_linear.register_autograd(_linear_backward, setup_context=_linear_setup)
quantized_embedding.register_autograd(_embedding_backward, setup_context=_embedding_setup)
fake_quantize.register_autograd(_fake_backward, setup_context=_fake_setup)
fake_quantize_activations.register_autograd(_straight_through)
