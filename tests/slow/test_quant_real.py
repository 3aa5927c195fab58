"""Slow tier: quantization on the embedded real models. Skipped with `-m "not slow"`.

MiniLM-L6 through the w8a8-smoothquant recipe, scored in onnxruntime (the artifact) against the float model;
about a minute on 2 cores. (SmolLM2 perplexities are measured by ``bash tools/run_benchmarks.sh`` into
BENCHMARKS.md; too slow for the suite.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from graphpress import evaluation as ev
from graphpress.capture import capture
from graphpress.compress import calibration_batches, resolve_source, sample_inputs
from graphpress.lowering.onnx import export_onnx, ort_forward
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline

pytestmark = pytest.mark.slow


def test_minilm_w8a8_smoothquant_keeps_cosine_099_in_onnxruntime(tmp_path: Path) -> None:
    src = resolve_source("minilm-l6")
    recipe = load_recipe("w8a8-smoothquant")
    program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    out, records = run_pipeline(program, recipe.passes, calibration=calibration_batches(src, recipe))
    stats = {r.name: r.stats for r in records}
    assert stats["w8a8"]["quantized"] == 24  # 6 layers x (qkv merged, attention out, intermediate, output)
    assert stats["smoothquant"]["scaled_groups"] == 24
    exported = export_onnx(out, tmp_path / "model.onnx")
    assert exported.lowered["graphpress.quantized_linear.default"] == 24
    assert exported.lowered["graphpress.quantized_embedding.default"] == 3  # word, position, token-type tables
    result = ev.evaluate("encoder", ort_forward(exported.path), src.tokenizer, ev.torch_forward(src.model, "encoder"))
    assert result.value >= 0.99  # measured 0.9988


def test_smollm2_w4_artifact_is_packed_and_small(tmp_path: Path) -> None:
    import onnx

    src = resolve_source("smollm2-135m")
    recipe = load_recipe("w4-rtn")
    recipe.calibration["generated"] = 0  # what is stored is tested here, not the calibration mix (a minute to sample)
    program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    out, records = run_pipeline(program, recipe.passes, calibration=calibration_batches(src, recipe))
    assert {r.name: r.stats for r in records}["rtn"]["quantized"] == 120  # 30 x (qkv, o, gate_up, down)
    exported = export_onnx(out, tmp_path / "model.onnx")  # checked against the torch program in onnxruntime
    assert exported.lowered == {"graphpress.quantized_linear.default": 121, "graphpress.quantized_embedding.default": 1,
                                "graphpress.cached_attention.default": 30, "aten.rms_norm.default": 61}
    # issue bar: 90 MB (the fp32 export is 538 MB); the rotary tables the fused attention reads are computed in
    # the file, not stored (2.1 MB for 8192 positions)
    assert exported.bytes <= 90e6
    model = onnx.load(str(tmp_path / "model.onnx"))
    big_float = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                 and len(t.dims) == 2 and t.dims[0] * t.dims[1] > 576 * 576]
    assert not big_float, big_float  # no float copy of any quantized weight
