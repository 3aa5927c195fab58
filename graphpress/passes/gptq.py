"""GPTQ: weight-only quantization that corrects rounding error with second-order information.

    linear(x, W, b)  =>  matmul_nbits(x, B, scales, zeros, b, ...)   with  W_hat = GPTQ(W, H),  H = 2 X^T X / T

Calibration streams through the program one block at a time (graphpress.calibration.BlockStream): for each
block, the inputs of its selected linears are observed to accumulate H (one accumulator per distinct input,
so q/k/v or gate/up share theirs), the weights are quantized (graphpress.quant.gptq), the block's float weights
are overwritten by their dequantized values, and the block runs again so the next block calibrates on the
outputs of the quantized ones. Peak memory: the model, one block's Hessians, and the boundary activations.

``match_float`` (asymmetric calibration, GPTAQ): the stream also carries the float model's activations, and
each linear is quantized to reproduce the float layer on its float inputs from its inputs in the quantized
program (``graphpress.quant.gptq.float_target``), so the error of the blocks before it is corrected as well
as its own. Costs one more forward of each block and a second set of boundary activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from graphpress.calibration import BlockStream, Part, linear_weights
from graphpress.graph import cleanup
from graphpress.passes.base import PassContext, PassError, PassResult
from graphpress.passes.weight_only import WeightOnlyConfig, replace_linear, selected_linears
from graphpress.quant.gptq import cross_accumulate, float_target, gptq_quantize, hessian_accumulate
from graphpress.quant.qweight import QuantizedWeight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQ(WeightOnlyConfig):
    name: ClassVar[str] = "gptq"
    exact: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True
    damp: float = 0.01
    block_size: int = 128  # columns updated together (lazy batch), not the quantization group
    act_order: bool = False
    clip_search: bool = False  # weight-error range search per group; see QuantizeRTN
    match_float: bool = False  # GPTAQ: target the float model's outputs on its float inputs
    # quantize a block's linears in dependency order (q/k/v, then o, ...), each calibrated on the outputs of
    # the quantized ones before it: one more forward of the block per stage
    sequential: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.damp < 1:
            raise ValueError(f"gptq: damp must be in [0, 1), not {self.damp}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.calibration:
            raise PassError("gptq needs calibration data: set `calibration:` in the recipe or pass batches")
        nodes, skipped = selected_linears(gm, self, self.name)
        wanted = {n.args[1].target for n in nodes}
        quantized: dict[str, QuantizedWeight] = {}

        def on_part(part: Part, forward: Any) -> None:
            linears = [(node, t) for node, t in linear_weights(part) if t in wanted]
            if not linears:
                return
            for stage in (_stages(linears) if self.sequential else [linears]):
                hessians, crosses = _hessians(forward, stage, self.match_float)
                for _, target in stage:
                    w = gm.get_parameter(target)
                    v = w.detach().float()
                    if self.match_float:
                        v = float_target(v, hessians[target], crosses[target], self.damp)
                    q = gptq_quantize(v, hessians[target], self.spec, damp=self.damp, block_size=self.block_size,
                                      act_order=self.act_order, clip_search=self.clip_search)
                    quantized[target] = q
                    with torch.no_grad():  # later linears and blocks calibrate on the quantized outputs
                        w.copy_(q.dequantize().to(w.dtype))
            log.info("gptq: %s (%d linears)", part.name, len(linears))

        BlockStream(gm, ctx.calibration).run(on_part, weights=wanted, reference=self.match_float)
        for node in nodes:
            target = node.args[1].target
            if target not in quantized:  # a linear outside the streamed parts: no Hessian was seen
                skipped[target] = "not reached by the calibration stream"
                continue
            replace_linear(gm, node, quantized[target], accuracy_level=self.accuracy_level, kernel=self.kernel)
        cleanup(gm)
        stats = {"quantized": len(quantized), "skipped": skipped, "calibration_batches": len(ctx.calibration)}
        return PassResult(gm, bool(quantized), stats)


def _stages(linears: list[tuple[fx.Node, str]]) -> list[list[tuple[fx.Node, str]]]:
    """The linears of a part grouped by depth: a linear's stage is one more than the deepest selected linear
    its input depends on (Llama: q/k/v, o, gate/up, down)."""
    depth: dict[fx.Node, int] = {}
    selected = {node for node, _ in linears}
    for node, _ in linears:  # graph order: ancestors first
        seen, frontier, d = set(), [node.args[0]], 0
        while frontier:
            n = frontier.pop()
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if n in selected:
                d = max(d, depth[n] + 1)
            frontier.extend(n.all_input_nodes)
        depth[node] = d
    stages: dict[int, list[tuple[fx.Node, str]]] = {}
    for node, target in linears:
        stages.setdefault(depth[node], []).append((node, target))
    return [stages[d] for d in sorted(stages)]


def _hessians(forward: Any, linears: list[tuple[fx.Node, str]], paired: bool = False
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the part once, accumulating H per distinct input (q/k/v and gate/up share one) and, when
    ``paired``, the cross term G with the float model's input of the same linear."""
    owner: dict[str, str] = {}
    first: dict[fx.Node, str] = {}
    for node, target in linears:
        owner[target] = first.setdefault(node.args[0], target)
    acc: dict[str, tuple[torch.Tensor | None, int]] = {}
    cross: dict[str, tuple[torch.Tensor | None, int]] = {}

    def observe(target: str, x: torch.Tensor, x_ref: torch.Tensor | None = None) -> None:
        if owner.get(target) == target:
            H, n = acc.get(target, (None, 0))
            acc[target] = hessian_accumulate(H, n, x.detach().float())
            if x_ref is not None:
                G, m = cross.get(target, (None, 0))
                cross[target] = cross_accumulate(G, m, x.detach().float(), x_ref.detach().float())

    forward(observe, paired=paired)
    hessians = {target: acc[owner[target]][0] for _, target in linears}
    crosses = {target: cross[owner[target]][0] for _, target in linears} if paired else {}
    return hessians, crosses
