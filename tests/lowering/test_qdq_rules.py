"""The onnx-qdq target: named recipes lowered to standard ONNX only (DequantizeLinear, Q/DQ pairs), checked by
onnx's full checker and in onnxruntime; 4-bit initializers narrowed only where every value fits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.lowering.onnx import export_onnx
from graphpress.lowering.qdq_rules import narrow_initializers
from graphpress.lowering.rules import TargetError
from graphpress.lowering.targets import target_rules
from graphpress.passes.quantize_embedding import QuantizeEmbedding
from graphpress.passes.weight_only import QuantizeRTN
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline
from tests.conftest import capture_tiny
from tests.test_recipes_architectures import _program

STANDARD = {"", "ai.onnx"}


@pytest.mark.parametrize(("arch", "recipe"), [("llama", "w4-awq-gptq"), ("gpt2", "w4-rtn"),
                                               ("bert", "w8a8-smoothquant"), ("qwen2", "w8-rtn")])
def test_named_recipes_lower_to_standard_onnx(arch: str, recipe: str, tmp_path: Path) -> None:
    program, batches = _program(arch)
    out, _ = run_pipeline(program, load_recipe(recipe).passes, calibration=batches)
    result = export_onnx(out, tmp_path / "m.onnx", rules=target_rules("onnx-qdq"))  # checked in onnxruntime
    assert result.check["sqnr_db"] >= result.check["floor_db"] == 20.0
    model = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= STANDARD
    assert {n.domain for n in model.graph.node} <= STANDARD
    ops = Counter(n.op_type for n in model.graph.node)
    linears = result.lowered["graphpress.quantized_linear.default"]
    assert ops["DequantizeLinear"] >= linears + result.lowered["graphpress.quantized_embedding.default"]
    types = Counter(i.data_type for i in model.graph.initializer)
    four_bit = sum(1 for n in out.gm.graph.nodes if n.op == "call_function" and "quantized_linear" in str(n.target)
                   and n.args[6] == 4)  # (x, codes, scales, zeros, bias, K, bits, ...); w4-awq-gptq: block 0 is 8-bit
    if recipe.startswith("w4"):  # the 4-bit linears' codes and zero points, two a byte
        assert four_bit >= 2 and types[TensorProto.UINT4] >= 2 * four_bit
    else:
        assert not types[TensorProto.UINT4] and not types[TensorProto.INT4]
    if recipe == "w8a8-smoothquant":  # activations rounded per token by a Q/DQ pair in front of each product
        assert ops["QuantizeLinear"] == linears
        assert types[TensorProto.INT8] >= linears  # symmetric weights: signed codes, no zero point


def test_a_partial_last_block_is_padded_to_a_whole_one(tmp_path: Path) -> None:
    # K = 64 in groups of 48: one whole block and one of 16 columns, which OpenVINO refuses
    out, _ = run_pipeline(capture_tiny("llama"), [QuantizeRTN(bits=4, group_size=48)])
    export_onnx(out, tmp_path / "m.onnx", rules=target_rules("onnx-qdq"))  # agrees with the program
    model = onnx.load(tmp_path / "m.onnx")
    dq = {i.name: list(i.dims) for i in model.graph.initializer if i.data_type == TensorProto.UINT4}
    assert dq and all(dims[0] % 48 == 0 for dims in dq.values() if dims[0] > 2)  # codes [K', N], zeros [G, N]
    assert any(n.op_type == "Pad" for n in model.graph.node)


def test_a_4_bit_table_shared_with_the_head_is_refused() -> None:
    program = capture_tiny("llama")  # tied embedding and head
    out, _ = run_pipeline(program, [QuantizeEmbedding(bits=4, group_size=16)])
    with pytest.raises(TargetError, match="quantize the embedding with bits 8"):
        export_onnx(out, "unused.onnx", rules=target_rules("onnx-qdq"))


def _dq_model(codes: np.ndarray, zero: np.ndarray | None, gather_too: bool = False) -> onnx_ir.Model:
    inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(np.ones(4, np.float32), "scale")]
    inputs = ["codes", "scale"]
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "zero"))
        inputs.append("zero")
    nodes = [helper.make_node("DequantizeLinear", inputs, ["y"], axis=1)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])]
    graph_inputs = []
    if gather_too:  # the same codes read by another op
        nodes.append(helper.make_node("Gather", ["codes", "ids"], ["rows"]))
        graph_inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2]))
        outputs.append(helper.make_tensor_value_info("rows", TensorProto.UINT8, [2, 4]))
    graph = helper.make_graph(nodes, "g", graph_inputs, outputs, inits)
    return onnx_ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _types(model: onnx_ir.Model) -> dict[str, onnx_ir.DataType]:
    return {name: v.dtype for name, v in model.graph.initializers.items() if name != "scale"}


@pytest.mark.parametrize(("codes", "zero", "narrowed"), [
    (np.arange(12, dtype=np.uint8).reshape(3, 4), np.array([8, 8, 8, 15], np.uint8), onnx_ir.DataType.UINT4),
    (np.arange(-6, 6, dtype=np.int8).reshape(3, 4), None, onnx_ir.DataType.INT4),
    (np.arange(12, dtype=np.uint8).reshape(3, 4), np.array([8, 8, 8, 16], np.uint8), None),  # a zero point > 15
    (np.arange(-8, 16, 2, dtype=np.int8).reshape(3, 4), None, None),  # 14 does not fit int4
])
def test_dequantized_initializers_narrow_only_where_every_value_fits(codes, zero, narrowed) -> None:  # noqa: ANN001
    model = _dq_model(codes, zero)
    before = _types(model)
    narrow_initializers(model)
    assert _types(model) == ({k: narrowed for k in before} if narrowed else before)
    # the same numbers either way
    values = model.graph.initializers["codes"].const_value.numpy().astype(np.int16)
    assert np.array_equal(values, codes.astype(np.int16))
    onnx.checker.check_model(onnx_ir.serde.serialize_model(model), full_check=True)


def test_initializers_another_op_reads_are_not_narrowed() -> None:
    model = _dq_model(np.arange(12, dtype=np.uint8).reshape(3, 4), None, gather_too=True)
    narrow_initializers(model)
    assert _types(model) == {"codes": onnx_ir.DataType.UINT8}


def test_opset_21_writes_the_opset_23_ops_as_older_ones(tmp_path: Path) -> None:
    program, batches = _program("llama")
    out, _ = run_pipeline(program, load_recipe("w4-rtn").passes, calibration=batches)
    fused = {"RMSNormalization", "RotaryEmbedding", "Attention"}
    ops = {}
    for opset in (23, 21):
        path = tmp_path / f"m{opset}.onnx"
        result = export_onnx(out, path, rules=target_rules("onnx-qdq", {"opset": opset}))  # checked in onnxruntime
        assert result.check["sqnr_db"] >= result.check["floor_db"]
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        assert {(o.domain, o.version) for o in model.opset_import} == {("", opset)}
        ops[opset] = {n.op_type for n in model.graph.node}
    assert {"RMSNormalization", "RotaryEmbedding"} <= ops[23] and not fused & ops[21]
    assert {"DequantizeLinear", "Softmax", "ReduceMean", "Sin", "Cos"} <= ops[21]
