from __future__ import annotations

import onnx
import pytest

from graphpress.lowering.onnx import export_onnx, onnx_metadata
from tests.conftest import capture_tiny


@pytest.mark.parametrize("name", ["llama", "bert", "convnet"])
def test_export_runs_in_onnxruntime_with_dynamic_dims(tmp_path, name: str) -> None:
    program = capture_tiny(name)
    result = export_onnx(program, tmp_path / "m.onnx", tolerance=1e-5)
    assert result.check["max_rel"] < 1e-5  # checked on a batch one row larger than the sample
    model = onnx.load(str(tmp_path / "m.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # batch stays symbolic
    if name != "convnet":
        assert dims[1].dim_param  # and so does the sequence
    assert onnx_metadata(tmp_path / "m.onnx")["kind"] == program.kind
