"""graphpress.lowrank against dense references: the whitened truncation error is the output error on the
calibration rows, whitening survives singular statistics, the update lowers the error, refusals."""

from __future__ import annotations

import pytest
import torch

from graphpress import lowrank


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # one per test: xdist runs them in any order


def _problem(m: int = 24, n: int = 32, rows: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs with a few loud channels (as an LLM's activations are)."""
    G = _gen()
    W = torch.randn(m, n, generator=G, dtype=torch.float64)
    mix = torch.randn(n, n, generator=G, dtype=torch.float64) / n ** 0.5
    X = torch.randn(rows, n, generator=G, dtype=torch.float64) @ mix
    X[:, :3] *= 20
    return W, X, X.T @ X


def test_break_even() -> None:
    r = lowrank.break_even(576, 1536)
    assert r * (576 + 1536) < 576 * 1536 <= (r + 1) * (576 + 1536)


def test_plain_is_exact_on_a_low_rank_weight() -> None:
    G = _gen()
    W = torch.randn(20, 4, generator=G, dtype=torch.float64) @ torch.randn(4, 30, generator=G, dtype=torch.float64)
    A, B = lowrank.plain(W, 4)
    assert A.shape == (20, 4) and B.shape == (4, 30)
    torch.testing.assert_close(A @ B, W)


@pytest.mark.parametrize("r", [1, 5, 12])
def test_whitened_truncation_error_is_the_output_error(r: int) -> None:
    W, X, H = _problem()
    A, B = lowrank.whitened(W, H, r)
    dense = float(((X @ W.T - X @ B.T @ A.T) ** 2).sum())
    assert lowrank.output_error(W, A, B, H) == pytest.approx(dense, rel=1e-9)
    assert float(lowrank.tail_errors(W, H)[r]) == pytest.approx(dense, rel=1e-8)


def test_whitened_beats_plain_and_asvd_on_the_output_error() -> None:
    W, X, H = _problem()
    errors = {name: lowrank.output_error(W, *f, H) for name, f in {
        "plain": lowrank.plain(W, 8), "asvd": lowrank.asvd(W, X.abs().mean(0), 8),
        "whitened": lowrank.whitened(W, H, 8)}.items()}
    assert errors["whitened"] < errors["asvd"] < errors["plain"], errors


def test_whitening_survives_singular_statistics() -> None:
    W, X, _ = _problem(rows=10)  # 10 rows, 32 channels: X^T X has rank 10
    H = X.T @ X
    H[5, :] = H[:, 5] = 0  # and a dead channel
    S, S_inv = lowrank.whitening(H)
    torch.testing.assert_close(S @ S_inv, torch.eye(32, dtype=torch.float64), atol=1e-6, rtol=0)
    A, B = lowrank.whitened(W, H, 6)
    assert torch.isfinite(A @ B).all()
    assert lowrank.output_error(W, A, B, H) <= lowrank.output_error(W, *lowrank.plain(W, 6), H) * (1 + 1e-9)


def test_update_lowers_the_error_on_other_rows() -> None:
    W, X, H = _problem()
    A, B = lowrank.whitened(W, H, 6)
    X2 = X + 0.5 * torch.randn(X.shape, generator=_gen(1), dtype=torch.float64)  # what a compressed model gives
    H2 = X2.T @ X2
    before = lowrank.output_error(W, A, B, H2)
    A2, B2 = lowrank.update(W, A, B, H2)
    assert lowrank.output_error(W, A2, B2, H2) < 0.995 * before  # whitened A B was optimal for H, not H2


def test_fisher_weighs_the_output_channels() -> None:
    W, X, H = _problem()
    fisher = 0.01 + torch.rand(24, generator=_gen(3), dtype=torch.float64) ** 4  # a few channels matter most

    def weighted(A: torch.Tensor, B: torch.Tensor) -> float:
        return float((fisher * ((X @ W.T - X @ B.T @ A.T) ** 2).sum(0)).sum())

    for r in (3, 10):
        A, B = lowrank.whitened(W, H, r, fisher=fisher)
        assert weighted(A, B) == pytest.approx(float(lowrank.tail_errors(W, H, fisher=fisher)[r]), rel=1e-8)
        assert weighted(A, B) < weighted(*lowrank.whitened(W, H, r))


@pytest.mark.parametrize("r", [0, 25, -1, True, 2.5])
def test_refuses_a_rank_outside_the_weight(r: object) -> None:
    W, _, H = _problem()
    with pytest.raises(ValueError, match=r"rank must be between 1 and 24 for a \[24, 32\] weight"):
        lowrank.whitened(W, H, r)  # type: ignore[arg-type]
