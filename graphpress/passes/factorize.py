"""Low-rank factorization: one linear into two, ranks chosen under a budget.

    linear(x, W [m, n], b)   =>   linear(linear(x, B [r, n]), A [m, r], b)      W ~ A B   (graphpress.lowrank)

``method``: ``whitened`` (SVD-LLM: the factors minimize the output error on the calibration rows), ``asvd``
(activation-scaled SVD) or ``plain`` (truncated SVD, no calibration). The amount is one ``rank`` for every
selected linear, or a ``ratio`` of the selected linears' weights kept, the same fraction in every layer; with
``allocate`` (whitened only) the budget is split across layers by what each layer's singular values predict
(SVD-LLM V2's idea: every next dimension goes to the layer whose relative output error it lowers most per
weight it costs, each layer keeping at least rank 1). On SmolLM2 that allocation measured worse than one
fraction for all (BENCHMARKS.md, issue 12), so it is off by default. A layer whose rank would not store fewer weights
than the dense matrix (r >= m n / (m + n)) stays dense and is reported. Statistics are taken on the unfactorized
program (X^T X of every selected linear's input, one stream over the calibration batches).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress import graph, lowrank
from graphpress.calibration import Part, stack_batches
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection, check_amount
from graphpress.roles import linear_roles
from graphpress.statistics import GroupStats, Request, groups_by_input, spread, stream_statistics

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
    allocate: bool = False  # split the ratio's budget across layers by their tail errors (whitened only)
    damp: float = 0.0  # whitening: H + damp * mean diag(H) I (singular H falls back to clamped eigenvalues)
    alpha: float = 0.5  # ASVD's exponent
    max_batches: int = 0  # calibration batches used (0: all), spread over them

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount(self.name, self.ratio, "rank", self.rank, "dimensions", "fraction of the weights kept")
        if self.method not in lowrank.METHODS:
            raise ValueError(f"factorize: method must be one of {', '.join(lowrank.METHODS)}, not {self.method!r}")
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
        stats = self._statistics(gm, ctx, nodes) if self.method != "plain" else {}
        ranks = self._ranks(nodes, weights, stats)
        before = sum(p.numel() for p in gm.parameters())
        chosen = {}
        for node in nodes:
            module = graph.module_name(node.args[1].target)
            W, r = weights[node], ranks[node]
            if r > lowrank.break_even(*W.shape):
                skipped[module] = f"rank {r} would not store fewer weights than [{W.shape[0]}, {W.shape[1]}]"
                continue
            if self.method == "whitened":
                A, B = lowrank.whitened(W, stats[node][0], r, self.damp)
            elif self.method == "asvd":
                A, B = lowrank.asvd(W, stats[node][1], r, self.alpha)
            else:
                A, B = lowrank.plain(W, r)
            _replace(gm, node, A.to(W.dtype), B.to(W.dtype))
            chosen[module] = r
        graph.cleanup(gm)
        after = sum(p.numel() for p in gm.parameters())
        return PassResult(gm, bool(chosen), {"ranks": chosen, "skipped": skipped,
                                             "parameters_removed": before - after})

    def _statistics(self, gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node]
                    ) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]:
        """(X^T X, mean |x|) of each node's input, in float32."""
        if not ctx.calibration:
            raise PassError(f"factorize: method {self.method} needs calibration data: set `calibration:` in the "
                            "recipe, or use method plain")
        targets = {n.args[1].target: n for n in nodes}
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        groups = groups_by_input(gm, set(targets))
        by_lead = {g.lead: g.weights for g in groups}

        def on_stats(part: Part, got: dict[str, GroupStats]) -> None:
            for lead, st in got.items():
                for w in by_lead[lead]:
                    found[w] = (st.inputs.xtx.float(), st.inputs.mean_abs)

        batches = stack_batches(gm, spread(ctx.calibration, self.max_batches), 2)
        stream_statistics(gm, batches, groups, Request(xtx=True, mean_abs=True), on_stats)
        missing = [graph.module_name(t) for t in targets if t not in found]
        if missing:
            raise PassError(f"factorize: {missing[0]} got no calibration statistics (the stream only reaches "
                            f"linears inside repeated blocks): leave it out with `ignore:` or use method plain")
        return {n: found[t] for t, n in targets.items()}

    def _ranks(self, nodes: list[fx.Node], weights: dict[fx.Node, torch.Tensor],
               stats: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]) -> dict[fx.Node, int]:
        if self.rank is not None:
            return {n: self.rank for n in nodes}
        ratio = float(self.ratio)  # type: ignore[arg-type]
        if not (self.allocate and self.method == "whitened"):
            return {n: max(1, int(ratio * w.numel() / sum(w.shape))) for n, w in weights.items()}
        tails = {n: lowrank.tail_errors(weights[n], stats[n][0], self.damp) for n in nodes}
        return allocate(tails, {n: tuple(w.shape) for n, w in weights.items()},
                        ratio * sum(w.numel() for w in weights.values()))


def allocate(tails: dict, shapes: dict, budget: float) -> dict:
    """Ranks under a weight budget: every layer starts at rank 1; each next dimension goes to the layer whose
    relative output error (tail error / total) it lowers most per weight it costs (m + n), until the budget
    is spent. ``tails[k]``: graphpress.lowrank.tail_errors of layer k; ``shapes[k]``: (m, n)."""
    keys = list(tails)
    ranks = {k: 1 for k in keys}
    spent = sum(sum(shapes[k]) for k in keys)

    def gain(i: int) -> tuple[float, int]:  # the next dimension of layer i: -(relative error it removes) / weight
        k, r = keys[i], ranks[keys[i]]
        t = tails[k]
        return -float(t[r] - t[r + 1]) / (float(t[0]) or 1.0) / sum(shapes[k]), i

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
        if ranks[k] + 1 < len(tails[k]) and ranks[k] < lowrank.break_even(*shapes[k]):
            heapq.heappush(heap, gain(i))
    return ranks


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
