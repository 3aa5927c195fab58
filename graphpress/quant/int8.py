"""Symmetric int8 references for W8A8: per-output-channel weights, per-token dynamic activations.

    w [N, K] -> (w_q int8 [N, K], w_s [N]),   x [..., K] -> (x_q int8 [..., K], x_s [...])
    q = clamp(round(v / s), -127, 127),  s = absmax / 127 along K (1 for an all-zero row)
    y = x @ w^T ~= (x_q @ w_q^T)_int32 * x_s[..., None] * w_s          (int8_matmul_reference)
-128 is left unused so that the range is symmetric and negation is exact.
"""

from __future__ import annotations

import torch

from graphpress.quant.qweight import check_weight


def _symmetric_int8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dim; returns (int8 codes like v, scale v.shape[:-1])."""
    v = v.float()
    scale = v.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(v / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_symmetric_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 codes [N, K], float32 scale [N])."""
    check_weight(w, "quantize_symmetric_int8_per_channel")
    return _symmetric_int8(w)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization, one scale per row: x [..., K] -> (int8 [..., K], float32 scale [...])."""
    return _symmetric_int8(x)


def int8_matmul_reference(
    x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor
) -> torch.Tensor:
    """(x_q [..., K] @ w_q [N, K]^T) accumulated exactly, times x_s [...] and w_s [N] -> float32 [..., N]."""
    # int32 accumulation is exact for K < 2^31 / 127^2 ~ 133k; int64 here since CPU matmul lacks int32
    acc = x_q.long() @ w_q.long().T
    return acc.float() * x_s[..., None] * w_s
