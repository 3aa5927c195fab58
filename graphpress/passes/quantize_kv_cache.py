"""quantize_kv_cache: the KV cache stored as int8 codes, one static scale per channel.

    out, present_k, present_v = graphpress::cached_attention(q, k, v, past_k, past_v, ...)
        =>  graphpress::cached_attention(q, k, v, past_k, past_v, ..., k_scale=s_k, v_scale=s_v)

with s_k, s_v [Hkv * D] per layer: each channel's largest |key| (rotated) or |value| over the calibration
text, divided by 127. The new tokens' keys and values are rounded to codes before attention reads them, and
the cache (every past input and present output) holds the codes: a quarter of float32's bytes per token.

Static scales, one per channel, fixed before deployment: an int8 cache that a kernel reads with no scale
computed at run time (how a target lowers it is its lowering rule's business; per-token scales would cost
less quality, measured in BENCHMARKS.md, issue 14). A channel whose values go past its calibrated maximum
later saturates at ±127 codes.
Needs the fused attention (``fuse_attention`` before it) and calibration batches; refuses a cache already in
int8 and a run without calibration; leaves a program without a cache (an encoder) or with an attention that
is not fused (Mistral's sliding window) as it is, and its stats say why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from graphpress import kv_cache
from graphpress.graph import free_target, infer_val, new_get_attr
from graphpress.kernels.attention import SIZES, TENSORS, heads_rotated
from graphpress.kernels.rotary import rotary_embedding_reference
from graphpress.passes.base import Pass, PassContext, PassError, PassResult
from graphpress.passes.fuse_attention import FUSED

log = logging.getLogger(__name__)

QMAX = 127


@dataclass(frozen=True)
class QuantizeKVCache(Pass):
    """The KV cache in int8 with static per-channel scales from calibration (lossy)."""

    name: ClassVar[str] = "quantize_kv_cache"
    exact: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True
    bits: int = 8
    max_batches: int = 8  # calibration batches observed (maxima settle within a few windows of 512 tokens)

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise ValueError(f"quantize_kv_cache: bits must be 8 (the int8 cache is the one this pass makes), not {self.bits}")
        if self.max_batches < 1:
            raise ValueError(f"quantize_kv_cache: max_batches must be at least 1, not {self.max_batches}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cache = kv_cache.layout(gm)
        if cache is None:  # an encoder, or a causal LM captured without its cache: nothing to store
            return PassResult(gm, False, {"layers": 0, "skipped": "the program was captured without a KV cache"})
        if cache.dtype == "int8":
            raise PassError(f"{self.name}: the cache of {ctx.program.name} is already int8")
        sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is FUSED]
        pasts = [n for n in gm.graph.nodes if n.meta.get(kv_cache.MARK, ("",))[0] == "past"]
        read = {a for n in sites for a in n.args[3:5]}
        unfused = [n.meta[kv_cache.MARK][1] for n in pasts if set(n.users) - set(sites) or n not in read]
        if unfused:  # one cache, one type: every layer's attention must be the fused op
            why = (f"{unfused[0]} is read outside a fused attention (fuse_attention left {len(unfused)} cache "
                   "input(s) unfused; its report says why), so the cache stays float")
            log.warning("%s: %s", self.name, why)
            return PassResult(gm, False, {"layers": 0, "skipped": why})
        if not ctx.calibration:
            raise PassError(f"{self.name}: needs calibration batches (the recipe's calibration: section)")
        maxima = _observe(gm, sites, ctx.calibration[: self.max_batches])
        for node in sites:
            k_max, v_max = maxima[node]
            scales = []
            for kind, m in (("k", k_max), ("v", v_max)):
                s = (m.clamp_min(1e-6) / QMAX).reshape(-1).float()
                scales.append(new_get_attr(gm, free_target(gm, f"{_module(node)}.{kind}_cache_scale"), s, node,
                                           buffer=True))
            node.args = (*node.args[:TENSORS + SIZES], *scales)
        for past in pasts:
            past.kwargs = {**past.kwargs, "dtype": torch.int8}
            if isinstance(past.meta.get("val"), torch.Tensor):
                past.meta["val"] = past.meta["val"].to(torch.int8)
        for node in sites:
            infer_val(node)
            for user in node.users:
                user.meta["val"] = node.meta["val"][user.args[1]]
        gm.meta[kv_cache.META] = kv_cache.CacheLayout(cache.layers, cache.heads, cache.head_dim, "int8",
                                                      cache.positions).to_json()
        gm.graph.lint()
        gm.recompile()
        per_token = 2 * cache.layers * cache.heads * cache.head_dim
        return PassResult(gm, True, {
            "layers": len(sites), "bytes_per_token_before": per_token * torch.finfo(cache.torch_dtype).bits // 8,
            "bytes_per_token_after": per_token, "calibration_batches": min(len(ctx.calibration), self.max_batches),
            "largest_scale": max(float(m.max()) / QMAX for pair in maxima.values() for m in pair)})


def _module(node: fx.Node) -> str:
    """The attention module the fused node came from (``model.layers.3.self_attn``), for its scales' names."""
    stack = node.meta.get("nn_module_stack") or {}
    names = [path for path, _ in stack.values() if path]
    return names[-1].replace("L['self'].", "") if names else node.name


def _observe(gm: fx.GraphModule, sites: list[fx.Node], batches: list[tuple[torch.Tensor, ...]]
             ) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]:
    """Per fused attention, the largest |key| and |value| per channel [Hkv, D] that the batches reach, keys as
    the cache stores them (rotated)."""
    maxima: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
    wanted = set(sites)

    class Observer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n in wanted:
                args, _ = self.fetch_args_kwargs_from_env(n)
                q, k, v, past_k = args[0], args[1], args[2], args[3]
                cos, sin, heads, kv_heads = args[6], args[7], args[10], args[11]
                _, k, v = heads_rotated(rotary_embedding_reference, q, k, v, cos, sin, heads, kv_heads,
                                        past_k.shape[-1])
                new = tuple(x.detach().abs().amax(dim=(0, 2)).float() for x in (k, v))
                old = maxima.get(n)
                maxima[n] = new if old is None else (torch.maximum(old[0], new[0]), torch.maximum(old[1], new[1]))
            return out

    with torch.no_grad():
        for batch in batches:
            Observer(gm).run(*batch)
    return maxima

