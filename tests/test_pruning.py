"""graphpress.pruning: which units go and how the kept columns are refit (pure math on tensors)."""

from __future__ import annotations

import pytest
import torch

from graphpress import pruning


def _problem(n: int = 24, k: int = 32, rows: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5
    x = torch.randn(rows, k, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    x[:, :4] *= 0.05  # a few quiet columns
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    return W, x


def _error(W: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ W.T - x @ new.T) ** 2).sum())


def test_refit_is_the_least_squares_solution() -> None:
    W, x = _problem()
    keep = torch.ones(W.shape[1], dtype=torch.bool)
    keep[::3] = False
    fitted = pruning.refit(W, x.T @ x, keep, damp=0)
    expected = torch.linalg.lstsq(x[:, keep], x @ W.T).solution.T
    torch.testing.assert_close(fitted, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", pruning.METHODS)
def test_select_removes_the_quota_and_zeroes_their_columns(method: str) -> None:
    W, x = _problem()
    units = [torch.tensor([j]) for j in range(W.shape[1])]
    given = torch.rand(len(units), generator=torch.Generator().manual_seed(1))  # taylor: the caller's scores
    removed, new = pruning.select(W, units, {0: 8}, [0] * len(units), method=method, H=x.T @ x,
                                  mean_abs=x.abs().mean(0), given=given)
    if method == "taylor":
        assert removed == sorted(torch.argsort(given)[:8].tolist())
    assert len(removed) == 8
    assert (new[:, removed] == 0).all() and (new[:, [j for j in range(32) if j not in removed]] != 0).any()


def test_second_order_selection_beats_one_shot_importance_with_refit() -> None:
    W, x = _problem()
    H = x.T @ x
    units = [torch.tensor([j]) for j in range(W.shape[1])]
    args = (W, units, {0: 12}, [0] * len(units))
    _, obs = pruning.select(*args, method="obs", H=H, damp=1e-6)
    _, act = pruning.select(*args, method="activation", H=H, correct=True, damp=1e-6)
    _, plain = pruning.select(*args, method="activation", H=H, correct=False)
    assert _error(W, obs, x) <= _error(W, act, x) * 1.0001 < _error(W, plain, x)


def test_quota_per_group_is_respected_for_blocks_of_columns() -> None:
    W, x = _problem(k=24)
    units = [torch.arange(h * 4, h * 4 + 4) for h in range(6)]  # six heads of four columns
    groups = [0, 0, 0, 1, 1, 1]  # two key/value groups
    for method in pruning.METHODS:
        removed, _ = pruning.select(W, units, {0: 1, 1: 2}, groups, method=method, H=x.T @ x,
                                    given=torch.arange(6.0).flip(0))  # taylor: the last heads least important
        assert sum(groups[u] == 0 for u in removed) == 1 and sum(groups[u] == 1 for u in removed) == 2


def test_refusals() -> None:
    W, x = _problem()
    units = [torch.tensor([j]) for j in range(W.shape[1])]
    with pytest.raises(ValueError, match="cannot remove 40"):
        pruning.select(W, units, {0: 40}, [0] * 32, H=x.T @ x)
    with pytest.raises(ValueError, match="unknown importance"):
        pruning.select(W, units, {0: 1}, [0] * 32, method="random")
    with pytest.raises(ValueError, match="taylor importance needs one given score per unit"):
        pruning.select(W, units, {0: 1}, [0] * 32, method="taylor")
    with pytest.raises(ValueError, match="needs X\\^T X"):
        pruning.select(W, units, {0: 1}, [0] * 32, method="obs")
