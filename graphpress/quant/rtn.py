"""Round-to-nearest weight quantization with a per-group range search.

    w [N, K]  ->  QuantizedWeight(codes, scales, zeros)      (lossy)

For each group the range [lo, hi] (symmetric: absmax) is shrunk by factors
f = 1, 1 - max_shrink / grid, ..., 1 - max_shrink, and the factor minimizing the group's error is kept:
    weight error:   ||w_g - Q_f(w_g)||^2
    output error:   ||(w_g - Q_f(w_g)) x_g^T||^2 = e_g^T (x_g^T x_g) e_g     when activations x [T, K] are given.
The output error is exact per group; cross terms between groups of one row are ignored, so the groups stay
independent and the search is one batched pass per factor over [N, G, g].
"""

from __future__ import annotations

import torch

from graphpress.quant.qweight import (
    QuantizedWeight,
    QuantSpec,
    check_weight,
    fake_quantize,
    group_columns,
    minmax_qparams,
    quantize_codes,
)


def group_gram(x: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """x [T, K] -> per-group Gram matrices [G, g, g] = x_g^T x_g (zero rows / columns for padding)."""
    x = x.reshape(-1, in_features).float()
    xg = group_columns(x, spec)  # [T, G, g]
    xg = xg.transpose(0, 1)  # [G, T, g]
    return xg.transpose(1, 2) @ xg


def search_qparams(
    wg: torch.Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    max_shrink: float = 0.2,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [N, G] for grouped weights wg [N, G, g], the range shrunk to minimize the error.

    gram [G, g, g] (optional) weighs the error by the activations; grid=0 means plain min / max.
    """
    lo, hi = wg.amin(-1), wg.amax(-1)  # [N, G]
    best_scale, best_zero = minmax_qparams(lo, hi, spec)
    if grid <= 0 or max_shrink <= 0:
        return best_scale, best_zero
    best_err = torch.full_like(lo, torch.inf)
    for i in range(grid + 1):
        f = 1.0 - max_shrink * i / grid
        scale, zero = minmax_qparams(lo * f, hi * f, spec)
        e = fake_quantize(wg, scale[..., None], zero[..., None], spec).sub_(wg)  # [N, G, g]
        if gram is None:
            err = torch.linalg.vecdot(e, e)
        else:
            eg = e.transpose(0, 1)  # [G, N, g]
            err = ((eg @ gram) * eg).sum(-1).transpose(0, 1)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


@torch.no_grad()
def quantize_rtn(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    clip_search: bool = True,
    grid: int = 20,
    max_shrink: float = 0.2,
    x: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize w [N, K] group-wise by rounding to nearest; x [T, K] (optional) makes the search output-aware."""
    check_weight(w, "quantize_rtn")
    n, k = w.shape
    if x is not None and x.shape[-1] != k:
        raise ValueError(f"quantize_rtn: activations have {x.shape[-1]} features, the weight has K={k}")
    wg = group_columns(w, spec)  # [N, G, g]
    gram = group_gram(x, spec, k) if (x is not None and clip_search) else None
    scale, zero = search_qparams(wg, spec, grid=grid if clip_search else 0, max_shrink=max_shrink, gram=gram)
    codes = quantize_codes(wg, scale[..., None], zero[..., None], spec).reshape(n, -1)  # [N, Kp]
    return QuantizedWeight(codes.to(torch.uint8), scale.float(), zero.to(torch.uint8), spec, k)
