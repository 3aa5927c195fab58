"""Sparsify: zero individual weights of the selected linears (graphpress.sparsity), the shapes unchanged.

    linear(x, W, b)  =>  linear(x, W_hat, b)                        W_hat zero where the mask says
    linear(x, W, b)  =>  quantized_linear(x, codes, scales, ...)    with ``bits``: SparseGPT then GPTQ, one sweep

``method``: ``sparsegpt`` (pruned weights' error compensated by the others, from X^T X; then, with ``refine``, the kept
weights solved to the least-squares optimum on SparseGPT's mask, and ``swaps`` rounds of exchanging pruned and
kept weights where that lowers the output error), ``wanda`` (|w| ||x||,
no update) or ``magnitude`` (|w|, no calibration). The amount: ``ratio`` (the share of zeros) or ``pattern``
('2:4': N kept of every M consecutive input weights). ``owl`` (OWL, arXiv:2310.05175): each block's ratio in
[ratio - owl, ratio + owl], fewer zeros where the block's Wanda scores have more outliers, the mean over the
selected weights still ``ratio``; measured from the first ``owl_batches`` batches of the original program.
``allocate``: a ratio per layer within ``ratio`` +/- ``allocate``, the least salient weights of all layers first
(OBS saliency weighted by the next-token loss's diagonal Fisher on each output, as factorize's allocation):
SmolLM2 at 50 %, 41-59 %: 20.29 perplexity against 21.54 with one ratio (BENCHMARKS.md, issue 13).

Calibration streams block by block (graphpress.statistics); with ``sequential`` (default) each block is pruned
on the inputs the pruned earlier blocks give, as SparseGPT's reference does.

The program records which weights are sparse (``gm.meta[KEY]``: weight -> pattern): later passes keep the
zeros (gptq quantizes with them as a mask; round to nearest and AWQ / SmoothQuant scaling keep an exact zero).
Refused: a ratio outside (0, 1), N >= M, a layer whose input width M does not divide, ``bits`` with a method
other than sparsegpt, ``owl`` with a pattern.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress import graph, sparsity
from graphpress.calibration import Part, block_name, stack_batches
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.passes.weight_only import replace_linear, selected_linears
from graphpress.quant.gptq import gptq_quantize
from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.statistics import (
    GroupStats,
    Request,
    groups_by_input,
    output_fisher,
    spread,
    stream_statistics,
)

log = logging.getLogger(__name__)

KEY = "graphpress.sparsity"


def sparse_weights(gm: fx.GraphModule) -> dict[str, str]:
    """The weights a sparsify pass zeroed, and their patterns (empty for a dense program)."""
    return gm.meta.get(KEY, {})


@dataclass(frozen=True)
class Sparsify(Selection, Pass):
    """Sparsify the selected linears (see the module docstring)."""

    name: ClassVar[str] = "sparsify"
    exact: ClassVar[bool] = False
    method: str = "sparsegpt"
    ratio: float | None = None
    pattern: str | None = None
    damp: float = 0.01  # sparsegpt: H + damp * mean diag(H) I
    block_size: int = 128  # sparsegpt: columns updated together; a ratio's mask is chosen per block
    # sparsegpt: at most this many conjugate-gradient steps to the least-squares optimum of the kept weights on
    # SparseGPT's mask (graphpress.sparsity.refine, which stops where a step wins < 1 % of what it has won);
    # 0: SparseGPT's own update
    refine: int = 30
    # sparsegpt with refine: rounds of exchanging pruned and kept weights where the output error falls
    # (graphpress.sparsity.reselect), each refit with 10 steps, then ``refine`` steps more
    swaps: int = 3
    sequential: bool = True
    max_batches: int = 0  # calibration batches used (0: all), spread over them
    owl: float = 0.0  # OWL's spread of per-block ratios; 0: the same ratio everywhere
    owl_threshold: float = 5.0  # a Wanda score above this many times its block's mean is an outlier
    owl_batches: int = 2
    # a ratio per layer in [ratio - allocate, ratio + allocate] (the total still ``ratio``), from each weight's
    # OBS saliency weighted by the next-token loss's sensitivity to its output (a diagonal Fisher): the least
    # salient weights of all layers go first. Language models; others keep one ratio (reported)
    allocate: float = 0.0
    allocate_batches: int = 2
    bits: int | None = None  # sparsegpt: GPTQ of the kept weights, with the mask, on the same statistics
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in sparsity.METHODS:
            raise ValueError(f"sparsify: method must be one of {', '.join(sparsity.METHODS)}, not {self.method!r}")
        pattern = self.parsed  # validates ratio / pattern
        if self.bits is not None:
            if self.method != "sparsegpt":
                raise ValueError(f"sparsify: bits quantizes in SparseGPT's sweep: not with method {self.method} "
                                 "(sparsify, then run gptq: it keeps the zeros)")
            QuantSpec(self.bits, self.group_size, self.symmetric)
        if self.owl and self.allocate:
            raise ValueError("sparsify: owl and allocate both choose ratios per layer: give one")
        if self.allocate and (pattern.ratio is None or not 0 < self.allocate < min(pattern.ratio, 1 - pattern.ratio)):
            raise ValueError(f"sparsify: allocate {self.allocate} spreads a ratio (not a pattern) within (0, 1)")
        if self.owl:
            if pattern.ratio is None:
                raise ValueError("sparsify: owl varies a ratio per block; a pattern like 2:4 is the same in every "
                                 "layer")
            if not 0 < self.owl < min(pattern.ratio, 1 - pattern.ratio):
                raise ValueError(f"sparsify: owl {self.owl} must be above 0 and keep every ratio in (0, 1)")
        if not 0 <= self.damp < 1:
            raise ValueError(f"sparsify: damp must be in [0, 1), not {self.damp}")

    @property
    def parsed(self) -> sparsity.Pattern:
        return sparsity.Pattern.parse(self.ratio, self.pattern)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method != "magnitude"

    @property
    def spec(self) -> QuantSpec | None:
        return None if self.bits is None else QuantSpec(self.bits, self.group_size, self.symmetric)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes, skipped = selected_linears(gm, self, self.name)
        if not nodes:
            why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
            raise PassError(f"sparsify: no selected linear to sparsify ({why}); layers that are matmuls (GPT-2's "
                            "Conv1D) become linears with linearize_matmuls before")
        base = self.parsed
        by_target = {n.args[1].target: n for n in nodes}
        weights = {t: graph.get_tensor(gm, n.args[1]) for t, n in by_target.items()}
        for t, w in weights.items():
            try:
                base.check(w.shape[1], graph.module_name(t))
            except ValueError as e:
                raise PassError(str(e)) from e
        if self.method != "magnitude" and not ctx.calibration:
            raise PassError(f"sparsify: method {self.method} needs calibration data: set `calibration:` in the "
                            "recipe, or use method magnitude")
        ratios = self._owl(gm, ctx, by_target) if self.owl else self._allocate(gm, ctx, by_target) if (
            self.allocate) else {}
        patterns = {t: sparsity.Pattern(ratio=ratios[t]) if t in ratios else base for t in weights}
        quantized: dict[str, QuantizedWeight] = {}
        if self.method == "magnitude":
            for t, w in weights.items():
                with torch.no_grad():
                    w.masked_fill_(sparsity.magnitude(w.detach(), patterns[t]), 0)
            done = set(weights)
        else:
            done = self._stream(gm, ctx, weights, patterns, quantized)
        missing = [graph.module_name(t) for t in weights if t not in done]
        if missing:
            raise PassError(f"sparsify: {missing[0]} got no calibration statistics (the stream only reaches "
                            "linears inside repeated blocks): leave it out with `ignore:` or use method magnitude")
        zeros = sum(int((q.dequantize() == 0).sum()) if t in quantized else int((w == 0).sum())
                    for t, w in weights.items() for q in [quantized.get(t)])
        total = sum(w.numel() for w in weights.values())
        for t, q in quantized.items():
            replace_linear(gm, by_target[t], q)
        graph.cleanup(gm)
        gm.meta[KEY] = {**sparse_weights(gm), **{t: str(patterns[t]) for t in weights if t not in quantized}}
        stats = {"sparsified": len(done), "pattern": str(base), "zeros": round(zeros / max(total, 1), 4),
                 "skipped": skipped}
        if ratios and self.owl:
            stats["block_ratios"] = {block_name(by_target[t]) or graph.module_name(t): round(r, 4)
                                     for t, r in ratios.items()}
        elif ratios:
            stats["layer_ratios"] = {graph.module_name(t): round(r, 4) for t, r in ratios.items()}
        if self.allocate:
            stats["weighed"] = "by the next-token loss's Fisher" if ratios else "no (not a language model)"
        if quantized:
            stats["quantized"] = len(quantized)
        return PassResult(gm, True, stats)

    def _stream(self, gm: fx.GraphModule, ctx: PassContext, weights: dict[str, torch.Tensor],
                patterns: dict[str, sparsity.Pattern], quantized: dict[str, QuantizedWeight]) -> set[str]:
        """Prune (wanda, sparsegpt) block by block on the calibration stream; the weights pruned in place."""
        groups = groups_by_input(gm, set(weights))
        done: set[str] = set()

        def on_stats(part: Part, got: dict[str, GroupStats]) -> None:
            for group in groups:
                if group.lead not in got:
                    continue
                H = got[group.lead].inputs.hessian()  # [K, K] float64, shared by the group's members
                for t in group.weights:
                    w = weights[t]
                    if self.method == "wanda":
                        new = w.detach().masked_fill(sparsity.wanda(w.detach(), H, patterns[t]), 0)
                    else:
                        new = self._sparsegpt(w.detach().float(), H, patterns[t], t, quantized)
                    with torch.no_grad():
                        w.copy_(new.to(w.dtype))
                    done.add(t)
            log.info("sparsify: %s (%d groups)", part.name, len(got))

        batches = spread(ctx.calibration, self.max_batches)
        stream_statistics(gm, stack_batches(gm, batches, 2), groups, Request(xtx=True), on_stats,
                          rerun=self.sequential)
        return done

    def _sparsegpt(self, w: torch.Tensor, H: torch.Tensor, pattern: sparsity.Pattern, target: str,
                   quantized: dict[str, QuantizedWeight]) -> torch.Tensor:
        """SparseGPT of one weight (then its refinement, and GPTQ with its mask for ``bits``, all on one H);
        the new float values."""
        found = sparsity.sparsegpt(w, H, pattern, damp=self.damp, block_size=self.block_size)
        new = found.weight
        mask = found.mask
        if self.refine:
            new = sparsity.refine(w, new, H, mask, self.refine, self.damp)
            if self.swaps:
                new, mask = sparsity.reselect(w, new, H, mask, pattern, self.swaps, damp=self.damp,
                                              block_size=self.block_size)
                new = sparsity.refine(w, new, H, mask, self.refine, self.damp)
        if self.spec is not None:
            q = gptq_quantize(new, H, self.spec, damp=self.damp, block_size=self.block_size, mask=mask)
            quantized[target] = q
            new = q.dequantize()
        return new

    def _allocate(self, gm: fx.GraphModule, ctx: PassContext, by_target: dict[str, fx.Node]) -> dict[str, float]:
        """Each selected weight's ratio from Fisher-weighted OBS saliencies on the original program ({} when it
        is not a language model)."""
        batches = spread(ctx.calibration, self.allocate_batches)
        fisher = output_fisher(gm, list(by_target.values()), batches)
        if fisher is None:
            log.info("sparsify: %s is not a language model: one ratio for every layer", ctx.program.name)
            return {}
        groups = groups_by_input(gm, set(by_target))
        found: dict[str, torch.Tensor] = {}

        def on_stats(part: Part, got: dict[str, GroupStats]) -> None:
            for group in groups:
                if group.lead in got:
                    inv_diag = sparsity.inverse_diagonal(got[group.lead].inputs.hessian(), self.damp)
                    for t in group.weights:
                        w = graph.get_tensor(gm, by_target[t].args[1]).detach()
                        found[t] = sparsity.saliency(w, inv_diag, fisher[by_target[t]])

        stream_statistics(gm, stack_batches(gm, batches, 2), groups, Request(xtx=True), on_stats)
        return sparsity.allocate_ratios(found, float(self.ratio), self.allocate)

    def _owl(self, gm: fx.GraphModule, ctx: PassContext, by_target: dict[str, fx.Node]) -> dict[str, float]:
        """Each selected weight's ratio: its block's OWL ratio, from the original program's Wanda scores."""
        groups = groups_by_input(gm, set(by_target))
        outliers: dict[str, tuple[float, int]] = {}  # part -> (outlier share, weights)
        part_of: dict[str, str] = {}

        def on_stats(part: Part, got: dict[str, GroupStats]) -> None:
            scores = []
            for group in groups:
                if group.lead in got:
                    norms = torch.diagonal(got[group.lead].inputs.xtx).clamp(min=0).sqrt().float()  # ||x_j||
                    for t in group.weights:
                        scores.append((graph.get_tensor(gm, by_target[t].args[1]).detach().abs().float()
                                       * norms).reshape(-1))
                        part_of[t] = part.name
            flat = torch.cat(scores)
            outliers[part.name] = (float(sparsity.outlier_ratios([flat], self.owl_threshold)[0]), flat.numel())

        stream_statistics(gm, stack_batches(gm, spread(ctx.calibration, self.owl_batches), 2), groups,
                          Request(xtx=True), on_stats)
        names = list(outliers)
        ratios = sparsity.owl_ratios(torch.tensor([outliers[p][0] for p in names]),
                                     torch.tensor([outliers[p][1] for p in names]), float(self.ratio), self.owl)
        by_part = dict(zip(names, ratios.tolist(), strict=True))
        return {t: by_part[p] for t, p in part_of.items()}


__all__ = ["KEY", "Sparsify", "sparse_weights"]
