"""The rotary tables of graphpress::cached_attention computed in the exported file instead of stored.

``fuse_attention`` stores them, [L, D/2] for cos and for sin: the program's own reference never reads them, so
computing them there would cost every call. A target whose runtime folds constants when it loads a model
(onnxruntime) computes them in the copy it exports, from the model's own rotary subgraph: the file keeps a few
inverse frequencies instead of L * D floats (2 MB for SmolLM2, 64 MB for a context of 128K).
"""

from __future__ import annotations

import torch
from torch import fx

from graphpress import kv_cache
from graphpress.graph import get_tensor, infer_val, is_derived
from graphpress.passes.fuse_attention import FUSED, mask_case

aten = torch.ops.aten


def computed_rotary_tables(gm: fx.GraphModule) -> int:
    """Each pair of stored tables that graphpress::cached_attention reads replaced, in place (the copy being
    exported), by the model's own rotary subgraph run on positions 0..L-1 with no past; only where that subgraph
    gives the stored tables bit for bit, else they stay stored. Returns how many pairs were replaced."""
    cache = kv_cache.layout(gm)
    if cache is None:
        return 0
    marks = {n.meta[kv_cache.MARK][1]: n for n in gm.graph.nodes if kv_cache.MARK in n.meta}
    done: dict[tuple[str, str], tuple[fx.Node, fx.Node] | None] = {}
    for node in list(gm.graph.find_nodes(op="call_function", target=FUSED)):
        cos, sin, cos_table, sin_table = node.args[6:10]
        if not all(isinstance(n, fx.Node) for n in (cos, sin, cos_table, sin_table)) or \
                cos_table.op != "get_attr" or sin_table.op != "get_attr":
            continue
        key = (cos_table.target, sin_table.target)
        if key not in done:
            done[key] = _computed_tables(gm, cos, sin, (get_tensor(gm, cos_table), get_tensor(gm, sin_table)),
                                         cache, marks)
        if done[key] is not None:
            node.update_arg(8, done[key][0])
            node.update_arg(9, done[key][1])
    for table in [n for n in gm.graph.find_nodes(op="get_attr") if is_derived(n.target) and not n.users]:
        gm.graph.erase_node(table)
    gm.recompile()
    return sum(nodes is not None for nodes in done.values())


def _computed_tables(gm: fx.GraphModule, cos: fx.Node, sin: fx.Node, stored: tuple[torch.Tensor, torch.Tensor],
                     cache: kv_cache.CacheLayout, marks: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The subgraph computing ``cos`` and ``sin`` from the cache inputs, copied at the start of ``gm`` on one row of
    positions 0..L-1 (L: the stored tables' rows) with no past, and the first halves of its outputs' rows:
    [L, D/2] each; None, with nothing added, when they are not ``stored`` bit for bit."""
    from torch._guards import detect_fake_mode

    length, half = stored[0].shape
    device = stored[0].device
    try:
        sub = kv_cache.input_subgraph(gm, [cos, sin], marks)
        with torch.no_grad():
            full = sub(*(x.to(device) for x in mask_case(cache, 1, 0, length, 0)))
    except Exception:  # noqa: BLE001 - then the tables stay stored
        return None
    if not all(torch.equal(whole[0, 0, :, :half], table) for whole, table in zip(full, stored, strict=True)):
        return None
    graph = gm.graph
    start = next(n for n in graph.nodes if n.op != "placeholder")
    factories = {  # the cache inputs of mask_case(cache, 1, 0, length, 0), as nodes
        "input_ids": (aten.zeros.default, ([1, length],), torch.long),
        "attention_mask": (aten.ones.default, ([1, length],), torch.long),
        "position_ids": (aten.arange.start, (0, length), torch.long),
    }
    env: dict[fx.Node, fx.Node] = {}
    new: list[fx.Node] = []
    try:
        mode = detect_fake_mode([cos.meta["val"]])
        with graph.inserting_before(start):
            for p in sub.graph.find_nodes(op="placeholder"):
                if not p.users:
                    continue
                target, args, dtype = factories.get(
                    p.target, (aten.zeros.default, ([1, cache.heads, 0, cache.head_dim],), cache.torch_dtype))
                env[p] = graph.call_function(target, args, {"dtype": dtype, "device": device})
                new.append(env[p])
                if p.target == "position_ids":
                    env[p] = graph.call_function(aten.unsqueeze.default, (env[p], 0))
                    new.append(env[p])
            outputs = ()
            for node in sub.graph.nodes:
                if node.op == "output":
                    outputs = node.args[0]
                elif node.op != "placeholder":
                    env[node] = graph.node_copy(node, env.__getitem__)
                    env[node].meta.pop(kv_cache.MARK, None)
                    new.append(env[node])
            tables = []
            for out in outputs:
                row = graph.call_function(aten.select.int, (graph.call_function(aten.select.int, (env[out], 0, 0)),
                                                            0, 0))
                tables.append(graph.call_function(aten.slice.Tensor, (row, -1, 0, half)))
                new.extend([row.args[0], row, tables[-1]])
        for node in new:
            if node.op == "call_function":
                infer_val(node, mode)
    except Exception:  # noqa: BLE001 - a subgraph whose shapes cannot be propagated: the tables stay stored
        for node in reversed(new):
            graph.erase_node(node)
        return None
    return tables[0], tables[1]
