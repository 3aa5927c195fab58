"""Per-input-channel scales that move difficulty between activations and weights (AWQ, SmoothQuant).

Both rest on one exact identity: for s [K] > 0 and any W [N, K], x [T, K],
    y = x @ W^T = (x / s) @ (W * s)^T              (W * s scales column k of W by s_k)
so s can be folded into the producer of x (a norm's weight, a previous Linear's rows) and into W's columns.

AWQ (Lin et al., 2023, arXiv:2306.00978): s = mean|x|^alpha, normalized so sqrt(max(s) min(s)) = 1; the
weight columns that meet large activations get scaled up before quantization, so rounding hurts them less.
alpha in {0, 1/grid, ..., (grid - 1)/grid} is searched to minimize
    sum_i ||x @ (Q(W_i * s) / s)^T - x @ W_i^T||^2 = sum_i tr(E_i x^T x E_i^T),   E_i = Q(W_i * s) / s - W_i
with Q plain round-to-nearest (no range search). alpha = 0 is s = 1, plain RTN, so the search never does
worse than RTN on the calibration rows.

SmoothQuant (Xiao et al., 2022, arXiv:2211.10438), for W8A8:
    s = max|x|^alpha / max|W|^(1 - alpha)      (per input channel, over all weights that read x)
which flattens activation outliers into the weights. ``smoothquant_search_scales`` picks alpha per group from a
grid, minimizing the error of the W8A8 product as it runs (per-token int8 x / s, per-channel int8 W * s) on
calibration rows, instead of one alpha for every layer: what is best for a norm feeding q/k/v is not what is best
for a 49k-row output head.
"""

from __future__ import annotations

import torch

from graphpress.quant.int8 import fake_quantize_rows, symmetric_int8_rows
from graphpress.quant.qweight import QuantSpec, check_weight
from graphpress.quant.rtn import quantize_rtn


def _check(x_features: int, weights: list[torch.Tensor], what: str) -> None:
    if not weights:
        raise ValueError(f"{what}: no weights given; pass the Linear weights [N_i, K] that read these activations")
    for w in weights:
        check_weight(w, what)
        if w.shape[1] != x_features:
            raise ValueError(f"{what}: a weight has K={w.shape[1]} input features, the activations have {x_features}")


def subsample_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """x [..., K] -> at most max_rows rows [T, K], evenly spaced (deterministic)."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= max_rows:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_rows).round().long()
    return x[idx]


@torch.no_grad()
def awq_search_scales(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    spec: QuantSpec,
    grid: int = 20,
    *,
    max_rows: int = 4096,
    int8_compute: bool = False,
) -> torch.Tensor:
    """AWQ scales s [K] for activations x [..., K] shared by weights W_i [N_i, K]; apply as x / s, W_i * s.

    ``int8_compute``: the error is that of the product as the int8 kernel computes it (x / s quantized per
    token, Q(W_i * s) requantized to int8 per channel, as W4A8 targets multiply), so the
    search also weighs what s does to the activations' rounding. Measured directly on at most 1024 rows.
    """
    k = x.shape[-1]
    _check(k, weights, "awq_search_scales")
    x = subsample_rows(x, min(max_rows, 1024) if int8_compute else max_rows).float()  # [T, K]
    mean_abs = x.abs().mean(0)  # [K]
    # the error needs x only through x^T x; use whichever of x, x^T x is smaller
    gram = x.T @ x if x.shape[0] > k and not int8_compute else None  # [K, K]

    def error(w: torch.Tensor, ref: torch.Tensor | None, s: torch.Tensor) -> float:
        if ref is not None:  # int8_compute: the product as the kernel computes it, against the float one
            return w8a8_error(x / s, quantize_rtn(w * s, spec, clip_search=False).dequantize(), ref)
        e = quantize_rtn(w * s, spec, clip_search=False).dequantize() / s - w  # [N, K]
        if gram is None:
            return (x @ e.T).double().pow(2).sum().item()
        return ((e @ gram) * e).double().sum().item()

    ws = [w.float() for w in weights]
    refs = [x @ w.T if int8_compute else None for w in ws]
    best_s, best_err = torch.ones(k, device=x.device), float("inf")
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(error(w, ref, s) for w, ref in zip(ws, refs, strict=True))
        if err < best_err:
            best_s, best_err = s, err
    return best_s


def smoothquant_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant scales s [K] from per-channel activation maxima [K]; apply as x / s, W_i * s."""
    _check(act_absmax.shape[-1], weights, "smoothquant_scales")
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothquant_scales: alpha={alpha} must lie in [0, 1]")
    w_absmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)  # [K]
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def w8a8_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ w [N, K]^T with both rounded as the W8A8 kernels round them (per-token / per-channel int8)."""
    wq, ws = symmetric_int8_rows(w)
    return fake_quantize_rows(x) @ (wq.float() * ws[:, None]).T


def w8a8_error(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, rows: int = 4096) -> float:
    """||w8a8_product(x, w) - ref||^2 (x [T, K], w [N, K], ref [T, N]): what the scale searches minimize.

    Summed over chunks of ``rows`` rows of w (each row is rounded on its own, so the product is the same):
    for a 49k-row head on 1024 calibration rows, whole it held ~1.3 GB of [T, N] temporaries (measured
    2.59 GB peak against 1.54 GB for SmolLM2's head smoothing)."""
    xq = fake_quantize_rows(x)  # [T, K]
    total = 0.0
    for i in range(0, w.shape[0], rows):
        wq, ws = symmetric_int8_rows(w[i : i + rows])
        total += (xq @ (wq.float() * ws[:, None]).T - ref[:, i : i + rows]).double().pow(2).sum().item()
    return total


@torch.no_grad()
def smoothquant_search_scales(
    x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor],
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), *, max_rows: int = 1024,
) -> tuple[torch.Tensor, float]:
    """SmoothQuant scales with alpha chosen from ``alphas`` to minimize sum_i ||W8A8(x / s, W_i * s) - x W_i^T||^2
    on up to ``max_rows`` rows of x [..., K]; returns (s, alpha)."""
    _check(x.shape[-1], weights, "smoothquant_search_scales")
    x = subsample_rows(x, max_rows).float()
    ws = [w.float() for w in weights]
    refs = [x @ w.T for w in ws]
    best: tuple[float, torch.Tensor, float] | None = None
    for alpha in alphas:
        s = smoothquant_scales(act_absmax, ws, alpha)
        err = sum(w8a8_error(x / s, w * s, ref) for w, ref in zip(ws, refs, strict=True))
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]
