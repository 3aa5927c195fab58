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


def test_compact_halves_fp16_exact_initializers_without_changing_outputs(tmp_path) -> None:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from graphpress.lowering.onnx import compact

    rng = np.random.default_rng(0)
    exact = rng.standard_normal((64, 32)).astype(np.float16).astype(np.float32)  # fp16-representable
    inexact = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["y0"]), helper.make_node("MatMul", ["y0", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
        [numpy_helper.from_array(exact, "a"), numpy_helper.from_array(inexact[:32, :], "b")],
    )
    graph.node[0].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="x" * 1000)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    small = compact(model)
    types = {t.name: t.data_type for t in small.graph.initializer}
    assert types == {"a.fp16": TensorProto.FLOAT16, "b": TensorProto.FLOAT}
    assert not any(n.metadata_props for n in small.graph.node)
    after = ort.InferenceSession(small.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)
