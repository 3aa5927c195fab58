"""Channel-dependency analysis: which rows, columns, biases, norm scales and shape constants of a captured
program must shrink together, found on the graph with no per-architecture knowledge.

Every channel a parameter creates is an *atom* (an integer): a linear's output rows, an embedding's columns,
a 1-D parameter's entries. Each node's value carries a tensor of atom ids with the node's concrete shape
(symbolic batch/sequence sizes taken as 1), or None where no channel flows. The ids are pushed through the
graph by running the same shape op on them (view, transpose, slice, cat, split...), so head splits, rotary
halves and fused q/k/v or gate/up slices need no special case:

    linear(x, W, b)           W's columns <- ids of x's last dim;  rows = fresh atoms = b's entries
    pointwise(a, b, ...)      tagged operands equal position by position: their atoms are unified
    expand / broadcast        each repeated position becomes a *copy* atom of its source; a source survives
                              while any of its copies does (grouped-query attention's repeated key/value
                              heads, a per-head norm scale shared by every head)
    sdpa(q, k, v)             q ~ k position by position (the contraction), output ~ v; the head axis is
                              recorded as an attention *site*
    reduction over channels   the atoms are marked "reduced" (a norm's mean changes when they go)
    program output / an op    the atoms are marked "pinned" by that node: they cannot be removed
    the analysis cannot follow

Union-find over atoms gives the *classes*: the units that are removed together. An MLP neuron is one class
(gate row j ~ up row j ~ down column j); an attention head is the classes at one head position of a site.

graphpress.channel_cut rewrites the graph once classes are chosen for removal.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from graphpress.graph import aliases, get_tensor

aten = torch.ops.aten


class ChannelError(ValueError):
    """A removal the graph cannot express; the message names the node."""


_SHAPE_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.flatten.using_ints, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.detach.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.cat.default, aten.stack.default, aten.expand.default,
    aten.repeat.default, aten.narrow.default,
}
# ops that keep each channel where it is (casts, dropout in eval)
_SAME = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.dropout.default,
         aten.type_as.default, aten.lift_fresh_copy.default}
EXPANDING = {aten.expand.default, aten.repeat.default}
_SDPA = {aten.scaled_dot_product_attention.default}
LAYER_NORM = {aten.layer_norm.default}
_LINEAR = aten.linear.default
_EMBEDDING = aten.embedding.default
_IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int}


def concrete(val: Any) -> tuple[int, ...] | None:
    """A tensor value's shape with symbolic sizes taken as 1 (None for non-tensors)."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else 1 for s in val.shape)


@dataclass
class Site:
    """One attention call: atoms of q [H, D] and of its output [H, Dv], heads along dim 0; ``group[h]``
    the key/value group head h reads."""

    node: fx.Node
    q: torch.Tensor
    out: torch.Tensor
    group: list[int]


@dataclass
class Analysis:
    gm: fx.GraphModule
    ids: dict[fx.Node, Any] = field(default_factory=dict)  # node -> atom ids (tensor, list of them, or None)
    parent: list[int] = field(default_factory=list)
    # parameter (canonical name) -> {dim: 1-D atom ids along it}
    params: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (copy atoms, source atoms)
    pinned: dict[int, str] = field(default_factory=dict)  # atom -> the node that pins it
    reduced: dict[int, str] = field(default_factory=dict)  # atom -> the node that reduces over it
    sites: list[Site] = field(default_factory=list)
    # linear node -> (weight name, input atoms [K], output atoms [N])
    linears: dict[fx.Node, tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    # -- union-find --------------------------------------------------------------------------------------
    def fresh(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = len(self.parent)
        count = 1
        for s in shape:
            count *= s
        self.parent.extend(range(n, n + count))
        return torch.arange(n, n + count).reshape(shape)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def unify(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, y in zip(a.flatten().tolist(), b.flatten().tolist(), strict=True):
            if x >= 0 and y >= 0:
                rx, ry = self.find(x), self.find(y)
                if rx != ry:
                    self.parent[max(rx, ry)] = min(rx, ry)

    def classes(self, atoms: torch.Tensor) -> torch.Tensor:
        """The class (root atom) of every atom; -1 stays -1."""
        flat = [self.find(a) if a >= 0 else -1 for a in atoms.flatten().tolist()]
        return torch.tensor(flat, dtype=torch.long).reshape(atoms.shape)

    def class_set(self, atoms: torch.Tensor) -> set[int]:
        return {c for c in self.classes(atoms).flatten().tolist() if c >= 0}

    def why_fixed(self, classes: set[int]) -> str | None:
        """Why some of ``classes`` cannot be removed (the pinning node), else None."""
        pinned = {self.find(a): node for a, node in self.pinned.items()}
        for c in sorted(classes):
            if c in pinned:
                return pinned[c]
        return None

    # -- removal -------------------------------------------------------------------------------------------
    def removal(self, removed: set[int]) -> set[int]:
        """Every class that goes when ``removed`` go: a copied source goes once all of its copies have."""
        children: dict[int, set[int]] = defaultdict(set)
        for copy, source in self.copies:
            for c, s in zip(self.classes(copy).flatten().tolist(), self.classes(source).flatten().tolist(),
                            strict=True):
                if c >= 0 and s >= 0 and c != s:
                    children[s].add(c)
        memo: dict[int, bool] = {}

        def gone(c: int, depth: int = 0) -> bool:
            if c in removed:
                return True
            if c not in children or depth > 64:
                return False
            if c not in memo:
                memo[c] = all(gone(ch, depth + 1) for ch in children[c])
            return memo[c]

        return set(removed) | {s for s in children if gone(s)}


# -- analysis ----------------------------------------------------------------------------------------------

def analyze(gm: fx.GraphModule) -> Analysis:
    """Push atom ids through ``gm`` (see the module docstring)."""
    an = Analysis(gm)
    names = aliases(gm)
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = get_tensor(gm, node)
            canonical = _canonical(names, node.target)
            an.ids[node] = None
            if node.target in parameters and isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point():
                an.ids[node] = _param_dim(an, canonical, 0, an.fresh(tuple(t.shape)))
        elif node.op == "call_function":
            an.ids[node] = _transfer(an, node, names)
        elif node.op == "output":
            for arg in fx.node.map_aggregate(node.args, lambda a: a):
                for a in _flat(arg):
                    if isinstance(a, fx.Node):
                        _pin(an, an.ids.get(a), f"{a.name} (a program output)")
        else:
            an.ids[node] = None
    return an


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flat(v)]
    return [x]


def _canonical(names: dict[str, list[str]], target: str) -> str:
    return min(names.get(target, [target]))


def _param_dim(an: Analysis, name: str, dim: int, atoms: torch.Tensor) -> torch.Tensor:
    """Record that ``name``'s dimension ``dim`` holds ``atoms`` (unified with what another use recorded)."""
    dims = an.params.setdefault(name, {})
    if dim in dims:
        if dims[dim].shape != atoms.shape:
            _pin(an, atoms, f"{name} (used with two widths)")
            _pin(an, dims[dim], f"{name} (used with two widths)")
        else:
            an.unify(dims[dim], atoms)
    else:
        dims[dim] = atoms
    return dims[dim]


def _pin(an: Analysis, ids: Any, why: str, table: str = "pinned") -> None:
    target = an.pinned if table == "pinned" else an.reduced
    for t in _flat(ids):
        if isinstance(t, torch.Tensor):
            for a in t.flatten().tolist():
                if a >= 0:
                    target.setdefault(a, why)


def _ids(an: Analysis, a: Any) -> Any:
    return an.ids.get(a) if isinstance(a, fx.Node) else None


def _tagged(ids: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and bool((t >= 0).any()) for t in _flat(ids))


def _transfer(an: Analysis, node: fx.Node, names: dict[str, list[str]]) -> Any:
    target = node.target
    if target in _IGNORED:
        return None
    shape = concrete(node.meta.get("val"))
    inputs = [a for a in node.all_input_nodes if _tagged(an.ids.get(a))]
    if target is _LINEAR:
        return _linear(an, node, names, shape)
    if target is _EMBEDDING:
        weight = node.args[0]
        if shape is None or not isinstance(weight, fx.Node) or weight.op != "get_attr":
            return None
        out = an.fresh(shape[-1:])
        _param_dim(an, _canonical(names, weight.target), 1, out)
        return out.expand(shape).clone() if len(shape) > 1 else out
    if not inputs:
        return None
    if target is operator.getitem:
        src, index = node.args
        ids = an.ids.get(src)
        return ids[index] if isinstance(ids, (list, tuple)) else None
    if target in _SDPA:
        return _attention(an, node, shape)
    if target in LAYER_NORM:
        x = _ids(an, node.args[0])
        _pin(an, x, node.name, table="reduced")
        for p in node.args[2:4]:
            pids = _ids(an, p)
            if isinstance(pids, torch.Tensor) and isinstance(x, torch.Tensor):
                an.unify(_copies(an, pids, x.shape), x)
        return x
    if target in _SAME:
        return _ids(an, node.args[0])
    if target in _SHAPE_OPS:
        return _shape_op(an, node, shape)
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags and shape is not None:
        return _pointwise(an, node, shape)
    if isinstance(target, torch._ops.OpOverload) and _is_reduction(node):
        for a in inputs:
            _pin(an, an.ids[a], node.name, table="reduced")
        return None
    for a in inputs:
        _pin(an, an.ids[a], f"{node.name} ({op_name(node)}, which the channel analysis does not follow)")
    return None


def op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


_REDUCTIONS = ("mean", "sum", "amax", "amin", "var", "std", "norm", "_softmax", "softmax", "_log_softmax",
               "log_softmax", "linalg_vector_norm", "max", "min", "logsumexp")


def _is_reduction(node: fx.Node) -> bool:
    return op_name(node).split(".")[0] in _REDUCTIONS


def _linear(an: Analysis, node: fx.Node, names: dict[str, list[str]], shape: tuple[int, ...] | None) -> Any:
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    x_ids = _ids(an, x)
    if shape is None or not isinstance(weight, fx.Node) or weight.op != "get_attr":
        _pin(an, x_ids, f"{node.name} (a linear whose weight is not a parameter)")
        return None
    name = _canonical(names, weight.target)
    k = get_tensor(an.gm, weight).shape[1]
    cols = x_ids.reshape(-1, k)[0] if isinstance(x_ids, torch.Tensor) and _varies_only_last(x_ids) else None
    if cols is None:
        _pin(an, x_ids, f"{node.name} (a linear whose input carries channels outside its last dimension)")
        cols = an.fresh((k,))
    cols = _param_dim(an, name, 1, cols)
    rows = _param_dim(an, name, 0, an.fresh(shape[-1:]))
    b = _ids(an, bias)
    if isinstance(b, torch.Tensor):
        an.unify(b, rows)
    an.linears[node] = (name, cols, rows)
    return rows.expand(shape).clone()


def _varies_only_last(ids: torch.Tensor) -> bool:
    flat = ids.reshape(-1, ids.shape[-1])
    return bool((flat == flat[:1]).all())


def _copies(an: Analysis, ids: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """``ids`` broadcast to ``shape``; repeated positions become copy atoms of their source."""
    shape = tuple(shape)
    lead = (1,) * (len(shape) - ids.dim())
    src = ids.reshape(lead + tuple(ids.shape))
    if tuple(src.shape) == shape:
        return src
    out = src.expand(shape)
    fresh = an.fresh(shape)
    fresh[out < 0] = -1
    an.copies.append((fresh, out.clone()))
    return fresh


def _pointwise(an: Analysis, node: fx.Node, shape: tuple[int, ...]) -> torch.Tensor | None:
    result = None
    for a in node.all_input_nodes:
        ids = an.ids.get(a)
        if not isinstance(ids, torch.Tensor):
            continue
        b = _copies(an, ids, shape)
        if result is None:
            result = b.clone()
        else:
            an.unify(result, b)
            result = torch.where(result >= 0, result, b)
    return result


def _arg(an: Analysis, a: Any) -> Any:
    """An argument of a shape op, for running it on atom ids: tensors -> ids (untagged: -1 of their shape),
    symbolic sizes -> 1."""
    if isinstance(a, fx.Node):
        val = a.meta.get("val")
        if isinstance(val, torch.Tensor):
            ids = an.ids.get(a)
            return ids if isinstance(ids, torch.Tensor) else torch.full(concrete(val), -1, dtype=torch.long)
        if isinstance(val, int):
            return val
        return 1
    if isinstance(a, (list, tuple)):
        return type(a)(_arg(an, x) for x in a)
    if isinstance(a, torch.SymInt):
        return 1
    return a


def _shape_op(an: Analysis, node: fx.Node, shape: tuple[int, ...] | None) -> Any:
    args = _arg(an, node.args)
    kwargs = {k: _arg(an, v) for k, v in node.kwargs.items()}
    try:
        out = node.target(*args, **kwargs)
    except (RuntimeError, IndexError, ValueError):
        out = None
    val = node.meta.get("val")
    expected = [concrete(v) for v in val] if isinstance(val, (list, tuple)) else concrete(val)
    got = [tuple(t.shape) for t in out] if isinstance(out, (list, tuple)) else (
        tuple(out.shape) if isinstance(out, torch.Tensor) else None)
    if got != expected:
        for a in node.all_input_nodes:
            _pin(an, an.ids.get(a), f"{node.name} ({op_name(node)} over a symbolic size the analysis cannot follow)")
        return None
    if node.target in EXPANDING:
        src = _ids(an, node.args[0])
        if isinstance(src, torch.Tensor) and src.numel() != out.numel():
            fresh = an.fresh(tuple(out.shape))
            fresh[out < 0] = -1
            an.copies.append((fresh, out.clone()))
            return fresh
    if isinstance(out, (list, tuple)):
        return [t.clone() for t in out]
    return out.clone()


def _attention(an: Analysis, node: fx.Node, shape: tuple[int, ...] | None) -> Any:
    q, k, v = (_ids(an, a) for a in node.args[:3])
    vals = [a.meta.get("val") for a in node.args[:3]]
    if shape is None or any(not isinstance(t, torch.Tensor) for t in vals):
        return None
    qs, ks, vs = (concrete(t) for t in vals)
    q = q if isinstance(q, torch.Tensor) else torch.full(qs, -1, dtype=torch.long)
    k = k if isinstance(k, torch.Tensor) else torch.full(ks, -1, dtype=torch.long)
    v = v if isinstance(v, torch.Tensor) else torch.full(vs, -1, dtype=torch.long)
    heads = qs[-3]
    group = list(range(heads))
    if ks[-3] != heads:  # grouped-query attention without an explicit repeat (enable_gqa)
        rep = heads // ks[-3]
        group = [h // rep for h in range(heads)]
        k = _repeat_heads(an, k, rep)
        v = _repeat_heads(an, v, rep)
    else:
        group = _groups(an, k)
    # q ~ k over the contraction (per head and channel); output ~ v (per head and channel)
    an.unify(_squeeze_seq(q), _squeeze_seq(k))
    out = an.fresh(shape)
    an.unify(_squeeze_seq(out), _squeeze_seq(v))
    an.sites.append(Site(node, _squeeze_seq(q), _squeeze_seq(out), group))
    return out


def _repeat_heads(an: Analysis, ids: torch.Tensor, rep: int) -> torch.Tensor:
    source = ids.repeat_interleave(rep, dim=-3)
    fresh = an.fresh(tuple(source.shape))
    fresh[source < 0] = -1
    an.copies.append((fresh, source))
    return fresh


def _squeeze_seq(ids: torch.Tensor) -> torch.Tensor:
    """[..., H, T, D] ids (batch and sequence of size 1) -> [H, D]."""
    return ids.reshape(-1, *ids.shape[-3:])[0][:, 0, :]


def _groups(an: Analysis, k: torch.Tensor) -> list[int]:
    """The key/value group of each head position of k: heads whose atoms are copies of the same sources."""
    source: dict[int, int] = {}
    for copy, src in an.copies:
        for c, s in zip(copy.flatten().tolist(), src.flatten().tolist(), strict=True):
            if c >= 0:
                source[c] = s

    def root(a: int) -> int:
        seen = 0
        while a in source and seen < 64:
            a, seen = source[a], seen + 1
        return an.find(a) if a >= 0 else a

    per_head = _squeeze_seq(k)
    keys: dict[frozenset[int], int] = {}
    return [keys.setdefault(frozenset(root(a) for a in per_head[h].tolist()), len(keys))
            for h in range(per_head.shape[0])]


# -- groups --------------------------------------------------------------------------------------------------

@dataclass
class Family:
    """Channels made by ``producers`` (rows) and read only by ``consumers`` (columns): an MLP's neurons.
    ``classes[j]`` is the class of the lead consumer's column j."""

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    consumer_nodes: tuple[fx.Node, ...]
    classes: list[int]


def families(an: Analysis) -> list[Family]:
    """Every set of channels that flow from linears' rows to linears' columns through pointwise ops only
    (MLP neurons): not pinned, not reduced, not attended."""
    fixed = {an.find(a) for a in an.pinned} | {an.find(a) for a in an.reduced}
    attended = set()
    for site in an.sites:
        attended |= an.class_set(site.q) | an.class_set(site.out)
    producers: dict[int, set[str]] = defaultdict(set)
    consumers: dict[int, list[tuple[str, fx.Node, int]]] = defaultdict(list)
    for node, (name, cols, rows) in an.linears.items():
        for c in an.classes(rows).tolist():
            producers[c].add(name)
        for j, c in enumerate(an.classes(cols).tolist()):
            if c >= 0:
                consumers[c].append((name, node, j))
    by_key: dict[tuple, Family] = {}
    for c, cons in consumers.items():
        if c in fixed or c in attended or c not in producers:
            continue
        key = (tuple(sorted(producers[c])), tuple(dict.fromkeys(n for n, _, _ in cons)))
        fam = by_key.setdefault(key, Family(key[0], key[1], tuple(dict.fromkeys(nd for _, nd, _ in cons)), []))
        fam.classes.append(c)
    result = []
    for fam in by_key.values():
        node = fam.consumer_nodes[0]
        order = an.classes(an.linears[node][1]).tolist()
        members = set(fam.classes)
        fam.classes = [c for c in order if c in members]
        result.append(fam)
    return result


def stream_classes(an: Analysis) -> list[int]:
    """The classes of the residual stream, one per channel in order: the embedding's columns (all embeddings
    added into the stream share them). Empty when there is no embedding or its channels are tied together."""
    for node, ids in an.ids.items():
        if node.op == "call_function" and node.target is _EMBEDDING and isinstance(ids, torch.Tensor):
            classes = an.classes(ids.reshape(-1, ids.shape[-1])[0]).tolist()
            return classes if len(set(classes)) == len(classes) and min(classes) >= 0 else []
    return []


def head_classes(an: Analysis, site: Site, head: int) -> set[int]:
    """The classes removed with one query head of a site (its q channels and its output channels)."""
    return an.class_set(site.q[head]) | an.class_set(site.out[head])
