"""Roles of a program's linears, found from the graph and the module tree, so that recipes need no
architecture's module names:

    block   a linear inside a repeated block (a module path ending in ``.<int>``: ``model.layers.3``,
            ``transformer.h.0``, ``encoder.layer.5``; see graphpress.calibration.block_name)
    head    a linear outside the blocks whose output reaches a program output through no other linear
            or matmul: the output projection of a language model (``lm_head``, ``embed_out``); encoders
            that return hidden states have none
    attention_value    a linear whose output reaches the value input of an attention
                       (``scaled_dot_product_attention``) through no other linear: ``v_proj``; a merged
                       q/k/v projection has it too (``attention_rows`` says which of its rows)
    attention_output   the first linear the output of an attention reaches: ``o_proj``, ``out_proj``, ``dense``

A pass's selection (``graphpress.passes.base.Selection``) takes ``roles`` / ``ignore_roles`` beside its
module-name regexes.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from graphpress.calibration import block_name

aten = torch.ops.aten
ROLES = ("block", "head", "attention_value", "attention_output")
SDPA = aten.scaled_dot_product_attention.default
# ops that mix features: a value past one of them is no longer "the head's output"
_MIXERS = (aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default)


def linear_roles(gm: fx.GraphModule) -> dict[fx.Node, frozenset[str]]:
    """Every aten.linear node -> its roles."""
    reaches_output = _reaches_output(gm)
    attention = {node: role for role, found in attention_rows(gm).items() for node in found}
    roles = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.linear.default:
            found = set()
            if block_name(node) is not None:
                found.add("block")
            elif reaches_output.get(node, False):
                found.add("head")
            if node in attention:
                found.add(attention[node])
            roles[node] = frozenset(found)
    return roles


def _reaches_output(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """node -> whether some path from it to the output passes no feature-mixing op (the node itself aside)."""
    result: dict[fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        if node.op == "output":
            result[node] = True
            continue
        result[node] = any(result.get(u, False) and not (u.op == "call_function" and u.target in _MIXERS)
                           for u in node.users)
    return result


# ops a projection's output goes through on its way into or out of an attention: head split and merge,
# repeat_kv, casts; anything else (another linear, a matmul, an add) ends the search
_LAYOUT = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int,
           aten.permute.default, aten.expand.default, aten.unsqueeze.default, aten.contiguous.default,
           aten.clone.default, aten.to.dtype, aten._to_copy.default, aten.slice.Tensor, aten.squeeze.dim,
           aten.flatten.using_ints, aten.unflatten.int}


def attention_rows(gm: fx.GraphModule) -> dict[str, dict[fx.Node, slice]]:
    """Role (``attention_value``, ``attention_output``) -> linear -> the rows of its weight that have the role:
    all of them, or the value's share of a merged or packed q/k/v projection (the cut of its output)."""
    found: dict[str, dict[fx.Node, slice]] = {"attention_value": {}, "attention_output": {}}
    for sdpa in gm.graph.find_nodes(op="call_function", target=SDPA):
        value = _producer(sdpa.args[2])
        if value is not None:
            found["attention_value"][value[0]] = value[1]
        node = sdpa
        while len(node.users) == 1:
            (node,) = node.users
            if node.op == "call_function" and node.target is aten.linear.default:
                found["attention_output"][node] = slice(None)
                break
            if not (node.op == "call_function" and node.target in _LAYOUT):
                break
    return found


def _producer(node: object) -> tuple[fx.Node, slice] | None:
    """The linear (and its rows) whose output ``node`` is, through layout ops and one cut of the linear's
    last dimension (``split_with_sizes``, ``split`` or ``slice``: a packed q/k/v projection's value share)."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target is aten.linear.default:
            return node, slice(None)
        rows = _rows_of_linear(node)
        if rows is not None:
            return rows
        if node.target is aten.cat.default:  # the cache's concatenation: the past is an input, not a projection
            found = [f for f in map(_producer, node.args[0]) if f is not None]
            return found[0] if len(found) == 1 else None
        if node.target not in _LAYOUT:
            return None
        node = node.args[0]
    return None


def _rows_of_linear(node: fx.Node) -> tuple[fx.Node, slice] | None:
    """``node`` as rows [start, stop) of a linear's output features, when it cuts them directly."""
    if node.target is aten.slice.Tensor:
        source, dim, start, stop = (list(node.args) + [0, None, None])[:4]
        cut = (start or 0, stop)
    elif node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and node.args[0].target in (aten.split_with_sizes.default, aten.split.Tensor):
        split, i = node.args
        source, sizes = split.args[0], split.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if isinstance(sizes, int):
            sizes = [sizes] * (i + 1)
        if not all(isinstance(s, int) for s in sizes[: i + 1]):
            return None
        cut = (sum(sizes[:i]), sum(sizes[: i + 1]))
    else:
        return None
    if not (isinstance(source, fx.Node) and source.target is aten.linear.default
            and dim in (-1, _rank(source) - 1) and all(isinstance(c, int) for c in cut)):
        return None
    return source, slice(*cut)


def _rank(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -2
