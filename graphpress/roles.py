"""Roles of a program's linears, found from the graph and the module tree, so that recipes need no
architecture's module names:

    block   a linear inside a repeated block (a module path ending in ``.<int>``: ``model.layers.3``,
            ``transformer.h.0``, ``encoder.layer.5``; see graphpress.calibration.block_name)
    head    a linear outside the blocks whose output reaches a program output through no other linear
            or matmul: the output projection of a language model (``lm_head``, ``embed_out``); encoders
            that return hidden states have none

A pass's selection (``graphpress.passes.base.Selection``) takes ``roles`` / ``ignore_roles`` beside its
module-name regexes.
"""

from __future__ import annotations

import torch
from torch import fx

from graphpress.calibration import block_name

aten = torch.ops.aten
ROLES = ("block", "head")
# ops that mix features: a value past one of them is no longer "the head's output"
_MIXERS = (aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default)


def linear_roles(gm: fx.GraphModule) -> dict[fx.Node, frozenset[str]]:
    """Every aten.linear node -> its roles."""
    reaches_output = _reaches_output(gm)
    roles = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.linear.default:
            found = set()
            if block_name(node) is not None:
                found.add("block")
            elif reaches_output.get(node, False):
                found.add("head")
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
