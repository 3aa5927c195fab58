"""graphpress.sparsity against dense references: every mask has exactly its pattern, SparseGPT's output error
is below magnitude's and Wanda's, the refinement and the exchange of weights lower it further, GPTQ with a mask keeps the zeros exact,
OWL's ratios, refusals."""

from __future__ import annotations

import pytest
import torch

from graphpress import sparsity
from graphpress.quant.qweight import QuantSpec
from graphpress.quant.rtn import quantize_rtn
from graphpress.sparsity import Pattern


def _problem(n: int = 48, k: int = 64, rows: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight, correlated inputs with a few loud channels (as an LLM's are), and H = 2 X^T X / T."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g) @ (torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5)
    x[:, :4] *= 10
    return w, x, 2 * x.T.double() @ x.double() / rows


def _error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x.double() @ (w - w_hat).double().T) ** 2).sum())


def _has_pattern(zero: torch.Tensor, pattern: Pattern) -> bool:
    """At least M - N zeros in every group of M consecutive entries of every row."""
    groups = zero.reshape(zero.shape[0], -1, pattern.m)
    return bool((groups.sum(-1) >= pattern.m - pattern.n).all())


@pytest.mark.parametrize("pattern", [Pattern(n=2, m=4), Pattern(n=4, m=8), Pattern(n=1, m=4)])
def test_every_method_gives_exactly_the_n_m_pattern(pattern: Pattern) -> None:
    w, _, H = _problem()
    masks = {"magnitude": sparsity.magnitude(w, pattern), "wanda": sparsity.wanda(w, H, pattern),
             "sparsegpt": sparsity.sparsegpt(w, H, pattern).mask}
    for name, mask in masks.items():
        groups = mask.reshape(w.shape[0], -1, pattern.m)
        assert (groups.sum(-1) == pattern.m - pattern.n).all(), name
    found = sparsity.sparsegpt(w, H, pattern)
    assert torch.equal(found.weight == 0, found.mask) or bool((found.weight[found.mask] == 0).all())


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_a_ratio_is_exact_per_row_layer_or_block(ratio: float) -> None:
    w, _, H = _problem()
    n, k = w.shape
    assert int(sparsity.magnitude(w, Pattern(ratio)).sum()) == round(ratio * n * k)
    assert (sparsity.wanda(w, H, Pattern(ratio)).sum(1) == round(ratio * k)).all()
    found = sparsity.sparsegpt(w, H, Pattern(ratio), block_size=32)
    for b in range(0, k, 32):  # per block of columns, over all rows
        assert int(found.mask[:, b:b + 32].sum()) == round(ratio * n * 32)
    assert sparsity.sparsity(found.weight) == pytest.approx(ratio, abs=1 / (n * 32))


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(n=2, m=4)])
def test_sparsegpt_beats_magnitude_and_wanda_and_refine_beats_sparsegpt(pattern: Pattern) -> None:
    w, x, H = _problem()
    magnitude = _error(w, w * ~sparsity.magnitude(w, pattern), x)
    wanda = _error(w, w * ~sparsity.wanda(w, H, pattern), x)
    found = sparsity.sparsegpt(w, H, pattern)
    sgpt = _error(w, found.weight, x)
    refined = sparsity.refine(w, found.weight, H, found.mask, steps=30)
    assert bool((refined[found.mask] == 0).all())
    assert sgpt < 0.9 * min(wanda, magnitude), (sgpt, wanda, magnitude)
    if pattern.ratio is not None:  # per row, weighed by ||x||: the loud channels keep their weights
        assert wanda < magnitude
    assert _error(w, refined, x) < 0.95 * sgpt


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(n=2, m=4)])
def test_reselect_exchanges_weights_where_the_error_falls_and_keeps_the_pattern(pattern: Pattern) -> None:
    w, x, H = _problem()
    found = sparsity.sparsegpt(w, H, pattern, block_size=32)
    refined = sparsity.refine(w, found.weight, H, found.mask, steps=30)
    again, mask = sparsity.reselect(w, refined, H, found.mask, pattern, rounds=3, block_size=32)
    assert not torch.equal(mask, found.mask) and bool((again[mask] == 0).all())
    assert _error(w, again, x) < 0.97 * _error(w, refined, x)
    if pattern.m is not None:
        assert (mask.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    else:
        for b in range(0, w.shape[1], 32):
            assert int(mask[:, b:b + 32].sum()) == round(0.5 * w.shape[0] * 32)


def test_refine_reaches_the_least_squares_optimum_of_each_row() -> None:
    w, x, H = _problem(n=6, k=16)
    mask = sparsity.magnitude(w, Pattern(0.5))
    refined = sparsity.refine(w, w * ~mask, H, mask, steps=40, damp=0.0, tol=0.0)
    for i in range(w.shape[0]):  # the kept columns S: x_S^+ x w_i, the exact least-squares fit
        keep = ~mask[i]
        best = torch.linalg.lstsq(x[:, keep].double(), (x.double() @ w[i].double())[:, None]).solution[:, 0]
        torch.testing.assert_close(refined[i, keep].double(), best, rtol=1e-3, atol=1e-3)


def test_refine_stops_when_a_step_wins_little_and_ends_near_the_optimum() -> None:
    w, x, H = _problem()
    found = sparsity.sparsegpt(w, H, Pattern(0.5))
    early = sparsity.refine(w, found.weight, H, found.mask, steps=200, tol=1e-3)
    taken = next(n for n in range(1, 201)  # the same steps without the stop: where it stopped
                 if torch.equal(sparsity.refine(w, found.weight, H, found.mask, steps=n, tol=0.0), early))
    best = _error(w, sparsity.refine(w, found.weight, H, found.mask, steps=200, tol=0.0), x)
    assert taken < 50 and _error(w, early, x) < 1.01 * best and bool((early[found.mask] == 0).all())


def test_gptq_with_a_mask_keeps_the_zeros() -> None:
    from graphpress.quant.gptq import gptq_quantize

    w, x, H = _problem()
    mask = sparsity.wanda(w, H, Pattern(n=2, m=4))
    with pytest.raises(ValueError, match="mask is"):
        gptq_quantize(w, H, QuantSpec(4, 32, False), mask=mask[:, :8])
    for act_order in (False, True):
        q = gptq_quantize(w * ~mask, H, QuantSpec(4, 32, False), mask=mask, act_order=act_order).dequantize()
        assert bool((q[mask] == 0).all())
    unmasked = gptq_quantize(w * ~mask, H, QuantSpec(4, 32, False)).dequantize()
    assert not bool((unmasked[mask] == 0).all())  # without it, GPTQ's updates fill the zeros in
    pruned = sparsity.sparsegpt(w, H, Pattern(n=2, m=4))
    spec = QuantSpec(4, 32, False)
    rounded = quantize_rtn(pruned.weight, spec).dequantize()  # rounding after pruning, uncompensated
    assert bool((rounded[pruned.mask] == 0).all())  # round to nearest keeps an exact zero
    gptq = gptq_quantize(pruned.weight, H, spec, mask=pruned.mask).dequantize()
    assert _has_pattern(gptq == 0, Pattern(n=2, m=4))
    assert _error(w, gptq, x) < 0.97 * _error(w, rounded, x)


def test_saliency_is_the_error_of_pruning_one_weight_with_its_row_compensating() -> None:
    w, x, H = _problem(n=3, k=12)
    inv_diag = sparsity.inverse_diagonal(H, damp=0.0)
    s = sparsity.saliency(w, inv_diag)
    for i, j in ((0, 0), (1, 5), (2, 11)):  # the kept weights of row i refit by least squares without w_ij
        keep = torch.ones(w.shape[1], dtype=torch.bool)
        keep[j] = False
        target = x.double() @ w[i].double()
        fit = torch.linalg.lstsq(x[:, keep].double(), target[:, None]).solution[:, 0]
        err = float(((x[:, keep].double() @ fit - target) ** 2).sum()) * 2 / x.shape[0]
        assert float(s[i, j]) == pytest.approx(err, rel=1e-3)
    fisher = torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(sparsity.saliency(w, inv_diag, fisher), s * fisher[:, None])


def test_allocated_ratios_take_the_least_salient_weights_of_all_layers_within_bounds() -> None:
    g = torch.Generator().manual_seed(1)
    saliencies = {"loud": torch.rand(40, 50, generator=g) * 10, "quiet": torch.rand(30, 50, generator=g),
                  "mid": torch.rand(20, 50, generator=g) * 3}
    r = sparsity.allocate_ratios(saliencies, 0.5, 0.1)
    total = sum(r[k] * s.numel() for k, s in saliencies.items())
    assert total == pytest.approx(0.5 * sum(s.numel() for s in saliencies.values()), abs=1)
    assert all(0.4 <= v <= 0.6 for v in r.values())
    assert r["quiet"] == pytest.approx(0.6) and r["loud"] < r["mid"] < r["quiet"]


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("levels", [0, 2, 7])  # continuous scores; a few distinct values (many ties)
def test_lowest_takes_exactly_the_lowest_scores_ties_included(per_row: bool, levels: int) -> None:
    scores = torch.rand(9, 40, generator=torch.Generator().manual_seed(levels))
    if levels:
        scores = (scores * levels).floor()
    mask = sparsity.lowest(scores, Pattern(0.45), per_row=per_row)
    for got, s in zip(mask, scores, strict=True) if per_row else [(mask.reshape(-1), scores.reshape(-1))]:
        count = round(0.45 * s.numel())
        assert int(got.sum()) == count
        assert torch.equal(s[got].sort().values, s.sort().values[:count])  # the lowest values, whichever ties


@pytest.mark.parametrize("levels", [0, 3, 40])  # continuous values; a few distinct values (ties at both ends)
@pytest.mark.parametrize(("lo", "hi"), [(0, 500), (120, 380), (499, 500), (250, 250), (7, 8)])
def test_ranked_window_holds_the_sorted_window_values(levels: int, lo: int, hi: int) -> None:
    x = torch.rand(500, generator=torch.Generator().manual_seed(levels + lo))
    if levels:
        x = (x * levels).floor()
    got = sparsity.ranked_window(x, lo, hi)
    assert torch.equal(got.sort().values, x.sort().values[lo:hi])


def test_owl_ratios_stay_in_bounds_and_average_to_the_ratio() -> None:
    outliers = torch.tensor([0.01, 0.03, 0.02, 0.08])
    counts = torch.tensor([100, 100, 200, 100])
    r = sparsity.owl_ratios(outliers, counts, 0.5, 0.08)
    assert float((r * counts).sum() / counts.sum()) == pytest.approx(0.5, abs=1e-9)
    assert float(r.min()) >= 0.42 - 1e-9 and float(r.max()) <= 0.58 + 1e-9
    assert int(r.argmin()) == 3 and int(r.argmax()) == 0  # most outliers: fewest zeros
    assert torch.equal(sparsity.owl_ratios(torch.full((3,), 0.02), torch.ones(3), 0.5, 0.08),
                       torch.full((3,), 0.5, dtype=torch.float64))
    scores = torch.cat([torch.ones(98), torch.full((2,), 100.0)])
    assert float(sparsity.outlier_ratios([scores], 5.0)[0]) == pytest.approx(0.02)


def test_refusals() -> None:
    w, _, H = _problem(k=66)
    with pytest.raises(ValueError, match=r"ratio of zeros must be in \(0, 1\)"):
        Pattern(1.0)
    with pytest.raises(ValueError, match="0 < N < M"):
        Pattern(n=4, m=4)
    with pytest.raises(ValueError, match="like '2:4'"):
        Pattern.parse(None, "2-4")
    with pytest.raises(ValueError, match="not both"):
        Pattern.parse(0.5, "2:4")
    with pytest.raises(ValueError, match="66 input features, not divisible by M = 4"):
        sparsity.sparsegpt(w, H, Pattern(n=2, m=4))
    with pytest.raises(ValueError, match="not divisible"):
        sparsity.wanda(w, H, Pattern(n=2, m=4))
    with pytest.raises(ValueError, match="NaN or inf"):
        sparsity.sparsegpt(w, H * float("nan"), Pattern(0.5))
