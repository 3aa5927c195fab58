"""Lowering rules: graphpress custom op -> ONNX node(s), as data.

A rule maps one custom-op overload to a function with the op's signature whose body emits ONNX through
``torch.onnx.ops.symbolic`` (any domain, e.g. ``com.microsoft``). Before export, ``apply_rules`` retargets
every matching node of a copy of the program to its rule's function; ``torch.onnx.export`` then traces that
function, and each ``symbolic`` call becomes exactly one ONNX node. Ops without a rule are exported through
their decomposition (the reference implementation), which is correct but not packed.

Tables compose with ``+``; a new target adds rules and never edits passes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import fx


@dataclass(frozen=True)
class Rule:
    op: torch._ops.OpOverload
    lower: Callable[..., torch.Tensor]
    # what the emitted node needs to run, for reports and error messages
    target: str = "onnxruntime"


@dataclass(frozen=True)
class RuleTable:
    rules: tuple[Rule, ...] = ()
    # the export check's floor: SQNR of the runtime's output against the torch program. Exact lowerings
    # land above 100 dB; a table whose ops compute in lower precision (int8 activations) says so here.
    check_sqnr_db: float = 60.0

    def __post_init__(self) -> None:
        ops = [r.op for r in self.rules]
        dup = {str(o) for o in ops if ops.count(o) > 1}
        if dup:
            raise ValueError(f"lowering table has more than one rule for {', '.join(sorted(dup))}")

    def __add__(self, other: RuleTable | Iterable[Rule]) -> RuleTable:
        extra = other.rules if isinstance(other, RuleTable) else tuple(other)
        floor = min(self.check_sqnr_db, other.check_sqnr_db) if isinstance(other, RuleTable) else self.check_sqnr_db
        return RuleTable(self.rules + extra, floor)

    def lookup(self, target: object) -> Rule | None:
        return next((r for r in self.rules if r.op == target), None)


def apply_rules(gm: fx.GraphModule, table: RuleTable) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of ``gm`` where each custom-op node calls its rule's function, or else its reference."""
    from graphpress.kernels import REFERENCES

    gm = copy.deepcopy(gm)
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        rule = table.lookup(node.target)
        if rule is not None:
            counts[str(rule.op)] = counts.get(str(rule.op), 0) + 1
            node.target = rule.lower
        elif node.target in REFERENCES:
            node.target = REFERENCES[node.target]
    gm.recompile()
    return gm, counts
