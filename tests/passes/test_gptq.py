from __future__ import annotations

import pytest
import torch

from graphpress.metrics import sqnr
from graphpress.passes.gptq import GPTQ
from graphpress.passes.weight_only import QuantizeRTN
from graphpress.runner import PipelineError, run_pipeline
from tests.conftest import capture_tiny

QLINEAR = torch.ops.graphpress.quantized_linear.default


def _calibration(n: int = 6, seed: int = 3) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (2, 48), generator=g),) for _ in range(n)]


def test_gptq_quantizes_every_block_linear_and_beats_rtn_on_calibration_inputs() -> None:
    program = capture_tiny("llama")
    calib = _calibration()
    spec = dict(bits=4, group_size=32, targets=(r"\.layers\.",))
    gptq, records = run_pipeline(program, [GPTQ(**spec, clip_search=False)], calibration=calib)
    rtn, _ = run_pipeline(program, [QuantizeRTN(**spec, clip_search=False)])
    assert records[0].stats["quantized"] == 14 and records[0].stats["calibration_batches"] == 6
    assert sum(n.target == QLINEAR for n in gptq.gm.graph.nodes) == 14
    ref = torch.cat([program(*b) for b in calib])
    s_gptq = sqnr(ref, torch.cat([gptq(*b) for b in calib]))
    s_rtn = sqnr(ref, torch.cat([rtn(*b) for b in calib]))
    assert s_gptq > s_rtn + 0.5, (s_gptq, s_rtn)
    assert s_gptq > 18


def test_gptq_ridge_option_reaches_the_quantizer() -> None:
    program = capture_tiny("llama")
    calib = _calibration()
    spec = dict(bits=4, group_size=32, targets=(r"\.layers\.",), damp=0.1)
    plain, _ = run_pipeline(program, [GPTQ(**spec)], calibration=calib)
    ridge, records = run_pipeline(program, [GPTQ(**spec, ridge=True)], calibration=calib)
    assert records[0].stats["quantized"] == 14
    ref = torch.cat([program(*b) for b in calib])
    out = torch.cat([ridge(*b) for b in calib])
    assert sqnr(ref, out) > 18
    assert not torch.equal(out, torch.cat([plain(*b) for b in calib]))


def test_gptq_act_order_and_merged_siblings() -> None:
    from graphpress.passes.merge_siblings import MergeSiblingLinears

    program = capture_tiny("llama")
    out, records = run_pipeline(
        program, [MergeSiblingLinears(), GPTQ(bits=4, group_size=32, act_order=True, targets=(r"\.layers\.",))],
        calibration=_calibration(3),
    )
    assert records[1].stats["quantized"] == 8  # qkv, o, gate_up, down per layer
    x = (torch.randint(0, 128, (2, 30)),)
    assert sqnr(program(*x), out(*x)) > 15


def test_gptq_refuses_without_calibration_or_targets() -> None:
    program = capture_tiny("llama")
    with pytest.raises(PipelineError, match="gptq needs calibration data"):
        run_pipeline(program, [GPTQ()])
    with pytest.raises(PipelineError, match="match no linear layer"):
        run_pipeline(program, [GPTQ(targets=("nothing_here",))], calibration=_calibration(1))
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=1.5)
