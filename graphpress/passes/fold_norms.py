"""Fold the scale (and shift) of RMSNorm / LayerNorm into the linears that read the norm.

    mul(n, gamma)                  -> Linear(W, b)  =>  n                                -> Linear(W', b)
    rms_norm(x, [H], gamma, eps)   -> Linear(W, b)  =>  rms_norm(x, [H], None, eps)      -> Linear(W', b)
    layer_norm(x, [H], gamma, beta, eps)
                                   -> Linear(W, b)  =>  layer_norm(x, [H], None, None, eps) -> Linear(W', b')

    with  W' = W * gamma[None, :]   and   b' = b + W @ beta   (b = 0 when the linear has none)

since ``(n * gamma + beta) @ W^T + b = n @ (W * gamma[None, :])^T + (b + W @ beta)``; W: [N, H], gamma, beta: [H].

The ``mul`` rule is what a Hugging Face RMSNorm captures to (``weight * hidden_states.to(dtype)``), but it is
architecture-free: any product with a 1-D parameter over the last dimension folds. The norm's output may
reach its linears through ops that commute with a last-dimension scale (same-dtype casts, eval dropout,
slices of leading dimensions, as before Llama's ``lm_head``). What is left is a scale-free norm: the
canonical form that GPTQ, SmoothQuant and rotations start from.

Refused (``stats["skipped"][norm module]: reason``): a norm output with any consumer other than a linear's
input (BERT's post-LN also feeds the residual add), a consumer weight shared or tied with another tensor
(a tied ``lm_head``), a gamma or beta used elsewhere, a product that promotes the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress import graph
from graphpress.graph import aten, is_op
from graphpress.passes.base import Pass, PassContext, PassResult

_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)
_IDENTITIES = (aten.clone.default, aten.alias.default)


def fold_scale_into_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') with ``linear(n * gamma + beta, W, b) == linear(n, W', b')``.

    weight: [N, K]; bias: [N] or None; gamma, beta: [K] or None (scale 1, shift 0). Computed in float64,
    returned in the weight's dtype; b' is None only when both bias and beta are.
    """
    w = weight.double()
    new_w = w * gamma.double()[None, :] if gamma is not None else w
    new_b = bias.double() if bias is not None else None
    if beta is not None:
        shift = w @ beta.double()  # [N]; beta is added after the scale, so it meets the unscaled W
        new_b = shift if new_b is None else new_b + shift
    if new_b is not None:
        new_b = new_b.to(bias.dtype if bias is not None else weight.dtype)
    return new_w.to(weight.dtype), new_b


@dataclass
class _Norm:
    node: fx.Node  # the mul / rms_norm / layer_norm
    gamma: fx.Node | None  # get_attr (for mul: possibly behind same-dtype casts)
    beta: fx.Node | None  # get_attr
    hidden: int  # H, the normalized last dimension
    name: str  # the norm's module name, for stats and messages
    scaled: fx.Node | None = None  # mul only: the unscaled operand that replaces the product


@dataclass(frozen=True)
class FoldNormScales(Pass):
    """Fold RMSNorm / LayerNorm gamma (and beta) into the linears that consume the norm; exact."""

    name: ClassVar[str] = "fold_norm_scales"
    exact: ClassVar[bool] = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded, updated = 0, 0
        skipped: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            norm = _match(gm, node)
            if norm is None:
                continue
            linears = _check(gm, norm)
            if isinstance(linears, str):
                key = norm.name if norm.name not in skipped else f"{norm.name} ({node.name})"
                skipped[key] = linears
                continue
            _rewrite(gm, norm, linears)
            folded += 1
            updated += len(linears)
        if folded:
            graph.cleanup(gm)  # the gamma / beta parameters lose their last reader here
        stats = {"folded_norms": folded, "linears_updated": updated, "skipped": skipped}
        return PassResult(gm=gm, modified=folded > 0, stats=stats)


# --- pattern ---------------------------------------------------------------------------------------------


def _match(gm: fx.GraphModule, node: fx.Node) -> _Norm | None:
    if is_op(node, aten.layer_norm.default, aten.rms_norm.default):
        shape = node.args[1]
        gamma = node.args[2] if len(node.args) > 2 else None
        beta = node.args[3] if is_op(node, aten.layer_norm.default) and len(node.args) > 3 else None
        params = [p for p in (gamma, beta) if p is not None]
        # normalized over the last dimension only, affine: what a per-input-channel fold can absorb
        if not params or len(shape) != 1 or not isinstance(shape[0], int):
            return None
        source = _param_source(gm, params[0])
        name = graph.module_name(source.target) if source is not None else node.name
        return _Norm(node, gamma, beta, shape[0], name)
    if not is_op(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for gamma, other in (node.args, node.args[::-1]):
        source = _param_source(gm, gamma)
        x = other.meta.get("val") if isinstance(other, fx.Node) else None
        if source is None or not isinstance(x, torch.Tensor) or x.dim() == 0 or _param_source(gm, other):
            continue
        g = graph.get_tensor(gm, source)
        # gamma: [H] against x: [..., H] with H static, so the product keeps x's shape
        if (
            g.dim() == 1
            and g.is_floating_point()
            and isinstance(x.shape[-1], int)
            and x.shape[-1] == g.numel()
        ):
            return _Norm(node, gamma, None, g.numel(), graph.module_name(source.target), scaled=other)
    return None


def _param_source(gm: fx.GraphModule, node: object) -> fx.Node | None:
    """The get_attr behind ``node`` through same-dtype casts, else None."""
    while isinstance(node, fx.Node) and node.op == "call_function" and _is_same_dtype_cast(node):
        node = node.args[0]
    return node if graph.get_tensor(gm, node) is not None else None


def _is_same_dtype_cast(node: fx.Node) -> bool:
    if node.target not in _CASTS or not isinstance(node.args[0], fx.Node):
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    return (
        isinstance(src, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and src.dtype == out.dtype
        and src.device == out.device
    )


# --- check -----------------------------------------------------------------------------------------------


def _check(gm: fx.GraphModule, norm: _Norm) -> list[fx.Node] | str:
    """The linears to update, or the reason the norm stays as it is."""
    for p in (norm.gamma, norm.beta):
        if p is None:
            continue
        source = _param_source(gm, p)
        if source is None:
            return f"its {'scale' if p is norm.gamma else 'shift'} {p.name} is computed, not a parameter"
        if _chain_shared(gm, p, source):
            return f"its parameter {source.target} is also used elsewhere"
    if norm.scaled is not None:
        x, out = norm.scaled.meta["val"], norm.node.meta.get("val")
        if not isinstance(out, torch.Tensor) or out.dtype != x.dtype:
            return f"the product {norm.node.name} promotes {x.dtype} to {getattr(out, 'dtype', '?')}"
    linears = _linear_readers(norm.node)
    if isinstance(linears, str):
        return linears
    for lin in linears:
        reason = _linear_refuses(gm, lin, norm)
        if reason:
            return reason
    return linears


def _chain_shared(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """True when the parameter, or a cast of it on the way to ``node``, has readers besides the norm."""
    if graph.is_shared(gm, source):
        return True
    while node is not source:
        if len(node.users) > 1:
            return True
        node = node.args[0]
    return False


def _linear_readers(norm: fx.Node) -> list[fx.Node] | str:
    """Every linear that reads ``norm``'s output as its input, through ops that commute with a last-dim scale.

    Returns a reason instead when any other consumer sees the output.
    """
    linears: list[fx.Node] = []
    frontier = [norm]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if is_op(user, aten._assert_tensor_metadata.default):
                continue  # checks dtype / device, which the rewrite keeps
            if is_op(user, aten.linear.default) and user.args[0] is n and n not in user.args[1:]:
                linears.append(user)
            elif _commutes_with_last_dim_scale(user, n):
                frontier.append(user)
            elif user.op == "output":
                return "its output is a graph output"
            else:
                return f"its output feeds {user.name} ({_op_name(user)}), not only linears"
    return linears if linears else "no linear reads its output"


def _commutes_with_last_dim_scale(user: fx.Node, src: fx.Node) -> bool:
    if user.op != "call_function" or user.args[0] is not src or src in user.args[1:]:
        return False
    if _is_same_dtype_cast(user) or user.target in _IDENTITIES:
        return True
    if is_op(user, aten.dropout.default):
        return len(user.args) > 2 and user.args[2] is False  # eval dropout is the identity
    if is_op(user, aten.slice.Tensor):
        val = src.meta.get("val")
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
        return isinstance(val, torch.Tensor) and isinstance(dim, int) and dim % val.dim() != val.dim() - 1
    return False


def _linear_refuses(gm: fx.GraphModule, lin: fx.Node, norm: _Norm) -> str | None:
    module = graph.module_name(lin.args[1].target) if lin.args[1].op == "get_attr" else lin.name
    w = graph.get_tensor(gm, lin.args[1])
    if w is None:
        return f"{module} reads its output with a computed weight ({lin.args[1].name}), not a parameter"
    if w.dim() != 2 or w.shape[1] != norm.hidden:
        return f"{module} weight has shape {tuple(w.shape)}, not [N, {norm.hidden}]"
    if graph.is_shared(gm, lin.args[1]):
        return _tie_reason(gm, lin.args[1], module)
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    if bias is not None and norm.beta is not None:
        if graph.get_tensor(gm, bias) is None:
            return f"{module} bias is computed ({bias.name}), not a parameter"
        if graph.is_shared(gm, bias):
            return f"{module} bias is shared with another tensor; folding the shift would change it too"
    return None


def _tie_reason(gm: fx.GraphModule, weight: fx.Node, module: str) -> str:
    names = graph.aliases(gm).get(weight.target, [weight.target])
    others = [n for n in names if n != weight.target]
    readers = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target in names for u in n.users]
    what = "the embedding" if any(is_op(u, aten.embedding.default) for u in readers) else "its other readers"
    if others:
        return f"{module} weight is tied to {', '.join(others)}; folding would change {what}"
    return f"{module} weight is read by {len(readers)} nodes; folding would change {what}"


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else node.op


# --- rewrite ---------------------------------------------------------------------------------------------


def _rewrite(gm: fx.GraphModule, norm: _Norm, linears: list[fx.Node]) -> None:
    gamma = graph.get_tensor(gm, _param_source(gm, norm.gamma)) if norm.gamma is not None else None
    beta = graph.get_tensor(gm, _param_source(gm, norm.beta)) if norm.beta is not None else None
    for lin in linears:
        weight = lin.args[1]
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        new_w, new_b = fold_scale_into_linear(
            graph.get_tensor(gm, weight), graph.get_tensor(gm, bias), gamma, beta
        )
        graph.set_tensor(gm, weight.target, new_w)
        if beta is None:
            continue  # the bias is unchanged
        if bias is not None:
            graph.set_tensor(gm, bias.target, new_b)
        else:
            target = graph.free_target(gm, graph.module_name(weight.target) + ".bias")
            bias_node = graph.new_get_attr(gm, target, new_b, before=lin)
            lin.args = (lin.args[0], weight, bias_node)
            lin.kwargs = {k: v for k, v in lin.kwargs.items() if k != "bias"}
    if norm.scaled is not None:
        norm.node.replace_all_uses_with(norm.scaled)
        gm.graph.erase_node(norm.node)
        return
    args = list(norm.node.args)
    args[2] = None
    if is_op(norm.node, aten.layer_norm.default) and len(args) > 3:
        args[3] = None
    norm.node.args = tuple(args)
