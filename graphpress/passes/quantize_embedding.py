"""Embedding tables quantized to 8 or 4 bits; a tied output projection shares the quantized table.

    embedding(W [V, H], ids)  =>  quantized_embedding(codes, scales, zeros, ids, bits, g, H)
    linear(x, W, b)           =>  quantized_linear(x, codes, scales, zeros, b, H, bits, g)   (W tied, tie_output)
    with  W ~ (codes - zero) * scale  per group of g columns of H (or per row), rounded to nearest (RTN)

The table is stored once (graphpress.kernels.quantized), so the embedding and the tied projection read one
tensor and the float table is dropped. Tables are stored in whole groups, without padding (so that a target
can read the rows as its gather reads them): a requested group size that does not divide H is replaced by
the largest power of two >= 16 below it that does (SmolLM2: H = 576 = 9 * 64), and the choice is reported
(stats ``group_size``); H with no such divisor (odd H, for instance) is refused.

Selection: ``targets`` / ``ignore`` match the embedding's module name. In a captured tied model the table is
one storage under several names (``model.embed_tokens.weight`` and ``lm_head.weight``, and the embedding may
read either); a table is selected when one of its names, or the module the embedding node was called from,
is selected. To keep a tied output projection in float, pass ``tie_output=False``: the float table then stays
for it (stored twice, reported in stats ``skipped``); anything else that reads the table does the same.
``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` only change gradients and are ignored; ``max_norm``
embeddings (``aten.embedding_renorm_`` rewrites the table at run time) are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import graphpress.kernels.quantized  # noqa: F401  (defines torch.ops.graphpress.quantized_*)
from graphpress import provenance
from graphpress.graph import aliases, cleanup, free_target, get_tensor, is_op, module_name, set_tensor
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.quant.qweight import QuantSpec
from graphpress.quant.rtn import quantize_rtn

aten = torch.ops.aten
log = logging.getLogger(__name__)

# views through which aten.embedding_renorm_ (max_norm) reaches the table it rewrites
_VIEWS = (aten.detach.default, aten.alias.default, aten._to_copy.default)


@dataclass
class _Table:
    """One stored embedding table (one storage) and the nodes that read it."""

    names: tuple[str, ...]  # every qualified name of the storage
    module: str  # the embedding module, prefix of the packed tensors
    weight: torch.Tensor  # [V, H]
    embeddings: list[fx.Node]
    linears: list[fx.Node]


def block_size_for(hidden: int, bits: int, group_size: int | None, where: str) -> int:
    """The group length used for a table with ``hidden`` columns: H for one group per row, else the
    requested group size if it divides H, else the largest power of two >= 16 below it that does."""
    if group_size is None:
        return hidden
    block = group_size
    while block >= 16 and hidden % block:
        block //= 2
    if block < 16 or block * bits % 8:
        raise PassError(
            f"{where}: no power of two >= 16 up to group_size={group_size} divides H={hidden}, so the table "
            "cannot be stored in whole groups; use group_size: null (one scale per row) or ignore this embedding"
        )
    return block


@dataclass(frozen=True)
class QuantizeEmbedding(Selection, Pass):
    """Round-to-nearest quantization of embedding tables (and the output projections tied to them)."""

    name: ClassVar[str] = "quantize_embedding"
    exact: ClassVar[bool] = False
    bits: int = 8
    group_size: int | None = 64
    symmetric: bool = False
    clip_search: bool = True
    # quantize a linear that reads the same storage (tied lm_head) on the shared quantized table
    tie_output: bool = True
    # 8: that tied projection also quantizes its activations per token (W8A8, graphpress.kernels.quantized);
    # needs 8-bit symmetric rows (group_size null), which are its int8 weights as they are
    activation_bits: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        QuantSpec(self.bits, self.group_size, self.symmetric)  # validates bits and group size
        if self.activation_bits not in (0, 8):
            raise ValueError(f"quantize_embedding: activation_bits is 0 (float) or 8, not {self.activation_bits}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        tables = self._tables(gm)
        # every refusal before the first rewrite
        blocks = [block_size_for(t.weight.shape[1], self.bits, self.group_size, f"{self.name} on {t.module}")
                  for t in tables]
        stats: dict = {"embeddings": 0, "tied_linears": 0, "bytes_before": 0, "bytes_after": 0,
                       "group_size": {}, "skipped": {}}
        for t, block in zip(tables, blocks, strict=True):
            w = t.weight
            stats["bytes_before"] += w.numel() * w.element_size()
            stats["group_size"][t.module] = block
            stored = self._rewrite(gm, t, block if self.group_size is not None else None)
            stats["bytes_after"] += stored
            stats["embeddings"] += len(t.embeddings)
            stats["tied_linears"] += len(t.linears) if self.tie_output else 0
        cleanup(gm)
        # whatever still reads a float table (an untied linear, a transpose, a matmul) keeps it stored
        for t in tables:
            readers = _float_readers(gm, t.names)
            if readers:
                stats["bytes_after"] += t.weight.numel() * t.weight.element_size()
                log.warning("%s: %d node(s) still read the float table of %s, which is therefore stored twice",
                            self.name, len(readers), t.module)
            for node in readers:
                why = ("tie_output=False keeps this linear on the float table" if node in t.linears
                       else f"{node.target} reads the float table")
                stats["skipped"][_called_from(node) or node.name] = (
                    f"{why}, stored beside the packed {t.module}: the table is stored twice")
        return PassResult(gm, bool(tables), stats)

    def _tables(self, gm: fx.GraphModule) -> list[_Table]:
        """Selected tables, one per storage, with the embeddings and tied linears that read them."""
        names = aliases(gm)
        renormed = _renormed_tables(gm, names)
        by_storage: dict[tuple[str, ...], _Table] = {}
        for node in gm.graph.nodes:
            if not is_op(node, aten.embedding.default):
                continue
            w = get_tensor(gm, node.args[0])
            if w is None:
                continue
            group = tuple(sorted(names.get(node.args[0].target, [node.args[0].target])))
            called_from = _called_from(node)
            modules = {module_name(n) for n in group} | ({called_from} if called_from else set())
            if not any(self.selects(m) for m in modules):
                continue
            module = called_from or module_name(node.args[0].target)
            if group in renormed:
                raise PassError(
                    f"{self.name}: embedding {module} has max_norm (aten.embedding_renorm_ rewrites its table "
                    "at run time), which a quantized table cannot follow; add it to ignore"
                )
            if w.ndim != 2 or not w.is_floating_point():
                raise PassError(f"{self.name}: embedding {module} has a {w.dtype} table of shape "
                                f"{tuple(w.shape)}; only float [V, H] tables are quantized. Add it to ignore")
            table = by_storage.setdefault(group, _Table(group, module, w, [], []))
            table.embeddings.append(node)
        if not by_storage:
            raise PassError(
                f"{self.name}: targets {list(self.targets)} (ignore {list(self.ignore)}) match no embedding; "
                "module names look like 'model.embed_tokens' or 'embeddings.word_embeddings'"
            )
        for node in gm.graph.nodes:
            if is_op(node, aten.linear.default) and isinstance(node.args[1], fx.Node) \
                    and node.args[1].op == "get_attr":
                for table in by_storage.values():
                    if node.args[1].target in table.names:
                        table.linears.append(node)
        return list(by_storage.values())

    def _rewrite(self, gm: fx.GraphModule, t: _Table, group: int | None) -> int:
        """Quantize t, store it packed once, and retarget its nodes; returns the packed bytes."""
        w = t.weight.detach()
        h = w.shape[1]
        q = quantize_rtn(w.float(), QuantSpec(self.bits, group, self.symmetric), clip_search=self.clip_search)
        qweight, scales, zeros = q.packed()
        tensors = {"qweight": qweight, "scales": scales.to(w.dtype)}
        if zeros is not None:
            tensors["qzeros"] = zeros
        targets = {k: free_target(gm, f"{t.module}.{k}") for k in tensors}
        for k, value in tensors.items():
            set_tensor(gm, targets[k], value, buffer=True)  # codes and scales are buffers, not weights
            provenance.record(gm, targets[k], [provenance.Piece(t.names[0])])

        users = t.embeddings + (t.linears if self.tie_output else [])
        first = next(n for n in gm.graph.nodes if n in users)
        attrs: dict[str, fx.Node | None] = {"qzeros": None}
        with gm.graph.inserting_before(first):
            for k, target in targets.items():
                attrs[k] = gm.graph.get_attr(target)
                attrs[k].meta["val"] = tensors[k]
        B, scales, zeros = attrs["qweight"], attrs["scales"], attrs["qzeros"]
        for node in t.embeddings:
            _replace(gm, node, torch.ops.graphpress.quantized_embedding.default,
                     (B, scales, zeros, node.args[1], self.bits, q.group_len, h))
        for node in t.linears if self.tie_output else []:
            bias = node.args[2] if len(node.args) > 2 else None
            _replace(gm, node, torch.ops.graphpress.quantized_linear.default,
                     (node.args[0], B, scales, zeros, bias, h, self.bits, q.group_len, self.activation_bits))
        return sum(x.numel() * x.element_size() for x in tensors.values())


def _replace(gm: fx.GraphModule, node: fx.Node, op: object, args: tuple) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, args)
    new.meta = {k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _float_readers(gm: fx.GraphModule, names: tuple[str, ...]) -> list[fx.Node]:
    """Nodes that still read a get_attr of the float table under any of its names."""
    return [u for n in gm.graph.nodes if n.op == "get_attr" and n.target in names for u in n.users]


def _called_from(node: fx.Node) -> str | None:
    """The qualified name of the innermost module this node was traced in, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def _renormed_tables(gm: fx.GraphModule, names: dict[str, list[str]]) -> set[tuple[str, ...]]:
    """Alias groups of the tables that aten.embedding_renorm_ (nn.Embedding(max_norm=...)) rewrites."""
    out = set()
    for node in gm.graph.nodes:
        if not is_op(node, aten.embedding_renorm_.default, aten.embedding_renorm.default):
            continue
        src = node.args[0]
        while isinstance(src, fx.Node) and is_op(src, *_VIEWS):
            src = src.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            out.add(tuple(sorted(names.get(src.target, [src.target]))))
    return out
