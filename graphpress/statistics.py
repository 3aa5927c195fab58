"""Calibration statistics of linear inputs (and outputs), streamed block by block.

One API for every pass that calibrates on activations (GPTQ, AWQ, SmoothQuant; pruning and low-rank next):

    groups of linears that read one input x [..., K]  (q/k/v, gate/up: one group; a lone linear: its own)
    Request(xtx, mean_abs, max_abs, rows, outputs)     what to accumulate
    stream_statistics(gm, batches, groups, request, on_stats)
        for each part of graphpress.calibration.BlockStream that reads a group's weights:
            run the part over every batch, accumulating each of its groups' Stats
            on_stats(part, {lead weight: Stats})         the pass chooses, may rewrite the part's weights
            the part's Stats are dropped                 before the next part runs

Statistics of x over the T rows (tokens) of every batch, x_t [K] one row:
    count      T
    xtx        sum_t x_t^T x_t          [K, K] float64: each batch's product in float32 (float64 for float64 x),
                                        summed across batches in float64, so the sum does not drift with the
                                        number of batches (a float64 product costs 2.2x on this CPU: ~75 s more
                                        GPTQ on SmolLM2 with 32 windows)
    mean_abs   sum_t |x_t| / T          [K] (summed in float64)
    max_abs    max_t |x_t|              [K] float32
    rows       evenly spaced rows       [R, K] float32 (float64 x stays float64), R <= ceil(rows / batches) * batches; each batch gives its
                                        own ceil(rows / batches) (graphpress.quant.scaling.subsample_rows)
                                        ("x" is what the linear reads: the dtype it computes in, made float32)
    outputs    the same statistics of each member's output y_i [..., N_i] (linears observed one by one)

Memory: the Stats of one part's groups (xtx is K^2 float64: 18 MB for K = 1536) plus the bounded rows, never
anything that grows with calibration tokens; the stream itself holds one part's weights and the activations
crossing part boundaries. In the last part a pass reads (an LLM's head), linears whose outputs nothing needs
are never computed: statistics of the head's input do not need the [tokens, vocabulary] logits.

Observation runs on the part as it is when the stream reaches it: earlier parts rewritten by ``on_stats`` feed
their rewritten outputs on (the outputs of the observing run flow on, computed before ``on_stats``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from graphpress import graph
from graphpress.calibration import BlockStream, Part, linear_weights
from graphpress.metrics import lm_loss
from graphpress.quant.scaling import subsample_rows


@dataclass(frozen=True)
class Request:
    """What to accumulate per group (of its shared input) and, with ``outputs``, per member's output."""

    xtx: bool = False
    mean_abs: bool = False
    max_abs: bool = False
    rows: int = 0  # bound on the rows kept in all; 0 keeps none
    outputs: bool = False

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ValueError(f"statistics: rows={self.rows} must be >= 0")


@dataclass
class Stats:
    """Statistics of one activation x [..., K] over every calibration row seen (see the module docstring)."""

    features: int
    count: int = 0
    xtx: torch.Tensor | None = None  # [K, K] float64, sum_t x_t^T x_t
    abs_sum: torch.Tensor | None = None  # [K] float64, sum_t |x_t|
    max_abs: torch.Tensor | None = None  # [K] float32
    row_chunks: list[torch.Tensor] = field(default_factory=list)  # [R_b, K] float32 per batch

    @property
    def mean_abs(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise ValueError("statistics: mean_abs was not requested (Request(mean_abs=True))")
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def rows(self) -> torch.Tensor:
        """The kept rows [R, K] float32, batch after batch."""
        if not self.row_chunks:
            raise ValueError("statistics: no rows were kept (Request(rows=N) with N > 0)")
        return torch.cat(self.row_chunks)

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / T [K, K] float64: GPTQ's Hessian of ||W X^T||^2 / T."""
        if self.xtx is None:
            raise ValueError("statistics: xtx was not requested (Request(xtx=True))")
        return self.xtx * (2 / max(self.count, 1))

    def update(self, x: torch.Tensor, request: Request, rows_per_batch: int) -> None:
        """Add the rows of one batch's x [..., K]."""
        x = x.detach().reshape(-1, x.shape[-1])  # [T_b, K]
        if x.shape[1] != self.features:
            raise ValueError(f"statistics: activations have {x.shape[1]} features, expected {self.features}")
        self.count += x.shape[0]
        if request.max_abs:
            m = x.abs().amax(0).float() if x.shape[0] else torch.zeros(self.features)
            self.max_abs = m if self.max_abs is None else torch.maximum(self.max_abs, m)
        xf = x if x.dtype == torch.float64 else x.float()
        if request.xtx:
            if self.xtx is None:
                self.xtx = torch.zeros(self.features, self.features, dtype=torch.float64, device=x.device)
            self.xtx += gram(xf).double()
        if request.mean_abs:
            s = xf.abs().sum(0, dtype=torch.float64)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        if request.rows:
            self.row_chunks.append(subsample_rows(xf, rows_per_batch))


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x [K, K] of rows x [T, K], in x's dtype, made exactly symmetric. Through torch's own matmul, not
    NumPy's symmetric rank-k update: alone that one is faster (0.08 s against 0.11 s for 8192 x 1536 on the
    2-core machine), but between torch's operators NumPy's BLAS threads and torch's contend for the cores: the
    calibration stream of SmolLM2's 30 blocks over 64 windows took 109 s with it, 86 s without."""
    g = x.T @ x
    return (g + g.T) / 2


@dataclass(frozen=True)
class Group:
    """Linears reading one input; ``weights`` their program weight names, the first one the group's key."""

    weights: tuple[str, ...]

    @property
    def lead(self) -> str:
        return self.weights[0]


@dataclass
class GroupStats:
    """What a part observed of one group: its input's Stats, and each member's output Stats when asked."""

    inputs: Stats
    outputs: dict[str, Stats] = field(default_factory=dict)


# on_stats(part, {group lead: GroupStats}); called once per part that reads a group's weights
OnStats = Callable[[Part, dict[str, GroupStats]], None]


def groups_by_input(gm: fx.GraphModule, weights: set[str]) -> list[Group]:
    """The linears of ``gm`` whose weight is in ``weights``, grouped by the node they read, in graph order."""
    by_input: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target is torch.ops.aten.linear.default
                and isinstance(node.args[1], fx.Node) and node.args[1].target in weights):
            by_input.setdefault(node.args[0], []).append(node.args[1].target)
    return [Group(tuple(dict.fromkeys(ws))) for ws in by_input.values()]


def observe_part(forward: Callable[..., list], groups: Sequence[Group], request: Request, batches: int,
                 changes: Iterable[str] = ()) -> dict[str, GroupStats]:
    """Run a part once through ``forward`` (BlockStream's), accumulating the Stats of ``groups``.

    Each group's input is read once per batch, at its first member's linear (all members read the same x).
    ``changes``: the tensors the caller rewrites before running the part again (BlockStream.run).
    """
    per_batch = math.ceil(request.rows / max(1, batches)) if request.rows else 0
    lead_of = {w: g.lead for g in groups for w in g.weights}
    reader: dict[str, str] = {}  # group lead -> the member whose input is read (the first one run)
    found: dict[str, GroupStats] = {}

    def observe(target: str, x: torch.Tensor) -> None:
        lead = lead_of.get(target)
        if lead is None or reader.setdefault(lead, target) != target:
            return  # not a group's weight, or another member of its group already saw this x
        if lead not in found:
            found[lead] = GroupStats(Stats(x.shape[-1]))
        found[lead].inputs.update(x, request, per_batch)

    def observe_output(target: str, y: torch.Tensor) -> None:
        lead = lead_of.get(target)
        if lead is None or lead not in found:
            return
        outs = found[lead].outputs
        if target not in outs:
            outs[target] = Stats(y.shape[-1])
        outs[target].update(y, request, per_batch)

    forward(observe, observe_output if request.outputs else None, changes)
    return found


def spread(batches: list[tuple[torch.Tensor, ...]], n: int) -> list[tuple[torch.Tensor, ...]]:
    """``n`` of ``batches`` evenly spaced from first to last (all of them for n = 0 or n >= their number)."""
    if n <= 0 or n >= len(batches):
        return list(batches)
    if n == 1:
        return [batches[0]]
    return [batches[round(i * (len(batches) - 1) / (n - 1))] for i in range(n)]


def stream_statistics(gm: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]], groups: Sequence[Group],
                      request: Request, on_stats: OnStats, rerun: bool = False) -> set[str]:
    """Stream ``batches`` through ``gm`` block by block; for each part reading some groups' weights, observe
    them and call ``on_stats(part, stats)``. Returns the leads of the groups that were observed (a group
    outside the streamed parts, or split over two parts, is not). Only one part's Stats are alive at once.
    ``rerun``: run each part again after ``on_stats``, so that what flows on is the rewritten part's output
    (later blocks then calibrate on the compressed earlier ones). ``on_stats`` should rewrite only the weights
    of the groups it is given: the second run then recomputes only what they reach (the whole part otherwise).
    """
    by_weight = {w: g for g in groups for w in g.weights}
    done: set[str] = set()

    def on_part(part: Part, forward: Callable[..., list]) -> None:
        here = {t for _, t in linear_weights(part)}
        mine = [g for g in dict.fromkeys(by_weight[t] for t in here if t in by_weight)
                if g.lead not in done and set(g.weights) <= here]
        if not mine:
            return
        stats = observe_part(forward, mine, request, len(batches),
                             [w for g in mine for w in g.weights] if rerun else ())
        done.update(stats)
        on_stats(part, stats)
        if rerun:
            forward(None)

    wanted = {w for g in groups for w in g.weights}
    if wanted:
        BlockStream(gm, batches).run(on_part, weights=wanted)
    return done


class _Keeping(fx.Interpreter):
    """Runs a program, keeping the outputs of some nodes."""

    def __init__(self, gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
        super().__init__(gm)
        self.nodes = set(nodes)
        self.kept: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if n in self.nodes:
            self.kept[n] = out
        return out


def output_fisher(gm: fx.GraphModule, linears: Sequence[fx.Node], batches: list[tuple[torch.Tensor, ...]],
                  rows: int = 1) -> dict[fx.Node, torch.Tensor] | None:
    """The diagonal Fisher information of each linear's output: per output channel, the sum over tokens of
    (dL/dy)^2, L the next-token loss of a causal language model (the mean over a batch's tokens), on the
    batches split into ``rows`` sequences at a time (the backward holds every block's activations of those rows
    and their [rows, tokens, vocabulary] logits: on SmolLM2, 1.2 GB a row of 512 tokens).
    float64 [out features] per linear; None when the program is not a language model (graphpress.metrics.
    lm_loss). The loss's sensitivity to each output: what weighs one layer's output error against another's."""
    tensors = [graph.get_tensor(gm, n.args[1]) for n in linears]
    flags = [t.requires_grad for t in tensors]
    fisher = {n: torch.zeros(t.shape[0], dtype=torch.float64) for n, t in zip(linears, tensors, strict=True)}
    try:
        for t in tensors:
            t.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                for i in range(0, batch[0].shape[0], rows):
                    part = tuple(t[i:i + rows] for t in batch)
                    run = _Keeping(gm, linears)
                    loss = lm_loss(run.run(*part), part)
                    if loss is None:
                        return None
                    outs = [run.kept[n] for n in linears]
                    grads = torch.autograd.grad(loss, outs, allow_unused=True)
                    for n, g in zip(linears, grads, strict=True):
                        if g is not None:
                            fisher[n] += (g.detach().double() ** 2).reshape(-1, g.shape[-1]).sum(0)
                    del run, outs, grads, loss
    finally:
        for t, flag in zip(tensors, flags, strict=True):
            t.requires_grad_(flag)
    return fisher

