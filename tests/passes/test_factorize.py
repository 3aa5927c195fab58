"""factorize on tiny random models: whitened beats plain, allocation beats one ratio, the export, every
architecture, the break-even skip and the refusals."""

from __future__ import annotations

import pytest
import torch

from graphpress.metrics import sqnr
from graphpress.passes.factorize import Factorize, allocate
from graphpress.runner import PipelineError, run_pipeline
from tests.conftest import capture_tiny


def _calibration(n: int = 8) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 128, (2, 32), generator=g),) for _ in range(n)]


def _quality(**kwargs: object) -> tuple[float, dict]:
    program = capture_tiny("llama")
    calib = _calibration()
    ref = torch.cat([program(*b) for b in calib])
    out, records = run_pipeline(program, [Factorize(roles=("block",), **kwargs)], calibration=calib)
    return sqnr(ref, torch.cat([out(*b) for b in calib])), records[0].stats


def test_whitened_beats_plain_and_allocation_beats_one_ratio() -> None:
    """Ranks allocated by the Fisher-weighted (loss-unit) tail errors beat one fraction for all."""
    plain, _ = _quality(method="plain", ratio=0.6)
    uniform, u = _quality(method="whitened", ratio=0.6)
    allocated, a = _quality(method="whitened", ratio=0.6, allocate=True)
    assert allocated > uniform > plain + 2, (plain, uniform, allocated)
    assert len(set(a["ranks"].values())) > len(set(u["ranks"].values()))  # the ranks differ across layers
    assert a["parameters_removed"] >= 0.95 * u["parameters_removed"]  # for about the same budget


def test_sequential_factorizes_later_blocks_on_the_factorized_earlier_ones() -> None:
    once, _ = _quality(ratio=0.6, sequential=False)
    sequential, stats = _quality(ratio=0.6)
    assert sequential != once and min(once, sequential) > 8, (once, sequential)  # other statistics, both fit
    assert len(stats["ranks"]) == 14


def test_the_factors_are_computed_outside_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights that require grad (a captured program's parameters do) must not reach the factorization with
    it: every factor would keep its autograd graph (the whitening, the SVD's factors) alive until the pass
    ends, 0.1 GB a block on SmolLM2."""
    from graphpress import lowrank

    program = capture_tiny("llama")
    assert all(p.requires_grad for p in program.gm.parameters())
    real, seen = lowrank.whitened, []

    def whitened(W: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(W.requires_grad)
        return real(W, *args, **kwargs)

    monkeypatch.setattr(lowrank, "whitened", whitened)
    run_pipeline(program, [Factorize(ratio=0.6, roles=("block",))], calibration=_calibration())
    assert seen and not any(seen)


def test_the_stream_holds_one_blocks_original_weights_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """sequential: a factorized block's weights hold A B while the stream runs that block again, then their own
    values again, so the copies of the originals never span more than the block being factorized (held for
    every block until the end, they cost 0.4 GB on SmolLM2, and the float64 factors 0.34 GB more)."""
    import re

    from graphpress import lowrank

    program = capture_tiny("llama")
    params = dict(program.gm.named_parameters())
    originals = {n: t.detach().clone() for n, t in params.items()}
    real, seen = lowrank.whitened, []

    def block(name: str) -> str:
        return re.search(r"layers\.(\d+)\.", name).group(1)

    def whitened(W: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        current = next(n for n, t in params.items() if t.data_ptr() == W.data_ptr())
        changed = {block(n) for n, t in params.items() if not torch.equal(t.detach(), originals[n])}
        seen.append((block(current), changed))
        return real(W, *args, **kwargs)

    monkeypatch.setattr(lowrank, "whitened", whitened)
    out, _ = run_pipeline(program, [Factorize(ratio=0.6, roles=("block",))], calibration=_calibration(),
                          in_place=True)
    assert {b for b, _ in seen} == {"0", "1"}
    assert all(changed <= {current} for current, changed in seen), seen
    assert {p.dtype for p in out.gm.parameters()} == {torch.float32}


def test_one_rank_for_every_linear_and_the_export(tmp_path) -> None:
    from graphpress.lowering.onnx import export_onnx

    program = capture_tiny("llama")  # hidden 64, intermediate 96
    out, records = run_pipeline(program, [Factorize(rank=8, roles=("block",))], calibration=_calibration())
    shapes = {n: tuple(p.shape) for n, p in out.gm.named_parameters() if "lowrank" in n}
    assert shapes["model.layers.0.mlp.down_proj.lowrank_a.weight"] == (64, 8)
    assert shapes["model.layers.0.mlp.down_proj.lowrank_b.weight"] == (8, 96)
    assert len(records[0].stats["ranks"]) == 14 and not records[0].stats["skipped"]
    export_onnx(out, tmp_path / "m.onnx", tolerance=1e-4)  # onnxruntime agrees with the factorized program


def test_composes_with_pruning_and_exports(tmp_path) -> None:
    from graphpress.lowering.onnx import export_onnx
    from graphpress.passes.prune import PruneMLP

    program = capture_tiny("llama")
    passes = [PruneMLP(ratio=0.25, roles=("block",)), Factorize(ratio=0.7, allocate=True, roles=("block",))]
    out, records = run_pipeline(program, passes, calibration=_calibration())
    assert records[1].stats["weighed"] == "by the next-token loss's Fisher"
    down = {n: p.shape[1] for n, p in out.gm.named_parameters() if "mlp.down_proj" in n and "lowrank_a" not in n}
    assert set(down.values()) == {72}  # the pruned MLP's 96 * 0.75, factorized or kept dense
    assert any("lowrank" in n for n in out.gm.state_dict())
    export_onnx(out, tmp_path / "m.onnx", tolerance=1e-4)


def test_a_rank_that_would_not_shrink_the_layer_keeps_it_dense() -> None:
    _, stats = _quality(rank=30, method="plain")  # 64 x 64: break-even 31; k/v 32 x 64: 21
    assert stats["ranks"]["model.layers.0.self_attn.q_proj"] == 30
    assert "would not store fewer weights" in stats["skipped"]["model.layers.0.self_attn.k_proj"]


def test_an_encoder_gets_one_fraction_for_all() -> None:
    """No next-token loss to weigh by: allocate and fisher fall back to one fraction, and say so."""
    encoder = capture_tiny("bert")
    _, records = run_pipeline(encoder, [Factorize(ratio=0.5, allocate=True, fisher=True)],
                              calibration=[encoder.example_inputs])
    stats = records[0].stats
    assert stats["weighed"] == "no (not a language model)"
    assert len({r for k, r in stats["ranks"].items() if "intermediate" in k}) == 1


def test_allocate_spends_the_budget_where_the_error_falls_most() -> None:
    flat = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])  # each dimension removes 1 of 4
    steep = torch.tensor([4.0, 0.5, 0.2, 0.1, 0.0])  # the first removes 3.5
    ranks = allocate({"flat": flat, "steep": steep}, {"flat": (10, 10), "steep": (10, 10)}, budget=5 * 20)
    assert ranks == {"flat": 4, "steep": 1}  # 1 each, then flat's 0.25 a dimension beats steep's 0.075
    ranks = allocate({"flat": flat, "steep": steep}, {"flat": (10, 10), "steep": (4, 6)}, budget=100)
    assert ranks == {"flat": 4, "steep": 2}  # flat up to its break-even rank, then steep's cheaper dimension fits
    ranks = allocate({"flat": flat, "steep": steep}, {"flat": (10, 10), "steep": (4, 6)}, budget=130)
    assert ranks == {"flat": 10, "steep": 4}  # 20 weights more keep flat dense: its full rank


def test_refusals() -> None:
    program = capture_tiny("llama")
    with pytest.raises(PipelineError, match="rank 100 is above the full rank 64 of model.layers.0.self_attn.q_proj"):
        run_pipeline(program, [Factorize(rank=100, roles=("block",))], calibration=_calibration())
    with pytest.raises(PipelineError, match="needs calibration data"):
        run_pipeline(program, [Factorize(ratio=0.5)])
    with pytest.raises(PipelineError, match="no selected linear"):
        run_pipeline(program, [Factorize(ratio=0.5, targets=("nothing_is_called_this",))], calibration=_calibration())
    with pytest.raises(ValueError, match="rank must be a positive number"):
        Factorize(rank=0)
    with pytest.raises(ValueError, match="give one of ratio"):
        Factorize()
    with pytest.raises(ValueError, match="method must be one of"):
        Factorize(ratio=0.5, method="svd")
    with pytest.raises(ValueError, match="fisher works on whitened factors: not with method asvd"):
        Factorize(ratio=0.5, method="asvd", fisher=True)
    with pytest.raises(ValueError, match="allocate works on whitened factors: not with method plain"):
        Factorize(ratio=0.5, method="plain", allocate=True)

