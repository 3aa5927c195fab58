"""Lowering rules: graphpress custom op -> ONNX node(s), as data.

A rule maps one custom-op overload to a function with the op's signature whose body emits ONNX through
``torch.onnx.ops.symbolic`` (any domain, e.g. ``com.microsoft``). Before export, ``apply_rules`` retargets
every matching node of a copy of the program to its rule's function; ``torch.onnx.export`` then traces that
function, and each ``symbolic`` call becomes exactly one ONNX node. Ops without a rule are exported through
their decomposition (the reference implementation), which is correct but not packed.

A rule may also choose how the constants it reads are stored (``store``: called once per node, eagerly, on the
node's constant tensors; what it returns becomes the node's arguments, new tensors new initializers): a layout
that the runtime unpacks cheaply, values it precomputes once instead of at every session start.

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
from typing import Any

import torch
from torch import fx

from graphpress.graph import cleanup, delete_tensor, free_target, get_tensor, is_shared, new_get_attr

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
    # how the node's constants are stored: called with the node's arguments (its get_attr constants as
    # tensors, other inputs as fx nodes) and ``shared``, the indices of constants that other nodes read too
    # (a tied table: storing it anew would store it twice); returns the arguments ``lower`` then receives
    # (tensors among them become initializers of the exported copy), or None to keep them
    store: Callable[..., tuple[object, ...] | None] | None = None

    def floor(self, node: fx.Node) -> float:
        f = self.check_sqnr_db
        return float(f(*node.args, **node.kwargs) if callable(f) else f)


@dataclass(frozen=True)
class RuleTable:
    rules: tuple[Rule, ...] = ()
    # rewrites the copy of the program about to be exported, before the rules (a target's storage choices for
    # initializers, e.g. scales rounded to float16 values so that the file stores them in half the bytes)
    prepare: Callable[[fx.GraphModule], None] | None = None
    # rewrites the exported ONNX model (onnx_ir) after constant folding, before it is saved: storage choices
    # that only ONNX can express (4-bit initializers)
    finish: Callable[[Any], None] | None = None
    # the ONNX opset the target reads (None: the exporter's default, graphpress.lowering.onnx.OPSET); below 23
    # the exporter decomposes attention and RMS norm into older standard ops, and ops without a rule go
    # through their decomposition
    opset: int | None = None

    def __post_init__(self) -> None:
        ops = [r.op for r in self.rules]
        dup = {str(o) for o in ops if ops.count(o) > 1}
        if dup:
            raise ValueError(f"lowering table has more than one rule for {', '.join(sorted(dup))}")

    def __add__(self, other: RuleTable | Iterable[Rule]) -> RuleTable:
        if not isinstance(other, RuleTable):
            return RuleTable(self.rules + tuple(other), self.prepare, self.finish, self.opset)
        if None not in (self.opset, other.opset) and self.opset != other.opset:
            raise ValueError(f"lowering tables for opsets {self.opset} and {other.opset} cannot be combined")
        return RuleTable(self.rules + other.rules, chain(self.prepare, other.prepare),
                         chain(self.finish, other.finish), self.opset if self.opset is not None else other.opset)

    def lookup(self, target: object) -> Rule | None:
        return next((r for r in self.rules if r.op == target), None)


def chain(*steps: Callable[[Any], None] | None) -> Callable[[Any], None] | None:
    """One step running ``steps`` in turn (None when there are none)."""
    todo = [s for s in steps if s is not None]
    if len(todo) <= 1:
        return todo[0] if todo else None

    def run(target: Any) -> None:
        for step in todo:
            step(target)

    return run


def emulation(gm: fx.GraphModule, table: RuleTable) -> fx.GraphModule | None:
    """A copy of ``gm`` in which each node whose rule emulates its runtime calls that emulation; None when no
    rule used here emulates."""
    if not any(n.op == "call_function" and (r := table.lookup(n.target)) is not None and r.emulate is not None
               for n in gm.graph.nodes):
        return None
    gm = structural_copy(gm)
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

    gm = structural_copy(gm)
    if table.prepare is not None:
        table.prepare(gm)
    counts: dict[str, int] = {}
    floor = EXACT_DB
    stored = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        rule = table.lookup(node.target)
        if rule is not None:
            counts[str(rule.op)] = counts.get(str(rule.op), 0) + 1
            floor = min(floor, rule.floor(node))
            if rule.store is not None:
                stored = _store(gm, node, rule) or stored
            node.target = rule.lower
        elif node.target in REFERENCES:
            node.target = REFERENCES[node.target]
    if stored:
        cleanup(gm)  # the constants replaced by stored ones
        _drop_unread_buffers(gm)
    gm.recompile()
    return gm, counts, floor


def structural_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph and module tree can be rewritten without touching ``gm``; its tensors are
    ``gm``'s own (a deep copy would double a model's memory for an export)."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    copied.meta = dict(getattr(gm, "meta", {}))
    return copied


def _store(gm: fx.GraphModule, node: fx.Node, rule: Rule) -> bool:
    """Replace ``node``'s arguments by what ``rule.store`` makes of them; whether it changed any."""
    assert rule.store is not None
    values = [get_tensor(gm, a) if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in node.args]
    shared = frozenset(i for i, a in enumerate(node.args)
                       if isinstance(a, fx.Node) and a.op == "get_attr" and is_shared(gm, a))
    with torch.no_grad():
        new = rule.store(*values, shared=shared)
    if new is None:
        return False
    args: list[object] = []
    for i, value in enumerate(new):
        kept = next((a for a, v in zip(node.args, values, strict=True) if v is value), None)
        if isinstance(value, torch.Tensor) and kept is not None:  # a constant handed back as it is
            value = kept
        elif isinstance(value, torch.Tensor):
            value = new_get_attr(gm, free_target(gm, f"_stored.{node.name}_{i}"), value, node, buffer=True)
        args.append(value)
    node.args, node.kwargs = tuple(args), {}
    return True


def _drop_unread_buffers(gm: fx.GraphModule) -> None:
    """Buffers of the copy that no node reads any more (constants a rule stored anew), so that the export does
    not carry them too."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            delete_tensor(gm, name)
