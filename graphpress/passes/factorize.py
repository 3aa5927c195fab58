"""Low-rank factorization: one linear into two, ranks chosen under a budget.

    linear(x, W [m, n], b)   =>   linear(linear(x, B [r, n]), A [m, r], b)      W ~ A B   (graphpress.lowrank)

``method``: ``whitened`` (SVD-LLM: the factors minimize the output error on the calibration rows), ``asvd``
(activation-scaled SVD) or ``plain`` (truncated SVD, no calibration). The amount is one ``rank`` for every
selected linear, or a ``ratio`` of the selected linears' weights kept: the same fraction in every layer, or
with ``allocate`` split across layers (SVD-LLM V2's idea, in the loss's units): every next dimension goes to
the layer whose truncation error it lowers most per weight it costs, each error weighted per output channel by
the next-token loss's squared gradient there (a diagonal Fisher, statistics.output_fisher), so that one layer's
error compares with another's. Error weighted by output channel in the factorization itself: ``fisher``.
A program that is not a language model has no such loss: one fraction for all, unweighted, reported. A layer
whose rank would not store fewer weights than the dense matrix (r >= m n / (m + n)) stays dense and is reported.

Calibration: with ``sequential`` (default) the blocks are factorized in order, each on the inputs the
factorized earlier blocks give; ``sequential: false``: every statistic from the original program, one stream.
(Fitting the factors to the original program's outputs from the compressed inputs instead collapsed SmolLM2:
BENCHMARKS.md, issue 12.)
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress import graph, lowrank
from graphpress.calibration import Part, stack_batches
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection, check_amount
from graphpress.roles import linear_roles
from graphpress.statistics import (
    GroupStats,
    Request,
    groups_by_input,
    output_fisher,
    spread,
    stream_statistics,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class Factorize(Selection, Pass):
    """Factorize the selected linears (see the module docstring)."""

    name: ClassVar[str] = "factorize"
    exact: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True
    method: str = "whitened"  # graphpress.lowrank.METHODS
    ratio: float | None = None  # fraction of the selected linears' weights kept
    rank: int | None = None  # one rank for every selected linear
    allocate: bool = False  # split the ratio's budget across layers by their Fisher-weighted tail errors
    damp: float = 0.0  # whitening: H + damp * mean diag(H) I (singular H falls back to clamped eigenvalues)
    alpha: float = 0.5  # ASVD's exponent
    max_batches: int = 0  # calibration batches used (0: all), spread over them
    # batches for what only chooses the ranks and weighs (the Fisher's backward passes cost 3 forwards each)
    allocate_batches: int = 2
    sequential: bool = True  # each block factorized on the inputs of the factorized earlier blocks
    fisher: bool = False  # weigh each output channel by the next-token loss's sensitivity to it (whitened only)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount(self.name, self.ratio, "rank", self.rank, "dimensions", "fraction of the weights kept")
        if self.method not in lowrank.METHODS:
            raise ValueError(f"factorize: method must be one of {', '.join(lowrank.METHODS)}, not {self.method!r}")
        for key in ("fisher", "allocate"):
            if getattr(self, key) and self.method != "whitened":
                raise ValueError(f"factorize: {key} works on whitened factors: not with method {self.method}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"factorize: damp must be in [0, 1), not {self.damp}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        roles = linear_roles(gm)
        nodes, skipped = [], {}
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            w = node.args[1]
            if not (isinstance(w, fx.Node) and w.op == "get_attr") or not self.selects(
                    graph.module_name(w.target), roles.get(node)):
                continue
            if graph.is_shared(gm, w):
                skipped[graph.module_name(w.target)] = "its weight is shared (tied)"
                continue
            nodes.append(node)
        if not nodes:
            raise PassError("factorize: no selected linear to factorize")
        weights = {n: graph.get_tensor(gm, n.args[1]).detach() for n in nodes}
        for n, w in weights.items():
            if self.rank is not None and self.rank > min(w.shape):
                raise PassError(f"factorize: rank {self.rank} is above the full rank {min(w.shape)} of "
                                f"{graph.module_name(n.args[1].target)} [{w.shape[0]}, {w.shape[1]}]")
        fisher = self._fisher(gm, ctx, nodes)
        ranks = self._ranks(gm, ctx, nodes, weights, fisher)
        for node in nodes:
            W, r = weights[node], ranks[node]
            if r > lowrank.break_even(*W.shape):
                skipped[graph.module_name(node.args[1].target)] = (
                    f"rank {r} would not store fewer weights than [{W.shape[0]}, {W.shape[1]}]")
        kept = [n for n in nodes if ranks[n] <= lowrank.break_even(*weights[n].shape)]
        factors = self._factors(gm, ctx, kept, ranks, fisher if self.fisher else {})
        weighed = "by the next-token loss's Fisher" if fisher else "no (not a language model)"
        chosen = {graph.module_name(n.args[1].target): ranks[n] for n in kept}
        before = sum(p.numel() for p in gm.parameters())
        del weights  # views of weights that the factors replace
        for node in kept:
            _replace(gm, node, *factors.pop(node))
        graph.cleanup(gm)
        after = sum(p.numel() for p in gm.parameters())
        stats = {"ranks": chosen, "skipped": skipped, "parameters_removed": before - after}
        if self.fisher or self.allocate:
            stats["weighed"] = weighed
        return PassResult(gm, bool(chosen), stats)

    def _fisher(self, gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
        """The output channels' diagonal Fisher of every node, when ``fisher`` or ``allocate`` needs it."""
        if not (self.fisher or self.allocate):
            return {}
        self._check_calibration(ctx)
        found = output_fisher(gm, nodes, spread(ctx.calibration, self.allocate_batches))
        if found is None:  # an encoder, a conv net: no next-token loss to weigh by
            log.info("factorize: %s is not a language model (token ids in, logits out): no Fisher weights, one "
                     "fraction for every layer", ctx.program.name)
            return {}
        return found

    def _factors(self, gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], ranks: dict[fx.Node, int],
                 fisher: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]:
        """The factors of every node, in the weights' dtype; with ``sequential``, each block's linears are
        factorized on the inputs the factorized earlier blocks give (their weight holds A B while the stream runs
        that block again, then its own values again: one block's copies alive at a time)."""
        if self.method == "plain":
            return {n: _cast(lowrank.plain(graph.get_tensor(gm, n.args[1]), ranks[n]), gm, n) for n in nodes}
        factors: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
        originals: dict[fx.Node, torch.Tensor] = {}  # the weights of the block the stream runs again

        def restore() -> None:
            with torch.no_grad():
                for node, w in originals.items():
                    graph.get_tensor(gm, node.args[1]).copy_(w)
            originals.clear()

        def on_group(members: list[fx.Node], xtx: torch.Tensor, mean_abs: torch.Tensor | None) -> None:
            white = lowrank.whitening(xtx, self.damp) if self.method == "whitened" else None
            for node in members:
                w = graph.get_tensor(gm, node.args[1])
                # detached: factors of a weight that requires grad would keep their autograd graph (the
                # whitening, the SVD's factors) alive with them: 0.1 GB a block on SmolLM2
                W = w.detach()
                if white is not None:
                    A, B = lowrank.whitened(W, xtx, ranks[node], fisher=fisher.get(node), white=white)
                else:
                    A, B = lowrank.asvd(W, mean_abs, ranks[node], self.alpha)
                if self.sequential:
                    originals[node] = W.clone()
                    with torch.no_grad():
                        w.copy_((A @ B).to(w.dtype))
                factors[node] = _cast((A, B), gm, node)  # float64 held to the end: 0.34 GB more on SmolLM2

        try:
            self._stream(gm, ctx, nodes, on_group, rerun=self.sequential, on_part=restore)
        finally:
            restore()
        return factors

    def _check_calibration(self, ctx: PassContext) -> None:
        if not ctx.calibration:
            raise PassError(f"factorize: method {self.method} needs calibration data: set `calibration:` in the "
                            "recipe, or use method plain")

    def _stream(self, gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node],
                on_group: Callable[[list[fx.Node], torch.Tensor, torch.Tensor | None], None], rerun: bool = False,
                max_batches: int | None = None, on_part: Callable[[], None] = lambda: None) -> None:
        """Stream the calibration batches, calling ``on_group(nodes, X^T X, mean |x|)`` for the nodes that read
        one input, and ``on_part()`` before each part's groups (the part before it has run again by then)."""
        self._check_calibration(ctx)
        targets = {n.args[1].target: n for n in nodes}
        groups = groups_by_input(gm, set(targets))
        by_lead = {g.lead: g.weights for g in groups}
        done: set[fx.Node] = set()
        asvd = self.method == "asvd"  # mean |x| only for ASVD's scaling

        def on_stats(part: Part, got: dict[str, GroupStats]) -> None:
            on_part()
            for lead, st in got.items():
                members = [targets[w] for w in by_lead[lead]]
                on_group(members, st.inputs.xtx.float(), st.inputs.mean_abs if asvd else None)
                done.update(members)
            log.info("factorize: %s", part.name)

        batches = spread(ctx.calibration, self.max_batches if max_batches is None else max_batches)
        stream_statistics(gm, stack_batches(gm, batches, 2), groups, Request(xtx=True, mean_abs=asvd), on_stats,
                          rerun=rerun)
        missing = [graph.module_name(t) for t, n in targets.items() if n not in done]
        if missing:
            raise PassError(f"factorize: {missing[0]} got no calibration statistics (the stream only reaches "
                            f"linears inside repeated blocks): leave it out with `ignore:` or use method plain")

    def _ranks(self, gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node],
               weights: dict[fx.Node, torch.Tensor], fisher: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, int]:
        if self.rank is not None:
            return {n: self.rank for n in nodes}
        ratio = float(self.ratio)  # type: ignore[arg-type]
        if not (self.allocate and fisher):
            return {n: max(1, int(ratio * w.numel() / sum(w.shape))) for n, w in weights.items()}
        tails: dict[fx.Node, torch.Tensor] = {}

        def on_group(members: list[fx.Node], xtx: torch.Tensor, _: torch.Tensor | None) -> None:
            white = lowrank.whitening(xtx, self.damp)
            for node in members:
                tails[node] = lowrank.tail_errors(weights[node], xtx, fisher=fisher[node], white=white)

        self._stream(gm, ctx, nodes, on_group, max_batches=self.allocate_batches)
        return allocate(tails, {n: tuple(w.shape) for n, w in weights.items()},
                        ratio * sum(w.numel() for w in weights.values()))


def allocate(tails: dict, shapes: dict, budget: float) -> dict:
    """Ranks under a weight budget: every layer starts at rank 1; each next dimension goes to the layer whose
    error (in the loss's units: Fisher-weighted) it lowers most per weight it costs (m + n), until the budget is
    spent. A layer reaching its break-even rank stays dense (its full rank) if the budget holds the few weights
    more. ``tails[k]``: graphpress.lowrank.tail_errors of layer k; ``shapes[k]``: (m, n)."""
    keys = list(tails)
    ranks = {k: 1 for k in keys}
    spent = sum(sum(shapes[k]) for k in keys)

    def gain(i: int) -> tuple[float, int]:  # the next dimension of layer i: -(error it removes) / weight
        k, r = keys[i], ranks[keys[i]]
        return -float(tails[k][r] - tails[k][r + 1]) / sum(shapes[k]), i

    heap = [gain(i) for i, k in enumerate(keys) if len(tails[k]) > 2 and lowrank.break_even(*shapes[k]) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        k = keys[i]
        cost = sum(shapes[k])
        if spent + cost > budget:
            continue
        ranks[k] += 1
        spent += cost
        m, n = shapes[k]
        if ranks[k] == lowrank.break_even(m, n) and spent + m * n - ranks[k] * (m + n) <= budget:
            spent += m * n - ranks[k] * (m + n)  # as many weights as the dense layer: it stays dense
            ranks[k] = min(m, n)
        elif ranks[k] + 1 < len(tails[k]) and ranks[k] < lowrank.break_even(m, n):
            heapq.heappush(heap, gain(i))
    return ranks


def _cast(factors: tuple[torch.Tensor, torch.Tensor], gm: fx.GraphModule, node: fx.Node
          ) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = graph.get_tensor(gm, node.args[1]).dtype
    return factors[0].to(dtype), factors[1].to(dtype)


def _replace(gm: fx.GraphModule, node: fx.Node, A: torch.Tensor, B: torch.Tensor) -> None:
    module = graph.module_name(node.args[1].target)
    a = graph.new_get_attr(gm, graph.free_target(gm, f"{module}.lowrank_a.weight"), A.contiguous(), before=node)
    b = graph.new_get_attr(gm, graph.free_target(gm, f"{module}.lowrank_b.weight"), B.contiguous(), before=node)
    with gm.graph.inserting_before(node):
        inner = gm.graph.call_function(aten.linear.default, (node.args[0], b))
        outer = gm.graph.call_function(aten.linear.default, (inner, a, *node.args[2:]), dict(node.kwargs))
    meta = {k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")}
    for new in (inner, outer):  # their values: the runner's shape propagation (infer_val's aten.linear on a
        new.meta.update(meta)   # symbolic input fails in torch 2.11's fake mode)
    node.replace_all_uses_with(outer)
    gm.graph.erase_node(node)


__all__ = ["Factorize", "allocate"]
