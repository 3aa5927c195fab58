"""Fusions: decomposed subgraphs -> the one op a runtime has a kernel for (exact up to float rounding).

    fuse_rms_norm:  x * rsqrt(mean(x^2, -1, keepdim) + eps) [* w]          =>  aten.rms_norm(x, [H], w, eps)
                    (x^2 as pow(x, 2) or x * x; rsqrt(v) also as 1 / sqrt(v); w a [H] weight, either side)
    fuse_rotary:    x * cos + cat(-x[..., D/2:], x[..., :D/2], -1) * sin  =>  graphpress::rotary_embedding(x, cos, sin)

The exporter writes aten.rms_norm as one ONNX RMSNormalization and scaled_dot_product_attention as one
Attention (opset 23); graphpress::rotary_embedding lowers to one RotaryEmbedding. SmolLM2-135M as exported
has ~2,100 ONNX nodes, most of them these patterns spelled out; fused, the non-matmul time of a 128-token
forward drops by about two thirds (BENCHMARKS.md).

Run them last in a recipe: the scaling passes (fold_norm_scales, awq, smoothquant) look for the decomposed
norm's weight multiply. A match is left alone, and reported in ``skipped``, when an intermediate value has
another reader (fusing would compute it twice), eps is not a constant, or (rotary) x is not [B, H, S, D] with
cos/sin [B or 1, 1, S, D] whose two halves repeat (ONNX RotaryEmbedding reads one half), checked on the
sample batch and on a probe batch with one more row and three times the sequence (positions past the
sample's, where frequencies that repeat only by accident would part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import graphpress.kernels.rotary  # noqa: F401  (defines torch.ops.graphpress.rotary_embedding)
from graphpress.graph import get_tensor, infer_val, is_op, last_dim
from graphpress.passes.base import Pass, PassContext, PassError, PassResult

aten = torch.ops.aten


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _is_mean_of_squares(mean: fx.Node, x: fx.Node) -> bool:
    """mean(x^2 over the last dim, keepdim=True)."""
    if not is_op(mean, aten.mean.dim) or len(mean.args) < 3 or mean.args[2] is not True:
        return False
    dims, ndim = mean.args[1], x.meta["val"].dim()
    if list(dims) not in ([-1], [ndim - 1]):
        return False
    sq = mean.args[0]
    if not isinstance(sq, fx.Node):
        return False
    if is_op(sq, aten.pow.Tensor_Scalar) and sq.args[0] is x and sq.args[1] == 2:
        return True
    return is_op(sq, aten.mul.Tensor) and sq.args[0] is x and sq.args[1] is x


def _inv_rms(node: object) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """rsqrt(mean(x^2) + eps) (or reciprocal(sqrt(...))) -> (x, eps, the chain's nodes), else None."""
    if not isinstance(node, fx.Node):
        return None
    chain = [node]
    if is_op(node, aten.rsqrt.default):
        add = node.args[0]
    elif is_op(node, aten.reciprocal.default) and is_op(node.args[0], aten.sqrt.default):
        chain.append(node.args[0])
        add = node.args[0].args[0]
    else:
        return None
    if not is_op(add, aten.add.Tensor, aten.add.Scalar) or not isinstance(add.args[1], (int, float)):
        return None
    mean = add.args[0]
    if not isinstance(mean, fx.Node) or not isinstance(mean.args[0], fx.Node):
        return None
    x = mean.args[0].args[0]
    if not isinstance(x, fx.Node) or "val" not in x.meta or not _is_mean_of_squares(mean, x):
        return None
    return x, float(add.args[1]), [*chain, add, mean, mean.args[0]]


@dataclass(frozen=True)
class FuseRMSNorm(Pass):
    """Decomposed RMSNorm (Llama-style) -> aten.rms_norm."""

    name: ClassVar[str] = "fuse_rms_norm"
    exact: ClassVar[bool] = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        fused, skipped = 0, {}
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.mul.Tensor):
                continue
            for x, r in (node.args, node.args[::-1]):
                found = _inv_rms(r)
                if found is None or found[0] is not x:
                    continue
                _, eps, chain = found
                if any(len(step.users) != 1 for step in chain):  # each step feeds only the next
                    skipped[node.name] = "an intermediate of the norm has another reader"
                    break
                _fuse_norm(gm, node, x, eps)
                fused += 1
                break
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, fused > 0, {"fused": fused, "skipped": skipped})


def _fuse_norm(gm: fx.GraphModule, mul: fx.Node, x: fx.Node, eps: float) -> None:
    h = last_dim(x)
    if h is None:
        raise PassError(f"fuse_rms_norm: {mul.name} normalizes a last dimension of unknown size")
    # a following multiply by a [H] weight becomes the norm's weight
    out, weight = mul, None
    if len(mul.users) == 1:
        user = next(iter(mul.users))
        if is_op(user, aten.mul.Tensor):
            other = user.args[1] if user.args[0] is mul else user.args[0]
            w = get_tensor(gm, other) if isinstance(other, fx.Node) else None
            if w is not None and w.dim() == 1 and w.numel() == h and w.dtype == x.meta["val"].dtype:
                out, weight = user, other
    with gm.graph.inserting_before(out):
        norm = gm.graph.call_function(aten.rms_norm.default, (x, [h], weight, eps))
    norm.meta = {k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace")}
    infer_val(norm)
    out.replace_all_uses_with(norm)


def _rotate_half_of(node: object) -> fx.Node | None:
    """cat([-x[..., D/2:], x[..., :D/2]], -1) -> x, else None."""
    if not is_op(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    neg, low = node.args[0]
    if not is_op(neg, aten.neg.default) or not is_op(neg.args[0], aten.slice.Tensor) or \
            not is_op(low, aten.slice.Tensor):
        return None
    high = neg.args[0]
    x = low.args[0]
    if high.args[0] is not x or not isinstance(x, fx.Node) or "val" not in x.meta:
        return None
    nd, d = x.meta["val"].dim(), last_dim(x)
    if d is None or d % 2 or dim not in (-1, nd - 1):
        return None

    def bounds(s: fx.Node) -> tuple[int, int, int, int]:
        """aten.slice.Tensor(x, dim=0, start=None, end=None, step=1), normalized against x's shape."""
        dim_, start, end, step = (list(s.args[1:]) + [0, None, None, 1][len(s.args) - 1:])[:4]
        start, end = start or 0, d if end is None or end > d else end
        return (dim_ + nd if dim_ < 0 else dim_, start + d if start < 0 else start, end + d if end < 0 else end,
                step)

    if bounds(low) != (nd - 1, 0, d // 2, 1) or bounds(high) != (nd - 1, d // 2, d, 1):
        return None
    return x


@dataclass(frozen=True)
class FuseRotary(Pass):
    """Rotate-half rotary position embedding -> graphpress::rotary_embedding."""

    name: ClassVar[str] = "fuse_rotary"
    exact: ClassVar[bool] = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        matches, skipped = [], {}
        for node in gm.graph.nodes:
            if not is_op(node, aten.add.Tensor) or len(node.args) != 2:
                continue
            a, b = node.args
            if not (is_op(a, aten.mul.Tensor) and is_op(b, aten.mul.Tensor)):
                continue
            for m_cos, m_sin in ((a, b), (b, a)):
                found = _rotary_match(m_cos, m_sin)
                if found is not None:
                    matches.append((node, m_cos, m_sin, *found))
                    break
        wanted = {n for _, _, _, _, c, s, _ in matches for n in (c, s)}
        tables = [_values(gm, inputs, wanted) for inputs in _batches(ctx)] if matches else []
        fused = 0
        for add, m_cos, m_sin, x, cos, sin, rot in matches:
            why = _refusal(x, cos, sin, tables, (m_cos, m_sin, rot))
            if why:
                skipped[add.name] = why
                continue
            with gm.graph.inserting_before(add):
                new = gm.graph.call_function(torch.ops.graphpress.rotary_embedding.default, (x, cos, sin))
            new.meta = {k: v for k, v in add.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
            add.replace_all_uses_with(new)
            fused += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, fused > 0, {"fused": fused, "skipped": skipped})


def _rotary_match(m_cos: fx.Node, m_sin: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """(x * cos, rotate_half(x) * sin) -> (x, cos, sin, the cat node), else None."""
    for rot, sin in (m_sin.args, m_sin.args[::-1]):
        x = _rotate_half_of(rot)
        if x is None:
            continue
        for xx, cos in (m_cos.args, m_cos.args[::-1]):
            if xx is x and isinstance(cos, fx.Node) and isinstance(sin, fx.Node):
                return x, cos, sin, rot
    return None


def _refusal(x: fx.Node, cos: fx.Node, sin: fx.Node, tables: list[dict[fx.Node, torch.Tensor]],
             inner: tuple[fx.Node, ...]) -> str | None:
    if any(len(n.users) != 1 for n in inner):
        return "an intermediate of the rotation has another reader"
    xv, cv, sv = (n.meta.get("val") for n in (x, cos, sin))
    if not all(isinstance(v, torch.Tensor) for v in (xv, cv, sv)) or xv.dim() != 4 or \
            cv.dim() != 4 or sv.dim() != 4 or cv.shape[1] != 1 or sv.shape[1] != 1:
        return "x is not [B, H, S, D] with cos/sin [B, 1, S, D]"
    for values, batch in zip(tables, ("sample", "probe"), strict=False):
        for name, node in (("cos", cos), ("sin", sin)):
            v = values.get(node)
            if v is None:
                return f"{name} could not be computed on the {batch} batch"
            half = v.shape[-1] // 2
            if not torch.equal(v[..., :half], v[..., half:]):
                return (f"the two halves of {name} differ on the {batch} batch (ONNX RotaryEmbedding assumes "
                        "repeated frequencies)")
    return None


def _batches(ctx: PassContext) -> list[tuple[torch.Tensor, ...]]:
    """The sample batch, and a probe: each dynamic dimension grown (batch + 1 row, sequence x 3) by repeating
    the sample along it, so positions past the sample's are computed too."""
    program = ctx.program
    probe = []
    for x, dims in zip(program.example_inputs, program.dynamic_dims, strict=True):
        for d, name in sorted(dims.items()):
            if isinstance(x, torch.Tensor) and x.dim() > d:
                x = torch.cat([x, x.narrow(d, 0, 1)], d) if name == "batch" else torch.cat([x] * 3, d)
        probe.append(x)
    return [program.example_inputs, tuple(probe)]


def _values(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], wanted: set[fx.Node]
            ) -> dict[fx.Node, torch.Tensor]:
    """Values of ``wanted`` nodes on ``inputs`` (one forward, stopped early; a forward that fails, e.g. past
    the model's positions, computes nothing)."""
    got: dict[fx.Node, torch.Tensor] = {}
    last = max((list(gm.graph.nodes).index(n) for n in wanted), default=-1)

    class _Stop(Exception):
        pass

    class _Grab(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            if n in wanted:
                got[n] = out
            if order[n] >= last:
                raise _Stop
            return out

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    try:
        with torch.no_grad():
            _Grab(gm).run(*inputs)
    except _Stop:
        pass
    except Exception:  # noqa: BLE001 - the refusal names the batch whose values are missing
        return {}
    return got
