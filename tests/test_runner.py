from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from torch import fx

from graphpress import graph
from graphpress.capture import capture
from graphpress.graph import get_tensor
from graphpress.passes.base import Pass, PassContext, PassResult
from graphpress.program import Program
from graphpress.recipes import load_recipe
from graphpress.runner import PipelineError, ShapeError, propagate_shapes, run_pipeline
from tests.conftest import capture_tiny


@dataclass(frozen=True)
class _ScaleFirstWeight(Pass):
    """Multiplies the last linear weight: a wrong 'exact' pass, or a lossy one when declared so."""

    name = "scale_first_weight"
    factor: float = 1.5

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        node = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default][-1]
        w = get_tensor(gm, node.args[1])
        with torch.no_grad():
            w.mul_(self.factor)
        return PassResult(gm, True, {"scaled": 1})


@dataclass(frozen=True)
class _Lossy(_ScaleFirstWeight):
    name = "lossy_scale"
    exact = False


@dataclass(frozen=True)
class _Identity(Pass):
    name = "identity"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, False, {})


def test_records_and_leaves_input_untouched() -> None:
    program = capture_tiny("llama")
    before = program(*program.example_inputs)
    out, records = run_pipeline(program, [_Identity(), _Lossy(factor=1.01)])
    assert [r.name for r in records] == ["identity", "lossy_scale"]
    assert records[0].error["max_rel"] == 0 and not records[0].modified
    assert records[1].error["max_rel"] > 0 and records[1].nodes_before == records[1].nodes_after
    assert records[1].bytes_after == program.num_bytes()
    torch.testing.assert_close(program(*program.example_inputs), before)  # the input program was cloned
    assert out.gm is not program.gm


def test_exact_pass_that_changes_outputs_is_stopped_with_its_name() -> None:
    program = capture_tiny("llama")
    with pytest.raises(PipelineError, match=r"exact pass scale_first_weight .*passes before it: identity"):
        run_pipeline(program, [_Identity(), _ScaleFirstWeight()])


def test_nan_stops_pipeline() -> None:
    program = capture_tiny("convnet")
    with pytest.raises(PipelineError, match="lossy_scale produced .* NaN/Inf"):
        run_pipeline(program, [_Lossy(factor=float("nan"))])


def test_verify_off_skips_checks() -> None:
    program = capture_tiny("convnet")
    _, records = run_pipeline(program, [_ScaleFirstWeight()], verify=False)
    assert records[0].error is None


def test_a_wrong_exact_pass_on_the_second_output_is_caught() -> None:
    """Every output is verified, not only the first."""
    from dataclasses import dataclass
    from typing import ClassVar

    from examples.custom_pass import ScaleOutputs

    @dataclass(frozen=True)
    class SaysExact(ScaleOutputs):
        exact: ClassVar[bool] = True

    class TwoOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.fc(x)
            return y, torch.relu(y)

    program = capture(TwoOutputs().eval(), (torch.randn(2, 4),), name="two")
    with pytest.raises(PipelineError, match=r"changed output output_1 of two"):
        run_pipeline(program, [SaysExact(factor=1.001, outputs=(1,))])


# --- shapes after every pass ------------------------------------------------------------------------------


def _linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]


@dataclass(frozen=True)
class _NarrowLinear(Pass):
    """Points a linear at a weight with ``rows`` output rows (first ``rows`` of the old one); ``drop_meta``
    removes the linear's val (the runner infers it), else it keeps claiming the old width."""

    name = "narrow_linear"
    exact = False
    index: int = -1
    rows: int = 100
    drop_meta: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        lin = _linears(gm)[self.index]
        w = get_tensor(gm, lin.args[1])[: self.rows].clone()
        lin.args = (lin.args[0], graph.new_get_attr(gm, "narrow.weight", w, before=lin), *lin.args[2:])
        if self.drop_meta:
            del lin.meta["val"]
        return PassResult(gm, True, {})


@dataclass(frozen=True)
class _ReplaceWeightInPlace(Pass):
    """Swaps the tensor behind the last linear's get_attr for a narrower one; the graph is not touched."""

    name = "replace_weight"
    exact = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        weight = _linears(gm)[-1].args[1]
        graph.set_tensor(gm, weight.target, get_tensor(gm, weight)[:100].clone())
        return PassResult(gm, True, {})


@dataclass(frozen=True)
class _WrongDtypeMeta(Pass):
    """Rewrites no node, but leaves a float16 val on the first linear (it computes float32)."""

    name = "wrong_dtype_meta"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        lin = _linears(gm)[0]
        lin.meta["val"] = lin.meta["val"].to(torch.float16)
        return PassResult(gm, True, {})


@pytest.mark.parametrize("verify", [True, False])
def test_a_pass_that_narrows_a_linear_without_fixing_meta_is_named(llama: Program, verify: bool) -> None:
    head = _linears(llama.gm)[-1]  # lm_head: its output is the logits, so nothing downstream fails first
    with pytest.raises(PipelineError) as info:
        run_pipeline(llama, [_Identity(), _NarrowLinear()], verify=verify)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("pass narrow_linear broke the shapes of tiny-llama (passes before it: identity)")
    assert re.search(rf"node {head.name} \(linear.default\) claims \[s\d+, s\d+, 128\] float32 "
                     rf"but computes \[s\d+, s\d+, 100\] float32$", message), message


def test_a_graph_that_no_longer_propagates_is_named_at_the_failing_node(llama: Program) -> None:
    q = _linears(llama.gm)[0]  # q_proj, 64 rows: its view as [B, S, -1, 16] cannot take 40
    (reshape,) = q.users
    with pytest.raises(PipelineError) as info:
        run_pipeline(llama, [_NarrowLinear(index=0, rows=40, drop_meta=True)], verify=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"node {reshape.name} ({reshape.target.__name__}) does not propagate with fake tensors" in message


def test_a_weight_replaced_under_its_name_is_caught_at_its_get_attr(llama: Program) -> None:
    weight = _linears(llama.gm)[-1].args[1]
    with pytest.raises(PipelineError, match=rf"node {weight.name} \({weight.target}\) claims \[128, 64\] float32 "
                                            r"but computes \[100, 64\] float32"):
        run_pipeline(llama, [_ReplaceWeightInPlace()], verify=False)


def test_a_wrong_dtype_on_an_untouched_node_is_caught(llama: Program) -> None:
    lin = _linears(llama.gm)[0]
    with pytest.raises(PipelineError, match=rf"node {lin.name} .* claims \[s\d+, s\d+, 64\] float16 "
                                            r"but computes \[s\d+, s\d+, 64\] float32"):
        run_pipeline(llama, [_WrongDtypeMeta()], verify=False)


def test_failed_propagation_leaves_every_val_as_it_was(llama: Program) -> None:
    program = llama.clone()
    _NarrowLinear()(program.gm, PassContext(program))
    vals = {n: n.meta.get("val") for n in program.gm.graph.nodes}
    with pytest.raises(ShapeError, match="claims"):
        propagate_shapes(program.gm)
    assert all(n.meta.get("val") is v for n, v in vals.items())


def test_exact_recipe_keeps_every_shape_and_the_symbolic_dims(llama: Program) -> None:
    out, records = run_pipeline(llama, load_recipe("exact").passes, verify=False)
    modified = [r for r in records if r.modified]
    assert len(modified) >= 4 and all(0 < r.shape_nodes < r.nodes_after for r in modified)
    assert all(r.shape_nodes == 0 for r in records if not r.modified)
    # what the passes and the partial re-propagation left equals a propagation from scratch
    kept = {n: n.meta.get("val") for n in out.gm.graph.nodes}
    assert propagate_shapes(out.gm) == len(out.gm.graph.nodes)
    ops = {str(n.target) for n in out.gm.graph.nodes if n.op == "call_function"}
    assert any(op.startswith("graphpress.") for op in ops)  # fused ops propagate through their fake kernels
    (logits,) = [n.args[0][0] for n in out.gm.graph.nodes if n.op == "output"]
    batch, seq, vocab = logits.meta["val"].shape
    assert isinstance(batch, torch.SymInt) and isinstance(seq, torch.SymInt) and vocab == 128
    placeholder = next(iter(out.gm.graph.find_nodes(op="placeholder")))
    assert [str(d) for d in placeholder.meta["val"].shape] == [str(batch), str(seq)]
    for n, val in kept.items():
        if isinstance(val, torch.Tensor):
            assert val.dtype == n.meta["val"].dtype and [str(d) for d in val.shape] == [
                str(d) for d in n.meta["val"].shape], n.name


@dataclass(frozen=True)
class _NewModule(Pass):
    """Returns a fresh GraphModule over the same graph, as a pass that rebuilds the module does."""

    name = "new_module"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(fx.GraphModule(gm, gm.graph), True, {})


def test_the_provenance_record_follows_a_pass_that_returns_a_new_module(llama: Program) -> None:
    from graphpress.passes.merge_siblings import MergeSiblingLinears
    from graphpress.provenance import KEY

    assert fx.GraphModule(llama.gm, llama.gm.graph).meta == {}  # what the runner has to make up for
    out, _ = run_pipeline(llama, [MergeSiblingLinears(), _NewModule()], verify=False)
    assert len(out.gm.meta[KEY]) == 4
