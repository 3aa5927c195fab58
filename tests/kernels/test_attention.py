"""graphpress::cached_attention: the reference against a per-query loop, its fake shapes, and its backward."""

from __future__ import annotations

import math

import torch

import graphpress.kernels.attention  # noqa: F401
from graphpress.kernels.attention import cached_attention_reference
from graphpress.kernels.rotary import rotary_embedding_reference

OP = torch.ops.graphpress.cached_attention.default


def _inputs(b: int = 2, s: int = 3, p: int = 4, h: int = 4, hkv: int = 2, d: int = 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, n * d, generator=g, dtype=dtype) for n in (h, hkv, hkv))
    past_k, past_v = (torch.randn(b, hkv, p, d, generator=g, dtype=dtype) for _ in range(2))
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[-1, :2] = 0  # a left-padded row
    angles = torch.arange(p, p + s, dtype=dtype)[:, None] * torch.rand(d // 2, generator=g, dtype=dtype)
    cos, sin = (f(torch.cat([angles, angles], -1))[None, None].expand(b, 1, s, d) for f in (torch.cos, torch.sin))
    return q, k, v, past_k, past_v, mask, cos, sin, None, None, h, hkv, 1 / math.sqrt(d)


def test_the_reference_is_causal_grouped_attention_over_the_cache() -> None:
    q, k, v, past_k, past_v, mask, cos, sin, _, _, h, hkv, scale = _inputs()
    out, pk, pv = OP(q, k, v, past_k, past_v, mask, cos, sin, None, None, h, hkv, scale)
    packed = OP(torch.cat([q, k, v], -1), None, None, past_k, past_v, mask, cos, sin, None, None, h, hkv, scale)
    for a, b in zip(packed, (out, pk, pv), strict=True):  # q, k and v from one fused projection
        torch.testing.assert_close(a, b)
    b, s, _ = q.shape
    p, d = past_k.shape[2], past_k.shape[3]
    rq = rotary_embedding_reference(q.view(b, s, h, d).transpose(1, 2), cos, sin)
    rk = rotary_embedding_reference(k.view(b, s, hkv, d).transpose(1, 2), cos, sin)
    torch.testing.assert_close(pk, torch.cat([past_k, rk], 2))
    torch.testing.assert_close(pv, torch.cat([past_v, v.view(b, s, hkv, d).transpose(1, 2)], 2))
    for row in range(b):
        for head in range(h):
            for i in range(s):
                keys = [j for j in range(p + i + 1) if mask[row, j]]  # causal and not padding
                kv = head // (h // hkv)
                w = torch.softmax(pk[row, kv, keys] @ rq[row, head, i] * scale, 0)
                torch.testing.assert_close(out[row, i, head * d:(head + 1) * d], w @ pv[row, kv, keys])


def test_without_rotary_and_its_fake_shapes() -> None:
    q, k, v, past_k, past_v, mask, _, _, _, _, h, hkv, scale = _inputs(p=0, dtype=torch.float32)
    mask = mask[:, :3].clone()
    out, pk, _ = OP(q, k, v, past_k, past_v, mask, None, None, None, None, h, hkv, scale)
    assert out.shape == q.shape and pk.shape == (2, hkv, 3, 8)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (q, k, v, past_k, past_v, mask)]
        shapes = [tuple(t.shape) for t in OP(*fakes, None, None, None, None, h, hkv, scale)]
    assert shapes == [tuple(out.shape), tuple(pk.shape), tuple(pk.shape)]


def test_its_backward_matches_the_reference() -> None:
    args = list(_inputs(b=1, s=2, p=2, h=2, hkv=1, d=4))
    for i in (0, 1, 2, 3, 4):
        args[i] = args[i].requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: OP(*t, *args[5:]), tuple(args[:5]))
    ours = torch.autograd.grad(sum(o.square().sum() for o in OP(*args)), args[:5])
    ref = torch.autograd.grad(sum(o.square().sum() for o in cached_attention_reference(*args)), args[:5])
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)
