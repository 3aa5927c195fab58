"""fuse_attention: a causal LM's attention over its KV cache -> one ``graphpress::cached_attention`` per layer.

    q4 = rotary(split_heads(q)), k4 = rotary(split_heads(k)), v4 = split_heads(v)
    present_k = cat([past_k, k4], -2);  present_v = cat([past_v, v4], -2)
    out = merge_heads(scaled_dot_product_attention(q4, repeat_kv(present_k), repeat_kv(present_v), mask4d, scale=s))
        =>  out, present_k, present_v = graphpress::cached_attention(q, k, v, past_k, past_v, attention_mask,
                                                                     cos, sin, heads, kv_heads, s)

The op works on tokens ([B, S, heads * D], what the projections give and read), so the head split and merge
(view + transpose), and the rotary embedding when q and k share its tables, go inside it; where a model lays
its heads out otherwise, the pass adds the transposes that bring them to tokens and back.

It needs a program captured with its cache (graphpress.kv_cache: the past, the presents and the attention mask
are marked nodes). The model's 4-D mask is replaced by the op's own (causal, and the 2-D attention mask's padding),
so the pass first checks that they are the same: the subgraph that computes each mask is run on cache inputs of
several shapes (no past, a past with a padded row, one new token after a long past) and must give the causal,
padding mask on every query row that is not padding itself. A mask that differs (a sliding window, a bidirectional
prefix, a soft bias) leaves its layers alone, reported in ``skipped``, as is attention without a cache, with
dropout, or whose present is read elsewhere.

Exact: the op's reference computes what the layer computed. It is the last pass of a recipe: the fused op hides
the heads and the cache's concatenation from the channel analysis (pruning) and the rotary from fuse_rotary.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import graphpress.kernels.attention  # noqa: F401  (defines torch.ops.graphpress.cached_attention)
from graphpress import kv_cache
from graphpress.graph import DERIVED, free_target, get_tensor, infer_val, is_derived, new_get_attr
from graphpress.kernels.attention import causal_padding_mask
from graphpress.passes.base import Pass, PassContext, PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
FUSED = torch.ops.graphpress.cached_attention.default
ROTARY = torch.ops.graphpress.rotary_embedding.default
# (batch, past, new tokens, left-padded tokens of the last row): the shapes the mask check runs on; the long
# past finds sliding windows (Mistral's 4096, Phi-3's 262144) that shorter ones cannot tell from causal masks
MASK_CASES = ((2, 0, 5, 2), (2, 3, 2, 1), (1, 6, 1, 0), (3, 4, 3, 3), (1, 1 << 19, 1, 0))


@dataclass(frozen=True)
class FuseAttention(Pass):
    """Attention over the KV cache -> graphpress::cached_attention (exact)."""

    name: ClassVar[str] = "fuse_attention"
    exact: ClassVar[bool] = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
        if kv_cache.layout(gm) is None:
            return PassResult(gm, False, {"fused": 0, "skipped": {
                n.name: "the program was captured without a KV cache" for n in sites}})
        marks = {n.meta[kv_cache.MARK][1]: n for n in gm.graph.nodes if kv_cache.MARK in n.meta}
        skipped: dict[str, str] = {}
        matches = []
        for sdpa in sites:
            found = _match(sdpa)
            if isinstance(found, str):
                skipped[sdpa.name] = found
            else:
                matches.append((sdpa, *found))
        masks = {m for _, _, _, _, _, m in matches}
        wrong = _mask_differences(gm, masks, marks) if masks else {}
        fused = 0
        tables: dict[tuple[fx.Node, fx.Node], tuple[fx.Node, fx.Node] | None] = {}
        for sdpa, q, (cat_k, k), (cat_v, v), scale, mask in matches:
            if mask in wrong:
                skipped[sdpa.name] = wrong[mask]
                continue
            _fuse(gm, sdpa, q, cat_k, k, cat_v, v, scale, marks, tables)
            fused += 1
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, fused > 0, {"fused": fused, "skipped": skipped})


def _match(sdpa: fx.Node) -> tuple[fx.Node, tuple[fx.Node, fx.Node], tuple[fx.Node, fx.Node], float, fx.Node] | str:
    """(q, (present_k, k), (present_v, v), scale, mask) of an attention over the cache, else why not."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = dict(zip(names, sdpa.args, strict=False)) | dict(sdpa.kwargs)
    q, key, value, mask = args["query"], args["key"], args["value"], args.get("attn_mask")
    if args.get("dropout_p", 0.0) or args.get("is_causal", False):
        return "dropout or is_causal: not the masked attention of a decoder with a cache"
    if not isinstance(mask, fx.Node):
        return "no attention mask"
    qv = q.meta.get("val") if isinstance(q, fx.Node) else None
    if not isinstance(qv, torch.Tensor) or qv.dim() != 4:
        return "the query is not [B, H, S, D]"
    pair = []
    for name, x in (("key", key), ("value", value)):
        present = _unrepeated(x, qv.shape[1])
        if present is None:
            return f"the {name} is not the cache's present (a concatenation with the past, its heads repeated)"
        past, new = present.args[0]
        if kv_cache.MARK not in present.meta or not isinstance(past, fx.Node) or \
                past.meta.get(kv_cache.MARK, ("",))[0] != "past":
            return f"the {name} is not a marked present of the cache"
        if present.meta["val"].shape[-1] != qv.shape[-1]:
            return f"the {name} heads are not as wide as the query's"
        pair.append((present, new))
    scale = args.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(qv.shape[-1])
    return q, pair[0], pair[1], scale, mask


def _unrepeated(x: object, heads: int) -> fx.Node | None:
    """The cat([past, new], -2) that ``x`` is, directly or with its heads repeated (repeat_kv: unsqueeze(2),
    expand, reshape) up to ``heads``; else None."""
    if not isinstance(x, fx.Node):
        return None
    node = x
    if node.target in RESHAPES:
        expand = node.args[0]
        unsq = expand.args[0] if isinstance(expand, fx.Node) and expand.target is aten.expand.default else None
        if isinstance(unsq, fx.Node) and unsq.target is aten.unsqueeze.default and unsq.args[1] == 2 and \
                all(len(n.users) == 1 for n in (expand, unsq)):
            node = unsq.args[0]
    if not (isinstance(node, fx.Node) and node.target is aten.cat.default and len(node.args[0]) == 2):
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or dim not in (2, -2) or heads % val.shape[1]:
        return None
    if node is not x and len(node.users) != 1:
        return None  # the present read by more than the repeat: fusing would compute it twice
    return node


RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _swaps_1_2(node: object) -> bool:
    """``node`` is transpose(x, 1, 2) or permute(x, [0, 2, 1, 3])."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.transpose.int:
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    return node.target is aten.permute.default and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]


def _split_input(x4: fx.Node) -> fx.Node | None:
    """x3 when x4 = transpose(view(x3, [B, S, H, D]), 1, 2), the view read by the transpose alone; else None."""
    view = x4.args[0] if _swaps_1_2(x4) else None
    if not (isinstance(view, fx.Node) and view.target in RESHAPES and len(view.users) == 1):
        return None
    x3 = view.args[0]
    v3, v4 = (n.meta.get("val") for n in (x3, x4)) if isinstance(x3, fx.Node) else (None, None)
    if not isinstance(v3, torch.Tensor) or v3.dim() != 3 or v3.shape[-1] != v4.shape[1] * v4.shape[3]:
        return None
    return x3


def _rotated(q4: fx.Node, k4: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """(q before, k before, cos, sin) when q4 and k4 are graphpress::rotary_embedding of one cos/sin, each read
    once; else None."""
    if not all(n.target is ROTARY and len(n.users) == 1 for n in (q4, k4)):
        return None
    (q, cq, sq), (k, ck, sk) = q4.args, k4.args
    return (q, k, cq, sq) if cq is ck and sq is sk else None


def _to_tokens(graph: fx.Graph, x4: fx.Node) -> fx.Node:
    """[B, H, S, D] -> [B, S, H * D]: the node it was split from, else a transpose and flatten."""
    x3 = _split_input(x4)
    if x3 is not None:
        return x3
    with graph.inserting_after(x4):
        swapped = graph.call_function(aten.transpose.int, (x4, 1, 2))
    with graph.inserting_after(swapped):
        flat = graph.call_function(aten.flatten.using_ints, (swapped, 2))
    for n in (swapped, flat):
        infer_val(n)
    return flat


def _fuse(gm: fx.GraphModule, sdpa: fx.Node, q4: fx.Node, cat_k: fx.Node, k4: fx.Node, cat_v: fx.Node,
          v4: fx.Node, scale: float, marks: dict[str, fx.Node],
          tables: dict[tuple[fx.Node, fx.Node], tuple[fx.Node, fx.Node] | None]) -> None:
    graph = gm.graph
    past_k, past_v = cat_k.args[0][0], cat_v.args[0][0]
    heads, kv_heads = int(q4.meta["val"].shape[1]), int(cat_k.meta["val"].shape[1])
    rotated = _rotated(q4, k4)
    cos = sin = None
    if rotated is not None:
        q4, k4, cos, sin = rotated
        if (cos, sin) not in tables:
            tables[cos, sin] = _rotary_tables(gm, cos, sin, marks)
    cos_table, sin_table = tables.get((cos, sin)) or (None, None)
    q, k, v = (_to_tokens(graph, x) for x in (q4, k4, v4))
    packed = _packed(q, k, v)
    if packed is not None:
        q, k, v = packed, None, None
    with graph.inserting_before(sdpa):
        fused = graph.call_function(FUSED, (q, k, v, past_k, past_v, marks["attention_mask"], cos, sin, cos_table,
                                            sin_table, heads, kv_heads, scale))
        outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
    infer_val(fused)
    for key in ("nn_module_stack", "stack_trace"):
        if key in sdpa.meta:
            fused.meta[key] = sdpa.meta[key]
    for i, out in enumerate(outs):
        out.meta["val"] = fused.meta["val"][i]
    # the presents are read by no node once the cache is detached: the fused node carries their marks, so that
    # dead-code elimination keeps them (kv_cache.attach reads them out)
    fused.meta[kv_cache.MARK] = ("presents", (cat_k.meta.pop(kv_cache.MARK)[1], cat_v.meta.pop(kv_cache.MARK)[1]))
    merged = _merged_output(sdpa)
    if merged is not None:
        merged.replace_all_uses_with(outs[0])
    else:  # back to the model's [B, H, S, D]
        with graph.inserting_after(outs[0]):
            split = graph.call_function(aten.unflatten.int, (outs[0], 2, [heads, -1]))
        with graph.inserting_after(split):
            swapped = graph.call_function(aten.transpose.int, (split, 1, 2))
        for n in (split, swapped):
            infer_val(n)
        sdpa.replace_all_uses_with(swapped)
    repeated = [a for a in (*sdpa.args[1:3], sdpa.kwargs.get("key"), sdpa.kwargs.get("value")) if isinstance(a, fx.Node)]
    for node in (merged, merged.args[0] if merged is not None else None, sdpa):
        if node is not None and not node.users:
            graph.erase_node(node)  # fx counts attention as impure (its dropout draws random numbers)
    for node in repeated:  # the heads repeated for the attention, defined before the fused op
        while node not in (cat_k, cat_v) and not node.users:
            up = node.args[0]
            graph.erase_node(node)
            node = up
    for out, old in zip(outs[1:], (cat_k, cat_v), strict=True):
        old.replace_all_uses_with(out)


def _packed(q: fx.Node, k: fx.Node, v: fx.Node) -> fx.Node | None:
    """x when q, k and v are the three parts of split(x, [q, k, v], -1) and nothing else reads them (one fused
    projection: the op then takes x as it is)."""
    split = q.args[0] if q.target is operator.getitem else None
    if not (isinstance(split, fx.Node) and split.target is aten.split_with_sizes.default and
            [n.args for n in (q, k, v)] == [(split, 0), (split, 1), (split, 2)] and len(split.users) == 3):
        return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    val = split.args[0].meta.get("val")
    return split.args[0] if isinstance(val, torch.Tensor) and dim in (-1, val.dim() - 1) else None


TABLE_POSITIONS = 1 << 17  # the longest rotary tables written (a model with a longer context gets these)


def _rotary_tables(gm: fx.GraphModule, cos: fx.Node, sin: fx.Node, marks: dict[str, fx.Node]
                   ) -> tuple[fx.Node, fx.Node] | None:
    """The rotary embedding by position, [L, D/2] for cos and for sin (L: the model's positions), as constants
    for a runtime that rotates inside its attention kernel; None when the model does not say its positions or
    the rotation of a position depends on more than the position (checked: positions 5..7 after a past of 5
    must be rows 5..7). A target may compute them instead of storing them (graphpress.lowering.rotary_tables)."""
    cache = kv_cache.layout(gm)
    if cache is None or not cache.positions:
        return None
    length = min(cache.positions, TABLE_POSITIONS)
    known = [n for n in gm.graph.find_nodes(op="get_attr") if is_derived(n.target)]
    first = next(iter(gm.graph.nodes))
    try:
        sub = kv_cache.input_subgraph(gm, [cos, sin], marks)
        with torch.no_grad():
            full = sub(*mask_case(cache, 1, 0, length, 0))
            part = sub(*mask_case(cache, 1, 5, 3, 0))
    except Exception:  # noqa: BLE001 - then the rotary stays outside the kernel
        return None
    half = cache.head_dim // 2
    out = []
    for name, whole, some in zip(("cos", "sin"), full, part, strict=True):
        if whole.dim() != 4 or whole.shape[-1] != cache.head_dim or \
                not torch.allclose(some[0, 0], whole[0, 0, 5:8], rtol=0, atol=1e-6):
            return None
        table = whole[0, 0, :, :half].contiguous()
        same = next((n for n in known if torch.equal(get_tensor(gm, n), table)), None)  # layers share one
        if same is None:
            same = new_get_attr(gm, free_target(gm, f"{DERIVED}.rotary_{name}"), table, first, buffer=True)
            known.append(same)
        out.append(same)
    return out[0], out[1]


def _merged_output(sdpa: fx.Node) -> fx.Node | None:
    """The reshape(transpose(sdpa, 1, 2), [B, S, H * D]) that merges the heads, each step read once; else None."""
    if len(sdpa.users) != 1:
        return None
    swapped = next(iter(sdpa.users))
    if not _swaps_1_2(swapped) or len(swapped.users) != 1:
        return None
    merged = next(iter(swapped.users))
    val = merged.meta.get("val")
    if merged.target not in RESHAPES or not isinstance(val, torch.Tensor) or val.dim() != 3:
        return None
    return merged


def _mask_differences(gm: fx.GraphModule, masks: set[fx.Node], marks: dict[str, fx.Node]) -> dict[fx.Node, str]:
    """Per mask node, how it differs from the causal, padding mask of the cache inputs (absent: it does not)."""
    cache = kv_cache.layout(gm)
    assert cache is not None
    order = sorted(masks, key=list(gm.graph.nodes).index)
    try:
        sub = kv_cache.input_subgraph(gm, order, marks)
    except kv_cache.CacheError as e:
        return dict.fromkeys(order, f"the mask cannot be computed from the cache inputs alone: {e}")
    wrong: dict[fx.Node, str] = {}
    for batch, past, new, pad in MASK_CASES:
        inputs = mask_case(cache, batch, past, new, pad)
        try:
            with torch.no_grad():
                got = sub(*inputs)
        except Exception as e:  # noqa: BLE001 - a mask that cannot take another shape is not this op's mask
            return {m: wrong.get(m, f"its mask fails for a past of {past} and {new} new tokens: "
                                    f"{type(e).__name__}") for m in order}
        expected = causal_padding_mask(inputs[1], new)
        keep = inputs[1][:, past:].bool()[:, None, :, None]  # query rows that are not padding themselves
        for m, value in zip(order, got, strict=True):
            allowed = value if value.dtype == torch.bool else value == 0
            if m not in wrong and (allowed.shape[-2:] != expected.shape[-2:] or
                                   not torch.equal((allowed & keep).expand_as(expected), expected & keep)):
                wrong[m] = (f"its mask is not the causal, padding mask (past {past}, {new} new tokens): a sliding "
                            "window or another pattern that graphpress::cached_attention does not compute")
    return wrong


def mask_case(cache: kv_cache.CacheLayout, batch: int, past: int, new: int, pad: int) -> tuple[torch.Tensor, ...]:
    """Cache inputs for ``batch`` rows of ``new`` tokens after ``past`` ones, the last row left-padded by ``pad``."""
    ids = torch.zeros(batch, new, dtype=torch.long)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    mask[-1, :pad] = 0
    positions = torch.arange(past, past + new).expand(batch, new)
    zero = torch.zeros((), dtype=cache.torch_dtype)  # expanded: a long past costs no memory
    pasts = [zero.expand(batch, cache.heads, past, cache.head_dim) for _ in range(2 * cache.layers)]
    return (ids, mask, positions, *pasts)
