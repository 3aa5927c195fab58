"""Fold inference BatchNorm into the convolution or linear layer that feeds it.

    Conv(x, W, b) -> BatchNorm(gamma, beta, mean, var, eps)  =>  Conv(x, W', b')
    Linear(x, W, b) -> BatchNorm(gamma, beta, mean, var, eps)  =>  Linear(x, W', b')

    with  W' = W * gamma / sqrt(var + eps)                   (per output channel: row c of W scaled by s[c])
          b' = (b - mean) * gamma / sqrt(var + eps) + beta   (b = 0 for a layer without bias)

since BN(y) = (y - mean) * gamma / sqrt(var + eps) + beta per channel, and channel c of the layer's output,
W[c] . x + b[c], is linear in (W[c], b[c]). BatchNorm without affine parameters has gamma = 1, beta = 0.

Matches: ``aten.batch_norm.default(y, gamma, beta, mean, var, training, momentum, eps, cudnn)`` and
``aten._native_batch_norm_legit_no_training.default(y, gamma, beta, mean, var, momentum, eps)[0]`` whose input
``y`` is ``aten.conv{1,2,3}d`` / ``aten.convolution`` (not transposed) / ``aten.linear`` with constant weights.
Refuses (``stats["skipped"]``, by BatchNorm node): batch statistics (training=True, or no running stats), a
producer whose output is read by anything else, a shared or tied weight or bias, a transposed convolution, a
linear whose output is not [N, C] (BatchNorm normalises dim 1, linear writes the last), non-constant
parameters. The folded tensors replace the producer's own ``weight`` / ``bias`` (a layer without bias gets
``<layer>.bias``); the BatchNorm's parameters and buffers are deleted once nothing reads them.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from graphpress.graph import (
    cleanup,
    delete_tensor,
    get_tensor,
    is_shared,
    module_name,
    new_get_attr,
    set_tensor,
)
from graphpress.passes.base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten

CONVS = (
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv1d.padding,
    aten.conv2d.padding,
    aten.conv3d.padding,
    aten.convolution.default,
)
TRANSPOSED_CONVS = (
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
)
LINEARS = (aten.linear.default,)
BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


def fold_bn_into_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of the layer that computes BN(layer(x)) in one step; see the module docstring.

    weight: [C_out, ...] (conv: [C_out, C_in / groups, *kernel]; linear: [C_out, C_in]); the rest: [C_out].
    gamma / beta None: BatchNorm without affine parameters (1 and 0). Computed in float64, returned in the
    weight's dtype.
    """
    c_out = weight.shape[0]
    if mean.shape != (c_out,) or var.shape != (c_out,):
        raise ValueError(
            f"BatchNorm statistics of shape {tuple(mean.shape)} for a weight with {c_out} outputs"
        )
    f64 = torch.float64
    scale = torch.rsqrt(var.to(f64) + eps)
    if gamma is not None:
        scale = scale * gamma.to(f64)
    shift = -mean.to(f64) if bias is None else bias.to(f64) - mean.to(f64)
    new_bias = shift * scale + (beta.to(f64) if beta is not None else 0.0)
    new_weight = weight.to(f64) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


@dataclass
class _Match:
    bn: fx.Node
    # the node that carries the BatchNorm's output: the BN itself, or getitem(bn, 0) for the tuple form
    out: fx.Node
    layer: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    gamma: fx.Node | None
    beta: fx.Node | None
    mean: fx.Node | None
    var: fx.Node | None
    training: Any
    eps: float


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name = "fold_batchnorm"
    exact = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded = {"conv": 0, "linear": 0}
        skipped: dict[str, str] = {}
        bn_modules: set[str] = set()
        for node in list(gm.graph.nodes):
            if not (node.op == "call_function" and node.target in BATCH_NORMS):
                continue
            match, reason = _match(node)
            if match is not None:
                reason = _check(gm, match)
            if reason:
                skipped[node.name] = reason
                continue
            assert match is not None
            bn_modules.update(module_name(n.target) for n in (match.mean, match.var) if n is not None)
            folded["linear" if match.layer.target in LINEARS else "conv"] += 1
            _rewrite(gm, match)
        cleanup(gm)
        _delete_unread_buffers(gm, bn_modules)
        n = sum(folded.values())
        stats = {"folded": n, **folded, "skipped": skipped}
        log.info("fold_batchnorm: %s", stats)
        return PassResult(gm, modified=n > 0, stats=stats)


def _match(bn: fx.Node) -> tuple[_Match | None, str]:
    """The BatchNorm and its producer, or why this BatchNorm has none that can absorb it."""
    a = _args(bn)
    out = bn
    if bn.target is aten._native_batch_norm_legit_no_training.default:
        # a tuple (out, save_mean, save_invstd), eval only
        a["training"] = False
        users = list(bn.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return None, "the saved mean / invstd outputs are read"
        out = users[0]
    y = a["input"]
    if not isinstance(y, fx.Node) or y.op != "call_function":
        return None, "its input is not a convolution or linear layer"
    if y.target not in CONVS + LINEARS + TRANSPOSED_CONVS:
        return None, f"its input {y.name} ({y.target}) is not a convolution or linear layer"
    layer = _args(y)
    if y.target in TRANSPOSED_CONVS or layer.get("transposed"):
        return None, f"transposed convolution {y.name}: its weight is [C_in, C_out / groups, ...]"
    match = _Match(
        bn=bn,
        out=out,
        layer=y,
        weight=layer["weight"],
        bias=layer["bias"],
        gamma=a["weight"],
        beta=a["bias"],
        mean=a["running_mean"],
        var=a["running_var"],
        training=a["training"],
        eps=a["eps"],
    )
    return match, ""


def _check(gm: fx.GraphModule, m: _Match) -> str:
    """Why folding ``m`` would change the program; "" when it is exact."""
    if m.mean is None or m.var is None:
        return "no running statistics: BatchNorm normalises with the batch's own"
    if m.training is not False:
        return f"training={m.training}: BatchNorm normalises with batch statistics and updates its buffers"
    if set(m.layer.users) != {m.bn}:
        others = sorted(u.name for u in m.layer.users if u is not m.bn)
        return f"{m.layer.name}'s output is also read by {', '.join(others)}"
    for role, node in (("weight", m.weight), ("bias", m.bias)):
        if node is not None and get_tensor(gm, node) is None:
            return f"{m.layer.name}'s {role} is not a constant (get_attr)"
        if node is not None and is_shared(gm, node):
            return f"{m.layer.name}'s {role} {node.target} is shared or tied: folding would change its other uses"
    for role, node in (
        ("gamma", m.gamma),
        ("beta", m.beta),
        ("running_mean", m.mean),
        ("running_var", m.var),
    ):
        if node is not None and get_tensor(gm, node) is None:
            return f"BatchNorm {role} is not a constant (get_attr)"
    if not isinstance(m.eps, float | int):
        return f"eps is not a constant: {m.eps!r}"
    out = m.layer.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return f"no meta['val'] on {m.layer.name}: cannot tell which dimension holds its channels"
    weight, mean = get_tensor(gm, m.weight), get_tensor(gm, m.mean)
    assert weight is not None and mean is not None
    if m.layer.target in LINEARS and out.dim() != 2:
        return f"linear {m.layer.name} writes {out.dim()}-d output: BatchNorm's channel dim 1 is not its features"
    if m.layer.target in CONVS and out.dim() != weight.dim():
        return f"unbatched convolution {m.layer.name}: BatchNorm's channel dim 1 is not its channels"
    if mean.shape != (weight.shape[0],):
        return f"BatchNorm has {mean.numel()} channels, {m.layer.name} has {weight.shape[0]}"
    if m.bias is None and _bias_target(m) in _tensor_names(gm):
        return (
            f"{_bias_target(m)} already exists but {m.layer.name} does not read it: no name for the new bias"
        )
    return ""


def _rewrite(gm: fx.GraphModule, m: _Match) -> None:
    weight = get_tensor(gm, m.weight)
    bias = get_tensor(gm, m.bias) if m.bias is not None else None
    assert weight is not None
    new_weight, new_bias = fold_bn_into_weights(
        weight,
        bias,
        get_tensor(gm, m.gamma) if m.gamma is not None else None,
        get_tensor(gm, m.beta) if m.beta is not None else None,
        get_tensor(gm, m.mean),  # type: ignore[arg-type]  # checked in _check
        get_tensor(gm, m.var),  # type: ignore[arg-type]
        float(m.eps),
    )
    set_tensor(gm, m.weight.target, new_weight)  # type: ignore[arg-type]
    if m.bias is not None:
        set_tensor(gm, m.bias.target, new_bias)  # type: ignore[arg-type]
    else:
        node = new_get_attr(gm, _bias_target(m), new_bias, before=m.layer)
        if "bias" in m.layer.kwargs:
            m.layer.update_kwarg("bias", node)
        elif len(m.layer.args) > 2:
            m.layer.update_arg(2, node)
        else:  # conv{1,2,3}d(x, w, **kw) / linear(x, w): bias is the third positional argument
            m.layer.args = (*m.layer.args, node)
    m.out.replace_all_uses_with(m.layer)
    for node in (m.out, m.bn) if m.out is not m.bn else (m.bn,):
        gm.graph.erase_node(node)


def _delete_unread_buffers(gm: fx.GraphModule, modules: set[str]) -> None:
    """``cleanup`` deletes unread parameters; the folded BatchNorms' running stats are buffers."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers(remove_duplicate=False)):
        if module_name(name) in modules and name not in read:
            delete_tensor(gm, name)


def _bias_target(m: _Match) -> str:
    return f"{module_name(m.weight.target)}.bias"  # type: ignore[arg-type]


def _tensor_names(gm: fx.GraphModule) -> set[str]:
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return {name for name, _ in named}


def _args(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (``self`` is called ``input``)."""
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if pair is None:  # pragma: no cover - every op matched here has one schema
        raise ValueError(f"cannot normalise the arguments of {node.name} ({node.target})")
    return dict(pair.kwargs)


__all__ = ["FoldBatchNorm", "fold_bn_into_weights"]
