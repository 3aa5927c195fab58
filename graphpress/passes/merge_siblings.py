"""Merge sibling linears, the ones that read the same input (q/k/v, gate/up), into one wider linear.

    Linear(x, W1, b1), ..., Linear(x, Wn, bn)
        =>  y = Linear(x, cat([W1, ..., Wn]), cat([b1, ..., bn]));  y1, ..., yn = split_with_sizes(y, [N1, ..., Nn], -1)

    W_i: [N_i, K]  ->  W: [N1 + ... + Nn, K];  a member without bias contributes zeros when another has one.

Exact: row i of ``x @ W^T`` only reads row i of W. One matmul instead of n reads x once and fills the
device better. The merged parameter is named after the members' common module and their leaf names
(``model.layers.0.self_attn.q_proj_k_proj_v_proj.weight``); the members' parameters are deleted, and the
merged weight and bias record which rows each member's came from (``graphpress.provenance``), so
``provenance.unmerge`` gives them back.

Siblings are grouped by their input's source through casts that keep device (a linear on ``x`` and one on
``x.to(float16)`` share a source); only members with the same input dtype, weight dtype and K merge.
Refused (``stats["skipped"][linear module]: reason``): a linear without siblings (or fewer than
``min_group``), a weight or bias shared or tied with another tensor, a weight that is not a 2-D parameter,
siblings in another dtype.
"""

from __future__ import annotations

import itertools
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress import graph
from graphpress.graph import aten, is_op
from graphpress.passes.base import Pass, PassContext, PassResult
from graphpress.provenance import Piece, record

_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)


def concat_linears(
    weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of the linear whose output is the members' outputs side by side on the last dimension.

    weights: [N_i, K] each, one dtype; biases: [N_i] or None each. b is None when every bias is.
    """
    weight = torch.cat(weights, dim=0)
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat(
        [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases, strict=True)]
    )
    return weight, bias


def merged_name(modules: list[str]) -> str:
    """``[a.b.q_proj, a.b.k_proj]`` -> ``a.b.q_proj_k_proj``: the common module plus the joined rest."""
    parts = [m.split(".") for m in modules]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    leaf = "_".join("_".join(p[common:]) for p in parts)
    return ".".join([*parts[0][:common], leaf])


@dataclass(frozen=True)
class MergeSiblingLinears(Pass):
    """Concatenate linears that read the same input into one linear followed by a split; exact."""

    name: ClassVar[str] = "merge_sibling_linears"
    exact: ClassVar[bool] = True

    min_group: int = 2

    def __post_init__(self) -> None:
        if self.min_group < 2:
            raise ValueError(f"{self.name}: min_group must be at least 2, got {self.min_group}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups, merged = 0, 0
        skipped: dict[str, str] = {}
        for source, linears in _siblings(gm).items():
            for members, reason in _partition(gm, source, linears, self.min_group):
                if reason:
                    skipped.update({_module(m): reason for m in members})
                    continue
                _merge(gm, members)
                groups += 1
                merged += len(members)
        if groups:
            graph.cleanup(gm)  # the members' parameters lose their last reader here
        stats = {"groups": groups, "linears_merged": merged, "skipped": skipped}
        return PassResult(gm=gm, modified=groups > 0, stats=stats)


# --- pattern ---------------------------------------------------------------------------------------------


def _siblings(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Source node -> the linears reading it (directly or through casts), in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if is_op(node, aten.linear.default) and isinstance(node.args[0], fx.Node):
            groups[_source(node.args[0])].append(node)
    return groups


def _source(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _CASTS and isinstance(node.args[0], fx.Node):
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.device == out.device):
            break
        node = node.args[0]
    return node


# --- check -----------------------------------------------------------------------------------------------


def _partition(
    gm: fx.GraphModule, source: fx.Node, linears: list[fx.Node], min_group: int
) -> list[tuple[list[fx.Node], str | None]]:
    """Split one source's readers into mergeable groups (reason None) and refused ones (with the reason)."""
    if len(linears) == 1:
        return [(linears, f"single linear reading {source.name}")]
    out: list[tuple[list[fx.Node], str | None]] = []
    by_kind: dict[tuple, list[fx.Node]] = defaultdict(list)
    for lin in linears:
        reason = _refuses(gm, lin)
        if reason:
            out.append(([lin], reason))
            continue
        x, w = lin.args[0].meta["val"], graph.get_tensor(gm, lin.args[1])
        by_kind[(x.dtype, w.dtype, w.shape[1])].append(lin)
    for (x_dtype, w_dtype, k), members in by_kind.items():
        if len(members) >= min_group:
            out.append((members, None))
            continue
        others = [
            f"{_module(m)} ({m.args[0].meta['val'].dtype} input, {graph.get_tensor(gm, m.args[1]).dtype} weight)"
            for kind, ms in by_kind.items()
            if kind != (x_dtype, w_dtype, k)
            for m in ms
        ]
        why = (
            f"its siblings on {source.name} differ in dtype or K: {', '.join(others)}"
            if others
            else f"{len(members)} sibling(s) on {source.name}, fewer than min_group={min_group}"
        )
        out.append((members, why))
    return out


def _refuses(gm: fx.GraphModule, lin: fx.Node) -> str | None:
    weight = lin.args[1]
    bias = _bias(lin)
    w = graph.get_tensor(gm, weight)
    if w is None:
        return f"its weight {weight.name} is computed, not a parameter"
    if w.dim() != 2:
        return f"its weight has shape {tuple(w.shape)}, not [N, K]"
    if "val" not in lin.args[0].meta or "val" not in lin.meta:
        return f"{lin.name} or its input carries no meta['val']; recapture the program"
    if graph.is_shared(gm, weight):
        others = [n for n in graph.aliases(gm).get(weight.target, []) if n != weight.target]
        tied = f"tied to {', '.join(others)}" if others else "read by other nodes too"
        return f"its weight is {tied}; merging would drop or duplicate it"
    if bias is not None and (graph.get_tensor(gm, bias) is None or graph.is_shared(gm, bias)):
        return "its bias is computed or shared with another tensor"
    return None


def _bias(lin: fx.Node) -> fx.Node | None:
    return lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")


def _module(lin: fx.Node) -> str:
    weight = lin.args[1]
    return (
        graph.module_name(weight.target)
        if isinstance(weight, fx.Node) and weight.op == "get_attr"
        else lin.name
    )


# --- rewrite ---------------------------------------------------------------------------------------------


def _merge(gm: fx.GraphModule, members: list[fx.Node]) -> None:
    """One linear at the first member's place, on its input; a split whose pieces replace the members."""
    first = members[0]  # graph order: its input is defined before it, every member's users after it
    weights = [graph.get_tensor(gm, m.args[1]) for m in members]
    biases = [graph.get_tensor(gm, _bias(m)) for m in members]
    weight, bias = concat_linears(weights, biases)
    module = graph.free_target(gm, merged_name([_module(m) for m in members]))
    w_node = graph.new_get_attr(gm, f"{module}.weight", weight, before=first)
    b_node = graph.new_get_attr(gm, f"{module}.bias", bias, before=first) if bias is not None else None
    sizes = [w.shape[0] for w in weights]
    rows = list(itertools.pairwise([0, *itertools.accumulate(sizes)]))  # member i: rows [start, stop)
    record(gm, w_node.target,
           [Piece(m.args[1].target, 0, a, b) for m, (a, b) in zip(members, rows, strict=True)])
    if b_node is not None:  # a member without bias owns zeros there, not a source
        record(gm, b_node.target, [Piece(_bias(m).target, 0, a, b)
                                   for m, (a, b) in zip(members, rows, strict=True) if _bias(m) is not None])
    with gm.graph.inserting_before(first):
        args = (first.args[0], w_node) if b_node is None else (first.args[0], w_node, b_node)
        linear = gm.graph.call_function(aten.linear.default, args)
        split = gm.graph.call_function(aten.split_with_sizes.default, (linear, sizes, -1))
        pieces = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(members))]
    linear.meta.update(_common_meta(members))
    for node in (linear, split, *pieces):
        graph.infer_val(node)
    for m, piece in zip(members, pieces, strict=True):
        piece.meta.update({k: v for k, v in m.meta.items() if k != "val"})
        m.replace_all_uses_with(piece)
        gm.graph.erase_node(m)


def _common_meta(members: list[fx.Node]) -> dict:
    """The first member's meta, its ``nn_module_stack`` cut to the modules every member runs in."""
    meta = {k: v for k, v in members[0].meta.items() if k not in ("val", "tensor_meta", "from_node")}
    stacks = [m.meta.get("nn_module_stack", {}) for m in members]
    meta["nn_module_stack"] = {k: v for k, v in stacks[0].items() if all(s.get(k) == v for s in stacks)}
    return meta
