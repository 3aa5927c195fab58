"""Depth pruning: whole repeated blocks removed, each one's residual input passed straight on.

    x_out = block_b(x_in)  (= x_in + attention(...) + mlp(...))   =>   x_out = x_in      for the blocks chosen

A block is a repeated module (graphpress.calibration.partition: ``model.layers.7``, ``transformer.h.3``).
Its residual input is found from the graph: the one value from outside the block with the shape and dtype of
the one value the block hands on; a block with any other interface is refused with its name.

Which blocks go:
    influence    ShortGPT's block influence, 1 - cos(x_in, x_out) averaged over calibration tokens; the
                 ``count`` least influential go at once
    loss         greedy: the block whose removal raises the calibration loss least goes, then the next is
                 chosen on the model without it (causal LMs: next-token loss on calibration windows); the
                 candidates each round are the ``shortlist`` least influential blocks
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from graphpress.calibration import partition
from graphpress.graph import cleanup
from graphpress.metrics import next_token_loss
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, check_amount
from graphpress.statistics import spread

log = logging.getLogger(__name__)
aten = torch.ops.aten
METHODS = ("influence", "loss")
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default, aten.clone.default,
          aten.dropout.default}


@dataclass(frozen=True)
class Block:
    name: str
    nodes: frozenset[fx.Node]
    x_in: fx.Node  # the residual value entering the block
    x_out: fx.Node  # the value the block hands on


def blocks(gm: fx.GraphModule) -> list[Block]:
    """The program's repeated blocks with their residual input and output; refuses a block whose interface
    is not one value in, one out."""
    parts, names = partition(gm)
    result = []
    for i, name in enumerate(names):
        nodes = {n for n, p in parts.items() if p == i + 1 and n.op == "call_function"}
        outs = [n for n in nodes if any(u not in nodes for u in n.users)]
        tensors = [n for n in outs if isinstance(n.meta.get("val"), torch.Tensor)]
        if len(tensors) != 1:
            raise PassError(f"prune_layers: block {name} hands on {len(tensors)} values "
                            f"({', '.join(n.name for n in tensors[:4])}), not one residual stream")
        out = tensors[0]
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in nodes and a.op != "get_attr"}
        same = [a for a in inputs if _same_kind(a, out)]
        if len(same) != 1:
            raise PassError(f"prune_layers: block {name} has {len(same)} inputs shaped like its output "
                            f"{out.name}; cannot tell its residual input")
        result.append(Block(name, frozenset(nodes), same[0], out))
    return result


def _same_kind(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
            and len(va.shape) == len(vb.shape) and all(str(x) == str(y) for x, y in zip(va.shape, vb.shape, strict=True)))


def remove_blocks(gm: fx.GraphModule, chosen: list[Block]) -> None:
    """Route each chosen block's residual input to its output's users; the block's nodes and parameters go."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for block in sorted(chosen, key=lambda b: -order[b.x_out]):  # last first: a later block's input may be
        block.x_out.replace_all_uses_with(block.x_in)              # an earlier removed block's output
    gone = {n for b in chosen for n in b.nodes}
    for node in reversed(list(gm.graph.nodes)):  # explicitly: dead-code elimination keeps asserts alive
        if node in gone and not node.users:
            gm.graph.erase_node(node)
    cleanup(gm)


class _Skipping(fx.Interpreter):
    """Runs a program with some blocks passed through, observing every block's residual input and output."""

    def __init__(self, gm: fx.GraphModule, all_blocks: list[Block], skip: set[int],
                 watch: bool = False) -> None:
        super().__init__(gm)
        self.skip_nodes = {n for i in skip for n in all_blocks[i].nodes}
        self.passthrough = {all_blocks[i].x_out: all_blocks[i].x_in for i in skip}
        self.ends = {b.x_out: i for i, b in enumerate(all_blocks)} if watch else {}
        self.starts = {i: b.x_in for i, b in enumerate(all_blocks)}
        self.kept: dict[fx.Node, torch.Tensor] = {}  # residual inputs, kept past the interpreter's freeing
        self.inputs = {b.x_in for b in all_blocks}
        self.influence = torch.zeros(len(all_blocks), dtype=torch.float64)
        self.tokens = 0

    def run_node(self, n: fx.Node) -> Any:
        if n in self.passthrough:
            out = self.kept[self.passthrough[n]]
        elif n in self.skip_nodes:
            return None
        else:
            out = super().run_node(n)
        if n in self.inputs:
            self.kept[n] = out
        i = self.ends.get(n)
        if i is not None:
            x = self.kept[self.starts[i]].reshape(-1, out.shape[-1]).float()
            y = out.reshape(-1, out.shape[-1]).float()
            self.influence[i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).double().sum()
            if i == 0:
                self.tokens += x.shape[0]
        return out


def _writer(block: Block) -> tuple[fx.Node, fx.Node] | None:
    """The block's last residual write, ``x_out = y + L(a)`` (through casts): (the add, the linear L)."""
    add = block.x_out
    while add.op == "call_function" and add.target in _CASTS:
        add = add.args[0]
    if add.op != "call_function" or add.target is not aten.add.Tensor:
        return None
    for z in add.args:
        while isinstance(z, fx.Node) and z.op == "call_function" and z.target in _CASTS:
            z = z.args[0]
        if (isinstance(z, fx.Node) and z.target is aten.linear.default and z in block.nodes
                and isinstance(z.args[1], fx.Node) and z.args[1].op == "get_attr"):
            return add, z
    return None


def spans(chosen: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices: [(first, last), ...]."""
    runs: list[tuple[int, int]] = []
    for i in sorted(chosen):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


class _Bridging(fx.Interpreter):
    """Accumulates, for each span, a^T a and a^T r of the kept block before it: a the input of its last
    residual write L, r = x_after_span - x_out (what the span added on top of that block's output)."""

    def __init__(self, gm: fx.GraphModule, plan: dict[int, tuple[fx.Node, fx.Node, fx.Node]]) -> None:
        super().__init__(gm)
        self.plan = plan  # span index -> (linear L, block output, span output)
        self.linears = {v[0]: k for k, v in plan.items()}
        self.outs = {v[1]: k for k, v in plan.items()}
        self.ends = {v[2]: k for k, v in plan.items()}
        self.a: dict[int, torch.Tensor] = {}
        self.x: dict[int, torch.Tensor] = {}
        self.gram: dict[int, torch.Tensor] = {}
        self.cross: dict[int, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.linears:
            a = self.env[n.args[0]]
            self.a[self.linears[n]] = a.reshape(-1, a.shape[-1]).double()
        if n in self.outs:
            self.x[self.outs[n]] = out.reshape(-1, out.shape[-1]).double()
        if n in self.ends:
            k = self.ends[n]
            a, r = self.a.pop(k), out.reshape(-1, out.shape[-1]).double() - self.x.pop(k)
            self.gram[k] = self.gram.get(k, 0) + a.T @ a
            self.cross[k] = self.cross.get(k, 0) + a.T @ r
        return out


def bridge(gm: fx.GraphModule, all_blocks: list[Block], chosen: list[int],
           batches: list[tuple[torch.Tensor, ...]], damp: float) -> list[str]:
    """Before removing each span of blocks, refit the last residual write L of the kept block before it so
    that its output also carries what the span added (least squares on calibration, damped towards W):

        x_after = x_out + r,  x_out = y + W a   =>   W' = W + D,  D^T = (A^T A + lambda I)^-1 A^T R

    (training-free replacement of removed blocks by a linear map merged into an existing weight, as
    ReplaceMe does). Returns the refit weights' names; a block without such a write is left as it is."""
    plan = {}
    for k, (first, last) in enumerate(spans(chosen)):
        if first == 0:
            continue
        found = _writer(all_blocks[first - 1])
        if found is None:
            continue
        plan[k] = (found[1], all_blocks[first - 1].x_out, all_blocks[last].x_out)
    if not plan:
        return []
    run = _Bridging(gm, plan)
    with torch.no_grad():
        for batch in batches:
            run.run(*batch)
    names = []
    for k, (linear, _, _) in plan.items():
        G = run.gram[k]
        G = G + torch.eye(G.shape[0], dtype=G.dtype) * damp * torch.diag(G).mean().clamp_min(1e-12)
        delta = torch.linalg.solve(G, run.cross[k]).T  # [N, K]
        w = gm.get_parameter(linear.args[1].target)
        with torch.no_grad():
            w.add_(delta.to(w.dtype))
        names.append(linear.args[1].target)
    return names


def influence(gm: fx.GraphModule, all_blocks: list[Block], batches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """1 - cos(x_in, x_out) of every block, averaged over every calibration token."""
    run = _Skipping(gm, all_blocks, set(), watch=True)
    with torch.no_grad():
        for batch in batches:
            run.run(*batch)
    return run.influence / max(run.tokens, 1)


def calibration_loss(gm: fx.GraphModule, all_blocks: list[Block], skip: set[int],
                     batches: list[tuple[torch.Tensor, ...]]) -> float:
    """Mean next-token loss of a causal LM over the batches with the blocks ``skip`` passed through."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            out = _Skipping(gm, all_blocks, skip).run(*batch)
            logits = (out[0] if isinstance(out, (tuple, list)) else out).float()
            ids = batch[0]
            total += float(next_token_loss(logits, ids, reduction="sum"))
            count += ids[:, 1:].numel()
    return total / max(count, 1)


@dataclass(frozen=True)
class PruneLayers(Pass):
    """Remove ``count`` blocks (or ``ratio`` of them, rounded) chosen by ``importance``."""

    name: ClassVar[str] = "prune_layers"
    exact: ClassVar[bool] = False
    structural: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    count: int | None = None
    ratio: float | None = None
    importance: str = "loss"
    shortlist: int = 12  # candidates per round of the loss search (the least influential blocks)
    max_batches: int = 4  # calibration batches the loss search runs (spread over them); influence uses all
    bridge: bool = True  # refit the output projection before each removed span to what the span produced
    damp: float = 0.1  # of the bridge's least squares (0.01 overfit it to calibration text)

    def __post_init__(self) -> None:
        check_amount(self.name, self.ratio, "count", self.count, "blocks removed", "fraction removed")
        if self.importance not in METHODS:
            raise ValueError(f"prune_layers: importance must be one of {', '.join(METHODS)}, not {self.importance!r}")
        if self.shortlist < 1 or self.max_batches < 0:
            raise ValueError("prune_layers: shortlist must be >= 1 and max_batches >= 0")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.calibration:
            raise PassError("prune_layers needs calibration data: set `calibration:` in the recipe or pass batches")
        all_blocks = blocks(gm)
        n = len(all_blocks)
        count = self.count if self.count is not None else max(1, round(n * self.ratio))
        if not 1 <= count < n:
            raise PassError(f"prune_layers: removing {count} of the {n} blocks leaves "
                            f"{'none' if count >= n else 'all'}: choose a count between 1 and {n - 1}")
        scores = influence(gm, all_blocks, ctx.calibration)
        if self.importance == "influence" or ctx.program.kind != "causal-lm":
            chosen = sorted(torch.argsort(scores)[:count].tolist())
        else:
            chosen = self._greedy(gm, all_blocks, scores, count, spread(ctx.calibration, self.max_batches))
        names = [all_blocks[i].name for i in chosen]
        log.info("prune_layers: removing %s", ", ".join(names))
        refit = bridge(gm, all_blocks, chosen, ctx.calibration, self.damp) if self.bridge else []
        before = sum(p.numel() for p in gm.parameters())
        remove_blocks(gm, [all_blocks[i] for i in chosen])
        after = sum(p.numel() for p in gm.parameters())
        return PassResult(gm, True, {"removed_blocks": names, "parameters_removed": before - after, "bridged": refit,
                                     "influence": {all_blocks[i].name: round(float(scores[i]), 5) for i in range(n)}})

    def _greedy(self, gm: fx.GraphModule, all_blocks: list[Block], scores: torch.Tensor, count: int,
                batches: list[tuple[torch.Tensor, ...]]) -> list[int]:
        chosen: set[int] = set()
        for _ in range(count):
            candidates = [i for i in torch.argsort(scores).tolist() if i not in chosen][:self.shortlist]
            losses = {i: calibration_loss(gm, all_blocks, chosen | {i}, batches) for i in candidates}
            best = min(losses, key=losses.get)
            log.info("prune_layers: %s goes (calibration loss %.4f)", all_blocks[best].name, losses[best])
            chosen.add(best)
        return sorted(chosen)


__all__ = ["PruneLayers", "blocks", "remove_blocks"]
