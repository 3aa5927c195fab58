"""Weight-only quantization: linear -> graphpress::quantized_linear, weights rounded to nearest (RTN).

    linear(x, W [N, K], b)  =>  quantized_linear(x, codes, scales, zeros, b, K, bits, group_size)
    with  W ~ (codes - zero) * scale  per group of ``group_size`` input columns (or per output channel)

The program holds only the packed integers and their scales (graphpress.kernels.quantized); the float weight
is dropped. How a target multiplies them (block layout, compute precision, int8 kernels) is the lowering's
choice. ``replace_linear`` is the surgery every weight-only algorithm (RTN, GPTQ, AWQ + RTN) ends with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import graphpress.kernels.quantized  # noqa: F401  (defines torch.ops.graphpress.quantized_linear)
from graphpress import provenance
from graphpress.graph import aliases, cleanup, get_tensor, is_op, is_shared, module_name, new_get_attr
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.quant.rtn import quantize_rtn
from graphpress.roles import linear_roles

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightOnlyConfig(Selection, Pass):
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    # 8: the quantized linears round their activations to 8 bits per token too (W4A8, W8A8: weights requantized
    # to int8 per channel, graphpress.kernels.quantized), what int8 kernels compute; for awq, whose scales only
    # prepare a later rounding, the error its search weighs is that product's
    activation_bits: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        QuantSpec(self.bits, self.group_size, self.symmetric)  # validates bits and group size
        if self.activation_bits not in (0, 8):
            raise ValueError(f"{self.name}: activation_bits is 0 (float) or 8, not {self.activation_bits!r}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


def selected_linears(gm: fx.GraphModule, cfg: Selection, pass_name: str,
                     shared_ok: Callable[[fx.Node], bool] | None = None) -> tuple[list[fx.Node], dict[str, str]]:
    """Float linears whose module name ``cfg`` selects; (nodes, skipped {module: reason}).

    A linear whose weight is shared is skipped unless ``shared_ok(weight node)`` says the caller handles it.

    Refuses a selection by module names that matches no linear at all, since that is a mistake in a recipe;
    one by roles may find none (an encoder has no head).
    """
    names = aliases(gm)
    roles = linear_roles(gm)
    nodes, skipped, matched = [], {}, 0
    for node in gm.graph.nodes:
        if not is_op(node, aten.linear.default) or get_tensor(gm, node.args[1]) is None:
            continue
        module = module_name(node.args[1].target)
        if not cfg.selects(module, roles[node]):
            continue
        matched += 1
        if is_shared(gm, node.args[1]) and not (shared_ok and shared_ok(node.args[1])):
            # an alias name, or a second reader once cleanup() dropped the name
            tied = [n for n in names.get(node.args[1].target, []) if n != node.args[1].target]
            other = tied[0] if tied else "another node (e.g. the embedding)"
            skipped[module] = f"weight is shared with {other}; quantize it with quantize_embedding"
            continue
        nodes.append(node)
    if not matched and cfg.roles:
        return [], {f"role {'/'.join(cfg.roles)}": "no linear of this program has it"}
    if not matched:
        raise PassError(
            f"{pass_name}: targets {list(cfg.targets)} (ignore {list(cfg.ignore)}) match no linear layer; "
            "module names look like 'model.layers.0.self_attn.q_proj'"
        )
    return nodes, skipped


def replace_linear(gm: fx.GraphModule, node: fx.Node, q: QuantizedWeight, activation_bits: int = 0) -> fx.Node:
    """Swap one linear for quantized_linear on ``q``; the float weight is left for cleanup()."""
    prefix = module_name(node.args[1].target)
    x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
    qweight, scales, zeros = q.packed()
    tensors = [new_get_attr(gm, f"{prefix}.{name}", t, node, buffer=True) if t is not None else None
               for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", zeros))]
    for t in tensors:  # made from the whole float weight (graphpress.provenance)
        if t is not None:
            provenance.record(gm, t.target, [provenance.Piece(node.args[1].target)])
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            torch.ops.graphpress.quantized_linear.default,
            (x, *tensors, bias, q.in_features, q.spec.bits, q.group_len, activation_bits),
        )
    new.meta = {k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


@dataclass(frozen=True)
class QuantizeRTN(WeightOnlyConfig):
    """Round-to-nearest weight-only quantization with a clipping search per group."""

    name: ClassVar[str] = "rtn"
    exact: ClassVar[bool] = False
    # off by default: shrinking ranges to cut the weight error clips the outliers that matter most
    # (SmolLM2-135M int4 g128, 8 windows: 21.69 with the search, 20.11 without; fp32 14.70)
    clip_search: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes, skipped = selected_linears(gm, self, self.name)
        for node in nodes:
            w = get_tensor(gm, node.args[1]).detach().float()
            replace_linear(gm, node, quantize_rtn(w, self.spec, clip_search=self.clip_search), self.activation_bits)
        cleanup(gm)
        return PassResult(gm, bool(nodes), {"quantized": len(nodes), "skipped": skipped})
