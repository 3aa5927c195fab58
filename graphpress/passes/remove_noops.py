"""Remove nodes that do not change values: eval dropout, identity views and copies, same-dtype casts, asserts.

    dropout(x, p, train=False)                       =>  x      (also feature_/alpha_/feature_alpha_dropout;
    dropout(x, 0.0, train=True)                      =>  x       and any train flag when p == 0)
    alias(x) | detach(x) | contiguous(x)             =>  x      when out has x's shape, strides, dtype, device
    view | reshape | expand | slice(x, d, 0, ..)     =>  x      when out has x's shape (and strides)
    clone(x) | _to_copy(x) | to(x, copy=True)        =>  x      same, and: the graph mutates nothing in place,
                                                                and the copy does not reach an output
    to(x, dtype/device/layout) | type_as(x, y)       =>  x      when out has x's dtype, device and layout
    _assert_tensor_metadata | _assert_scalar |
    _assert_async | sym_constrain_range[_for_size]   =>  (gone)
    call_module _guards_fn(*inputs)                  =>  (gone) when it checks nothing the module
                                                                would not check anyway

"Same" is read from ``meta["val"]`` of the node and its input; symbolic sizes count as the same only when the
shape environment proves it without adding guards. A node without ``meta["val"]`` is kept and reported.

Why ``_guards_fn`` may go, and when it stays: ``ExportedProgram.module()`` inserts it to assert the input
shapes (specialised sizes, ranges, equal dimensions) and the tracer's shape guards (``ep._guards_code``).
Without it nothing checks the inputs of a deep-copied module (``Program.clone`` keeps neither torch's input
pre-hook nor ``range_constraints``), and an input that breaks a tracer guard (``x.size(0) % 2 == 0`` from a
branch) runs the traced branch where eager takes the other one: a silent wrong result. So it goes only when
  - its generated function asserts nothing (no narrowed ranges, no specialised sizes, no tracer
    guards: the tiny Llama), or
  - torch's ``_check_input_constraints_pre_hook`` is still on the module with ``range_constraints`` and every
    tracer guard follows from those ranges: deleting the submodule turns the pre-hook's own checks back on,
    as ``ep.module(check_guards=False)`` does.

The ``_assert_scalar`` / ``_assert_async`` asserts check data-dependent conditions: removing them keeps every
output of a valid input but turns a violated ``torch._check`` into a silent result, as in the lowered model.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function

from graphpress.graph import cleanup
from graphpress.passes.base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten

DROPOUTS = (
    aten.dropout.default,
    aten.feature_dropout.default,
    aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
)
# return their input (an alias) when the output has its metadata
ALIAS_IDENTITIES = (aten.alias.default, aten.detach.default, aten.contiguous.default)
VIEWS = (aten.view.default, aten.reshape.default, aten.expand.default, aten.slice.Tensor)
ALIAS_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.type_as.default)
# always return a fresh tensor
COPY_IDENTITIES = (aten.clone.default, aten._unsafe_view.default)
COPY_CASTS = (aten._to_copy.default,)
ASSERTS = (
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten._assert_async.default,
    aten._assert_async.msg,
    aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default,
)
KINDS = ("dropout", "identity", "cast", "assert", "guards")
GUARDS = "_guards_fn"


@dataclass(frozen=True)
class RemoveNoops(Pass):
    name = "remove_noops"
    exact = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts: Counter[str] = Counter()
        skipped: dict[str, str] = {}
        graphs = [(name, m) for name, m in gm.named_modules() if isinstance(m, fx.GraphModule)]
        nodes_before = sum(len(m.graph.nodes) for _, m in graphs)
        # one in-place op anywhere (a parent may mutate what a subgraph copies) makes every copy observable
        mutates = any(_is_mutating(n) for _, m in graphs for n in m.graph.nodes)
        for prefix, module in graphs:
            for node in list(module.graph.nodes):
                kind, reason = _match(node, mutates)
                if kind is None:
                    if reason:
                        skipped[f"{prefix}.{node.name}" if prefix else node.name] = reason
                    continue
                if kind == "assert":
                    module.graph.erase_node(node)
                else:
                    node.replace_all_uses_with(_input(node))
                    module.graph.erase_node(node)
                counts[kind] += 1
            if module is not gm:
                module.graph.eliminate_dead_code()
                module.graph.lint()
                module.recompile()
        reason = _drop_guards(gm)
        if reason is None:
            counts["guards"] += 1
        elif reason:
            skipped[GUARDS] = reason
        cleanup(gm)
        stats: dict[str, Any] = {k: counts[k] for k in KINDS}
        stats["skipped"] = skipped
        log.debug("remove_noops: %s", stats)
        # cleanup also drops what the export left dead: that changes the graph too
        nodes_after = sum(len(m.graph.nodes) for m in gm.modules() if isinstance(m, fx.GraphModule))
        return PassResult(gm, modified=sum(counts.values()) > 0 or nodes_after != nodes_before, stats=stats)


def _match(node: fx.Node, mutates: bool) -> tuple[str | None, str]:
    """(kind, "") when ``node`` can go; (None, reason) when it is a candidate that must stay; (None, "")."""
    if node.op != "call_function":
        return None, ""
    target = node.target
    if target in ASSERTS:
        return ("assert", "") if not node.users else (None, "assert result is used")
    if target in DROPOUTS:
        args = _args(node)
        p, train = args["p"], args["train"]
        if train is False or p == 0:
            return "dropout", ""
        return None, f"train={train}, p={p}: dropout is live"
    kind = "cast" if target in ALIAS_CASTS + COPY_CASTS else "identity"
    if target in ALIAS_CASTS + ALIAS_IDENTITIES + VIEWS:
        args = _args(node)
        copies = bool(args.get("copy", False))
    elif target in COPY_CASTS + COPY_IDENTITIES:
        args = _args(node)
        copies = True
    else:
        return None, ""
    if args.get("pin_memory"):
        return None, "pins memory"
    if target is aten.slice.Tensor and args["start"] not in (None, 0):
        return None, ""  # same length from a later start: a shifted window (a symbolic start is a Node)
    out, src = node.meta.get("val"), _val(_input(node))
    if not isinstance(out, torch.Tensor) or not isinstance(src, torch.Tensor):
        return None, "no meta['val'] on the node or its input: cannot tell whether it changes anything"
    if not _same_meta(src, out):
        return None, ""  # a real cast or reshape
    if copies:
        if mutates:
            return None, "copy in a graph with in-place ops: the copy may protect its input"
        if _reaches_output(node):
            return None, "copy flows to an output: removing it would hand out the input's storage"
    return kind, ""


def _drop_guards(gm: fx.GraphModule) -> str | None:
    """Erase the ``_guards_fn`` call and submodule; None when done, else why not ("" when there is none)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == GUARDS]
    if not calls:
        return ""
    if any(n.users for n in calls):
        return "its result is used"
    if not (_guards_check_nothing(getattr(gm, GUARDS)) or _input_checks_cover_guards(gm)):
        return (
            "it asserts input shapes that nothing else would check (no input pre-hook with range_constraints "
            "on this module, e.g. after a deepcopy, or tracer guards the ranges do not imply): keeping it"
        )
    for n in calls:
        gm.graph.erase_node(n)
    # with the submodule gone, torch's pre-hook (where there is one) checks the inputs against range_constraints
    delattr(gm, GUARDS)
    return None


def _guards_check_nothing(guards: nn.Module) -> bool:
    """True when the guards module's generated function (``def _(*args)`` in torch 2.13) is empty.

    It is found through the closure of its ``forward`` wrapper; any other layout counts as checking something.
    """
    stack, seen = [getattr(guards, "forward", None)], 0
    while stack and seen < 8:
        fn = stack.pop()
        seen += 1
        code = getattr(fn, "__code__", None)
        if code is None:
            continue
        if code.co_name == "_":
            return not code.co_names  # no torch._assert, no .size(): it reads nothing
        for cell in fn.__closure__ or ():
            try:
                stack.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    return False


def _input_checks_cover_guards(gm: fx.GraphModule) -> bool:
    """True when torch's input pre-hook is installed and every tracer guard follows from range_constraints.

    ``Program.clone`` (a deepcopy) drops both the pre-hook and ``range_constraints``: then this is False.
    """
    from torch.export._unlift import _check_input_constraints_pre_hook
    from torch.export.exported_program import _get_shape_env
    from torch.utils._sympy.value_ranges import bound_sympy

    hooked = any(h is _check_input_constraints_pre_hook for h in gm._forward_pre_hooks.values())
    ranges = getattr(gm, "range_constraints", None)
    if not hooked or not getattr(gm, "validate_inputs", False) or ranges is None:
        return False
    shape_env = _get_shape_env(gm)
    if shape_env is None:
        return True  # static shapes: the guards only specialise sizes, which the pre-hook checks
    for guard in shape_env.guards:
        expr = shape_env.simplify(guard.expr)  # applies the replacements (unified dimensions)
        if expr == sympy.true:
            continue
        if not expr.free_symbols <= set(ranges):
            return False
        if bound_sympy(expr, ranges).lower != sympy.true:
            return False
    return True


def _args(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (``self`` is called ``input``)."""
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if pair is None:  # pragma: no cover - every op matched here has one schema
        raise ValueError(f"cannot normalise the arguments of {node.name} ({node.target})")
    return pair.kwargs


def _input(node: fx.Node) -> fx.Node:
    return node.args[0]  # type: ignore[return-value]  # every op matched here takes its tensor first


def _val(node: object) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.layout == b.layout
        and _same_sizes(a.shape, b.shape)
        and (a.layout != torch.strided or _same_sizes(a.stride(), b.stride()))
    )


def _same_sizes(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _reaches_output(node: fx.Node) -> bool:
    """True when ``node``'s value, or a view of it, is returned by the graph."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op == "output":
                return True
            if user not in seen and _returns_alias(user):
                seen.add(user)
                stack.append(user)
    return False


def _returns_alias(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return node.op == "call_function"  # getitem and other Python callables: assume they may alias
    return any(r.alias_info is not None for r in schema.returns)


__all__ = ["RemoveNoops"]
