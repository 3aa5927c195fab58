from __future__ import annotations

import pytest
import torch

from graphpress.metrics import max_rel_error, sqnr
from graphpress.quant.qweight import QuantSpec
from graphpress.quant.rtn import quantize_rtn
from graphpress.quant.scaling import (
    awq_search_scales,
    smoothquant_scales,
    smoothquant_search_scales,
    w8a8_product,
)


def _outlier_layer(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Activations [2048, 256] with a few large channels and three weights reading them."""
    g = torch.Generator().manual_seed(seed)
    k = 256
    mag = torch.rand(k, generator=g) + 0.3
    mag[torch.randperm(k, generator=g)[:6]] = 20.0
    x = torch.randn(2048, k, generator=g) * mag
    ws = [torch.randn(n, k, generator=g) * 0.02 for n in (256, 64, 64)]
    return x, ws


def test_scaling_identity_is_exact() -> None:
    x, ws = _outlier_layer()
    for s in (awq_search_scales(x, ws, QuantSpec(4, 64), grid=5), smoothquant_scales(x.abs().amax(0), ws)):
        for w in ws:
            assert max_rel_error(x @ w.T, (x / s) @ (w * s).T) < 1e-5


def test_awq_beats_rtn_on_outlier_channels() -> None:
    x, ws = _outlier_layer()
    spec = QuantSpec(4, 64)
    s = awq_search_scales(x, ws, spec)
    assert s.shape == (256,) and (s > 0).all()
    for w in ws:
        ref = x @ w.T
        rtn = sqnr(ref, x @ quantize_rtn(w, spec, clip_search=False).dequantize().T)
        awq = sqnr(ref, (x / s) @ quantize_rtn(w * s, spec, clip_search=False).dequantize().T)
        assert awq > rtn + 2.0, (awq, rtn)  # measured 26.0 / 20.9, 26.5 / 20.9, 26.0 / 21.1 dB


def test_awq_falls_back_to_ones_when_scaling_cannot_help() -> None:
    # identical channel magnitudes: mean|x|^alpha is constant, normalized to 1 for every alpha
    x = torch.ones(64, 32)
    s = awq_search_scales(x, [torch.randn(8, 32)], QuantSpec(4, 16), grid=4)
    assert torch.allclose(s, torch.ones(32))


def test_smoothquant_formula_and_effect() -> None:
    x, ws = _outlier_layer(1)
    act = x.abs().amax(0)
    s = smoothquant_scales(act, ws, alpha=0.5)
    w_max = torch.stack([w.abs().amax(0) for w in ws]).amax(0)
    assert torch.allclose(s, (act.sqrt() / w_max.sqrt()).clamp(min=1e-5))
    # the activation range across channels gets flatter
    ratio = lambda v: (v.max() / v.min()).item()  # noqa: E731
    assert ratio((x / s).abs().amax(0)) < ratio(act) / 4
    # alpha = 0 only divides by the weight range; a zero channel does not produce inf
    act[0] = 0
    s0 = smoothquant_scales(act, ws, alpha=1.0)
    assert torch.isfinite(s0).all() and s0[0] == 1e-5


def test_scaling_refuses() -> None:
    with pytest.raises(ValueError, match="no weights"):
        awq_search_scales(torch.randn(4, 16), [], QuantSpec(4, 16))
    with pytest.raises(ValueError, match="K=8"):
        smoothquant_scales(torch.ones(16), [torch.randn(4, 8)])
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(torch.ones(16), [torch.randn(4, 16)], alpha=1.5)


def test_smoothquant_search_picks_the_alpha_with_least_w8a8_error() -> None:
    x, ws = _outlier_layer()
    absmax = x.abs().amax(0)
    grid = (0.0, 0.5, 0.9)
    s, alpha = smoothquant_search_scales(x, absmax, ws, grid)
    assert alpha in grid and torch.equal(s, smoothquant_scales(absmax, ws, alpha))

    def err(a: float) -> float:
        t = smoothquant_scales(absmax, ws, a)
        return sum((w8a8_product(x / t, w * t) - x @ w.T).pow(2).sum().item() for w in ws)

    assert err(alpha) == min(err(a) for a in grid)
    assert err(alpha) < 0.5 * err(0.0)  # flattening the outlier channels pays on this layer


def test_awq_for_int8_compute_never_does_worse_than_no_scale() -> None:
    x, ws = _outlier_layer()
    spec = QuantSpec(4, 32, False)
    s = awq_search_scales(x, ws, spec, grid=10, int8_compute=True)
    assert s.shape == (x.shape[-1],) and torch.isfinite(s).all() and (s > 0).all()

    def err(t: torch.Tensor) -> float:
        return sum((w8a8_product(x / t, quantize_rtn(w * t, spec, clip_search=False).dequantize()) - x @ w.T)
                   .pow(2).sum().item() for w in ws)

    assert err(s) <= err(torch.ones_like(s))
