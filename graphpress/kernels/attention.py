"""``graphpress::cached_attention``: causal attention that appends the new tokens' keys and values to a KV cache.

    q              [B, S, H * D]     queries, tokens first (what the q projection gives), or q, k and v packed
                                     [B, S, (H + 2 Hkv) * D] (one fused projection) with k and v None
    k, v           [B, S, Hkv * D]   the new tokens' keys and values; H a multiple of Hkv (grouped-query)
    past_k, past_v [B, Hkv, P, D]    the cache before these tokens
    mask           [B, P + S] int    1 for a token that may be attended to, 0 for padding
    cos, sin       [B, 1, S, D] or None   rotary embedding of q and k (graphpress::rotary_embedding's tables)
    cos_table, sin_table [L, D / 2] or None   the same rotation by position (row p: position p), for a runtime
                                     that rotates inside its kernel; the reference reads cos and sin
    heads, kv_heads, scale
    k_scale, v_scale [Hkv * D] or None   an int8 cache: one static scale per channel (head and dimension);
                                     past_k, past_v and the presents then hold int8 codes, the new tokens' keys
                                     (rotated) and values are rounded to codes before attention reads them
    -> out [B, S, H * D], present_k = cat(past_k, k), present_v = cat(past_v, v)   [B, Hkv, P + S, D]

Query i sits at position P + i and attends to key j when mask[b, j] = 1 and j <= P + i; query head h reads key/value
head h // (H / Hkv). The reference is what a Hugging Face decoder layer computes between its projections (split the
heads, rotate q and k, cat with the past, repeat_kv, a boolean mask, scaled_dot_product_attention, merge the heads);
``fuse_attention`` checks that a model's own mask is this one before it fuses. One op, so that a runtime with a
fused kernel (onnxruntime's GroupQueryAttention) gets the whole of it: the layout changes, the cache append, the
mask from lengths and the grouped heads. Its backward recomputes the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from graphpress.kernels.rotary import rotary_embedding_reference


def causal_padding_mask(mask: torch.Tensor, queries: int) -> torch.Tensor:
    """[B, 1, S, P + S] bool: query i (at position P + i) may read key j (``mask`` [B, P + S] of 1/0)."""
    total = mask.shape[-1]
    keys = torch.arange(total, device=mask.device)
    positions = torch.arange(queries, device=mask.device) + (total - queries)
    return (keys[None, :] <= positions[:, None])[None, None] & mask.bool()[:, None, None, :]


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D], each head repeated ``groups`` times in place."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads * D] -> [B, heads, S, D]."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def cached_attention_reference(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                               past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor,
                               cos: torch.Tensor | None, sin: torch.Tensor | None, cos_table: torch.Tensor | None,
                               sin_table: torch.Tensor | None, heads: int, kv_heads: int, scale: float,
                               k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cached_attention_with(rotary_embedding_reference, q, k, v, past_k, past_v, mask, cos, sin, cos_table,
                                 sin_table, heads, kv_heads, scale, k_scale, v_scale)


def cache_codes(x: torch.Tensor, channel_scale: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, S, D] float -> int8 codes, one scale per channel (``channel_scale`` [Hkv * D]), rounded half to
    even and saturated to [-128, 127] (onnxruntime's int8 cache does the same)."""
    s = channel_scale.view(1, x.shape[1], 1, x.shape[3])
    return torch.clamp(torch.round(x / s), -128, 127).to(torch.int8)


def cache_values(codes: torch.Tensor, channel_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes [B, Hkv, T, D] -> float (codes times their channel's scale)."""
    return codes.to(channel_scale.dtype) * channel_scale.view(1, codes.shape[1], 1, codes.shape[3])


def unpack(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, heads: int, kv_heads: int,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v, split from q when they come packed (k and v None)."""
    if k is not None and v is not None:
        return q, k, v
    q, k, v = q.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q, k, v


def heads_rotated(rotate: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor | None,
                  v: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int,
                  kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, S, D], and k, v [B, Hkv, S, D] as the cache stores them: unpacked, split into heads, q and k
    rotated."""
    q, k, v = unpack(q, k, v, heads, kv_heads, head_dim)
    q, k, v = split_heads(q, heads), split_heads(k, kv_heads), split_heads(v, kv_heads)
    if cos is not None and sin is not None:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return q, k, v


def cached_attention_with(rotate: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor | None,
                          v: torch.Tensor | None, past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor,
                          cos: torch.Tensor | None, sin: torch.Tensor | None, cos_table: torch.Tensor | None,
                          sin_table: torch.Tensor | None, heads: int, kv_heads: int, scale: float,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference with ``rotate(x [B, H, S, D], cos, sin)`` for the rotary embedding (a lowering passes the
    one that emits its target's op)."""
    q, k, v = heads_rotated(rotate, q, k, v, cos, sin, heads, kv_heads, past_k.shape[-1])
    if k_scale is not None and v_scale is not None:
        present_k = torch.cat([past_k, cache_codes(k, k_scale)], dim=-2)
        present_v = torch.cat([past_v, cache_codes(v, v_scale)], dim=-2)
        keys, values = cache_values(present_k, k_scale), cache_values(present_v, v_scale)
    else:
        present_k = keys = torch.cat([past_k, k], dim=-2)
        present_v = values = torch.cat([past_v, v], dim=-2)
    groups = heads // kv_heads
    out = F.scaled_dot_product_attention(q, repeat_heads(keys, groups), repeat_heads(values, groups),
                                         attn_mask=causal_padding_mask(mask, q.shape[-2]), scale=scale)
    b, _, s, _ = out.shape
    return out.transpose(1, 2).reshape(b, s, -1), present_k, present_v


cached_attention = torch.library.custom_op("graphpress::cached_attention", cached_attention_reference,
                                           mutates_args=())


@cached_attention.register_fake
def _(q, k, v, past_k, past_v, mask, cos, sin, cos_table, sin_table, heads, kv_heads, scale, k_scale=None,  # noqa: ANN001, ANN202
      v_scale=None):  # noqa: ANN001
    b, h, p, d = past_k.shape
    total = p + q.shape[1]
    return q.new_empty(*q.shape[:2], heads * d), past_k.new_empty(b, h, total, d), past_v.new_empty(b, h, total, d)


TENSORS = 10  # the op's tensor arguments (q ... sin_table), before heads, kv_heads and scale
SIZES = 3  # heads, kv_heads, scale; then the int8 cache's k_scale and v_scale
LEAVES = (0, 1, 2, 3, 4, 6, 7)  # those a gradient can flow to (not the mask, not the lowering's tables)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in inputs[:TENSORS]))
    ctx.given = tuple(t is not None for t in inputs[:TENSORS])
    ctx.sizes = inputs[TENSORS:]  # with the int8 cache's scales: constants, no gradient (codes are rounded)


def _backward(ctx, *grads):  # noqa: ANN001, ANN202
    saved = [t if given else None for t, given in zip(ctx.saved_tensors, ctx.given, strict=True)]
    needs = [ctx.needs_input_grad[i] and saved[i] is not None for i in range(TENSORS)]
    with torch.enable_grad():
        args = [t.detach().requires_grad_(needs[i]) if i in LEAVES and t is not None else t
                for i, t in enumerate(saved)]
        outs = cached_attention_reference(*args, *ctx.sizes)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        wanted = [args[i] for i in range(TENSORS) if needs[i]]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if wanted else ())
    return (*[next(got) if n else None for n in needs], *[None] * len(ctx.sizes))


cached_attention.register_autograd(_backward, setup_context=_setup)
