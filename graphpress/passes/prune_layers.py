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
from graphpress.passes.base import Pass, PassContext, PassError, PassResult
from graphpress.statistics import spread

log = logging.getLogger(__name__)
METHODS = ("influence", "loss")


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
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
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

    def __post_init__(self) -> None:
        if (self.count is None) == (self.ratio is None):
            raise ValueError("prune_layers: give one of count (blocks removed) or ratio (fraction removed)")
        if self.count is not None and (isinstance(self.count, bool) or self.count < 1):
            raise ValueError(f"prune_layers: count must be a positive number of blocks, not {self.count}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ValueError(f"prune_layers: ratio must be in (0, 1), not {self.ratio}")
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
        before = sum(p.numel() for p in gm.parameters())
        remove_blocks(gm, [all_blocks[i] for i in chosen])
        after = sum(p.numel() for p in gm.parameters())
        return PassResult(gm, True, {"removed_blocks": names, "parameters_removed": before - after,
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
