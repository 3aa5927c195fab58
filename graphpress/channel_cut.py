"""Cut channels out of a program: the rewrite that follows graphpress.channels' analysis.

``prune(analysis, removed)`` rewrites the graph for a set of removed classes: parameters sliced along every
dimension that carries atoms, and every shape constant (view/reshape/expand sizes, slice bounds, split
sizes) recomputed from the kept positions. A removal the graph cannot express (a cut that is not a
tensor, a constant that varies along a removed channel) is refused with the node named.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from graphpress.channels import EXPANDING, LAYER_NORM, Analysis, ChannelError, concrete, op_name
from graphpress.graph import aliases, get_tensor, infer_val, set_tensor

aten = torch.ops.aten


def prune(an: Analysis, removed: set[int]) -> dict[str, int]:
    """Remove the classes ``removed`` (and the sources only they copy) from ``an.gm`` in place: slice the
    parameters, recompute the shape constants, re-infer every node's value. Returns per-parameter counts
    of removed elements. Raises ChannelError naming the node when the graph cannot express the cut."""
    gone = an.removal(removed)
    why = an.why_fixed(gone)
    if why is not None:
        raise ChannelError(f"these channels cannot be removed: {why} needs them")
    gm = an.gm

    def keep_of(ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([an.find(a) not in gone if a >= 0 else True for a in ids.flatten().tolist()],
                            dtype=torch.bool).reshape(ids.shape)

    # 1. shape constants, from the sizes the kept channels leave (checked to form tensors)
    keeps: dict[fx.Node, _Kept] = {}
    for node, ids in an.ids.items():
        if isinstance(ids, torch.Tensor):
            keeps[node] = _kept(node, keep_of(ids))
        elif isinstance(ids, (list, tuple)):
            for t in ids:
                if isinstance(t, torch.Tensor):
                    _kept(node, keep_of(t))
    for node in gm.graph.nodes:
        if node.op == "call_function":
            _rewrite_constants(node, keeps)
    # 2. parameters
    names = aliases(gm)
    counts: dict[str, int] = {}
    for name, dims in an.params.items():
        t = get_tensor(gm, _first_get_attr(gm, names, name)) if _first_get_attr(gm, names, name) else None
        if t is None:
            continue
        new = t
        for dim, ids in dims.items():
            k = keep_of(ids)
            if not bool(k.all()):
                new = new.index_select(dim, k.nonzero().flatten())
        if new is not t:
            counts[name] = t.numel() - new.numel()
            for alias in names.get(name, [name]):
                set_tensor(gm, alias, new.contiguous())
    # 3. values
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    # only what the cut reaches is re-inferred (values no channel flows through keep theirs: a rotary
    # table computed under a higher-order op, say)
    changed: set[fx.Node] = set(keeps) | {n for n in gm.graph.nodes if n.target in FACTORIES}
    cut = {alias for name in counts for alias in names.get(name, [name])}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in cut:
            node.meta["val"] = get_tensor(gm, node)
            changed.add(node)
        elif node.op == "call_function" and "val" in node.meta and (
                node in changed or any(a in changed for a in node.all_input_nodes)):
            changed.add(node)
            try:
                infer_val(node, mode)
            except Exception as e:  # noqa: BLE001 - any failure names the node
                raise ChannelError(f"after removing channels, {node.name} ({op_name(node)}) no longer "
                                   f"computes: {str(e).splitlines()[0]}") from e
    gm.recompile()
    return counts


def _first_get_attr(gm: fx.GraphModule, names: dict[str, list[str]], name: str) -> fx.Node | None:
    wanted = set(names.get(name, [name]))
    return next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target in wanted), None)


@dataclass
class _Kept:
    """What stays of a node's value: per dimension, its new size and which positions some line keeps."""

    sizes: list[int]
    any: list[torch.Tensor]

    def cut(self, d: int) -> bool:
        return self.sizes[d] != self.any[d].numel()


def _kept(node: fx.Node, keep: torch.Tensor) -> _Kept:
    """The kept positions must leave a tensor: slices kept by no line are dropped, then what remains is either
    whole or keeps the same number of positions on every line along one dimension (not necessarily the same
    positions: the copies of a repeated key/value head are interchangeable). Refuses anything else, naming
    the node."""
    if keep.numel() == 0:
        return _Kept(list(keep.shape), [torch.ones(s, dtype=torch.bool) for s in keep.shape])
    anys = [keep.movedim(d, 0).reshape(keep.shape[d], -1).any(1) for d in range(keep.dim())]
    if not keep.any():
        return _Kept([int(a.sum()) for a in anys], anys)
    rest = keep
    for d, a in enumerate(anys):
        rest = rest.index_select(d, a.nonzero().flatten())
    sizes = list(rest.shape)
    if not rest.all():
        for d in _copy_dims_first(node, rest.dim()):
            counts = set(rest.movedim(d, -1).reshape(-1, rest.shape[d]).sum(1).tolist())
            if len(counts) == 1:
                sizes[d] = counts.pop()
                break
        else:
            raise ChannelError(f"the channels kept at {node.name} ({op_name(node)}) do not form a tensor: the "
                               "removal cuts a dimension unevenly (remove the same number per head or group)")
    return _Kept(sizes, anys)


def _copy_dims_first(node: fx.Node, rank: int) -> list[int]:
    """Dimensions of ``node``'s value, those an expand made copies along first."""
    copied: list[int] = []
    if node.op == "call_function" and node.target in EXPANDING and isinstance(node.args[0], fx.Node):
        src = concrete(node.args[0].meta.get("val")) or ()
        lead = rank - len(src)
        copied = [lead + d for d, size in enumerate(src) if size == 1]
    return copied + [d for d in range(rank) if d not in copied]


FACTORIES = (aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default)


def _concatenated_into(node: fx.Node, keeps: dict[fx.Node, _Kept], depth: int = 3) -> tuple[fx.Node, int] | None:
    """The first concatenation downstream of ``node`` (through concatenations only) that carries channels, and
    its dimension."""
    for user in node.users:
        if user.target is aten.cat.default:
            if user in keeps and any(keeps[user].cut(d) for d in range(len(keeps[user].sizes))):
                return user, user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
            if depth > 1 and (found := _concatenated_into(user, keeps, depth - 1)) is not None:
                return found
    return None


def _rewrite_constants(node: fx.Node, keeps: dict[fx.Node, _Kept]) -> None:
    target = node.target
    out = keeps.get(node)
    src = node.args[0] if node.args else None
    in_keep = keeps[src].any if isinstance(src, fx.Node) and src in keeps else None
    if target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default) \
            and out is not None:
        sizes = list(node.args[1])
        for d in range(len(sizes)):
            if out.cut(d) and isinstance(sizes[d], int) and sizes[d] != -1:
                sizes[d] = out.sizes[d]
        node.args = (node.args[0], sizes, *node.args[2:])
    elif target in FACTORIES and _concatenated_into(node, keeps) is not None:
        # an empty tensor concatenated with channels (a KV cache before its first token: graphpress.kv_cache)
        # takes the sizes they keep, but along the concatenation
        into, dim = _concatenated_into(node, keeps)  # type: ignore[misc]
        sizes = list(node.args[0])
        for d in range(len(sizes)):
            if d != dim % len(sizes) and keeps[into].cut(d) and isinstance(sizes[d], int):
                sizes[d] = keeps[into].sizes[d]
        node.args = (sizes, *node.args[1:])
    elif target in (aten.slice.Tensor, aten.narrow.default) and in_keep is not None:
        dim = node.args[1] if len(node.args) > 1 else 0
        k = in_keep[dim]
        if bool(k.all()):
            return
        size = k.numel()
        if target is aten.narrow.default:
            start, length = node.args[2], node.args[3]
            new_start = int(k[:start].sum())
            node.args = (src, dim, new_start, int(k[start:start + length].sum()))
            return
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else size
        start = 0 if start is None else (start + size if start < 0 else min(start, size))
        end = size if end is None else (end + size if end < 0 else min(end, size))
        node.args = (src, dim, int(k[:start].sum()), int(k[:end].sum()), *node.args[4:])
    elif target in LAYER_NORM and isinstance(src, fx.Node) and src in keeps:  # normalized_shape: the kept sizes
        sizes = keeps[src].sizes
        node.args = (src, sizes[len(sizes) - len(node.args[1]):], *node.args[2:])
    elif target is aten.select.int and in_keep is not None:
        dim, index = node.args[1], node.args[2]
        k = in_keep[dim]
        if not bool(k.all()):
            index = index + k.numel() if index < 0 else index
            if not bool(k[index]):
                raise ChannelError(f"{node.name} selects a removed channel")
            node.args = (src, dim, int(k[:index].sum()))
    elif target in (aten.split.Tensor, aten.split_with_sizes.default) and in_keep is not None:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        k = in_keep[dim]
        if bool(k.all()):
            return
        n = k.numel()
        if target is aten.split.Tensor:
            step = node.args[1]
            sizes = [int(k[i:i + step].sum()) for i in range(0, n, step)]
            if len(set(sizes[:-1] if n % step else sizes)) > 1:
                raise ChannelError(f"{node.name} splits into equal parts, but the removal leaves them unequal")
            node.args = (src, sizes[0], *node.args[2:])
        else:
            bounds, sizes, at = node.args[1], [], 0
            for s in bounds:
                sizes.append(int(k[at:at + s].sum()))
                at += s
            node.args = (src, sizes, *node.args[2:])
    elif target is aten.chunk.default and in_keep is not None:
        dim = node.args[2] if len(node.args) > 2 else 0
        k = in_keep[dim]
        chunks = node.args[1]
        step = -(-k.numel() // chunks)
        sizes = {int(k[i:i + step].sum()) for i in range(0, k.numel(), step)}
        if len(sizes) > 1:
            raise ChannelError(f"{node.name} splits into {chunks} equal parts, but the removal leaves them unequal")
    elif isinstance(target, torch._ops.OpOverload) and out is not None and torch.Tag.pointwise in target.tags:
        for a in node.all_input_nodes:
            if a not in keeps and isinstance(a.meta.get("val"), torch.Tensor):
                shape = concrete(a.meta["val"])
                lead = len(out.sizes) - len(shape)
                for d, size in enumerate(shape):
                    if size > 1 and out.cut(lead + d):
                        raise ChannelError(
                            f"{node.name} combines the removed channels with {a.name}, a value that varies along "
                            "them and that the analysis cannot slice")
