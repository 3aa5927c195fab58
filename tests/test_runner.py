from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import fx

from graphpress.capture import capture
from graphpress.graph import get_tensor
from graphpress.passes.base import Pass, PassContext, PassResult
from graphpress.runner import PipelineError, run_pipeline
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
