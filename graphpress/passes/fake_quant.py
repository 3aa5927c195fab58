"""Quantization-aware training: weights rounded on the fly while they train, then frozen into codes.

    fake_quantize:         linear(x, W, b)  =>  linear(x, fake_quantize(W, s, z, bits, g), b)
    freeze_fake_quantize:  linear(x, fake_quantize(W, s, z, bits, g), b)  =>  quantized_linear(x, codes, s, z, b, ...)
                           linear(fake_quantize_activations(x), fake_quantize(W, ..., int8_rows=True), b)
                               =>  quantized_linear(x, codes, s, z, b, ..., activation_bits=8)

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
from graphpress import provenance
from graphpress.graph import cleanup, free_target, get_tensor, is_op, module_name, new_get_attr
from graphpress.kernels.quantized import dequantize, grid, unpack_codes
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.passes.weight_only import WeightOnlyConfig, replace_linear, selected_linears
from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.quant.rtn import quantize_rtn
from graphpress.roles import linear_roles

aten = torch.ops.aten
FAKE = torch.ops.graphpress.fake_quantize.default
FAKE_ACTIVATIONS = torch.ops.graphpress.fake_quantize_activations.default
QLINEAR = torch.ops.graphpress.quantized_linear.default


def linear_tensors(node: fx.Node) -> list[str]:
    """The stored tensors a linear reads: its weight (or, through a fake quantization, the weight and its grid)
    and bias, or a quantized linear's codes, scales, zero points and bias."""
    direct = [a for a in node.all_input_nodes if a.op == "get_attr"]
    fake = [a for w in node.all_input_nodes if is_op(w, FAKE) for a in w.all_input_nodes if a.op == "get_attr"]
    return [a.target for a in direct + fake]


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
        frozen, replaced = 0, []
        for node in list(gm.graph.nodes):
            if not (is_op(node, aten.linear.default) and isinstance(node.args[1], fx.Node)
                    and is_op(node.args[1], FAKE)):
                continue
            fq, x = node.args[1], node.args[0]
            weight, scales, zeros, bits, group, *rest = fq.args
            int8_rows = bool(rest and rest[0])
            tensors = [get_tensor(gm, t) for t in (weight, scales, zeros)]
            if any(t is None for t in tensors) or len(fq.users) != 1:
                raise PassError(f"{self.name}: {fq.name} reads a computed tensor or feeds more than this linear; "
                                "freeze needs a parameter weight and grid read by one linear")
            rounded = isinstance(x, fx.Node) and is_op(x, FAKE_ACTIVATIONS)
            if rounded != int8_rows:
                raise PassError(f"{self.name}: {node.name} rounds its {'input' if rounded else 'weight to int8 rows'} "
                                "without the other: no quantized_linear computes that (activation_bits=8 needs both)")
            w, s, z = (t.detach() for t in tensors)
            _, codes, _ = grid(w, s, z, bits, group)
            k = w.shape[1]
            spec = QuantSpec(bits, group if group < k else None, symmetric=bool((z == 1 << (bits - 1)).all()))
            q = QuantizedWeight.from_codes(codes.reshape(w.shape[0], -1), s.float(), z.to(torch.uint8), spec, k)
            node.args = (x.args[0] if rounded else x, weight, *node.args[2:])
            replace_linear(gm, node, q, activation_bits=8 if rounded else 0)
            replaced.append(zeros.target)  # the grid's zero points are a buffer
            frozen += 1
        cleanup(gm, drop=replaced)
        return PassResult(gm, frozen > 0, {"frozen": frozen})


@dataclass(frozen=True)
class ThawQuantized(Pass):
    """Quantized weights back to trainable ones on the same grid, for quantization-aware training that starts
    from post-training quantization (GPTQ, AWQ):

        quantized_linear(x, codes, s, z, b, ...)  =>  linear(x, fake_quantize(W, s, z, bits, g), b),  W = (codes - z) * s

    Exact: W lies on its own grid, so the program computes what it computed; ``freeze_fake_quantize`` gives codes
    again after training. Layers whose activations the model quantizes (activation_bits=8) are skipped: training
    for int8 kernels thaws the weight-only program, then ``fake_quantize_activations`` rounds the activations of
    the linears it selects. With ``bits``, the weights of other widths are skipped too: an 8-bit grid's steps
    are 16x finer than a 4-bit one's, and the same learning rate flips its codes within a few dozen steps
    (BENCHMARKS.md, issue 16).
    """

    name: ClassVar[str] = "thaw_quantized"
    exact: ClassVar[bool] = True
    learn_scales: bool = True
    # only weights of these widths (None: all); the others stay quantized and do not train
    bits: tuple[int, ...] | None = None

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        thawed, skipped, replaced = 0, {}, []
        for node in list(gm.graph.nodes):
            if not is_op(node, QLINEAR):
                continue
            x, qweight, scales, zeros, bias, k, bits, group, *rest = node.args
            if rest and rest[0]:
                skipped[node.name] = (f"its activations are quantized to {rest[0]} bits: thaw the weight-only "
                                      "program, then fake_quantize_activations")
                continue
            if self.bits is not None and bits not in self.bits:
                skipped[node.name] = f"{bits}-bit weights: bits asks for {list(self.bits)}"
                continue
            q, s, z = (get_tensor(gm, t) if isinstance(t, fx.Node) else None for t in (qweight, scales, zeros))
            if q is None or s is None or (zeros is not None and z is None):
                raise PassError(f"{self.name}: {node.name} reads computed quantized tensors; thaw needs stored ones")
            w = dequantize(q, s, z, k, bits, group).to(s.dtype)
            groups = s.shape[1]
            zp = (torch.full((s.shape[0], groups), float(1 << (bits - 1))) if z is None
                  else unpack_codes(z, bits, groups).float())
            safe = torch.where(s == 0, torch.full_like(s, torch.finfo(s.dtype).tiny), s)  # an all-zero group
            prefix = module_name(qweight.target)
            sources = provenance.sources_of(gm, qweight.target)  # the original weights, through the codes
            for t in (qweight, scales, zeros):  # the codes go: so do their records
                if isinstance(t, fx.Node):
                    provenance.forget(gm, t.target)
            name = f"{prefix}.weight"  # its source's name, unless that is another tensor (a Conv1D's transpose)
            avoid = () if sources == [provenance.Piece(name)] else {p.source for p in sources}
            weight = new_get_attr(gm, free_target(gm, name, avoid), torch.nn.Parameter(w), node)
            if sources and sources != [provenance.Piece(weight.target)]:
                provenance.record(gm, weight.target, sources)
            s_node = new_get_attr(gm, free_target(gm, f"{prefix}.fq_scales"), torch.nn.Parameter(safe.clone()), node)
            gm.get_parameter(s_node.target).requires_grad_(self.learn_scales)
            z_node = new_get_attr(gm, free_target(gm, f"{prefix}.fq_zeros"), zp, node, buffer=True)
            with gm.graph.inserting_before(node):
                fq = gm.graph.call_function(FAKE, (weight, s_node, z_node, bits, group))
                linear = gm.graph.call_function(aten.linear.default, (x, fq, bias))
            fq.meta = {"val": weight.meta["val"]}
            linear.meta = {k_: v for k_, v in node.meta.items() if k_ in ("val", "nn_module_stack", "stack_trace")}
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
            replaced += [t.target for t in (qweight, scales, zeros) if isinstance(t, fx.Node)]
            thawed += 1
        cleanup(gm, drop=replaced)
        return PassResult(gm, thawed > 0, {"thawed": thawed, "skipped": skipped})


@dataclass(frozen=True)
class FakeQuantizeActivations(Selection, Pass):
    """Train for int8 kernels (W4A8): each selected fake-quantized linear also rounds its input per token and its
    weight to int8 rows, as quantized_linear with activation_bits=8 computes (graphpress.kernels.quantized):

        linear(x, fake_quantize(W, ...), b)  =>  linear(fake_quantize_activations(x), fake_quantize(W, ..., int8_rows=True), b)

    ``freeze_fake_quantize`` then gives quantized_linear(..., activation_bits=8). Lossy: the program now computes
    what such a kernel computes. Linears whose weight is not fake-quantized are refused by name."""

    name: ClassVar[str] = "fake_quantize_activations"
    exact: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        roles = linear_roles(gm)
        rounded, skipped = 0, {}
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.linear.default) or not isinstance(node.args[1], fx.Node):
                continue
            fq = node.args[1]
            weight = fq.args[0] if is_op(fq, FAKE) else fq
            if not isinstance(weight, fx.Node) or weight.op != "get_attr":
                continue
            module = module_name(weight.target)
            if not self.selects(module, roles[node]):
                continue
            if not is_op(fq, FAKE):
                skipped[module] = "a float weight: fake_quantize or thaw_quantized it first"
                continue
            if isinstance(node.args[0], fx.Node) and is_op(node.args[0], FAKE_ACTIVATIONS):
                continue
            with gm.graph.inserting_before(node):
                x = gm.graph.call_function(FAKE_ACTIVATIONS, (node.args[0],))
            x.meta = {"val": node.args[0].meta["val"]} if "val" in node.args[0].meta else {}
            fq.args = (*fq.args[:5], True)
            node.args = (x, *node.args[1:])
            rounded += 1
        if not rounded:
            raise PassError(f"{self.name}: no selected linear has a fake-quantized weight ({len(skipped)} float); "
                            "run thaw_quantized or fake_quantize before it")
        cleanup(gm)
        return PassResult(gm, True, {"rounded": rounded, "skipped": skipped})
