"""W8A8: linear -> graphpress::quantized_linear with int8 weights and activations quantized on the fly.

    linear(x, W [N, K], b)  =>  quantized_linear(x, Q + 128, w_s, None, b, K, 8, K, activation_bits=8)
    with  W ~ Q * w_s[:, None],  Q = round(W / w_s[:, None]),  w_s = max_k |W[n, k]| / 127   (symmetric per channel)

and x quantized per token at run time (graphpress.kernels.quantized). Lossy; the activation rounding is what
hurts where a few input channels carry outliers, which is what SmoothQuant (passes/smooth.py) flattens first.
The program holds only the int8 weights and their scales; biases stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress.graph import cleanup, get_tensor, is_shared, module_name
from graphpress.passes.base import Pass, PassContext, PassResult, Selection
from graphpress.passes.weight_only import replace_linear, selected_linears
from graphpress.quant.int8 import quantize_symmetric_int8_per_channel
from graphpress.quant.qweight import QuantizedWeight, QuantSpec


def replace_linear_w8a8(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Swap one float linear for a W8A8 quantized_linear; the float weight is left for cleanup()."""
    w = get_tensor(gm, node.args[1]).detach().float()  # [N, K]
    q, scale = quantize_symmetric_int8_per_channel(w)  # [N, K] int8 in [-127, 127], [N]
    spec = QuantSpec(8, None, symmetric=True)
    midpoint = torch.full((w.shape[0], 1), spec.midpoint, dtype=torch.uint8)
    weight = QuantizedWeight.from_codes(q.int() + spec.midpoint, scale[:, None], midpoint, spec, w.shape[1])
    return replace_linear(gm, node, weight, activation_bits=8)


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
