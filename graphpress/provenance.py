"""Provenance: which original tensors a rewritten program tensor was made from, so merges can be undone.

    record(gm, "a.qkv.weight", [Piece("a.q.weight", 0, 0, 576), Piece("a.k.weight", 0, 576, 768), ...])
        =>  gm.meta["graphpress.provenance"]["a.qkv.weight"] == [{"source": "a.q.weight", "dim": 0,
                                                                 "start": 0, "stop": 576}, ...]

A piece with a slice says ``T.narrow(dim, start, stop - start)`` holds the whole of ``source``; a piece
without one says all of T was computed from all of ``source`` with its layout kept (a quantized or rescaled
copy under a new name). ``transposed``: that part of T holds ``source`` with its two dimensions swapped (a
GPT-2 Conv1D weight [K, N] made a linear's [N, K]). Sources are names as they were when recorded; a source that is itself recorded is
followed back (``sources_of`` composes the chain), so a tensor quantized from a merged weight points at the
weights before the merge. The record is plain JSON in ``gm.meta``: ``copy.deepcopy`` and ``Program.clone``
keep it, ``Program.save`` / ``load`` write it beside the graph, and the runner carries it to a pass's new
GraphModule.

Who records: every pass that creates a tensor from other tensors under a new name (merge_sibling_linears,
linearize_matmuls' transposed copies, quantization passes for ``<module>.qweight`` / ``.scales``). A tensor rewritten in place under its
own name needs no record. Not representable yet: a tensor that keeps only part of its source (pruning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

if TYPE_CHECKING:
    from graphpress.program import Program

KEY = "graphpress.provenance"


@dataclass(frozen=True)
class Piece:
    """Where part (or all) of a program tensor came from: ``source`` fills ``[start, stop)`` along ``dim``,
    or, without a slice, the whole tensor was computed from the whole source."""

    source: str
    dim: int | None = None
    start: int | None = None
    stop: int | None = None
    transposed: bool = False

    def __post_init__(self) -> None:
        sliced = [v is not None for v in (self.dim, self.start, self.stop)]
        if any(sliced) and not all(sliced):
            raise ValueError(f"piece from {self.source}: give dim, start and stop together, or none of them")
        if all(sliced) and not (self.dim >= 0 and 0 <= self.start < self.stop):  # type: ignore[operator]
            raise ValueError(f"piece from {self.source}: need dim >= 0 and 0 <= start < stop, "
                             f"got dim={self.dim}, [{self.start}, {self.stop})")

    @property
    def whole(self) -> bool:
        return self.dim is None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}


def record(gm: fx.GraphModule, new_target: str, sources: list[Piece]) -> None:
    """Remember that the tensor at ``new_target`` was made from ``sources`` (replacing any earlier record).

    Call it where the pass creates the tensor; name sources as they are in ``gm`` at that moment (a source
    that is itself recorded is followed back by ``sources_of``). Slices along one dimension must not overlap.
    Raises ValueError for a tensor recorded as its own source, or a name already recorded as another
    tensor's source (the chain would then point at the new tensor: pick a fresh name, ``graph.free_target``).
    """
    if not sources:
        raise ValueError(f"record {new_target}: no sources given")
    if any(p.source == new_target for p in sources):
        raise ValueError(f"record {new_target}: a tensor cannot be its own source (a rewrite in place needs "
                         "no record)")
    table: dict[str, list[dict[str, Any]]] = gm.meta.get(KEY, {})
    users = [t for t, pieces in table.items()
             if t != new_target and any(p["source"] == new_target for p in pieces)]
    if users:
        raise ValueError(f"record {new_target}: that name is already the source of {', '.join(users)}; "
                         "give the new tensor a fresh name (graph.free_target)")
    spans = sorted((p.dim, p.start, p.stop, p.source) for p in sources if not p.whole)
    for (d0, _, stop0, s0), (d1, start1, _, s1) in zip(spans, spans[1:], strict=False):
        if d0 == d1 and start1 < stop0:
            raise ValueError(f"record {new_target}: the slices of {s0} and {s1} overlap along dim {d0}")
    tensor = _lookup(gm, new_target)  # may not exist yet: then its shape is not checked
    for p in sources:
        if tensor is not None and not p.whole and (p.dim >= tensor.dim() or p.stop > tensor.shape[p.dim]):
            raise ValueError(f"record {new_target}: the slice of {p.source}, [{p.start}, {p.stop}) along dim "
                             f"{p.dim}, lies outside its shape {list(tensor.shape)}")
    gm.meta[KEY] = table
    table[new_target] = [p.to_json() for p in sources]


def forget(gm: fx.GraphModule, target: str) -> None:
    """Drop the record of a tensor the pass deletes (its sources stay recorded for the tensors made from them)."""
    gm.meta.get(KEY, {}).pop(target, None)


def sources_of(gm: fx.GraphModule, target: str) -> list[Piece]:
    """The original tensors ``target`` was made from, in ``target``'s coordinates: each recorded source that
    is itself recorded is replaced by its own sources, slices shifted (``[]`` when ``target`` has no record).

    a.qkv.weight = cat(q 0:576, k 576:768, v 768:960), a.qkv.qweight <- a.qkv.weight (whole)
        =>  sources_of(a.qkv.qweight) == [q 0:576, k 576:768, v 768:960]
    """
    table = gm.meta.get(KEY, {})
    return _compose(table, target, ()) if target in table else []


def _compose(table: dict[str, list[dict[str, Any]]], target: str, seen: tuple[str, ...]) -> list[Piece]:
    if target in seen:
        raise ValueError(f"provenance of {seen[0]} loops through {target}")
    out: list[Piece] = []
    for piece in (Piece(**p) for p in table[target]):
        if piece.source not in table:
            out.append(piece)
            continue
        for inner in _compose(table, piece.source, (*seen, target)):
            out.append(_within(piece, inner, target))
    return out


def _within(outer: Piece, inner: Piece, target: str) -> Piece:
    """``inner`` (a piece of outer's source) in the coordinates of the tensor ``outer`` is a piece of."""
    flipped = outer.transposed != inner.transposed
    if outer.whole and not outer.transposed:
        return inner
    if outer.whole:  # target = source^T: inner's slice moves to the other dimension
        if inner.whole:
            return Piece(inner.source, transposed=flipped)
        return Piece(inner.source, 1 - inner.dim, inner.start, inner.stop, transposed=flipped)  # type: ignore[operator]
    if inner.whole:
        return Piece(inner.source, outer.dim, outer.start, outer.stop, transposed=flipped)
    if outer.transposed or inner.transposed:
        raise ValueError(f"provenance of {target}: {inner.source} is a slice of {outer.source}, which is "
                         "itself a transposed slice; not supported")
    if inner.dim != outer.dim:
        raise ValueError(f"provenance of {target}: {inner.source} is sliced along dim {inner.dim} inside "
                         f"{outer.source}, which is sliced along dim {outer.dim}; two-dimensional blocks are "
                         "not supported")
    start: int = outer.start  # type: ignore[assignment]
    return Piece(inner.source, outer.dim, start + inner.start, start + inner.stop)  # type: ignore[operator]


def unmerge(program: Program) -> dict[str, torch.Tensor]:
    """The original tensors, by their original names, cut back out of the program's current tensors.

    For every recorded tensor still in the program, each of its ``sources_of`` pieces: a slice is copied out
    of it, a whole piece is a copy of it. Values are the current ones (folded norm scales stay folded).
    Tensors without a record are not in the result. Raises ValueError, naming the tensor, when one to cut is
    not floating point (quantized: dequantize first), or when two live tensors claim the same original.
    """
    gm = program.gm
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for target in gm.meta.get(KEY, {}):
        tensor = _lookup(gm, target)
        if tensor is None:
            continue  # an intermediate a later pass replaced (a merged weight now quantized)
        for piece in sources_of(gm, target):
            if not tensor.is_floating_point():
                raise ValueError(f"unmerge {program.name}: {target} is {tensor.dtype}, not float; cannot cut "
                                 f"{piece.source} back out of it (dequantize it first)")
            if piece.source in out:
                raise ValueError(f"unmerge {program.name}: both {origin[piece.source]} and {target} claim "
                                 f"{piece.source}")
            out[piece.source] = _cut(tensor, piece).detach().clone()
            origin[piece.source] = target
    return out


def to_json(gm: fx.GraphModule) -> dict[str, list[dict[str, Any]]]:
    return gm.meta.get(KEY, {})


def restore(gm: fx.GraphModule, table: dict[str, list[dict[str, Any]]]) -> None:
    """Put a record read from JSON (``Program.load``) or taken from another module back on ``gm``."""
    if table:
        gm.meta[KEY] = {t: [Piece(**p).to_json() for p in pieces] for t, pieces in table.items()}


def _cut(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    part = tensor if piece.whole else tensor.narrow(piece.dim, piece.start, piece.stop - piece.start)  # type: ignore[arg-type, operator]
    return part.t() if piece.transposed else part


def _lookup(gm: nn.Module, target: str) -> torch.Tensor | None:
    *path, leaf = target.split(".")
    try:
        value = getattr(gm.get_submodule(".".join(path)) if path else gm, leaf)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None
