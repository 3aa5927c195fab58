"""Weight-only quantization: linear -> graphpress::matmul_nbits, weights rounded to nearest (RTN).

    linear(x, W [N, K], b)  =>  matmul_nbits(x, B, scales, zeros, b, K, N, bits, block)
    with  W ~ (codes - zero) * scale  per group of ``group_size`` input columns (or per output channel)

The packed tensors are stored in onnxruntime's MatMulNBits layout (see graphpress.quant.pack), so the program
holds only the integers; the float weight is dropped. K that the group size does not divide is padded.
``replace_linear`` is the surgery every weight-only algorithm (RTN, GPTQ, AWQ + RTN) ends with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress.graph import aliases, cleanup, get_tensor, is_op, is_shared, module_name, new_get_attr
from graphpress.kernels.matmul_nbits import KERNELS  # also defines torch.ops.graphpress.matmul_nbits
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.quant.pack import pack_matmulnbits
from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.quant.rtn import quantize_rtn

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightOnlyConfig(Selection, Pass):
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    # MatMulNBits compute precision: 4 = int8 activations per block (fastest on CPUs with VNNI), 0 = float
    accuracy_level: int = 4
    # how the packed weight is multiplied (graphpress.kernels.matmul_nbits): "nbits" = MatMulNBits on the
    # packed codes; "int8" = requantized to int8 per channel at session start, int8 GEMM with per-token
    # int8 activations (~2.5x faster at 128 tokens on AVX-512 VNNI, int8 weights in memory while running)
    kernel: str = "nbits"

    def __post_init__(self) -> None:
        super().__post_init__()
        QuantSpec(self.bits, self.group_size, self.symmetric)  # validates bits and group size
        if self.accuracy_level not in (0, 4):
            raise ValueError(f"accuracy_level must be 0 (float) or 4 (int8 activations), not {self.accuracy_level}")
        check_kernel(self.kernel)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")


def selected_linears(gm: fx.GraphModule, cfg: Selection, pass_name: str,
                     shared_ok: Callable[[fx.Node], bool] | None = None) -> tuple[list[fx.Node], dict[str, str]]:
    """Float linears whose module name ``cfg`` selects; (nodes, skipped {module: reason}).

    A linear whose weight is shared is skipped unless ``shared_ok(weight node)`` says the caller handles it.

    Refuses a selection that matches no linear at all, since that is always a mistake in a recipe.
    """
    names = aliases(gm)
    nodes, skipped, matched = [], {}, 0
    for node in gm.graph.nodes:
        if not is_op(node, aten.linear.default) or get_tensor(gm, node.args[1]) is None:
            continue
        module = module_name(node.args[1].target)
        if not cfg.selects(module):
            continue
        matched += 1
        if is_shared(gm, node.args[1]) and not (shared_ok and shared_ok(node.args[1])):
            # an alias name, or a second reader once cleanup() dropped the name
            tied = [n for n in names.get(node.args[1].target, []) if n != node.args[1].target]
            other = tied[0] if tied else "another node (e.g. the embedding)"
            skipped[module] = f"weight is shared with {other}; quantize it with quantize_embedding"
            continue
        nodes.append(node)
    if not matched:
        raise PassError(
            f"{pass_name}: targets {list(cfg.targets)} (ignore {list(cfg.ignore)}) match no linear layer; "
            "module names look like 'model.layers.0.self_attn.q_proj'"
        )
    return nodes, skipped


def fp16_scales(q: QuantizedWeight) -> QuantizedWeight:
    """Scales rounded to float16 values (kept as float32): the ONNX file then stores them in half the bytes
    (graphpress.lowering.onnx.compact) while the program stays bit-identical to the file. The rounding moves
    a weight by at most 2^-11 of its value, far below the quantization step."""
    return dataclasses.replace(q, scales=q.scales.half().float())


def replace_linear(gm: fx.GraphModule, node: fx.Node, q: QuantizedWeight, block_size: int | None = None,
                   accuracy_level: int = 0, kernel: str = "nbits") -> fx.Node:
    """Swap one linear for matmul_nbits on the packed ``q``; the float weight is left for cleanup()."""
    packed = pack_matmulnbits(fp16_scales(q), block_size)
    prefix = module_name(node.args[1].target)
    x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
    qweight = new_get_attr(gm, f"{prefix}.qweight", torch.from_numpy(packed.B), node, buffer=True)
    scales = new_get_attr(gm, f"{prefix}.scales", torch.from_numpy(packed.scales), node, buffer=True)
    zeros = (new_get_attr(gm, f"{prefix}.qzeros", torch.from_numpy(packed.zero_points), node, buffer=True)
             if packed.zero_points is not None else None)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            torch.ops.graphpress.matmul_nbits.default,
            (x, qweight, scales, zeros, bias, packed.K, packed.N, packed.bits, packed.block_size, accuracy_level,
             kernel),
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
            replace_linear(gm, node, quantize_rtn(w, self.spec, clip_search=self.clip_search),
                           accuracy_level=self.accuracy_level, kernel=self.kernel)
        cleanup(gm)
        return PassResult(gm, bool(nodes), {"quantized": len(nodes), "skipped": skipped})
