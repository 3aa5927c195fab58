"""Sparsity: which weights of a linear become zero, and how the others compensate (pure tensor math).

    w [N, K]  ->  w_hat [N, K], zero where mask [N, K] is True                       (lossy)

A ``Pattern`` is unstructured (``ratio``: the share of zeros) or N:M (``n`` of every ``m`` consecutive input
weights of a row stay nonzero: 2:4 is what sparse tensor cores run). Three ways to choose the zeros:

    magnitude   score |w_ij|, compared over the whole layer (N:M: within each group of m)
    wanda       score |w_ij| ||x_j||, compared within each output row (Sun et al., 2023, arXiv:2306.11695);
                ||x_j||^2 = T H_jj / 2 from the Hessian H = 2 X^T X / T; no weight update
    sparsegpt   the OBS saliency w_ij^2 / [H^-1]_jj, with the weights not yet visited updated to cancel each
                pruned weight's output error (Frantar & Alistarh, 2023, arXiv:2301.00774): GPTQ's column
                sweep (graphpress.quant.gptq) where a column's "rounding" zeroes its masked entries; the mask
                of each block of columns is chosen when the sweep reaches it, on the updated weights
    refine      the kept weights of a mask moved to the least-squares optimum of their support (conjugate
                gradients): on SmolLM2's layers, 22-42 % less output error than SparseGPT's greedy update

Every mask has exactly its pattern: N:M in every group of every row; a ratio rounds to whole weights per row
(wanda), per block of columns (sparsegpt) or per layer (magnitude).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from graphpress.quant.gptq import inverse_cholesky_upper
from graphpress.quant.qweight import check_weight

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Pattern:
    """``ratio`` of zeros (unstructured), or ``n`` kept of every ``m`` consecutive input weights."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.m is None):
            raise ValueError("sparsity: give a ratio of zeros (0.5) or an N:M pattern ('2:4'), one of them")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ValueError(f"sparsity: the ratio of zeros must be in (0, 1), not {self.ratio}")
        if self.m is not None and not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"sparsity: pattern {self.n}:{self.m} must keep N of M weights with 0 < N < M")

    @classmethod
    def parse(cls, ratio: float | None, pattern: str | None) -> Pattern:
        """From a recipe's ``ratio`` (0.5) or ``pattern`` ('2:4')."""
        if pattern is None:
            return cls(ratio=ratio)
        if ratio is not None:
            raise ValueError("sparsity: give ratio or pattern, not both")
        found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if not found:
            raise ValueError(f"sparsity: pattern must look like '2:4' (N kept of every M), not {pattern!r}")
        return cls(n=int(found[1]), m=int(found[2]))

    @property
    def zeros(self) -> float:
        """The share of zeros it leaves."""
        return self.ratio if self.ratio is not None else 1 - self.n / self.m  # type: ignore[operator]

    def check(self, in_features: int, what: str) -> None:
        if self.m is not None and in_features % self.m:
            raise ValueError(f"sparsity: {what} has {in_features} input features, not divisible by M = {self.m} "
                             f"of pattern {self}: leave it out (`ignore:`) or use a ratio")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m is not None else f"{self.ratio:g}"


def lowest(scores: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """The mask [N, K] (True: prune) of the lowest ``scores`` [N, K]: N:M within each group of m columns of
    a row; a ratio within each row (``per_row``) or over the whole tensor."""
    rows, k = scores.shape
    if pattern.m is not None:
        m = pattern.m
        groups = scores.reshape(rows, k // m, m)
        idx = groups.topk(m - pattern.n, dim=-1, largest=False).indices  # type: ignore[operator]
        mask = torch.zeros_like(groups, dtype=torch.bool)
        return mask.scatter_(-1, idx, True).reshape(rows, k)
    ratio = float(pattern.ratio)  # type: ignore[arg-type]
    if per_row:
        return _below_kth(scores, round(ratio * k))
    return _below_kth(scores.reshape(1, -1), round(ratio * scores.numel())).reshape(rows, k)


def _below_kth(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The mask [R, C] of the ``count`` lowest scores of each row: those below the row's count-th value, then
    as many of its ties as the count leaves, first ones first. A linear-time selection (kthvalue) where topk
    sorts: 2.5-4x faster on SmolLM2's [rows x 128] blocks."""
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(count, dim=1, keepdim=True).values
    below = scores < kth
    ties = scores == kth
    room = count - below.sum(1, keepdim=True)
    return below | (ties & (ties.cumsum(1) <= room))


def magnitude(w: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The mask of the smallest |w|, over the layer (N:M: per group)."""
    check_weight(w, "magnitude")
    pattern.check(w.shape[1], "the weight")
    return lowest(w.abs().float(), pattern, per_row=False)


def wanda(w: torch.Tensor, H: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Wanda's mask: the smallest |w_ij| ||x_j|| in each row; H [K, K] (or its diagonal [K]) ~ X^T X."""
    check_weight(w, "wanda")
    pattern.check(w.shape[1], "the weight")
    diag = H if H.dim() == 1 else torch.diagonal(H)
    if diag.shape[0] != w.shape[1]:
        raise ValueError(f"wanda: the statistics have {diag.shape[0]} features, the weight {w.shape[1]}")
    return lowest(w.abs().float() * diag.clamp(min=0).sqrt().float()[None], pattern)


@dataclass
class Sparse:
    """What sparsegpt returns: the new weight (float, exact zeros) and its mask."""

    weight: torch.Tensor  # [N, K] float32
    mask: torch.Tensor  # [N, K] bool, True where pruned


@torch.no_grad()
def sparsegpt(w: torch.Tensor, H: torch.Tensor, pattern: Pattern, *, damp: float = 0.01,
              block_size: int = 128) -> Sparse:
    """SparseGPT of w [N, K] given its input's Hessian H = 2 X^T X / T [K, K] (see the module docstring).

    Minimizes ||(W - W_hat) X^T||^2 greedily, column by column, as GPTQ does (U upper with U^T U = (H + lambda
    I)^-1, lambda = damp * mean diag(H)): a column's pruned entries leave the error e_j = (w_j - w_hat_j) /
    U_jj, which the later columns absorb: w_{j+1:} -= e_j U_{j, j+1:}. Masks: a ratio's, for each block of
    ``block_size`` columns over all rows, from w^2 / U_jj^2 when the sweep reaches the block; N:M's every m
    columns, per row.

    Quantization belongs after, with the mask (graphpress.quant.gptq.gptq_quantize(mask=)): rounding inside
    this sweep, as the paper's joint variant does, fixes each group's range before the compensation of the
    pruned weights moves the group's later columns out of it (SmolLM2 2:4 + 4 bit: 54.95 perplexity, against
    43.82 pruning, refining, then GPTQ with the mask on the same statistics; BENCHMARKS.md, issue 13).
    """
    check_weight(w, "sparsegpt")
    n, k = w.shape
    pattern.check(k, "the weight")
    if H.shape != (k, k):
        raise ValueError(f"sparsegpt: H is {tuple(H.shape)}, expected ({k}, {k}) for a weight {tuple(w.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("sparsegpt: H has NaN or inf entries; check the calibration activations")
    if not 0 <= damp < 1:
        raise ValueError(f"sparsegpt: damp must be in [0, 1), not {damp}")
    m = pattern.m or 0
    block_size = max(m, block_size // m * m) if m else block_size  # an N:M group lies inside one block

    Wt = w.float().T.clone()  # [K, N]: a column of W is a row here
    H = H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    Wt[dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(k, dtype=H.dtype, device=H.device)
    U = inverse_cholesky_upper(H, damp)  # [K, K]
    u_diag = torch.diagonal(U)

    Mt = torch.zeros(k, n, dtype=torch.bool, device=w.device)  # [K, N] True: pruned
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2].clone()  # [B, N]
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = u_diag[i1:i2, None].float()
        if pattern.ratio is not None:  # the block's mask over all rows at once
            Mt[i1:i2] = lowest((W1 ** 2 / d1 ** 2).reshape(1, -1), pattern, per_row=False).reshape(W1.shape)
        for i in range(i2 - i1):
            c = i1 + i
            if m and c % m == 0:  # the next m columns' N:M masks, per output row
                Mt[c:c + m] = lowest((W1[i:i + m] ** 2 / d1[i:i + m] ** 2).T, pattern).T
            e = E1[i]
            torch.mul(W1[i], Mt[c], out=e).div_(float(u_diag[c]))  # (w - w_hat) / U_cc
            W1[i].masked_fill_(Mt[c], 0)
            W1[i + 1:].addmm_(U1[i, i + 1:, None].float(), e[None], alpha=-1)
        Wt[i1:i2] = W1
        Wt[i2:].addmm_(U[i1:i2, i2:].T.float(), E1, alpha=-1)
    return Sparse(Wt.T.contiguous(), Mt.T.contiguous())


def sparsity(w: torch.Tensor) -> float:
    """The share of exact zeros in w."""
    return float((w == 0).sum()) / max(1, w.numel())


def outlier_ratios(scores: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """OWL's layerwise outlier ratio (Yin et al., 2023, arXiv:2310.05175): per entry of ``scores`` (one per
    block, its Wanda scores flattened together), the share of scores above ``threshold`` times their mean."""
    return torch.tensor([float((s > threshold * s.mean()).float().mean()) for s in scores])


def owl_ratios(outliers: torch.Tensor, weights: torch.Tensor, ratio: float, spread: float) -> torch.Tensor:
    """Per-block ratios of zeros in [ratio - spread, ratio + spread], linear in the outlier ratio: fewer zeros
    where more outliers, the block farthest from the (``weights``-weighted) mean at the bound, the mean weighted
    by each block's ``weights`` count exactly ``ratio``."""
    o = outliers.double()
    w = weights.double() / weights.double().sum()
    d = o - (o * w).sum()  # weighted mean 0
    if spread <= 0 or d.abs().max() == 0:
        return torch.full_like(o, ratio)
    return ratio - d * (spread / d.abs().max())  # the farthest block at ratio -/+ spread


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + lambda I in float64, lambda = damp * mean diag(H) (a new tensor: H is left as it was)."""
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    return Hd


@torch.no_grad()
def refine(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, steps: int,
           damp: float = 0.01, tol: float = 1e-2) -> torch.Tensor:
    """The kept weights of w_hat [N, K] moved towards the least-squares optimum for the fixed ``mask``:
    min ||(W - W_hat) X^T||^2 = tr((W - W_hat) H (W - W_hat)^T), W_hat zero on the mask, row by row, by
    at most ``steps`` of conjugate gradients (Jacobi-preconditioned, every row at once: one [N, K] x [K, K]
    product a step) from w_hat. SparseGPT's greedy sweep starts close; the exact optimum of the support it chose
    lies further down the same bowl. Stops once a step lowers the error by less than ``tol`` of what the steps
    before it won (0: every step). On 21 of SmolLM2's layers at 50 %: alone, 1e-2 takes 6-13 steps and ends
    within 1.3 % of the optimum's error, 1e-3 9-23 steps and 0.25 % (30 fixed steps: 0.05 %); after ``reselect``
    (sparsify's default) every layer ends within 0.1 % of what 30 fixed steps reach, a third faster."""
    Hf = damped(H, damp).float()
    keep = (~mask).float()
    inv_diag = 1 / torch.diagonal(Hf).clamp(min=1e-12)
    x = w_hat.float() * keep
    b = (w.float() @ Hf) * keep  # the optimum solves (x H)_S = (w H)_S on the kept support S
    r = b - (x @ Hf) * keep
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    won = 0.0  # the error the steps so far removed: a step removes alpha r^T z (twice the quadratic's fall)
    for _ in range(steps):
        Ap = (p @ Hf) * keep
        alpha = rz / (p * Ap).sum(1, keepdim=True).clamp(min=1e-30)
        x += alpha * p
        r -= alpha * Ap
        step = float((alpha * rz).sum())
        won += step
        if step <= tol * won:
            break
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + rz_new / rz.clamp(min=1e-30) * p
        rz = rz_new
    return x * keep


@torch.no_grad()
def reselect(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, pattern: Pattern,
             rounds: int, steps: int = 10, damp: float = 0.01, block_size: int = 128
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange pruned and kept weights where that lowers the output error: each round takes one Jacobi step
    of min tr((W - V) H (W - V)^T) from w_hat on every entry, pruned ones included (V = w_hat - (w_hat - W) H /
    diag(H)), chooses the mask again from V^2 diag(H) (what pruning one weight alone costs) with the same
    pattern (a ratio per block of ``block_size`` columns over all rows, as sparsegpt), and refines on it.
    On SmolLM2's layers, 3 rounds after SparseGPT and refine: 5-13 % less output error at 50 %, 3-5 % at 2:4.
    Returns (w_hat, mask)."""
    Hf = H.float()
    d = torch.diagonal(Hf).clamp(min=1e-12)
    k = w.shape[1]
    for _ in range(rounds):
        v = w_hat - ((w_hat - w.float()) @ Hf) / d
        score = v ** 2 * d
        if pattern.m is not None:
            mask = lowest(score, pattern)
        else:
            mask = torch.cat([lowest(score[:, b:b + block_size].reshape(1, -1), pattern, per_row=False).reshape(
                w.shape[0], -1) for b in range(0, k, block_size)], dim=1)
        w_hat = refine(w, v * ~mask, H, mask, steps, damp)
    return w_hat, mask


def inverse_diagonal(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """diag((H + lambda I)^-1) [K] float32, lambda = damp * mean diag(H): from the Cholesky factor's inverse
    (the sum of squares of each column of L^-1), without forming the inverse. Shared by the linears that read
    one input."""
    L = torch.linalg.cholesky(damped(H, damp))
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    return (torch.linalg.solve_triangular(L, eye, upper=False) ** 2).sum(0).float()


def saliency(w: torch.Tensor, inv_diag: torch.Tensor, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """OBS saliency [N, K] of every weight: the output error that pruning it alone leaves once the others of
    its row compensate, w_ij^2 / [H^-1]_jj (H = 2 X^T X / T, damped; ``inv_diag``: inverse_diagonal(H)), times
    ``fisher`` [N] (the next-token loss's sensitivity to output i) when given, so that saliencies of different
    layers compare in the loss's units."""
    s = w.float() ** 2 / inv_diag[None]
    return s if fisher is None else s * fisher.float()[:, None]


def ranked_window(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The values x.sort()[lo:hi] of a flat x, in no order: two linear-time selections (kthvalue) and a mask
    instead of a sort (8 s for SmolLM2's 106 M decoder weights on the 2-core machine), the ties at either end
    repeated as many times as the sorted window holds them."""
    if hi <= lo:
        return x[:0]
    first = x.kthvalue(lo + 1).values  # sorted[lo]
    last = x.kthvalue(hi).values  # sorted[hi - 1]
    if first == last:
        return first.expand(hi - lo).clone()
    inside = x[(x > first) & (x < last)]
    at_first = int((x <= first).sum()) - lo  # the copies of ``first`` at ranks lo, lo + 1, ...
    at_last = hi - int((x < last).sum())  # the copies of ``last`` up to rank hi - 1
    return torch.cat([first.expand(at_first), inside, last.expand(at_last)])


def allocate_ratios(saliencies: dict[str, torch.Tensor], ratio: float, spread: float) -> dict[str, float]:
    """Per-layer ratios of zeros in [ratio - spread, ratio + spread] with ``ratio`` of all weights zero: every
    layer prunes its (ratio - spread) least salient weights, and the rest of the budget goes to the least
    salient of all layers' next candidates (up to ratio + spread each). ``saliencies[k]``: any shape, one
    value per weight, comparable across layers (see ``saliency``)."""
    counts = {k: s.numel() for k, s in saliencies.items()}
    lo = {k: math.ceil((ratio - spread) * n) for k, n in counts.items()}
    hi = {k: math.floor((ratio + spread) * n) for k, n in counts.items()}
    budget = int(round(ratio * sum(counts.values()))) - sum(lo.values())
    candidates, owners = [], []
    for i, (k, s) in enumerate(saliencies.items()):
        part = ranked_window(s.reshape(-1).float(), lo[k], hi[k])
        candidates.append(part)
        owners.append(torch.full((part.numel(),), i, dtype=torch.int32))
    chosen = torch.cat(owners)[torch.cat(candidates).topk(max(budget, 0), largest=False).indices]
    extra = torch.bincount(chosen, minlength=len(saliencies)).tolist()
    return {k: (lo[k] + extra[i]) / counts[k] for i, k in enumerate(saliencies)}


__all__ = ["METHODS", "Pattern", "Sparse", "allocate_ratios", "damped", "inverse_diagonal", "lowest", "magnitude",
           "outlier_ratios", "owl_ratios", "ranked_window", "refine", "reselect", "saliency", "sparsegpt", "sparsity", "wanda"]
