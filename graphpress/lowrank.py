"""Low-rank factorization of one linear: pure math on tensors (the pass is graphpress.passes.factorize).

A linear y = W x with W [m, n] becomes y = A (B x), A [m, r], B [r, n]: r (m + n) weights instead of m n, a
gain only while r < m n / (m + n) (``break_even``). With H = X^T X over calibration rows (graphpress.statistics),
the output error of a factorization on those rows is

    err(A, B) = || (W - A B) X^T ||_F^2 = tr( (W - A B) H (W - A B)^T )

    plain      truncated SVD of W: optimal for H = I only; an LLM's smallest singular values are not its least
               important directions, and it collapses
    asvd       SVD of W diag(s), s_j = mean |x_j|^alpha, then B diag(s)^-1 (ASVD: activation-aware scaling)
    whitened   H = S S^T (Cholesky; eigenvalues clamped when H is singular), SVD of W S = U Sigma V^T truncated
               to r, B = V_r^T S^-1: the rank-r minimizer of err (SVD-LLM), each dropped singular value costing
               exactly sigma_i^2 of output error on the calibration rows (``tail_errors``)
    update     A = W H' B^T (B H' B^T)^-1, then B = (A^T A)^-1 A^T W: least squares of each factor given the
               other, for rows H' other than the ones the factors were fitted to (later layers calibrated on
               the factorized earlier ones)

``white``: whitening(H, damp) when the caller has it (linears reading one input share it).
Factors are balanced (A = U_r Sigma_r^1/2, B = Sigma_r^1/2 V_r^T) so that both quantize alike. Everything runs
in float64 and returns float64; the caller casts.
"""

from __future__ import annotations

import torch

METHODS = ("plain", "asvd", "whitened")


def break_even(m: int, n: int) -> int:
    """The largest rank that still stores fewer weights than the dense [m, n] matrix."""
    return (m * n - 1) // (m + n)


def _check_rank(W: torch.Tensor, r: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"rank must be between 1 and {min(W.shape)} for a [{W.shape[0]}, {W.shape[1]}] weight, "
                         f"not {r!r}")


def _balanced(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    root = s[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r], s


def plain(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD: A [m, r], B [r, n] with A B the best rank-r approximation of W in Frobenius norm."""
    _check_rank(W, r)
    A, B, _ = _balanced(W.double(), r)
    return A, B


def asvd(W: torch.Tensor, mean_abs: torch.Tensor, r: int, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD: the SVD of W scaled by mean |x_j|^alpha per input channel, the scaling undone on B."""
    _check_rank(W, r)
    s = mean_abs.double().clamp_min(1e-8) ** alpha
    A, B, _ = _balanced(W.double() * s, r)
    return A, B / s


def whitening(H: torch.Tensor, damp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """S with H + lambda I = S S^T (lambda = damp * mean diag H) and S^-1.

    Cholesky when H is positive definite; otherwise (fewer calibration rows than channels, dead channels)
    from its eigendecomposition with eigenvalues clamped to 1e-8 of the largest, so that S is always invertible.
    """
    Hd = H.double()
    n = Hd.shape[0]
    scale = float(torch.diag(Hd).mean().clamp_min(1e-12))
    Hd = Hd + torch.eye(n, dtype=Hd.dtype) * damp * scale
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) == 0 and bool(torch.diag(L).min() > 1e-6 * scale ** 0.5):
        return L, torch.linalg.solve_triangular(L, torch.eye(n, dtype=Hd.dtype), upper=False)
    values, Q = torch.linalg.eigh((Hd + Hd.T) / 2)
    root = values.clamp_min(float(values.max()) * 1e-8).sqrt()
    return Q * root, Q.T / root[:, None]


def whitened(W: torch.Tensor, H: torch.Tensor, r: int, damp: float = 0.0, fisher: torch.Tensor | None = None,
             white: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM's truncation-aware whitening: the rank-r factors minimizing tr((W - A B) H (W - A B)^T).

    ``fisher`` [m]: a weight per output channel (the loss's sensitivity to it, statistics.output_fisher); the
    error is then sum_j fisher_j (its row's error), minimized by truncating diag(fisher)^1/2 W S instead."""
    _check_rank(W, r)
    S, S_inv = white or whitening(H, damp)
    WS = _weighted(W.double() @ S, fisher)
    A, B, _ = _balanced(WS, r)
    if fisher is not None:
        A = A / _row_scale(fisher)[:, None]
    return A, B @ S_inv


def _row_scale(fisher: torch.Tensor) -> torch.Tensor:
    """sqrt(fisher), a channel the loss never felt kept at a thousandth of the mean (so every row is fitted)."""
    f = fisher.double()
    return f.clamp_min(float(f.mean()) * 1e-3 + 1e-30).sqrt()


def _weighted(M: torch.Tensor, fisher: torch.Tensor | None) -> torch.Tensor:
    return M if fisher is None else _row_scale(fisher)[:, None] * M


def tail_errors(W: torch.Tensor, H: torch.Tensor, damp: float = 0.0, fisher: torch.Tensor | None = None,
                white: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """err of the whitened factorization at every rank: [k + 1] for k = min(m, n), entry r the sum of the
    squared singular values of W S beyond r (entry 0: the whole output energy, k: 0); with ``fisher``, the
    weighted error (``whitened``), in units of the loss when fisher is the loss's."""
    S, _ = white or whitening(H, damp)
    s = torch.linalg.svdvals(_weighted(W.double() @ S, fisher))
    tail = torch.cumsum((s ** 2).flip(0), 0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def output_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - A B) H (W - A B)^T): the squared output error on the rows H = X^T X sums."""
    D = W.double() - A.double() @ B.double()
    return float(torch.sum((D @ H.double()) * D))


def update(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor, damp: float = 1e-6
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares of A given B on H, then of B given the new A (each step lowers the output error on H)."""
    Wd, Bd, Hd = W.double(), B.double(), H.double()
    G = Bd @ Hd @ Bd.T
    G += torch.eye(G.shape[0], dtype=G.dtype) * damp * float(torch.diag(G).mean().clamp_min(1e-12))
    A_new = torch.linalg.solve(G, (Wd @ Hd @ Bd.T).T).T
    AtA = A_new.T @ A_new
    AtA += torch.eye(AtA.shape[0], dtype=AtA.dtype) * damp * float(torch.diag(AtA).mean().clamp_min(1e-12))
    B_new = torch.linalg.solve(AtA, A_new.T @ Wd)
    return A_new, B_new
