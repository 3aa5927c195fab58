from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from graphpress.statistics import (
    Group,
    Request,
    Stats,
    gram,
    groups_by_input,
    observe_part,
    output_fisher,
    spread,
    stream_statistics,
)
from tests.conftest import capture_tiny

aten = torch.ops.aten


def _batches(n: int = 3, seed: int = 5) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (2, 10), generator=g),) for _ in range(n)]


class _LinearIO(fx.Interpreter):
    """The whole program, no stream: every linear's input and output rows, by weight name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if n.op == "call_function" and n.target is aten.linear.default and n.args[1].op == "get_attr":
            x = self.env[n.args[0]]
            self.inputs.setdefault(n.args[1].target, []).append(x.reshape(-1, x.shape[-1]).double())
            self.outputs.setdefault(n.args[1].target, []).append(out.reshape(-1, out.shape[-1]).double())
        return out


def _reference(gm: fx.GraphModule, batches: list) -> _LinearIO:
    ref = _LinearIO(gm)
    with torch.no_grad():
        for b in batches:
            ref.run(*b)
    return ref


def test_stats_match_the_full_batch_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 50, 24, generator=g, dtype=torch.float64) * torch.linspace(0.1, 30, 24) for _ in range(4)]
    full = torch.cat([c.reshape(-1, 24) for c in chunks])  # [600, 24] float64
    request = Request(xtx=True, mean_abs=True, max_abs=True, rows=100)
    stats = Stats(24)
    for c in chunks:
        stats.update(c, request, rows_per_batch=math.ceil(100 / len(chunks)))
    assert stats.count == 600
    assert stats.xtx is not None and stats.xtx.dtype == torch.float64
    torch.testing.assert_close(stats.xtx, full.T @ full, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(stats.hessian(), 2 * full.T @ full / 600, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.mean_abs, full.abs().mean(0).float())
    assert torch.equal(stats.max_abs, full.abs().amax(0).float())
    rows = stats.rows
    assert rows.shape == (100, 24)  # 25 of each batch
    assert all((full == r).all(-1).any() for r in rows)  # real rows, not averages
    # float32 activations: each batch's product in float32, within float32 rounding of the whole
    f32 = Stats(24)
    for c in chunks:
        f32.update(c.float(), Request(xtx=True), 0)
    assert (f32.xtx - full.T @ full).norm() / (full.T @ full).norm() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_is_the_symmetric_product_for_strided_rows(dtype: torch.dtype) -> None:
    x = torch.randn(40, 300, generator=torch.Generator().manual_seed(1), dtype=dtype)[:, ::3]  # [40, 100] strided
    g = gram(x)
    assert g.dtype == dtype and torch.equal(g, g.T)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-5, atol=1e-4)


def test_xtx_accumulates_across_batches_in_float64() -> None:
    # 4,096 rows of ones a batch: each batch's product (4096) is exact in float32, the sum of 5,000 batches plus
    # one row (20,480,001) is not: float32 holds integers exactly only up to 2^24
    stats = Stats(2)
    ones = torch.ones(4096, 2)
    for _ in range(5000):
        stats.update(ones, Request(xtx=True), 0)
    stats.update(torch.ones(1, 2), Request(xtx=True), 0)
    assert stats.count == 20_480_001
    assert stats.xtx is not None and stats.xtx[0, 1].item() == 20_480_001


def test_subsample_is_bounded_and_unrequested_statistics_refuse() -> None:
    stats = Stats(8)
    request = Request(max_abs=True, rows=5)
    for _ in range(3):
        stats.update(torch.randn(40, 8), request, rows_per_batch=math.ceil(5 / 3))
    assert stats.rows.shape[0] <= math.ceil(5 / 3) * 3
    with pytest.raises(ValueError, match="xtx was not requested"):
        stats.hessian()
    with pytest.raises(ValueError, match="mean_abs was not requested"):
        _ = stats.mean_abs
    with pytest.raises(ValueError, match="expected 8"):
        stats.update(torch.randn(4, 9), request, 2)
    with pytest.raises(ValueError, match="rows"):
        Request(rows=-1)


def test_streamed_statistics_equal_those_of_the_whole_program() -> None:
    program = capture_tiny("llama")
    batches = _batches()
    weights = {n.args[1].target for n in program.gm.graph.nodes
               if n.op == "call_function" and n.target is aten.linear.default and ".layers." in n.args[1].target}
    groups = groups_by_input(program.gm, weights)
    qkv = next(g for g in groups if g.lead.endswith("layers.1.self_attn.q_proj.weight"))
    assert [w.rsplit(".", 2)[-2] for w in qkv.weights] == ["q_proj", "k_proj", "v_proj"]
    assert len(groups) == 8  # qkv, o, gate/up, down in each of 2 layers
    ref = _reference(program.gm, batches)
    seen: dict[str, object] = {}

    def on_stats(part, stats) -> None:  # noqa: ANN001
        seen.update({lead: (part.name, s) for lead, s in stats.items()})

    done = stream_statistics(program.gm, batches, groups, Request(xtx=True, max_abs=True, outputs=True), on_stats)
    assert done == {g.lead for g in groups} == set(seen)
    for g in groups:
        part, s = seen[g.lead]
        assert g.lead.startswith(part)  # observed in its own block
        x = torch.cat(ref.inputs[g.lead])
        assert s.inputs.count == x.shape[0] == 3 * 2 * 10
        torch.testing.assert_close(s.inputs.xtx, x.T @ x, rtol=1e-5, atol=1e-5)
        assert torch.equal(s.inputs.max_abs, x.abs().amax(0).float())
        assert set(s.outputs) == set(g.weights)
        for w in g.weights:
            y = torch.cat(ref.outputs[w])
            torch.testing.assert_close(s.outputs[w].max_abs, y.abs().amax(0).float())


def test_only_one_parts_statistics_are_alive_at_once() -> None:
    program = capture_tiny("llama")
    weights = {n.args[1].target for n in program.gm.graph.nodes
               if n.op == "call_function" and n.target is aten.linear.default}
    alive: list[weakref.ref] = []
    parts: list[str] = []

    def on_stats(part, stats) -> None:  # noqa: ANN001
        gc.collect()
        assert not [r for r in alive if r() is not None], f"statistics of an earlier part alive at {part.name}"
        alive.extend(weakref.ref(s.inputs) for s in stats.values())
        parts.append(part.name)

    stream_statistics(program.gm, _batches(2), groups_by_input(program.gm, weights), Request(xtx=True), on_stats)
    assert parts == ["model.layers.0", "model.layers.1", "suffix"]


class _Shapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("outputs", [False, True])
def test_the_head_output_is_computed_only_when_observed(outputs: bool) -> None:
    program = capture_tiny("llama")  # vocabulary 128, hidden 64, MLP 96: only logits end in 128
    head = [n.args[1].target for n in program.gm.graph.nodes
            if n.op == "call_function" and n.target is aten.linear.default][-1]  # the last linear
    got = {}
    mode = _Shapes()
    with mode:
        stream_statistics(program.gm, _batches(2), [Group((head,))], Request(max_abs=True, outputs=outputs),
                          lambda part, stats: got.update(stats))
    logits = [s for s in mode.shapes if s[-1:] == (128,)]
    assert bool(logits) == outputs
    assert got[head].inputs.count == 2 * 2 * 10 and got[head].inputs.max_abs.shape == (64,)


def test_observe_part_reads_a_groups_input_once_per_batch() -> None:
    calls: list[str] = []
    x = torch.randn(2, 5, 4)

    def forward(observe, observe_output=None, changes=()) -> list:  # noqa: ANN001
        for _ in range(3):  # three batches, each linear of the group reads x
            for w in ("k", "q", "v"):
                calls.append(w)
                observe(w, x)
        return [None] * 3

    stats = observe_part(forward, [Group(("q", "k", "v"))], Request(xtx=True), batches=3)
    assert list(stats) == ["q"] and stats["q"].inputs.count == 3 * 10
    torch.testing.assert_close(stats["q"].inputs.xtx, 3 * (x.reshape(-1, 4).T @ x.reshape(-1, 4)).double())


def test_spread_takes_evenly_spaced_batches_first_and_last_included() -> None:
    batches = [(torch.tensor(i),) for i in range(8)]
    assert [int(b[0]) for b in spread(batches, 3)] == [0, 4, 7]  # round(3.5) is 4
    assert [int(b[0]) for b in spread(batches, 1)] == [0]
    assert spread(batches, 0) == batches and spread(batches, 9) == batches


def test_output_fisher_of_the_logits_is_the_squared_softmax_error() -> None:
    """At the head, dL/dlogits is (softmax - one-hot of the next token) / tokens: a closed-form reference."""
    program = capture_tiny("llama")
    head = [n for n in program.gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default][-1]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 128, (3, 10), generator=g),) for _ in range(2)]
    for p in program.gm.parameters():
        p.requires_grad_(False)
    fisher = output_fisher(program.gm, [head], batches, rows=2)
    expected = torch.zeros_like(fisher[head])
    for (ids,) in batches:
        for i in range(0, 3, 2):  # the loss is a mean over the tokens of each 2-row slice
            rows = ids[i:i + 2]
            logits = program(rows).double()[:, :-1]
            grad = torch.softmax(logits, -1) - torch.nn.functional.one_hot(rows[:, 1:], logits.shape[-1])
            expected += ((grad / grad[..., 0].numel()) ** 2).reshape(-1, logits.shape[-1]).sum(0)
    torch.testing.assert_close(fisher[head], expected, rtol=1e-4, atol=1e-12)
    assert not any(p.requires_grad for p in program.gm.parameters())  # restored


def test_output_fisher_is_none_for_a_program_without_logits() -> None:
    program = capture_tiny("bert")
    linear = next(n for n in program.gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default)
    assert output_fisher(program.gm, [linear], [program.example_inputs]) is None
