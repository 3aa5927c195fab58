"""Slow tier: activation quantization on an embedded real model. Skipped with `-m "not slow"`.

MiniLM-L6 through the w8a8-smoothquant recipe, scored in onnxruntime (the artifact) against the float model;
about a minute on 2 cores. (SmolLM2 W8A8 perplexity, 15.09 in onnxruntime against 14.94 in fp32, is measured by hand:
``graphpress compress smollm2-135m --recipe w8a8-smoothquant``; too slow for the suite.)
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
    assert exported.lowered == {"graphpress.matmul_w8a8.default": 24}
    result = ev.evaluate("encoder", ort_forward(exported.path), src.tokenizer, ev.torch_forward(src.model, "encoder"))
    assert result.value >= 0.99  # measured 0.9988
