"""Lowering rules: graphpress custom op -> ONNX node(s), as data.

A rule maps one custom-op overload to a function with the op's signature whose body emits ONNX through
``torch.onnx.ops.symbolic`` (any domain, e.g. ``com.microsoft``). Before export, ``apply_rules`` retargets
every matching node of a copy of the program to its rule's function; ``torch.onnx.export`` then traces that
function, and each ``symbolic`` call becomes exactly one ONNX node. Ops without a rule are exported through
their decomposition (the reference implementation), which is correct but not packed.

Each rule states the export check's floor for what it emits (``check_sqnr_db``: SQNR in dB of the runtime's
output against the torch program, a number or a function of the node's arguments): exact lowerings 60 dB,
lossy ones (int8 activations, lower compute precision) their own. The export is held to the lowest floor of
the rules it used, and to 60 dB when it used none.

Tables compose with ``+``; a new target adds rules and never edits passes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import fx

EXACT_DB = 60.0  # the export check's floor for exact lowerings and plain float programs


class TargetError(ValueError):
    """A program or an option that a target cannot lower; the message says what works instead."""


@dataclass(frozen=True)
class Rule:
    op: torch._ops.OpOverload
    lower: Callable[..., torch.Tensor]
    # what the emitted node needs to run, for reports and error messages
    target: str = "onnxruntime"
    # the export check's floor for this rule's output (a function of the node's args for option-dependent ones)
    check_sqnr_db: float | Callable[..., float] = EXACT_DB
    # what the runtime computes, in PyTorch (same signature as the op), where it differs from the op's
    # reference by more than rounding (int8 activations, float16 scales): the export check compares the
    # runtime with the program computing this, and holds it to the floor
    emulate: Callable[..., torch.Tensor] | None = None

    def floor(self, node: fx.Node) -> float:
        f = self.check_sqnr_db
        return float(f(*node.args, **node.kwargs) if callable(f) else f)


@dataclass(frozen=True)
class RuleTable:
    rules: tuple[Rule, ...] = ()
    # rewrites the copy of the program about to be exported, before the rules (a target's storage choices for
    # initializers, e.g. scales rounded to float16 values so that the file stores them in half the bytes)
    prepare: Callable[[fx.GraphModule], None] | None = None

    def __post_init__(self) -> None:
        ops = [r.op for r in self.rules]
        dup = {str(o) for o in ops if ops.count(o) > 1}
        if dup:
            raise ValueError(f"lowering table has more than one rule for {', '.join(sorted(dup))}")

    def __add__(self, other: RuleTable | Iterable[Rule]) -> RuleTable:
        if not isinstance(other, RuleTable):
            return RuleTable(self.rules + tuple(other), self.prepare)
        steps = [p for p in (self.prepare, other.prepare) if p is not None]

        def prepare(gm: fx.GraphModule) -> None:
            for step in steps:
                step(gm)

        return RuleTable(self.rules + other.rules, prepare if steps else None)

    def lookup(self, target: object) -> Rule | None:
        return next((r for r in self.rules if r.op == target), None)


def emulation(gm: fx.GraphModule, table: RuleTable) -> fx.GraphModule | None:
    """A copy of ``gm`` in which each node whose rule emulates its runtime calls that emulation; None when no
    rule used here emulates."""
    if not any(n.op == "call_function" and (r := table.lookup(n.target)) is not None and r.emulate is not None
               for n in gm.graph.nodes):
        return None
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        rule = table.lookup(node.target) if node.op == "call_function" else None
        if rule is not None and rule.emulate is not None:
            node.target = rule.emulate
    gm.recompile()
    return gm


def apply_rules(gm: fx.GraphModule, table: RuleTable) -> tuple[fx.GraphModule, dict[str, int], float]:
    """A copy of ``gm`` where each custom-op node calls its rule's function, or else its reference; with the
    count of nodes lowered per op and the export check's floor (the lowest of the rules used, else 60 dB)."""
    from graphpress.kernels import REFERENCES

    gm = copy.deepcopy(gm)
    if table.prepare is not None:
        table.prepare(gm)
    counts: dict[str, int] = {}
    floor = EXACT_DB
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        rule = table.lookup(node.target)
        if rule is not None:
            counts[str(rule.op)] = counts.get(str(rule.op), 0) + 1
            floor = min(floor, rule.floor(node))
            node.target = rule.lower
        elif node.target in REFERENCES:
            node.target = REFERENCES[node.target]
    gm.recompile()
    return gm, counts, floor
