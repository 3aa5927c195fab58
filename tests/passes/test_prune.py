"""prune_mlp, prune_heads and prune_hidden on tiny random models: widths, grouped-query attention, calibration use,
the export of the smaller program, and every refusal."""

from __future__ import annotations

import pytest
import torch

from graphpress.metrics import sqnr
from graphpress.passes.prune import PruneHeads, PruneHidden, PruneMLP
from graphpress.runner import PipelineError, run_pipeline
from tests.conftest import capture_tiny


def _calibration(n: int = 4, seed: int = 3) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (2, 32), generator=g),) for _ in range(n)]


def _shapes(program, part: str) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for n, p in program.gm.named_parameters() if part in n]


def test_prune_mlp_to_a_width_in_every_layer_and_the_program_still_runs() -> None:
    program = capture_tiny("llama")  # intermediate 96
    calib = _calibration()
    out, records = run_pipeline(program, [PruneMLP(width=64)], calibration=calib)
    assert _shapes(out, "down_proj") == [(64, 64)] * 2 and _shapes(out, "up_proj") == [(64, 64)] * 2
    stats = records[0].stats
    assert stats["pruned_layers"] == 2 and stats["parameters_removed"] == 2 * 3 * 32 * 64
    ref = torch.cat([program(*b) for b in calib])
    assert sqnr(ref, torch.cat([out(*b) for b in calib])) > 5
    assert out.num_parameters() < program.num_parameters()


def test_least_squares_correction_helps_on_calibration_inputs() -> None:
    program = capture_tiny("llama")
    calib = _calibration()
    ref = torch.cat([program(*b) for b in calib])
    results = {}
    for name, cfg in {"plain": PruneMLP(ratio=0.5, importance="activation", correct=False),
                      "refit": PruneMLP(ratio=0.5, importance="activation", correct=True),
                      "obs": PruneMLP(ratio=0.5)}.items():
        out, _ = run_pipeline(program, [cfg], calibration=calib)
        results[name] = sqnr(ref, torch.cat([out(*b) for b in calib]))
    assert results["refit"] > results["plain"] and results["obs"] > results["plain"], results


def test_prune_heads_evenly_inside_key_value_groups() -> None:
    program = capture_tiny("llama")  # 4 query heads in 2 key/value groups, head_dim 16
    out, records = run_pipeline(program, [PruneHeads(heads=2)], calibration=_calibration())
    assert _shapes(out, "q_proj") == [(32, 64)] * 2 and _shapes(out, "o_proj") == [(64, 32)] * 2
    assert _shapes(out, "k_proj") == [(32, 64)] * 2  # both key/value groups still read
    assert out(*_calibration()[0]).isfinite().all()


def test_prune_whole_key_value_groups() -> None:
    program = capture_tiny("llama")
    out, _ = run_pipeline(program, [PruneHeads(heads=2, groups=True)], calibration=_calibration())
    assert _shapes(out, "q_proj") == [(32, 64)] * 2 and _shapes(out, "k_proj") == [(16, 64)] * 2


def test_pruned_program_exports_smaller(tmp_path) -> None:
    from graphpress.lowering.onnx import export_onnx

    program = capture_tiny("llama")
    out, _ = run_pipeline(program, [PruneMLP(width=48), PruneHeads(heads=2)], calibration=_calibration())
    export_onnx(program, tmp_path / "a.onnx")
    export_onnx(out, tmp_path / "b.onnx", tolerance=1e-5)  # onnxruntime agrees with the pruned program
    assert (tmp_path / "b.onnx").stat().st_size < 0.8 * (tmp_path / "a.onnx").stat().st_size


def test_refusals() -> None:
    program = capture_tiny("llama")
    calib = _calibration()
    with pytest.raises(PipelineError, match="leaves no head"):
        run_pipeline(program, [PruneHeads(ratio=0.9)], calibration=calib)
    with pytest.raises(PipelineError, match="spread evenly over its 2 key/value groups"):
        run_pipeline(program, [PruneHeads(heads=3)], calibration=calib)
    with pytest.raises(PipelineError, match="not whole key/value groups"):
        run_pipeline(program, [PruneHeads(heads=3, groups=True)], calibration=calib)
    with pytest.raises(PipelineError, match="more than the 96 neurons"):
        run_pipeline(program, [PruneMLP(width=100)], calibration=calib)
    with pytest.raises(PipelineError, match="needs calibration"):
        run_pipeline(program, [PruneMLP(width=64)])
    with pytest.raises(ValueError, match="one of ratio"):
        PruneMLP()
    with pytest.raises(ValueError, match="importance must be"):
        PruneMLP(ratio=0.2, importance="random")


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give one of ratio"), ({"ratio": 0.5, "width": 8}, "give one of ratio"),
    ({"width": 0}, "width must be a positive number of neurons kept"), ({"width": True}, "positive number"),
    ({"ratio": 0.0}, r"ratio must be in \(0, 1\)"), ({"ratio": 1.0}, r"ratio must be in \(0, 1\)")])
def test_prune_mlp_refuses_a_bad_amount(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruneMLP(**kwargs)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "opt"])
def test_prune_hidden_shrinks_the_stream_of_every_layer(arch: str) -> None:
    """Embedding columns, norms, the rows every block writes and the columns every linear reads go together;
    the refit of the readers' kept columns helps on Llama-like models (tiny random models, random tokens)."""
    from tests.test_channels import _program

    model, program = _program(arch)  # hidden 64
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randint(0, 300, (2, 12), generator=g),) for _ in range(4)]
    ref = torch.cat([program.outputs(*b)[0] for b in calib])
    quality = {}
    for correct in (False, True):
        out, records = run_pipeline(program, [PruneHidden(width=48, correct=correct)], calibration=calib)
        quality[correct] = sqnr(ref, torch.cat([out.outputs(*b)[0] for b in calib]))
        assert records[0].stats["hidden"] == "64 -> 48"
    tables = [n.args[0] for n in out.gm.graph.nodes if n.op == "call_function" and "embedding" in str(n.target)]
    assert tables and {out.gm.get_parameter(t.target).shape[-1] for t in tables} == {48}
    assert all(48 in p.shape for n, p in out.gm.named_parameters() if "norm" in n or "ln" in n)
    assert quality[False] > 3, quality
    if arch in ("llama", "phi3"):
        assert quality[True] > quality[False] + 2, quality


def test_prune_hidden_refusals() -> None:
    from tests.test_channels import _program

    calib = _calibration()
    with pytest.raises(PipelineError, match="layer_norm_4 \\(a program output\\) needs them"):
        run_pipeline(_program("bert")[1], [PruneHidden(width=48)], calibration=calib)  # its output is the stream
    program = capture_tiny("llama")
    with pytest.raises(PipelineError, match="between 1 and the 64 hidden channels"):
        run_pipeline(program, [PruneHidden(width=65)], calibration=calib)
    with pytest.raises(PipelineError, match="found no embedding"):
        run_pipeline(capture_tiny("convnet"), [PruneHidden(ratio=0.5)], calibration=[(torch.randn(2, 3, 16, 16),)])
    with pytest.raises(ValueError, match="shared by every layer: use activation, magnitude or taylor"):
        PruneHidden(ratio=0.5, importance="obs")


def test_per_layer_widths_through_targets() -> None:
    """Uniform by default; per layer on request: one pass per set of layers, chosen by module name."""
    program = capture_tiny("llama")
    passes = [PruneMLP(width=80, targets=(r"layers\.0\.",)), PruneMLP(width=48, targets=(r"layers\.1\.",))]
    out, records = run_pipeline(program, passes, calibration=_calibration())
    assert _shapes(out, "down_proj") == [(64, 80), (64, 48)]
    assert [r.stats["pruned_layers"] for r in records] == [1, 1]
    assert out(*_calibration()[0]).isfinite().all()


def test_taylor_importance_from_the_next_token_loss() -> None:
    """Gradients of the calibration loss rank the units; the program's parameters are left as they were."""
    program = capture_tiny("llama")
    calib = _calibration()
    ref = torch.cat([program(*b) for b in calib])
    flags = [p.requires_grad for p in program.gm.parameters()]
    out, _ = run_pipeline(program, [PruneMLP(ratio=0.5, importance="taylor", correct=False)], calibration=calib)
    assert [p.requires_grad for p in program.gm.parameters()] == flags
    assert all(p.grad is None for p in program.gm.parameters())
    taylor = sqnr(ref, torch.cat([out(*b) for b in calib]))
    out, _ = run_pipeline(program, [PruneMLP(ratio=0.5, importance="magnitude", correct=False)], calibration=calib)
    assert taylor > sqnr(ref, torch.cat([out(*b) for b in calib]))  # the loss knows more than the weights
    out, _ = run_pipeline(program, [PruneHeads(heads=2, importance="taylor")], calibration=calib)
    assert out(*calib[0]).isfinite().all()


def test_taylor_importance_refuses_a_model_without_logits() -> None:
    from tests.test_channels import _program

    with pytest.raises(PipelineError, match="taylor importance needs a language model"):
        run_pipeline(_program("bert")[1], [PruneMLP(ratio=0.5, importance="taylor")], calibration=_calibration())


@pytest.mark.parametrize("arch", ["llama", "gemma"])  # gemma: the head is tied to the embedding
def test_prune_hidden_with_taylor_importance(arch: str) -> None:
    from tests.test_channels import _program

    _, program = _program(arch)
    out, records = run_pipeline(program, [PruneHidden(width=48, importance="taylor")], calibration=_calibration())
    assert records[0].stats["hidden"] == "64 -> 48" and out.outputs(*_calibration()[0])[0].isfinite().all()
