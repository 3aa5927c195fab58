"""sparsify on tiny random models: every block linear gets its pattern, SparseGPT beats Wanda beats magnitude on
the model's outputs, later quantization keeps the zeros, the export carries them, OWL's ratios, refusals. (Ten
architectures: the sparse recipes in tests/test_recipes_architectures.py.)"""

from __future__ import annotations

import pytest
import torch

from graphpress import graph
from graphpress.kernels.quantized import dequantize
from graphpress.kernels.sparse24 import is_2_4
from graphpress.metrics import sqnr
from graphpress.passes.gptq import GPTQ
from graphpress.passes.merge_siblings import MergeSiblingLinears
from graphpress.passes.sparsify import Sparsify, sparse_weights
from graphpress.runner import PipelineError, run_pipeline
from tests.conftest import capture_tiny

aten = torch.ops.aten
QLINEAR = torch.ops.graphpress.quantized_linear.default


def _calibration(n: int = 6, seed: int = 3) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (2, 48), generator=g),) for _ in range(n)]


def _block_weights(program) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {n.args[1].target: graph.get_tensor(program.gm, n.args[1]) for n in program.gm.graph.nodes
            if n.target is aten.linear.default and ".layers." in n.args[1].target}


def test_sparsegpt_beats_wanda_beats_magnitude_and_keeps_the_pattern() -> None:
    program = capture_tiny("llama")
    calib = _calibration()
    ref = torch.cat([program(*b) for b in calib])
    found = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out, records = run_pipeline(program, [Sparsify(method=method, pattern="2:4", roles=("block",))],
                                    calibration=calib)
        stats = records[0].stats
        assert stats["sparsified"] == 14 and stats["zeros"] >= 0.5 and stats["pattern"] == "2:4"
        weights = _block_weights(out)
        assert len(weights) == 14 and all(is_2_4(w) for w in weights.values())
        assert set(sparse_weights(out.gm)) == set(weights)
        found[method] = sqnr(ref, torch.cat([out(*b) for b in calib]))
    assert found["sparsegpt"] > found["wanda"] > found["magnitude"], found
    assert found["sparsegpt"] > 12
    head = next(n for n in program.gm.graph.nodes if n.target is aten.linear.default and "lm_head" in str(n.args[1]))
    assert (graph.get_tensor(program.gm, head.args[1]) != 0).all()  # the user's program is untouched


def test_refine_and_owl() -> None:
    program = capture_tiny("llama")
    calib = _calibration()
    ref = torch.cat([program(*b) for b in calib])
    plain, _ = run_pipeline(program, [Sparsify(ratio=0.5, refine=0, roles=("block",))], calibration=calib)
    refined, _ = run_pipeline(program, [Sparsify(ratio=0.5, roles=("block",))], calibration=calib)
    assert sqnr(ref, torch.cat([refined(*b) for b in calib])) > sqnr(ref, torch.cat([plain(*b) for b in calib]))
    owl, records = run_pipeline(program, [Sparsify(ratio=0.5, owl=0.1, roles=("block",))], calibration=calib)
    ratios = records[0].stats["block_ratios"]
    assert set(ratios) == {"model.layers.0", "model.layers.1"}
    assert sorted(ratios.values()) == pytest.approx([0.4, 0.6], abs=1e-3)  # two blocks: one at each bound
    assert records[0].stats["zeros"] == pytest.approx(0.5, abs=0.01)
    for target, w in _block_weights(owl).items():
        share = float((w == 0).float().mean())
        assert share == pytest.approx(ratios[target.rsplit(".", 3)[0]], abs=0.02), target


def test_allocate_spreads_ratios_by_fisher_weighted_saliency() -> None:
    program = capture_tiny("llama")
    calib = _calibration()
    ref = torch.cat([program(*b) for b in calib])
    one, _ = run_pipeline(program, [Sparsify(ratio=0.5, roles=("block",))], calibration=calib)
    spread, records = run_pipeline(program, [Sparsify(ratio=0.5, allocate=0.1, roles=("block",))],
                                   calibration=calib)
    stats = records[0].stats
    assert stats["weighed"] == "by the next-token loss's Fisher" and len(stats["layer_ratios"]) == 14
    assert all(0.4 <= r <= 0.6 for r in stats["layer_ratios"].values())
    assert len(set(stats["layer_ratios"].values())) > 3 and stats["zeros"] == pytest.approx(0.5, abs=0.002)
    assert sqnr(ref, torch.cat([spread(*b) for b in calib])) > sqnr(ref, torch.cat([one(*b) for b in calib]))


def test_an_encoder_keeps_one_ratio_when_asked_to_allocate() -> None:
    from tests.test_recipes_architectures import _program

    program, batches = _program("bert")
    out, records = run_pipeline(program, [Sparsify(ratio=0.5, allocate=0.1, roles=("block",))], calibration=batches)
    assert records[0].stats["weighed"] == "no (not a language model)" and "layer_ratios" not in records[0].stats
    assert records[0].stats["zeros"] == pytest.approx(0.5, abs=0.002)


def test_quantization_after_keeps_the_zeros_and_exports(tmp_path) -> None:  # noqa: ANN001
    from graphpress.lowering.onnx import export_onnx

    program = capture_tiny("llama")
    calib = _calibration(3)
    out, records = run_pipeline(program, [Sparsify(pattern="2:4", roles=("block",)), MergeSiblingLinears(),
                                          GPTQ(bits=4, group_size=32, act_order=True, roles=("block",))],
                                calibration=calib)
    assert records[2].stats["quantized"] == 8  # qkv, o, gate_up, down per layer
    for node in out.gm.graph.nodes:
        if node.target is QLINEAR:
            qweight, scales, zeros = (graph.get_tensor(out.gm, a) for a in node.args[1:4])
            w = dequantize(qweight, scales, zeros, *node.args[5:8])
            assert is_2_4(w), node.name
    joint, records = run_pipeline(program, [Sparsify(pattern="2:4", bits=4, group_size=32, roles=("block",))],
                                  calibration=calib)
    assert records[0].stats["quantized"] == 14 and records[0].stats["zeros"] >= 0.5
    x = (torch.randint(0, 128, (2, 30)),)
    assert sqnr(program(*x), joint(*x)) > 10
    export_onnx(joint, tmp_path / "m.onnx")  # onnxruntime agrees with the program (the export checks it)


def test_magnitude_needs_no_calibration_and_sparse_initializers_where_smaller(tmp_path) -> None:  # noqa: ANN001
    import onnx
    from onnx import numpy_helper

    from graphpress.lowering.onnx import export_onnx

    program = capture_tiny("llama")
    out, records = run_pipeline(program, [Sparsify(method="magnitude", ratio=0.75, roles=("block",))])
    assert records[0].stats["zeros"] == pytest.approx(0.75, abs=1e-3)
    export_onnx(out, tmp_path / "m.onnx", tolerance=1e-4)
    model = onnx.load(tmp_path / "m.onnx")
    # three quarters zero: stored as sparse initializers (smaller), which onnxruntime densifies (the export's
    # check ran the file); half zero: dense, zeros and all
    assert len(model.graph.sparse_initializer) == 14
    for sparse in model.graph.sparse_initializer:
        kept = numpy_helper.to_array(sparse.values).size
        assert 1 - kept / (sparse.dims[0] * sparse.dims[1]) == pytest.approx(0.75, abs=0.01)
    half, _ = run_pipeline(program, [Sparsify(method="magnitude", ratio=0.5, roles=("block",))])
    export_onnx(half, tmp_path / "h.onnx", tolerance=1e-4)
    model = onnx.load(tmp_path / "h.onnx")
    assert not model.graph.sparse_initializer
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2]
    assert sum(float((a == 0).mean()) >= 0.5 for a in arrays) >= 14  # the zeros reach the file


def test_refusals() -> None:
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        Sparsify(ratio=1.5)
    with pytest.raises(ValueError, match="0 < N < M"):
        Sparsify(pattern="4:4")
    with pytest.raises(ValueError, match="one of them"):
        Sparsify()
    with pytest.raises(ValueError, match="not with method wanda"):
        Sparsify(method="wanda", ratio=0.5, bits=4)
    with pytest.raises(ValueError, match="pattern like 2:4 is the same"):
        Sparsify(pattern="2:4", owl=0.05)
    with pytest.raises(ValueError, match="give one"):
        Sparsify(ratio=0.5, owl=0.05, allocate=0.05)
    with pytest.raises(ValueError, match="spreads a ratio"):
        Sparsify(pattern="2:4", allocate=0.05)
    with pytest.raises(ValueError, match="method must be one of"):
        Sparsify(method="obs", ratio=0.5)
    program = capture_tiny("llama")
    with pytest.raises(PipelineError, match="needs calibration data"):
        run_pipeline(program, [Sparsify(ratio=0.5)])
    with pytest.raises(PipelineError, match="not divisible by M = 7"):
        run_pipeline(program, [Sparsify(pattern="3:7", roles=("block",))], calibration=_calibration(1))
    with pytest.raises(PipelineError, match="match no linear"):
        run_pipeline(program, [Sparsify(ratio=0.5, targets=("nothing_here",))], calibration=_calibration(1))
