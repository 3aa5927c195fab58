"""int8 references for W8A8: per-output-channel weights, per-token dynamic activations.

    w [N, K] -> (w_q int8 [N, K], w_s [N]),   x [..., K] -> (x_q int8 [..., K], x_s [...])
    q = clamp(round(v / s), -127, 127),  s = absmax / 127 along K (1 for an all-zero row)
    y = x @ w^T ~= (x_q @ w_q^T)_int32 * x_s[..., None] * w_s          (int8_matmul_reference)
-128 is left unused so that the range is symmetric and negation is exact.

``quantize_rows_uint8`` is the W8A8 activation rounding (the model's semantics): every row scaled to
absmax 1, then the whole tensor quantized to uint8 the way ONNX DynamicQuantizeLinear does (one asymmetric
scale over [min(0, min), max(0, max)] ~ [-1, 1]). That is per-token quantization with 255 levels, in the form
a per-tensor dynamic quantizer takes.
"""

from __future__ import annotations

import torch

from graphpress.quant.qweight import check_weight

TINY = torch.finfo(torch.float32).tiny


def symmetric_int8_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dim; returns (int8 codes like v, scale v.shape[:-1]). No checks: traceable."""
    v = v.float()
    scale = v.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, 1.0)  # a scalar: traced by a lowering rule, one constant, not [N] ones
    q = torch.round(v / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_symmetric_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 codes [N, K], float32 scale [N])."""
    check_weight(w, "quantize_symmetric_int8_per_channel")
    return symmetric_int8_rows(w)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization, one scale per row: x [..., K] -> (int8 [..., K], float32 scale [...])."""
    return symmetric_int8_rows(x)


def int8_matmul_reference(
    x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor
) -> torch.Tensor:
    """(x_q [..., K] @ w_q [N, K]^T) accumulated exactly, times x_s [...] and w_s [N] -> float32 [..., N]."""
    # int32 accumulation is exact for K < 2^31 / 127^2 ~ 133k; int64 here since CPU matmul lacks int32
    acc = x_q.long() @ w_q.long().T
    return acc.float() * x_s[..., None] * w_s


def dynamic_quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: x -> (uint8 codes, float32 scale [], uint8 zero point []), one scale for x.

    scale = (max(0, max x) - min(0, min x)) / 255 (1 when that is 0), zero point = round(clamp(-min / scale)),
    codes = clamp(round(x / scale) + zero point, 0, 255), rounding half to even.
    """
    x = x.float()
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (hi - lo) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round((-lo / scale).clamp(0, 255))
    codes = (torch.round(x / scale) + zero).clamp_(0, 255).to(torch.uint8)
    return codes, scale, zero.to(torch.uint8)


def quantize_rows_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token activations as the lowering computes them: x [..., K] -> (uint8 codes [..., K], scale [],
    zero point [], row scale [...]) with x ~= (codes - zero point) * scale * row_scale[..., None]."""
    rows = x.float().abs().amax(-1, keepdim=True).clamp(min=TINY)  # an all-zero row: any scale is exact
    codes, scale, zero = dynamic_quantize_linear(x.float() / rows)
    return codes, scale, zero, rows[..., 0]


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded as the W8A8 lowering rounds it (``quantize_rows_uint8``), back in float32."""
    codes, scale, zero, rows = quantize_rows_uint8(x)
    return (codes.float() - zero.float()) * scale * rows[..., None]
