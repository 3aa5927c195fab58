"""Structured pruning: MLP neurons and attention heads removed from the graph, the program made smaller.

    prune_mlp    up/gate rows j, down column j (and biases)                    =>  gone, for the least
                 important neurons of each MLP; down's kept columns refit       important ``ratio`` or down
                                                                                to ``width`` per layer
    prune_heads  q rows of head h, o_proj's columns of head h (k/v rows too     =>  gone, evenly inside each
                 once no query head of their group is left)                        key/value group

Which rows, columns, biases and shape constants go together comes from the graph (graphpress.channels):
no module names, so any architecture whose MLP and attention the analysis follows is pruned the same way.
Which units go, and the least-squares correction of the consumer's kept columns, is graphpress.pruning.
Calibration streams block by block (graphpress.statistics): each block's consumer linears are corrected in
place (removed columns zeroed) and, with ``sequential``, the block runs again so that later blocks calibrate
on the pruned earlier ones; the graph is cut once at the end. Widths are uniform across layers (Hugging Face configs need it).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress import channel_cut, channels, pruning
from graphpress.calibration import Part, stack_batches
from graphpress.graph import aliases, cleanup, module_name
from graphpress.metrics import lm_loss
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection, check_amount
from graphpress.roles import linear_roles
from graphpress.statistics import Group, GroupStats, Request, groups_by_input, spread, stream_statistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig(Selection, Pass):
    exact: ClassVar[bool] = False
    structural: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    ratio: float | None = None  # fraction of the units removed
    importance: str = "obs"  # graphpress.pruning.METHODS (taylor: gradients of the calibration loss, LMs only)
    correct: bool = True  # refit the consumer's kept columns by least squares (always with "obs")
    damp: float = 0.01
    max_batches: int = 0  # calibration batches to use (0: all), spread over them
    sequential: bool = True  # later blocks calibrate on the pruned earlier ones (one more forward per block)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.importance not in pruning.METHODS:
            raise ValueError(f"{self.name}: importance must be one of {', '.join(pruning.METHODS)}, "
                             f"not {self.importance!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"{self.name}: damp must be in [0, 1), not {self.damp}")


@dataclass
class _Consumer:
    """A consumer linear to prune: its weight, its units (column indices), their groups and quota, and the
    classes removed with each unit."""

    weight: str
    units: list[torch.Tensor]
    groups: list[int]
    quota: dict[int, int]
    classes: list[set[int]]


def _prune(gm: fx.GraphModule, ctx: PassContext, cfg: PruneConfig, consumers: list[_Consumer],
           an: channels.Analysis) -> PassResult:
    if not ctx.calibration:
        raise PassError(f"{cfg.name} needs calibration data: set `calibration:` in the recipe or pass batches")
    by_weight = {c.weight: c for c in consumers}
    removed: set[int] = set()
    done: set[str] = set()
    batches = spread(ctx.calibration, cfg.max_batches)
    taylor = taylor_classes(gm, an, batches, cfg.name) if cfg.importance == "taylor" else {}
    streamed = stack_batches(gm, batches, 2)

    def on_stats(part: Part, stats: dict[str, GroupStats]) -> None:
        for weight, st in stats.items():
            c = by_weight[weight]
            w = gm.get_parameter(weight)
            given = torch.tensor([sum(taylor.get(k, 0.0) for k in cs) for cs in c.classes]) if taylor else None
            gone, new = pruning.select(w.detach(), c.units, c.quota, c.groups, method=cfg.importance,
                                       H=st.inputs.xtx, correct=cfg.correct, damp=cfg.damp, given=given)
            with torch.no_grad():  # later blocks calibrate on this one pruned (removed columns are zero)
                w.copy_(new)
            for u in gone:
                removed.update(c.classes[u])
            done.add(weight)
        log.info("%s: %s", cfg.name, part.name)

    # X^T X for the refit and every importance but magnitude (activation reads its diagonal)
    request = Request(xtx=cfg.correct or cfg.importance in ("obs", "activation"))
    stream_statistics(gm, streamed, [Group((c.weight,)) for c in consumers], request, on_stats,
                      rerun=cfg.sequential)
    skipped = {module_name(c.weight): "not reached by the calibration stream" for c in consumers
               if c.weight not in done}
    return PassResult(gm, True, {"pruned_layers": len(done), "parameters_removed": _cut(gm, an, removed, cfg.name),
                                 "skipped": skipped, "calibration_batches": len(batches)})


def taylor_classes(gm: fx.GraphModule, an: channels.Analysis, batches: list[tuple[torch.Tensor, ...]],
                   name: str) -> dict[int, float]:
    """First-order Taylor importance of every class (Molchanov et al.; Torch-Pruning's group Taylor): the sum,
    over every parameter entry that carries the class, of |w * dL/dw|, L the next-token loss of a causal
    language model (token ids in, logits out) on the calibration batches."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    flags = {n: p.requires_grad for n, p in params.items()}
    training = gm.training
    try:
        torch.nn.Module.train(gm, True)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for batch in batches:
                loss = lm_loss(gm(*batch), batch)
                if loss is None:
                    raise PassError(f"{name}: taylor importance needs a language model (token ids in, logits "
                                    "out) for its next-token loss: use activation importance")
                loss.backward()
        products = {id(p): (p.detach() * p.grad).abs() for p in params.values() if p.grad is not None}
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
        torch.nn.Module.train(gm, training)
    score: dict[int, float] = defaultdict(float)
    for pname, dims in an.params.items():
        prod = products.get(id(params.get(pname)))  # the canonical name of a tied tensor is one of its names
        if prod is None:
            continue
        for dim, ids in dims.items():
            per = prod.movedim(dim, 0).reshape(prod.shape[dim], -1).sum(1, dtype=torch.float64)
            for c, v in zip(an.classes(ids).tolist(), per.tolist(), strict=True):
                score[c] += v
    return dict(score)


def _selected(gm: fx.GraphModule, cfg: Selection, weight_nodes: list[fx.Node]) -> bool:
    roles = linear_roles(gm)
    return any(cfg.selects(module_name(n.args[1].target), roles.get(n)) for n in weight_nodes)


def _columns(an: channels.Analysis, node: fx.Node, classes: list[set[int]]) -> list[torch.Tensor]:
    """For each set of classes, the consumer's columns that carry them."""
    where: dict[int, list[int]] = {}
    for j, c in enumerate(an.classes(an.linears[node][1]).tolist()):
        where.setdefault(c, []).append(j)
    return [torch.tensor(sorted(j for c in cs for j in where.get(c, ())), dtype=torch.long) for cs in classes]


@dataclass(frozen=True)
class PruneMLP(PruneConfig):
    """Remove MLP neurons: ``ratio`` of each selected MLP's, or down to ``width`` per layer."""

    name: ClassVar[str] = "prune_mlp"
    width: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount(self.name, self.ratio, "width", self.width, "neurons kept", "fraction removed")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        an = channels.analyze(gm)
        consumers = []
        for fam in channels.families(an):
            node = fam.consumer_nodes[0]
            if len(fam.consumer_nodes) > 1 or not _selected(gm, self, [node]):
                continue
            n = len(fam.classes)
            keep = self.width if self.width is not None else n - round(n * self.ratio)
            if keep < 1:
                raise PassError(f"prune_mlp: ratio {self.ratio} leaves no neuron of the {n} in {module_name(fam.consumers[0])}")
            if keep > n:
                raise PassError(f"prune_mlp: width {keep} is more than the {n} neurons of {module_name(fam.consumers[0])}")
            classes = [{c} for c in fam.classes]
            consumers.append(_Consumer(node.args[1].target,
                                       _columns(an, node, classes), [0] * n, {0: n - keep}, classes))
        if not consumers:
            raise PassError("prune_mlp: found no MLP to prune (channels from linears' rows to another linear's "
                            "columns through pointwise ops only) among the selected layers")
        return _prune(gm, ctx, self, consumers, an)


@dataclass(frozen=True)
class PruneHeads(PruneConfig):
    """Remove attention heads: ``ratio`` of the query heads, or down to ``heads`` per layer; evenly inside
    each key/value group (``groups: false``), or whole key/value groups with their query heads."""

    name: ClassVar[str] = "prune_heads"
    heads: int | None = None
    groups: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount(self.name, self.ratio, "heads", self.heads, "heads kept", "fraction of heads removed")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        an = channels.analyze(gm)
        consumers = []
        for site in an.sites:
            node = _consumer_of(an, site)
            if node is None:
                continue
            if not _selected(gm, self, [node]):
                continue
            consumers.append(self._consumer(an, site, node))
        if not consumers:
            raise PassError("prune_heads: found no attention whose output a selected linear reads")
        return _prune(gm, ctx, self, consumers, an)

    def _consumer(self, an: channels.Analysis, site: channels.Site, node: fx.Node) -> _Consumer:
        n_heads = len(site.group)
        n_groups = len(set(site.group))
        per_group = n_heads // n_groups
        where = f"{site.node.name} ({module_name(node.args[1].target)})"
        if self.heads is not None:
            keep = self.heads
        elif per_group > 1 and not self.groups:  # the ratio of each key/value group's query heads
            keep = n_groups * round(per_group * (1 - self.ratio))
        else:  # the ratio of the groups (one head each without grouped-query attention)
            keep = per_group * (n_groups - round(n_groups * self.ratio))
        if keep < 1:
            raise PassError(f"prune_heads: ratio {self.ratio} leaves no head of the {n_heads} at {where}")
        if keep > n_heads:
            raise PassError(f"prune_heads: {keep} heads is more than the {n_heads} at {where}")
        heads = [channels.head_classes(an, site, h) for h in range(n_heads)]
        for h in range(n_heads):
            for g in range(h):
                if heads[h] & heads[g]:
                    raise PassError(f"prune_heads: heads {g} and {h} at {where} share channels "
                                    "(the graph couples them), so neither can be removed alone")
        if self.groups or per_group == 1:  # whole key/value groups (each head its own without GQA)
            if keep % per_group:
                raise PassError(f"prune_heads: {keep} heads at {where} are not whole key/value groups of "
                                f"{per_group}: keep a multiple of {per_group}")
            members = [[h for h in range(n_heads) if site.group[h] == g] for g in range(n_groups)]
            classes = [set().union(*(heads[h] for h in m)) for m in members]
            return _Consumer(node.args[1].target, _columns(an, node, classes), [0] * n_groups,
                             {0: n_groups - keep // per_group}, classes)
        if keep % n_groups:
            raise PassError(f"prune_heads: {keep} heads at {where} cannot be spread evenly over its {n_groups} "
                            f"key/value groups: keep a multiple of {n_groups}")
        quota = {g: per_group - keep // n_groups for g in range(n_groups)}
        return _Consumer(node.args[1].target, _columns(an, node, heads), list(site.group), quota, heads)


@dataclass(frozen=True)
class PruneHidden(PruneConfig):
    """Remove channels of the residual stream (the hidden size): ``ratio`` of them, or down to ``width``.

    The stream's channels are the embedding's columns: every block reads and writes them (residual adds tie
    them across layers), so one choice holds for all layers. Importance ``activation`` (Minitron) sums, over
    every linear that reads the stream (after its norm), the root mean square of each channel;
    ``magnitude`` sums the norms of their columns; ``taylor`` sums |w * dL/dw| over every weight entry of the
    channel. With ``correct``, each of those linears' kept columns are
    refit by least squares to its calibration inputs (weights tied to the embedding are only sliced).
    Norms over the stream then normalize over the kept channels (as Minitron's pruned models do).
    """

    name: ClassVar[str] = "prune_hidden"
    importance: str = "activation"
    width: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount(self.name, self.ratio, "width", self.width, "channels kept", "fraction removed")
        if self.importance == "obs":
            raise ValueError("prune_hidden: importance obs ranks one layer's columns, but hidden channels are "
                             "shared by every layer: use activation, magnitude or taylor")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        an = channels.analyze(gm)
        hidden = channels.stream_classes(an)
        if not hidden:
            raise PassError("prune_hidden: found no embedding whose columns form the residual stream")
        n = len(hidden)
        keep = self.width if self.width is not None else n - round(n * self.ratio)
        if not 1 <= keep <= n:
            raise PassError(f"prune_hidden: width {keep} must be between 1 and the {n} hidden channels")
        why = an.why_fixed(set(hidden))
        if why is not None:
            raise PassError(f"prune_hidden: the hidden channels cannot be removed: {why} needs them")
        if not ctx.calibration:
            raise PassError("prune_hidden needs calibration data: set `calibration:` in the recipe or pass batches")
        readers = {w: an.classes(cols) for w, cols, _ in an.linears.values() if an.class_set(cols) & set(hidden)}
        groups = groups_by_input(gm, set(readers))
        found: dict[str, tuple[torch.Tensor, int]] = {}  # group lead -> (X^T X, rows)

        def on_stats(part: Part, stats: dict[str, GroupStats]) -> None:
            for lead, st in stats.items():
                found[lead] = (st.inputs.xtx.float(), st.inputs.count)

        batches = spread(ctx.calibration, self.max_batches)
        if self.correct or self.importance != "taylor":
            stream_statistics(gm, stack_batches(gm, batches, 2), groups, Request(xtx=True), on_stats)
        members = {g.lead: g.weights for g in groups}
        if self.importance == "taylor":
            per_class = taylor_classes(gm, an, batches, self.name)
        else:
            per_class = defaultdict(float)
            for lead, (xtx, rows) in found.items():
                for w in members[lead] if self.importance == "magnitude" else [lead]:  # one input, counted once
                    part = (gm.get_parameter(w).detach().double().norm(dim=0) if self.importance == "magnitude"
                            else (torch.diag(xtx).double().clamp_min(0) / max(rows, 1)).sqrt())
                    for c, v in zip(readers[w].tolist(), part.tolist(), strict=True):
                        per_class[c] += v
        score = torch.tensor([per_class.get(c, 0.0) for c in hidden], dtype=torch.float64)
        removed = {hidden[i] for i in torch.argsort(score)[: n - keep].tolist()}
        refit = []
        if self.correct:
            names = aliases(gm)
            for lead, (xtx, _) in found.items():
                for w in members[lead]:
                    if len(names.get(w, [w])) == 1:  # a weight tied to the embedding is only sliced
                        kept = torch.tensor([c not in removed for c in readers[w].tolist()])
                        _refit(gm.get_parameter(w), xtx, kept, self.damp)
                        refit.append(w)
        gone = _cut(gm, an, removed, self.name)
        return PassResult(gm, True, {"hidden": f"{n} -> {keep}", "parameters_removed": gone, "refit": sorted(refit),
                                     "calibration_batches": len(batches)})


def _refit(weight: torch.nn.Parameter, xtx: torch.Tensor, kept: torch.Tensor, damp: float) -> None:
    """The kept columns of ``weight`` refit in place by least squares (graphpress.pruning.refit)."""
    new = weight.detach().double().clone()
    new[:, kept] = pruning.refit(weight.detach(), xtx, kept, damp)
    with torch.no_grad():
        weight.copy_(new.to(weight.dtype))


def _cut(gm: fx.GraphModule, an: channels.Analysis, removed: set[int], name: str) -> int:
    """Remove the classes ``removed`` from the graph (graphpress.channel_cut); the number of parameters gone."""
    before = sum(p.numel() for p in gm.parameters())
    try:
        channel_cut.prune(an, removed)
    except channels.ChannelError as e:
        raise PassError(f"{name}: {e}") from e
    cleanup(gm)
    return before - sum(p.numel() for p in gm.parameters())


def _consumer_of(an: channels.Analysis, site: channels.Site) -> fx.Node | None:
    """The linear that reads the attention's output (o_proj)."""
    out = an.class_set(site.out)
    for node, (_, cols, _) in an.linears.items():
        if out & an.class_set(cols):
            return node
    return None


__all__ = ["PruneHeads", "PruneHidden", "PruneMLP"]
