"""A causal LM's KV cache as graph inputs and outputs.

Capture traces a causal LM with its cache (``capture(..., cache=True)``): the attention mask, the positions
and each layer's past keys and values are inputs; the present keys and values (past and new tokens,
concatenated) are outputs. One graph then serves prefill (an empty past) and decode (one new token).

Compression runs on that graph *detached* from its cache (``detach``): each cache input becomes the value it
has before the first token (a mask of ones, positions 0..S-1, an empty past) and the present outputs are
dropped, so passes, calibration and evaluation see the program they always saw, ``input_ids -> logits``,
computing what the model computes without a cache. The nodes stay marked (``node.meta[MARK]``), and
``attach`` gives the inputs and outputs back for lowering. A pass that removes a marked node (or a past
length it bakes in) leaves a program that cannot attach: ``attach`` says which mark is missing.

Names follow onnxruntime-genai's defaults: ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key``,
``past_key_values.{i}.value``, ``present.{i}.key``, ``present.{i}.value``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx

aten = torch.ops.aten

# node.meta: ("mask" | "positions" | "past" | "present", name), or ("presents", (name, ...)) on a node whose
# output is a tuple holding those presents after its first item (graphpress::cached_attention)
MARK = "graphpress.kv_cache"
META = "graphpress.kv_cache"  # gm.meta: the cache's layout (CacheLayout.to_json())
EXAMPLE_PAST = 3  # past length of the example inputs that trace the attached graph (torch.export specializes 0/1)


@dataclass(frozen=True)
class CacheLayout:
    """What a cache holds: per layer a key and a value of [batch, heads, past, head_dim]."""

    layers: int
    heads: int
    head_dim: int
    dtype: str  # torch dtype name, "float32"
    positions: int = 0  # the model's positions (its context), 0 when it does not say

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "heads": self.heads, "head_dim": self.head_dim, "dtype": self.dtype,
                "positions": self.positions}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CacheLayout:
        return cls(int(d["layers"]), int(d["heads"]), int(d["head_dim"]), str(d["dtype"]), int(d.get("positions", 0)))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]


class CacheError(RuntimeError):
    """A program whose cache inputs or outputs a pass removed."""


def layout(gm: fx.GraphModule) -> CacheLayout | None:
    """The program's cache layout, or None when it was captured without a cache."""
    d = gm.meta.get(META)
    return CacheLayout.from_json(d) if d else None


def example_inputs(ids: torch.Tensor, cache: CacheLayout, past: int = EXAMPLE_PAST) -> tuple[torch.Tensor, ...]:
    """Inputs of the cache graph for token ids [B, S] after ``past`` earlier tokens (random past values)."""
    b, s = ids.shape
    g = torch.Generator().manual_seed(0)
    pasts = [torch.randn(b, cache.heads, past, cache.head_dim, generator=g).to(cache.torch_dtype)
             for _ in range(2 * cache.layers)]
    return (ids, torch.ones(b, past + s, dtype=torch.long), torch.arange(past, past + s).expand(b, s), *pasts)


def dynamic_dims(cache: CacheLayout) -> tuple[dict[int, str], ...]:
    """Per input of the cache graph, its dynamic dimensions."""
    return ({0: "batch", 1: "seq"}, {0: "batch", 1: "total_seq"}, {0: "batch", 1: "seq"},
            *[{0: "batch", 2: "past_seq"} for _ in range(2 * cache.layers)])


def detach(gm: fx.GraphModule, cache: CacheLayout) -> None:
    """Turn the captured cache graph (inputs ids, mask, positions, pasts; outputs logits, presents) into
    ``ids -> logits`` in place: cache inputs become their values before the first token, presents stay as
    marked nodes."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    expected = 3 + 2 * cache.layers
    if len(placeholders) != expected:
        raise CacheError(f"the cache graph has {len(placeholders)} inputs, expected {expected}")
    ids, mask, positions, *pasts = placeholders
    for node in pasts:
        _drop_empty_concatenation(gm, node)
    # torch.export's input checks (a pre-hook and a guards submodule) are for the inputs that go away here
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
    for node in graph.find_nodes(op="call_module"):
        if node.target == "_guards_fn":
            graph.erase_node(node)
            delattr(gm, "_guards_fn")
    with graph.inserting_after(ids):
        b = graph.call_function(aten.sym_size.int, (ids, 0))
    with graph.inserting_after(b):
        s = graph.call_function(aten.sym_size.int, (ids, 1))
    with graph.inserting_after(s):
        ones = graph.call_function(aten.ones.default, ([b, s],), {"dtype": torch.long})
    with graph.inserting_after(ones):
        arange = graph.call_function(aten.arange.default, (s,), {"dtype": torch.long})
    with graph.inserting_after(arange):
        row = graph.call_function(aten.unsqueeze.default, (arange, 0))
    with graph.inserting_after(row):
        pos = graph.call_function(aten.expand.default, (row, [b, s]))
    last = pos
    replacements = [(mask, ones, ("mask", "attention_mask")), (positions, pos, ("positions", "position_ids"))]
    for node, name in zip(pasts, cache.past_names(), strict=True):
        with graph.inserting_after(last):
            last = graph.call_function(aten.zeros.default, ([b, cache.heads, 0, cache.head_dim],),
                                       {"dtype": cache.torch_dtype})
        replacements.append((node, last, ("past", name)))
    for old, new, mark in replacements:
        new.meta[MARK] = mark
        old.replace_all_uses_with(new)
        graph.erase_node(old)
    out = graph.output_node()
    results = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    if len(results) != 1 + 2 * cache.layers:
        raise CacheError(f"the cache graph has {len(results)} outputs, expected {1 + 2 * cache.layers}")
    for node, name in zip(results[1:], cache.present_names(), strict=True):
        if MARK in node.meta:
            raise CacheError(f"{name} is also {node.meta[MARK][1]}: a present that is not a new node")
        node.meta[MARK] = ("present", name)
    _fold_presents(graph)
    out.args = ((results[0],),)
    _set_specs(gm, inputs=1, outputs=1)
    gm.meta[META] = cache.to_json()
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    from graphpress.runner import propagate_shapes  # the runner carries this module's META

    for node in graph.nodes:  # the vals had a past length; now it is 0
        if node.op != "placeholder":
            node.meta.pop("val", None)
    propagate_shapes(gm)


def _drop_empty_concatenation(gm: fx.GraphModule, past: fx.Node) -> None:
    """A cache layer starts as an empty 1-D constant that the past is appended to (``cat([tensor([]), past])``:
    transformers' DynamicLayer): the past itself, without a lifted constant that is not the model's."""
    for user in list(past.users):
        parts = user.args[0] if user.target is aten.cat.default else None
        if not parts or len(parts) != 2 or parts[1] is not past or not isinstance(parts[0], fx.Node):
            continue
        val = parts[0].meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 1 or val.numel() != 0:
            continue
        user.replace_all_uses_with(past)
        gm.graph.erase_node(user)
        chain = parts[0]
        while isinstance(chain, fx.Node) and not chain.users:  # detach_ <- lift_fresh_copy <- get_attr
            inputs = chain.all_input_nodes
            if chain.op == "get_attr" and hasattr(gm, chain.target):
                gm.graph.erase_node(chain)
                delattr(gm, chain.target)
            else:
                gm.graph.erase_node(chain)
            chain = inputs[0] if len(inputs) == 1 else None


def attach(gm: fx.GraphModule) -> tuple[fx.GraphModule, CacheLayout]:
    """A copy of a detached program with its cache inputs and outputs back (``CacheLayout.input_names()``,
    ``output_names()``)."""
    cache = layout(gm)
    if cache is None:
        raise CacheError("the program was captured without a KV cache")
    gm = copy.deepcopy(gm)
    graph = gm.graph
    for node in [n for n in graph.nodes if n.meta.get(MARK, ("",))[0] == "presents"]:
        _unfold_presents(graph, node)
    marked = {n.meta[MARK][1]: n for n in graph.nodes if MARK in n.meta}
    missing = [k for k in ("attention_mask", "position_ids", *cache.past_names(), *cache.present_names())
               if k not in marked]
    if missing:
        raise CacheError(f"a pass removed the cache's {missing[0]} node ({len(missing)} of "
                         f"{3 + 4 * cache.layers - 1} marks missing), so the program cannot serve generation")
    # a pass may have cut heads (pruning): the layout is what the presents hold now
    shapes = {tuple(marked[n].meta["val"].shape[i] for i in (1, 3)) for n in cache.present_names()
              if isinstance(marked[n].meta.get("val"), torch.Tensor)}
    if len(shapes) > 1:
        raise CacheError(f"the layers keep different key/value heads or head sizes ({sorted(shapes)}): one cache "
                         "layout cannot describe them")
    if shapes:
        (heads, head_dim), = shapes
        cache = CacheLayout(cache.layers, int(heads), int(head_dim), cache.dtype, cache.positions)
        gm.meta[META] = cache.to_json()
    ids = next(iter(graph.find_nodes(op="placeholder")))
    last = ids
    for name in ["attention_mask", "position_ids", *cache.past_names()]:
        with graph.inserting_after(last):
            last = graph.placeholder(name.replace(".", "_"))
        old = marked[name]
        old.replace_all_uses_with(last)
        graph.erase_node(old)
    out = graph.output_node()
    out.args = ((out.args[0][0], *[marked[n] for n in cache.present_names()]),)
    _set_specs(gm, inputs=len(cache.input_names()), outputs=len(cache.output_names()))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm, cache


def _fold_presents(graph: fx.Graph) -> None:
    """Presents that are items 1.. of one node's tuple (a fused attention, read back by ``Program.load``) mark that
    node instead: once the outputs are dropped, nothing reads the items and dead-code elimination would drop
    them with their marks."""
    import operator

    items: dict[fx.Node, dict[int, fx.Node]] = {}
    for node in graph.nodes:
        if node.meta.get(MARK, ("",))[0] == "present" and node.target is operator.getitem:
            items.setdefault(node.args[0], {})[node.args[1]] = node
    for parent, got in items.items():
        if sorted(got) == list(range(1, len(got) + 1)) and MARK not in parent.meta:
            parent.meta[MARK] = ("presents", tuple(got[i].meta.pop(MARK)[1] for i in sorted(got)))


def _unfold_presents(graph: fx.Graph, node: fx.Node) -> None:
    """A node marked ("presents", (names...)) returns a tuple whose items 1.. are those presents (a fused
    attention: its outputs are the attention's and the cache's): each becomes a marked getitem node."""
    import operator

    names = node.meta.pop(MARK)[1]
    last = node
    for i, name in enumerate(names, start=1):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (node, i))
        val = node.meta.get("val")
        last.meta["val"] = val[i] if isinstance(val, (tuple, list)) else None
        last.meta[MARK] = ("present", name)


def input_subgraph(gm: fx.GraphModule, outputs: Sequence[fx.Node], marks: dict[str, fx.Node] | None = None
                   ) -> fx.GraphModule:
    """A module computing ``outputs`` (nodes of a detached program) from the cache inputs, in the order of
    ``CacheLayout.input_names()``: the marked mask, positions and pasts read as inputs again, the rest of the
    program left out. CacheError when an output depends on a value that is not one of them (a present)."""
    cache = layout(gm)
    if cache is None:
        raise CacheError("the program was captured without a KV cache")
    marks = marks if marks is not None else {n.meta[MARK][1]: n for n in gm.graph.nodes if MARK in n.meta}
    sub = fx.Graph()
    ids = next(iter(gm.graph.find_nodes(op="placeholder")))
    env = {ids: sub.placeholder("input_ids")}
    for name in cache.input_names()[1:]:
        placeholder = sub.placeholder(name.replace(".", "_"))
        if name in marks:
            env[marks[name]] = placeholder
    needed: set[fx.Node] = set()
    todo = [n for n in outputs if n not in env]
    while todo:
        node = todo.pop()
        if node in needed:
            continue
        if node.meta.get(MARK, ("",))[0] in ("present", "presents") or node.op == "placeholder":
            raise CacheError(f"{node.name} reads {node.meta.get(MARK, ('', node.name))[1]}")
        needed.add(node)
        todo.extend(n for n in node.all_input_nodes if n not in env)
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(gm, sub)


def _set_specs(gm: fx.GraphModule, inputs: int, outputs: int) -> None:
    """torch.export's pytree calling convention for ``inputs`` positional tensors in and ``outputs`` out (one
    output: the tensor itself, as a captured module returns it)."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    x = torch.empty(0)
    in_spec = pytree.tree_flatten(((x,) * inputs, {}))[1]
    out_spec = pytree.tree_flatten(x if outputs == 1 else (x,) * outputs)[1]
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))
    gm._in_spec, gm._out_spec = in_spec, out_spec


def complete_feed(feed: dict[str, Any], inputs: Sequence[Any]) -> dict[str, Any]:
    """``feed`` (numpy arrays by input name, with ``input_ids``) completed with the cache inputs that a
    session's ``inputs`` (onnxruntime's NodeArgs: name, shape, type) ask for and it lacks: a mask of ones,
    positions 0..S-1, empty pasts. Runs a cache graph as the detached program: no earlier tokens."""
    missing = [i for i in inputs if i.name not in feed]
    if "input_ids" not in feed or not missing:
        return feed
    b, s = np.asarray(feed["input_ids"]).shape
    out = dict(feed)
    for i in missing:
        if i.name == "attention_mask":
            out[i.name] = np.ones((b, s), np.int64)
        elif i.name == "position_ids":
            out[i.name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        elif i.name.startswith("past_key_values."):
            dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(i.type, np.float32)
            out[i.name] = np.zeros((b, i.shape[1], 0, i.shape[3]), dtype)
    return out
