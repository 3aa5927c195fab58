"""Quantization-aware training: weights rounded on the fly while they train, then frozen into codes.

    fake_quantize:         linear(x, W, b)  =>  linear(x, fake_quantize(W, s, z, bits, g), b)
    freeze_fake_quantize:  linear(x, fake_quantize(W, s, z, bits, g), b)  =>  quantized_linear(x, codes, s, z, b, ...)

``fake_quantize`` keeps W a trainable parameter and adds its grid: scales s [N, G] (from round-to-nearest of
W, a trainable parameter when ``learn_scales``) and zero points z [N, G] (a buffer). The program then computes
what the quantized model will compute, and trains through it (graphpress.kernels.quantized.fake_quantize:
straight-through gradient for W inside the grid, LSQ gradient for s). ``freeze_fake_quantize`` rounds each W
onto its (trained) grid and stores the codes as ``rtn`` would: the frozen program computes exactly what the
fake-quantized one did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import graphpress.kernels.quantized  # noqa: F401  (defines torch.ops.graphpress.fake_quantize)
from graphpress.graph import cleanup, get_tensor, is_op, module_name, new_get_attr
from graphpress.kernels.quantized import grid
from graphpress.passes.base import Pass, PassContext, PassError, PassResult
from graphpress.passes.weight_only import WeightOnlyConfig, replace_linear, selected_linears
from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.quant.rtn import quantize_rtn

aten = torch.ops.aten
FAKE = torch.ops.graphpress.fake_quantize.default


@dataclass(frozen=True)
class FakeQuantize(WeightOnlyConfig):
    """Every selected linear's weight goes through fake_quantize on a round-to-nearest grid."""

    name: ClassVar[str] = "fake_quantize"
    exact: ClassVar[bool] = False
    learn_scales: bool = True
    clip_search: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes, skipped = selected_linears(gm, self, self.name)
        for node in nodes:
            weight = node.args[1]
            w = get_tensor(gm, weight)
            q = quantize_rtn(w.detach().float(), self.spec, clip_search=self.clip_search)
            prefix = module_name(weight.target)
            scales = new_get_attr(gm, f"{prefix}.fq_scales", q.scales.to(w.dtype), node)
            gm.get_parameter(scales.target).requires_grad_(self.learn_scales)
            zeros = new_get_attr(gm, f"{prefix}.fq_zeros", q.zeros.float(), node, buffer=True)
            with gm.graph.inserting_before(node):
                fq = gm.graph.call_function(FAKE, (weight, scales, zeros, self.bits, q.group_len))
            fq.meta = {"val": weight.meta.get("val", w), **{k: v for k, v in node.meta.items()
                                                             if k in ("nn_module_stack", "stack_trace")}}
            node.args = (node.args[0], fq, *node.args[2:])
        cleanup(gm)
        return PassResult(gm, bool(nodes), {"fake_quantized": len(nodes), "skipped": skipped})


@dataclass(frozen=True)
class FreezeFakeQuantize(Pass):
    """Round each fake-quantized weight onto its grid and store the codes (graphpress::quantized_linear)."""

    name: ClassVar[str] = "freeze_fake_quantize"
    exact: ClassVar[bool] = True  # the frozen program computes what the fake-quantized one computed

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        frozen = 0
        for node in list(gm.graph.nodes):
            if not (is_op(node, aten.linear.default) and isinstance(node.args[1], fx.Node)
                    and is_op(node.args[1], FAKE)):
                continue
            fq = node.args[1]
            weight, scales, zeros, bits, group = fq.args
            tensors = [get_tensor(gm, t) for t in (weight, scales, zeros)]
            if any(t is None for t in tensors) or len(fq.users) != 1:
                raise PassError(f"{self.name}: {fq.name} reads a computed tensor or feeds more than this linear; "
                                "freeze needs a parameter weight and grid read by one linear")
            w, s, z = (t.detach() for t in tensors)
            _, codes, _ = grid(w, s, z, bits, group)
            k = w.shape[1]
            spec = QuantSpec(bits, group if group < k else None, symmetric=bool((z == 1 << (bits - 1)).all()))
            q = QuantizedWeight.from_codes(codes.reshape(w.shape[0], -1), s.float(), z.to(torch.uint8), spec, k)
            node.args = (node.args[0], weight, *node.args[2:])
            replace_linear(gm, node, q)
            frozen += 1
        cleanup(gm)
        return PassResult(gm, frozen > 0, {"frozen": frozen})
