"""LoRA on the graph: low-rank adapters beside chosen linears, trained (graphpress.passes.distill), then merged.

    lora:        y = linear(x, W, b)  =>  y = linear(x, W, b) + (alpha / r) * linear(linear(x, A), B)
    merge_lora:  W += (alpha / r) * B @ A, the adapter's two matmuls removed (a float W only)

A [r, K] starts random (Kaiming uniform, as PEFT does) and B [N, r] at zero, so ``lora`` is exact: the program
computes what it computed until B trains. The base is a float linear or a quantized one
(``graphpress::quantized_linear``, QLoRA-style): with ``freeze_base`` its weights stop requiring gradients.
``merge_lora`` folds each adapter into a float weight (exact up to rounding); beside a quantized weight the
adapter stays as its two small matmuls (merging would need requantizing), and the report says so. The adapters'
parameters are ``<module>.lora_a`` / ``<module>.lora_b``: distill's ``train: ['\\.lora_[ab]$']`` trains only them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import graphpress.kernels.quantized  # noqa: F401  (defines torch.ops.graphpress.quantized_linear)
from graphpress.calibration import block_name
from graphpress.graph import (
    cleanup,
    free_target,
    get_tensor,
    infer_val,
    is_op,
    module_name,
    new_get_attr,
)
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.passes.fake_quant import FAKE, QLINEAR, linear_tensors
from graphpress.roles import linear_roles

aten = torch.ops.aten


@dataclass(frozen=True)
class LoRA(Selection, Pass):
    """Rank-``rank`` adapters beside the selected linears (float, fake-quantized or quantized)."""

    name: ClassVar[str] = "lora"
    exact: ClassVar[bool] = True  # B starts at zero
    rank: int = 16
    alpha: float = 16.0
    freeze_base: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora: rank must be a positive integer, not {self.rank!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        roles = linear_roles(gm)
        generator = torch.Generator().manual_seed(self.seed)
        added, skipped = 0, {}
        for node in list(gm.graph.nodes):
            weight = _base_weight(node)
            if weight is None:
                continue
            module = module_name(weight.target)
            found = roles.get(node, frozenset({"block"} if block_name(node) else ()))
            if not self.selects(module, found):
                continue
            n, k = node.meta["val"].shape[-1], node.args[0].meta["val"].shape[-1]
            if self.rank >= min(n, k):
                skipped[module] = f"rank {self.rank} is not below min(N, K) = {min(n, k)}"
                continue
            _add_adapter(gm, node, module, n, k, self.rank, self.alpha / self.rank, generator)
            if self.freeze_base:
                for t in linear_tensors(node):
                    p = dict(gm.named_parameters()).get(t)
                    if p is not None:
                        p.requires_grad_(False)
            added += 1
        if not added and not self.roles:
            raise PassError(f"{self.name}: targets {list(self.targets)} (ignore {list(self.ignore)}) match no "
                            "linear layer; module names look like 'model.layers.0.self_attn.q_proj'")
        cleanup(gm)
        return PassResult(gm, added > 0, {"adapters": added, "rank": self.rank, "skipped": skipped})


def _base_weight(node: fx.Node) -> fx.Node | None:
    """The stored tensor that names a linear's module: its weight, the weight under a fake quantization, or a
    quantized linear's codes."""
    if is_op(node, aten.linear.default):
        w = node.args[1]
        if isinstance(w, fx.Node) and is_op(w, FAKE):
            w = w.args[0]
        return w if isinstance(w, fx.Node) and w.op == "get_attr" else None
    if is_op(node, QLINEAR):
        return node.args[1] if isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr" else None
    return None


def _add_adapter(gm: fx.GraphModule, node: fx.Node, module: str, n: int, k: int, rank: int, scale: float,
                 generator: torch.Generator) -> None:
    a = torch.empty(rank, k)
    bound = 1 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT initialize
    a.uniform_(-bound, bound, generator=generator)
    dtype = node.meta["val"].dtype
    users = list(node.users)
    a_node = new_get_attr(gm, free_target(gm, f"{module}.lora_a"), a.to(dtype), node)
    b_node = new_get_attr(gm, free_target(gm, f"{module}.lora_b"), torch.zeros(n, rank, dtype=dtype), node)
    for t in (a_node, b_node):
        gm.get_parameter(t.target).requires_grad_(True)
    with gm.graph.inserting_after(node):
        down = gm.graph.call_function(aten.linear.default, (node.args[0], a_node))
    with gm.graph.inserting_after(down):
        up = gm.graph.call_function(aten.linear.default, (down, b_node))
    with gm.graph.inserting_after(up):
        scaled = gm.graph.call_function(aten.mul.Tensor, (up, scale))
    with gm.graph.inserting_after(scaled):
        total = gm.graph.call_function(aten.add.Tensor, (node, scaled))
    stack = {k_: v for k_, v in node.meta.items() if k_ in ("nn_module_stack", "stack_trace")}
    for new in (down, up, scaled, total):
        new.meta.update(stack)
        infer_val(new)
    for user in users:
        user.replace_input_with(node, total)


@dataclass(frozen=True)
class MergeLoRA(Pass):
    """Fold each adapter into its float base weight; beside a quantized base it stays (reported)."""

    name: ClassVar[str] = "merge_lora"
    exact: ClassVar[bool] = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        merged, kept = 0, {}
        for total in list(gm.graph.nodes):
            found = _adapter(gm, total)
            if found is None:
                continue
            base, a, b, scale, branch = found
            w = base.args[1]
            module = module_name(a.target)
            if not (isinstance(w, fx.Node) and w.op == "get_attr" and is_op(base, aten.linear.default)):
                kept[module] = "its base weight is quantized: the adapter stays as two small matmuls"
                continue
            if len(w.users) > 1 or get_tensor(gm, w) is None:
                kept[module] = "its base weight is read elsewhere (tied): merging would change the other reader"
                continue
            weight = gm.get_parameter(w.target) if w.target in dict(gm.named_parameters()) else None
            if weight is None:
                kept[module] = "its base weight is not a parameter"
                continue
            with torch.no_grad():
                delta = scale * (get_tensor(gm, b).double() @ get_tensor(gm, a).double())
                weight.copy_((weight.double() + delta).to(weight.dtype))
            total.replace_all_uses_with(base)
            for node in (total, *branch):  # A and B go with them (cleanup)
                gm.graph.erase_node(node)
            merged += 1
        cleanup(gm)
        return PassResult(gm, merged > 0, {"merged": merged, "skipped": kept})


def _adapter(gm: fx.GraphModule, total: fx.Node
             ) -> tuple[fx.Node, fx.Node, fx.Node, float, list[fx.Node]] | None:
    """``add(base, mul(linear(linear(x, A), B), s))`` as lora wrote it -> (base, A, B, s, the branch's nodes,
    last first)."""
    if not is_op(total, aten.add.Tensor) or len(total.args) != 2:
        return None
    base, scaled = total.args
    if not (isinstance(scaled, fx.Node) and is_op(scaled, aten.mul.Tensor) and isinstance(scaled.args[1], float)):
        return None
    up = scaled.args[0]
    if not (is_op(up, aten.linear.default) and isinstance(up.args[1], fx.Node)
            and str(up.args[1].target).endswith(".lora_b")):
        return None
    down = up.args[0]
    if not (is_op(down, aten.linear.default) and isinstance(down.args[1], fx.Node)
            and str(down.args[1].target).endswith(".lora_a")):
        return None
    if any(len(n.users) != 1 for n in (scaled, up, down)):
        return None
    return base, down.args[1], up.args[1], scaled.args[1], [scaled, up, down]

