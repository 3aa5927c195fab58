"""W8A8: linear -> graphpress::matmul_w8a8, int8 weights and int8 activations quantized on the fly.

    linear(x, W [N, K], b)  =>  matmul_w8a8(x, Q^T [K, N] int8, w_s [N], b)
    with  W ~ Q * w_s[:, None],  Q = round(W / w_s[:, None]),  w_s = max_k |W[n, k]| / 127   (symmetric per channel)

and x quantized symmetric per token at run time (graphpress.kernels.matmul_w8a8). Lossy; the activation
rounding is what hurts where a few input channels carry outliers, which is what SmoothQuant (passes/smooth.py)
flattens first. The program holds only the int8 weights and their scales; biases stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import graphpress.kernels.matmul_w8a8  # noqa: F401  (defines torch.ops.graphpress.matmul_w8a8)
from graphpress.graph import cleanup, get_tensor, is_shared, module_name, new_get_attr
from graphpress.passes.base import Pass, PassContext, PassResult, Selection
from graphpress.passes.weight_only import selected_linears
from graphpress.quant.int8 import quantize_symmetric_int8_per_channel


def replace_linear_w8a8(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Swap one float linear for matmul_w8a8 on its int8 weight; the float weight is left for cleanup()."""
    w = get_tensor(gm, node.args[1]).detach().float()  # [N, K]
    q, scale = quantize_symmetric_int8_per_channel(w)  # [N, K] int8, [N]
    prefix = module_name(node.args[1].target)
    x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
    qweight = new_get_attr(gm, f"{prefix}.qweight", q.T.contiguous(), node, buffer=True)  # [K, N]
    scales = new_get_attr(gm, f"{prefix}.scales", scale, node, buffer=True)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.graphpress.matmul_w8a8.default, (x, qweight, scales, bias))
    new.meta = {k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


@dataclass(frozen=True)
class W8A8(Selection, Pass):
    """int8 symmetric per-channel weights, int8 symmetric per-token dynamic activations."""

    name: ClassVar[str] = "w8a8"
    exact: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes, skipped = selected_linears(gm, self, self.name)
        quantized = 0
        for node in nodes:
            if is_shared(gm, node.args[1]):  # e.g. a tied head whose alias cleanup() already dropped
                readers = [u.name for u in node.args[1].users if u is not node]
                skipped[module_name(node.args[1].target)] = (
                    f"weight is also read by {', '.join(readers) or 'another name'}; quantize it with quantize_embedding")
                continue
            replace_linear_w8a8(gm, node)
            quantized += 1
        cleanup(gm)
        return PassResult(gm, quantized > 0, {"quantized": quantized, "skipped": skipped})
