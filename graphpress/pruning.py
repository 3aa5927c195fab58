"""Which structured units to remove, and how to correct what stays: pure math on tensors.

A consumer linear y = W x reads units (an MLP neuron: one column of W; an attention head: its D columns).
With H = X^T X over calibration rows (graphpress.statistics), removing the units U and refitting the kept
columns by least squares is

    W'_K = W H[:, K] H[K, K]^-1  =  W_K + W_U H[U, K] H[K, K]^-1      (K kept, U removed; W'_U = 0)

and the output error of removing one unit u from the current W, with the others refit (optimal brain
surgeon on a block of columns), is

    err(u) = tr( W_u [H^-1]_uu^-1 W_u^T ),   then   W -= W_u [H^-1]_uu^-1 [H^-1]_u,:   and
    H^-1 -= [H^-1]_:,u [H^-1]_uu^-1 [H^-1]_u,:

``select(... method="obs")`` removes units greedily by that error, updating W and H^-1 after each (the
structured OBS of ZipLM / SparseGPT for whole columns). The other importances rank units once:

    activation   mean |x_j| over calibration tokens (Minitron), a head by the root of its columns' x^2 sums
    magnitude    ||W_:,j||, a head by its columns' norm
    taylor       first-order Taylor (given: the caller sums |w * dL/dw| over every weight a unit owns)

Quotas: ``groups[u]`` names the group of unit u and ``quota[g]`` how many of its units go (query heads of one
key/value group removed evenly). Everything runs in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

METHODS = ("obs", "activation", "magnitude", "taylor")


def _damped_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += torch.eye(H.shape[0], dtype=H.dtype) * damp * torch.diag(H).mean()
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def scores(method: str, W: torch.Tensor, units: Sequence[torch.Tensor], mean_abs: torch.Tensor | None = None,
           H: torch.Tensor | None = None) -> torch.Tensor:
    """One score per unit (higher = more important) for the one-shot importances."""
    if method == "activation":
        if H is not None:
            d = torch.diag(H.double()).clamp_min(0)
            return torch.stack([d[u].sum().sqrt() for u in units])
        if mean_abs is None:
            raise ValueError("activation importance needs activation statistics")
        return torch.stack([mean_abs.double()[u].sum() for u in units])
    if method == "magnitude":
        Wd = W.double()
        return torch.stack([Wd[:, u].norm() for u in units])
    raise ValueError(f"unknown importance {method!r} (one of {', '.join(METHODS)})")


def refit(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Least squares: the kept columns [N, |K|] that best reproduce W x from x_K, damped towards W_K:

        W'_K = W_K + W_U H_UK (H_KK + lambda I)^-1      (lambda = damp * mean diag H_KK; lambda = 0: exact LS)
    """
    Hd, Wd = H.double(), W.double()
    HKK = Hd[keep][:, keep].clone()
    HKK += torch.eye(HKK.shape[0], dtype=HKK.dtype) * damp * torch.diag(HKK).mean().clamp_min(1e-12)
    drop = ~keep
    rhs = Wd[:, drop] @ Hd[drop][:, keep]  # [N, |K|]
    return Wd[:, keep] + torch.linalg.solve(HKK, rhs.T).T


def select(W: torch.Tensor, units: Sequence[torch.Tensor], quota: dict[int, int], groups: Sequence[int],
           method: str = "obs", H: torch.Tensor | None = None, mean_abs: torch.Tensor | None = None,
           correct: bool = True, damp: float = 0.01, given: torch.Tensor | None = None
           ) -> tuple[list[int], torch.Tensor]:
    """Remove ``quota[g]`` units of each group g from the consumer weight W [N, K] (``given``: one score per
    unit, for "taylor").

    Returns the removed units' indices (into ``units``) and the new full-width W [N, K] with the removed
    columns zero and, with ``correct`` (always for "obs"), the kept ones refit to H.
    """
    if method not in METHODS:
        raise ValueError(f"unknown importance {method!r} (one of {', '.join(METHODS)})")
    left = dict(quota)
    for g, n in left.items():
        have = sum(1 for x in groups if x == g)
        if n > have:
            raise ValueError(f"cannot remove {n} of the {have} units of group {g}")
    if method == "obs":
        if H is None:
            raise ValueError("obs importance needs X^T X of the consumer's input")
        return _obs(W, units, left, groups, H, damp)
    if method == "taylor" and (given is None or len(given) != len(units)):
        raise ValueError("taylor importance needs one given score per unit")
    s = given if method == "taylor" else scores(method, W, units, mean_abs=mean_abs, H=H)
    removed: list[int] = []
    for u in torch.argsort(s).tolist():  # least important first
        if left.get(groups[u], 0) > 0:
            removed.append(u)
            left[groups[u]] -= 1
    gone = torch.cat([units[u] for u in removed]) if removed else torch.empty(0, dtype=torch.long)
    keep = torch.ones(W.shape[1], dtype=torch.bool)
    keep[gone] = False
    new = W.double().clone()
    if correct and removed:
        if H is None:
            raise ValueError("the least-squares correction needs X^T X of the consumer's input")
        new[:, keep] = refit(W, H, keep, damp)
    new[:, ~keep] = 0
    return sorted(removed), new.to(W.dtype)


def _obs(W: torch.Tensor, units: Sequence[torch.Tensor], left: dict[int, int], groups: Sequence[int],
         H: torch.Tensor, damp: float) -> tuple[list[int], torch.Tensor]:
    Wd = W.double().clone()
    Hinv = _damped_inverse(H, damp)
    alive = set(range(len(units)))
    removed: list[int] = []
    single = all(len(u) == 1 for u in units)
    cols = torch.cat(list(units)) if single else None
    while any(v > 0 for v in left.values()):
        candidates = [u for u in alive if left.get(groups[u], 0) > 0]
        if single:
            idx = cols[candidates]
            err = (Wd[:, idx] ** 2).sum(0) / torch.diag(Hinv)[idx]
            best = candidates[int(torch.argmin(err))]
        else:
            best, best_err = -1, float("inf")
            for u in candidates:
                idx = units[u]
                Wu = Wd[:, idx]
                e = float(torch.trace(Wu @ torch.linalg.solve(Hinv[idx][:, idx], Wu.T)))
                if e < best_err:
                    best, best_err = u, e
        idx = units[best]
        block_inv = torch.linalg.inv(Hinv[idx][:, idx])  # [u, u]
        Wd -= Wd[:, idx] @ block_inv @ Hinv[idx, :]
        Hinv -= Hinv[:, idx] @ block_inv @ Hinv[idx, :]
        Wd[:, idx] = 0
        alive.discard(best)
        removed.append(best)
        left[groups[best]] -= 1
    for u in removed:  # later updates leave rounding residue in removed columns
        Wd[:, units[u]] = 0
    return sorted(removed), Wd.to(W.dtype)
