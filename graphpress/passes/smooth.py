"""Activation-aware channel scaling (AWQ, SmoothQuant): move per-input-channel scales from activations to weights.

    producer -> x -> linear_i(x, W_i, b_i)   =>   producer' -> x / s -> linear_i(x / s, W_i * s[None, :], b_i)

exact for any s [K] > 0, since (x / s) @ (W_i * s)^T = x @ W_i^T (W_i: [N_i, K]; the linears of one group all
read the same x). 1/s is folded into the producer of x where that changes nothing else (``apply_input_scale``):

    mul(y, gamma)                      gamma [K] a parameter (HF RMSNorm)    =>  gamma / s
    layer_norm(y, [K], gamma, beta)    (rms_norm(y, [K], gamma))             =>  gamma / s, beta / s
    linear(y, V, c)                    V [K, J]                              =>  V / s[:, None], c / s
    mul(a, linear(y, V, c))            SwiGLU's silu(gate) * up              =>  V / s[:, None], c / s
    otherwise                                                                =>  mul(x, 1 / s), a new parameter

reached from x backwards through same-dtype casts, clones and slices of leading dimensions. The fallback
``mul`` is always correct; it is taken whenever anything besides the group reads the producer's output
(BERT's LayerNorm also feeds the residual add), a parameter to scale is shared, or the producer is
something else (attention before o_proj, GELU before BERT's output dense, a norm without scale).

The passes choose s from calibration statistics (graphpress.statistics, streamed block by block; the math in
graphpress.quant.scaling):
    AWQ:          s searched so that round-to-nearest of W_i * s loses least on x (then quantize with rtn/gptq)
    SmoothQuant:  s = max|x|^alpha / max|W|^(1 - alpha), flattening activation outliers for W8A8
Both are exact rewrites (the runner verifies them); what they buy shows only after quantization.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress import graph
from graphpress.calibration import Part
from graphpress.graph import aten, is_op, last_dim
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.passes.weight_only import WeightOnlyConfig, selected_linears
from graphpress.quant.scaling import awq_search_scales, smoothquant_scales, smoothquant_search_scales
from graphpress.statistics import Group, GroupStats, Request, Stats, spread, stream_statistics

log = logging.getLogger(__name__)

_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)
_IDENTITIES = (aten.clone.default, aten.alias.default)

# --- surgery ---------------------------------------------------------------------------------------------


def check_input_scale(gm: fx.GraphModule, linears: list[fx.Node], s: torch.Tensor) -> str | None:
    """Why ``apply_input_scale(gm, linears, s)`` cannot run, or None."""
    if not linears:
        return "no linears given"
    x = linears[0].args[0]
    for lin in linears:
        if not is_op(lin, aten.linear.default) or lin.args[0] is not x:
            return f"{lin.name} is not a linear reading {x.name}; a group must share its input"
        w = graph.get_tensor(gm, lin.args[1])
        if w is None or w.dim() != 2:
            return f"{lin.name} has a computed or non-2-D weight"
        if graph.is_shared(gm, lin.args[1]) and embedding_tie(gm, lin.args[1]) is None:
            return f"{graph.module_name(lin.args[1].target)} weight is shared with another tensor or reader"
        if w.shape[1] != s.numel():
            return f"{graph.module_name(lin.args[1].target)} has K={w.shape[1]}, the scale has {s.numel()} entries"
    if s.dim() != 1 or not torch.isfinite(s).all() or not (s > 0).all():
        return "the scale must be a finite, positive 1-D tensor"
    return None


def apply_input_scale(gm: fx.GraphModule, linears: list[fx.Node], s: torch.Tensor) -> str:
    """W_i *= s (columns) for each linear of the group, 1/s folded into the input's producer; exact.

    Returns where 1/s went: "norm" (a norm's or a mul's 1-D scale), "linear" (a producing linear's rows)
    or "inserted" (a new ``mul(x, 1/s)``). Raises ValueError when ``check_input_scale`` refuses.
    """
    reason = check_input_scale(gm, linears, s)
    if reason:
        raise ValueError(f"apply_input_scale: {reason}")
    s64 = s.detach().double().cpu()
    for lin in linears:
        tied = embedding_tie(gm, lin.args[1]) if graph.is_shared(gm, lin.args[1]) else None
        _scale(gm, lin.args[1].target, s64[None, :])
        for emb in tied or []:  # the table's rows are read scaled now: E[ids] = (E * s)[ids] / s
            _unscale_embedding(gm, emb, s64)
    x = linears[0].args[0]
    absorbers = _absorbers(gm, x, set(linears), s.numel())
    if absorbers is None:
        _insert_mul(gm, x, linears, s64)
        return "inserted"
    for target, rows in absorbers:
        _scale(gm, target, (1 / s64)[:, None] if rows else 1 / s64)
    return "linear" if any(rows for _, rows in absorbers) else "norm"


def _scale(gm: fx.GraphModule, target: str, factor: torch.Tensor) -> None:
    """target *= factor, as a new tensor bound to every name of its storage (ties stay tied)."""
    try:
        t = gm.get_parameter(target)
    except AttributeError:
        t = gm.get_buffer(target)
    new = (t.detach().double() * factor).to(t.dtype)
    is_buffer = not isinstance(t, torch.nn.Parameter)
    for name in graph.aliases(gm).get(target, [target]):
        graph.set_tensor(gm, name, new, buffer=is_buffer)


def embedding_tie(gm: fx.GraphModule, weight: fx.Node) -> list[fx.Node] | None:
    """For a linear weight whose storage is otherwise read only as an embedding table (a tied output head):
    those embedding nodes. None for any other sharing."""
    names = graph.aliases(gm).get(weight.target, [weight.target])
    readers = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target in names for u in n.users]
    linears = [u for u in readers if is_op(u, aten.linear.default) and len(u.args) > 1
               and isinstance(u.args[1], fx.Node) and u.args[1].target in names]
    others = [u for u in readers if u not in linears]
    if len(linears) != 1 or not others:
        return None
    if all(is_op(u, aten.embedding.default) and u.args[0].target in names for u in others):
        return others
    return None


def _unscale_embedding(gm: fx.GraphModule, emb: fx.Node, s64: torch.Tensor) -> None:
    """mul(embedding(E * s, ids), 1 / s): the rows an embedding returns stay those of E."""
    with gm.graph.inserting_after(emb):
        mul = _mul_by(gm, emb, 1 / s64, graph.module_name(emb.args[0].target) + ".output_scale", emb, emb)
    emb.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)


def _mul_by(gm: fx.GraphModule, x: fx.Node, factor: torch.Tensor, name: str, before: fx.Node,
            meta_from: fx.Node) -> fx.Node:
    """mul(x, factor) at the graph's insertion point, factor a new buffer-like parameter named after ``name``;
    the node takes ``meta_from``'s module stack, so that calibration streams keep it in that block."""
    inv = graph.new_get_attr(gm, graph.free_target(gm, name), factor.to(x.meta["val"].dtype), before=before)
    mul = gm.graph.call_function(aten.mul.Tensor, (x, inv))
    mul.meta = {k: v for k, v in meta_from.meta.items() if k in ("nn_module_stack", "stack_trace")}
    graph.infer_val(mul)
    return mul


def _real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_op(u, aten._assert_tensor_metadata.default)]


def _transparent(node: fx.Node) -> bool:
    """Ops through which a last-dimension scale passes unchanged (their first argument is the data)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.dim() == 0:
        return False
    if node.target in _CASTS:
        return src.dtype == out.dtype
    if node.target in _IDENTITIES:
        return True
    if is_op(node, aten.slice.Tensor):
        dim = node.args[1] if len(node.args) > 1 else 0
        return isinstance(dim, int) and dim % src.dim() != src.dim() - 1
    return False


def _absorbers(gm: fx.GraphModule, x: fx.Node, group: set[fx.Node], k: int) -> list[tuple[str, bool]] | None:
    """Parameters to divide by s, as (target, along rows); None when 1/s must be a new mul."""
    if set(_real_users(x)) - group:
        return None  # another reader of x would see x / s
    node = x
    while _transparent(node) and len(_real_users(node.args[0])) == 1:
        node = node.args[0]
    if is_op(node, aten.mul.Tensor) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        for p, other in (node.args, node.args[::-1]):
            t = graph.get_tensor(gm, p)
            if t is not None and t.dim() == 1 and t.numel() == k and last_dim(other) == k and not graph.is_shared(gm, p):
                return [(p.target, False)]
        for p, other in (node.args, node.args[::-1]):
            if p is not other and last_dim(p) == k and _real_users(p) == [node]:
                found = _linear_rows(gm, p)
                if found is not None:
                    return found
        return None
    if is_op(node, aten.layer_norm.default, aten.rms_norm.default):
        gamma = node.args[2] if len(node.args) > 2 else None
        beta = node.args[3] if is_op(node, aten.layer_norm.default) and len(node.args) > 3 else None
        params = [p for p in (gamma, beta) if p is not None]
        if list(node.args[1]) != [k] or gamma is None:
            return None  # no scale to divide (a shift alone cannot absorb one)
        if any(graph.get_tensor(gm, p) is None or graph.is_shared(gm, p) for p in params):
            return None
        return [(p.target, False) for p in params]
    return _linear_rows(gm, node)


def _linear_rows(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, bool]] | None:
    """A float linear's weight rows and bias, when ``node`` is one whose parameters nothing else reads."""
    if not is_op(node, aten.linear.default):
        return None
    params = [a for a in node.args[1:3] if a is not None]
    if any(graph.get_tensor(gm, a) is None or graph.is_shared(gm, a) for a in params):
        return None
    return [(a.target, a is node.args[1]) for a in params]


def _insert_mul(gm: fx.GraphModule, x: fx.Node, linears: list[fx.Node], s64: torch.Tensor) -> fx.Node:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(linears, key=order.__getitem__)
    with gm.graph.inserting_before(first):
        mul = _mul_by(gm, x, 1 / s64, graph.module_name(first.args[1].target) + ".input_scale", first, first)
    for lin in linears:
        lin.args = (mul, *lin.args[1:])
    return mul


# --- calibration -----------------------------------------------------------------------------------------


def input_groups(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """Linears grouped by the input node they read (q/k/v, gate/up), in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in nodes:
        groups.setdefault(n.args[0], []).append(n)
    return list(groups.values())


# choose(input statistics of a group, its weights W_i [N_i, K] float32) -> s [K]
Choose = Callable[[Stats, list[torch.Tensor]], torch.Tensor]


def scale_groups(gm: fx.GraphModule, ctx: PassContext, cfg: Selection, name: str, request: Request,
                 choose: Choose, max_batches: int = 0) -> PassResult:
    """Stream the calibration batches (``max_batches`` > 0: that many, spread over them); for each group of
    selected linears, observe its input (``request``, graphpress.statistics), choose s, apply it.

    Every group is observed on the unscaled program: the rewrite is exact, so the stream's own outputs (from
    the forward that observed them) are what the scaled block computes too.
    """
    if not ctx.calibration:
        raise PassError(f"{name} needs calibration data: set `calibration:` in the recipe or pass batches")
    # a head tied to the embedding can be scaled too: the embedding's rows are scaled back after the gather
    nodes, skipped = selected_linears(gm, cfg, name, shared_ok=lambda w: embedding_tie(gm, w) is not None)
    groups: list[list[fx.Node]] = []
    for group in input_groups(nodes):
        reason = check_input_scale(gm, group, torch.ones(graph.get_tensor(gm, group[0].args[1]).shape[1]))
        if reason:
            for lin in group:
                skipped[graph.module_name(lin.args[1].target)] = reason
        else:
            groups.append(group)
    members = {g[0].args[1].target: g for g in groups}  # groups not yet scaled, by their first weight
    absorbed: dict[str, int] = {}
    linears = 0

    def on_stats(part: Part, stats: dict[str, GroupStats]) -> None:
        nonlocal linears
        for t, observed in stats.items():
            group = members.pop(t)
            weights = [graph.get_tensor(gm, lin.args[1]).detach().float() for lin in group]
            where = apply_input_scale(gm, group, choose(observed.inputs, weights))
            absorbed[where] = absorbed.get(where, 0) + 1
            linears += len(group)
        log.info("%s: %s (%d groups)", name, part.name, len(stats))

    observed = [Group(tuple(lin.args[1].target for lin in g)) for g in groups]
    batches = spread(ctx.calibration, max_batches)
    stream_statistics(gm, batches, observed, request, on_stats)
    for group in members.values():  # groups outside the streamed parts: nothing observed
        for lin in group:
            skipped[graph.module_name(lin.args[1].target)] = "not reached by the calibration stream"
    gm.graph.lint()  # no parameter became unused; cleanup() would also drop unread aliases of tied ones
    gm.recompile()
    scaled = sum(absorbed.values())
    stats = {"scaled_groups": scaled, "linears": linears, "absorbed": absorbed, "skipped": skipped,
             "calibration_batches": len(batches)}
    return PassResult(gm, scaled > 0, stats)


# --- passes ----------------------------------------------------------------------------------------------


def _check_max_batches(name: str, n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name}: max_batches={n!r} must be a whole number >= 0 (0: all)")


@dataclass(frozen=True)
class AWQ(WeightOnlyConfig):
    """Activation-aware scales for a later weight-only quantization (rtn, gptq) of the same bits / group_size."""

    name: ClassVar[str] = "awq"
    exact: ClassVar[bool] = True  # the rewrite is; the scales only pay off once the weights are rounded
    needs_calibration: ClassVar[bool] = True
    grid: int = 20
    max_rows: int = 4096  # activation rows per group that the search weighs the error on
    # calibration batches to observe, spread over the recipe's (0: all): the search weighs max_rows rows,
    # which a few batches already hold
    max_batches: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1 or self.max_rows < 1:
            raise ValueError(f"awq: grid ({self.grid}) and max_rows ({self.max_rows}) must be >= 1")
        _check_max_batches(self.name, self.max_batches)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        def choose(x: Stats, weights: list[torch.Tensor]) -> torch.Tensor:
            return awq_search_scales(x.rows, weights, self.spec, self.grid, max_rows=self.max_rows,
                                     int8_compute=self.activation_bits == 8)

        return scale_groups(gm, ctx, self, self.name, Request(rows=self.max_rows), choose, self.max_batches)


@dataclass(frozen=True)
class SmoothQuant(Selection, Pass):
    """Per-channel scales that flatten activation outliers into the weights, before W8A8."""

    name: ClassVar[str] = "smoothquant"
    exact: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    # a number in [0, 1], or "auto": per group, the alpha of a grid that minimizes the W8A8 product's error
    # on calibration rows (graphpress.quant.scaling.smoothquant_search_scales)
    alpha: float | str = 0.5
    max_rows: int = 1024  # activation rows per group that "auto" weighs the error on
    # calibration batches to observe, spread over the recipe's (0: all): maxima and a bounded sample of rows
    # need fewer tokens than GPTQ's Hessians, and observing an LLM's head streams the whole model
    max_batches: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ValueError(f"smoothquant: alpha={self.alpha!r} must lie in [0, 1] or be 'auto'")
        _check_max_batches(self.name, self.max_batches)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen: list[float] = []
        auto = self.alpha == "auto"

        def choose(x: Stats, weights: list[torch.Tensor]) -> torch.Tensor:
            assert x.max_abs is not None
            if not auto:
                return smoothquant_scales(x.max_abs, weights, float(self.alpha))
            s, alpha = smoothquant_search_scales(x.rows, x.max_abs, weights, max_rows=self.max_rows)
            chosen.append(alpha)
            return s

        request = Request(max_abs=True, rows=self.max_rows if auto else 0)
        result = scale_groups(gm, ctx, self, self.name, request, choose, self.max_batches)
        if chosen:
            result.stats["alphas"] = chosen
        return result
