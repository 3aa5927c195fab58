"""Write matrix products with a weight parameter as ``aten.linear``, the form every other pass reads.

    addmm(b, x, W [K, N])   =>  linear(x, W^T, b)       (GPT-2's Conv1D: ``torch.addmm(bias, x2d, weight)``)
    mm(x, W [K, N])         =>  linear(x, W^T)
    matmul(x, t(W [N, K]))  =>  linear(x, W)

W^T is stored as a new parameter ``<module>.weight`` in linear's layout [N, K] (the old one is dropped when
nothing else reads it). Exact: the same products, summed in the same order up to the BLAS kernel. Refused per
node (reported in ``skipped``): a weight that is computed, shared with another reader, or not 2-D; a bias
that is not 1-D; a scaled addmm (beta, alpha != 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress import provenance
from graphpress.graph import cleanup, free_target, get_tensor, is_op, is_shared, module_name, new_get_attr
from graphpress.passes.base import Pass, PassContext, PassResult

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearizeMatmuls(Pass):
    name: ClassVar[str] = "linearize_matmuls"
    exact: ClassVar[bool] = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        done, skipped = 0, {}
        for node in list(gm.graph.nodes):
            found = _match(node)
            if found is None:
                continue
            x, weight, bias, transposed = found
            reason = _refusal(gm, node, weight, bias)
            if reason:
                skipped[node.name] = reason
                continue
            w = get_tensor(gm, weight)
            wt = w.detach().t().contiguous() if transposed else w.detach()
            if not transposed:  # matmul(x, t(W)): the parameter is already [N, K]
                new_w = weight
            else:
                target = free_target(gm, f"{module_name(weight.target)}.linear_weight")
                new_w = new_get_attr(gm, target, wt, node)
                provenance.record(gm, target, [provenance.Piece(weight.target, transposed=True)])
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(aten.linear.default, (x, new_w) + ((bias,) if bias is not None else ()))
            new.meta = {k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            done += 1
        cleanup(gm)
        return PassResult(gm, done > 0, {"linearized": done, "skipped": skipped})


def _match(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, bool] | None:
    """(x, weight node, bias node, whether the weight is stored [K, N]) of a product with a weight."""
    if is_op(node, aten.addmm.default) and len(node.args) == 3 and not node.kwargs:
        bias, x, w = node.args
        return (x, w, bias, True) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    if is_op(node, aten.mm.default):
        x, w = node.args
        return (x, w, None, True) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    if is_op(node, aten.matmul.default):
        x, t = node.args
        if isinstance(t, fx.Node) and is_op(t, aten.t.default) and len(t.users) == 1 \
                and isinstance(t.args[0], fx.Node) and t.args[0].op == "get_attr":
            return x, t.args[0], None, False
    return None


def _refusal(gm: fx.GraphModule, node: fx.Node, weight: fx.Node, bias: fx.Node | None) -> str | None:
    w = get_tensor(gm, weight)
    if w is None or w.dim() != 2 or not w.is_floating_point():
        return "the weight is not a 2-D float parameter"
    if is_shared(gm, weight) and not is_op(node, aten.matmul.default):
        return f"{weight.target} is also read elsewhere; a transposed copy would store it twice"
    if bias is not None and (not isinstance(bias, fx.Node) or not isinstance(bias.meta.get("val"), torch.Tensor)
                             or bias.meta["val"].dim() != 1):
        return "the bias is not 1-D"
    x = node.args[1] if is_op(node, aten.addmm.default) else node.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype != w.dtype:
        return "the input's dtype is not the weight's"
    return None
