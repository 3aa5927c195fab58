"""The onnxruntime target's rules: each option's lowering against the torch reference, layouts that stay
packed, refusals, and per-rule floors of the export check."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.kernels.quantized import dequantize
from graphpress.lowering.onnx import LoweringError, export_onnx, ort_forward
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.lowering.rules import Rule, RuleTable, TargetError
from graphpress.metrics import sqnr
from graphpress.quant.qweight import QuantSpec
from graphpress.quant.rtn import quantize_rtn

LINEAR = "graphpress.quantized_linear.default"
EMBEDDING = "graphpress.quantized_embedding.default"


class _QLinear(nn.Module):
    """One quantized_linear on a random weight [N, K]; the codes large enough (> 8 kB) not to be folded."""

    def __init__(self, spec: QuantSpec, n: int = 64, k: int = 300, bias: bool = True, activation_bits: int = 0
                 ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q = quantize_rtn(torch.randn(n, k, generator=g) * 0.1, spec)
        qweight, scales, zeros = q.packed()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.randn(n, generator=g)) if bias else None
        self.args = (k, spec.bits, q.group_len, activation_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphpress.quantized_linear(x, self.qweight, self.scales, self.zeros, self.bias, *self.args)

    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, *self.args[:3])


def _export(tmp_path, module: nn.Module, k: int, **options: object):  # noqa: ANN202
    program = capture(module, (torch.randn(2, 5, k),), dynamic_dims=[{0: "batch", 1: "seq"}])
    path = tmp_path / "m.onnx"
    return export_onnx(program, path, rules=onnxruntime_rules(**options)), onnx.load(str(path)), path


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(8, 128, True), QuantSpec(4, None, False),
                                  QuantSpec(8, None, True)], ids=str)
def test_nbits_kernel_is_one_matmulnbits_exact_at_accuracy_level_0(tmp_path, spec: QuantSpec) -> None:
    module = _QLinear(spec)  # K = 300: groups of 32 pad the last one; one group per row becomes blocks of 4
    result, model, path = _export(tmp_path, module, 300, kernel="nbits", accuracy_level=0, fp16_scales=False)
    assert result.lowered == {LINEAR: 1} and result.check["floor_db"] == 60.0
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ("com.microsoft", "MatMulNBits") in ops
    assert not any(300 in t.dims and t.data_type != onnx.TensorProto.UINT8 for t in model.graph.initializer)
    x = torch.randn(3, 7, 300)
    out = torch.from_numpy(ort_forward(path)(x))
    assert sqnr(x @ module.weight().T + module.bias, out) > 100


def test_fp16_scales_halve_the_scales_and_stay_above_the_exact_floor(tmp_path) -> None:
    module = _QLinear(QuantSpec(4, 32, False), n=256, k=512)
    result, model, _ = _export(tmp_path, module, 512, accuracy_level=0)
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert [list(t.dims) for t in halves] == [[256, 16]]
    # against the program computing with float16 scales (the rule's emulation): exact; against the program
    # itself: the scales moved by < 2^-11 of their value
    assert result.check["sqnr_db"] > 100 and 60 <= result.check["program_sqnr_db"] < 100


@pytest.mark.parametrize(("zeros", "n", "k", "group", "bits"), [
    (False, 64, 300, 128, 4), (True, 64, 300, 128, 4), (True, 63, 301, None, 4), (False, 63, 301, None, 4),
    (True, 64, 300, 128, 8), (False, 64, 300, 32, 8)])
def test_int8_kernel_keeps_packed_codes_and_states_its_floor(tmp_path, zeros: bool, n: int, k: int,
                                                             group: int | None, bits: int) -> None:
    module = _QLinear(QuantSpec(bits, group, not zeros), n=n, k=k, bias=False)
    result, model, path = _export(tmp_path, module, k, kernel="int8")
    assert result.lowered == {LINEAR: 1} and result.check["floor_db"] == 20.0
    ops = {n.op_type for n in model.graph.node}
    assert "DynamicQuantizeMatMul" in ops and "MatMulNBits" not in ops  # unpacked at session start
    assert not any(k in t.dims and t.data_type != onnx.TensorProto.UINT8 for t in model.graph.initializer)
    codes = sum(t.dims[0] * t.dims[1] * t.dims[2] for t in model.graph.initializer
                if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 3 and t.dims[1] > 1 and t.dims[2] == n)
    padded = -(-k // group) * group if group else k + k % 2  # whole groups; an odd K one column more
    assert codes == padded * bits // 8 * n  # the file keeps the codes in their bits
    x = torch.randn(3, 7, k) * torch.rand(3, 7, 1) * 5
    out = torch.from_numpy(ort_forward(path)(x))
    assert 30 < sqnr(x @ module.weight().T, out) < 60  # requantized weight, int8 activations: ~38-40 dB
    assert result.check["sqnr_db"] > 100  # the rule's emulation computes what onnxruntime computes


def test_int8_kernel_folds_in_few_bytes_per_weight(tmp_path) -> None:
    """onnxruntime holds every intermediate of its session-start constant folding until it ends: the int8
    kernel's ops on a weight must stay few and narrow (~8 bytes per weight; 24 traced from the reference)."""
    result, model, _ = _export(tmp_path, _QLinear(QuantSpec(4, 128, False), bias=False), 300, kernel="int8")
    sizes = {onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.FLOAT16: 2,
             onnx.TensorProto.INT16: 2, onnx.TensorProto.FLOAT: 4}
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    per_weight = 0
    for value in inferred.graph.value_info:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if dims and all(dims) and math.prod(dims) >= 300 * 64:  # [K, N]-sized: a per-weight intermediate
            per_weight += sizes[value.type.tensor_type.elem_type] * math.prod(dims) / (300 * 64)
    assert 4 < per_weight <= 10


@torch.library.custom_op("graphpress_test::product", mutates_args=())
def _product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


@_product.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[1]))


class _Product(nn.Module):
    def __init__(self, also_plain: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
        self.also_plain = also_plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.graphpress_test.product(x, self.w)
        return y + x @ self.w if self.also_plain else y


@pytest.mark.parametrize("also_plain", [False, True])
def test_a_rule_stores_its_constants_anew_and_keeps_shared_ones(tmp_path, also_plain: bool) -> None:
    """``Rule.store``: what it returns becomes the exported copy's initializers, and the constant it replaced
    leaves the file; a constant that other nodes read too arrives in ``shared``, and handed back as it is, is
    stored once. The program itself is left as it was."""
    seen: list[frozenset[int]] = []

    def store(x, w, *, shared):  # noqa: ANN001, ANN202
        seen.append(shared)
        return None if 1 in shared else (x, w * 2)

    rule = Rule(torch.ops.graphpress_test.product.default, lambda x, w: x @ w / 2, store=store)
    module = _Product(also_plain)
    program = capture(module, (torch.randn(3, 8),))
    export_onnx(program, tmp_path / "p.onnx", rules=RuleTable((rule,)) if not also_plain else
                RuleTable((Rule(rule.op, lambda x, w: x @ w, store=store),)))
    assert seen == [frozenset({1}) if also_plain else frozenset()]
    initializers = [t for t in onnx.load(str(tmp_path / "p.onnx")).graph.initializer if list(t.dims) == [8, 8]]
    assert len(initializers) == 1
    stored = torch.from_numpy(onnx.numpy_helper.to_array(initializers[0]).copy())
    assert torch.equal(stored, module.w.detach() * (1 if also_plain else 2))
    assert torch.equal(dict(program.gm.named_parameters())["w"], module.w)  # untouched


def test_activation_bits_8_lowers_to_the_same_codes_onnxruntime_computes(tmp_path) -> None:
    module = _QLinear(QuantSpec(8, None, True), n=96, k=576, activation_bits=8)
    result, model, path = _export(tmp_path, module, 576, fp16_scales=False)
    assert result.lowered == {LINEAR: 1} and result.check["floor_db"] == 20.0
    assert [n.op_type for n in model.graph.node].count("DynamicQuantizeMatMul") == 1
    x = torch.randn(3, 11, 576) * torch.rand(3, 11, 1) * 4
    out = torch.from_numpy(ort_forward(path)(x))
    assert torch.allclose(out, module(x), rtol=1e-5, atol=1e-5)  # the same int8 codes and exact sums


def test_accuracy_level_4_states_a_lossy_floor_and_is_emulated(tmp_path) -> None:
    result, _, _ = _export(tmp_path, _QLinear(QuantSpec(4, 32, False)), 300, accuracy_level=4)
    check = result.check
    assert check["floor_db"] == 20.0 and 35 < check["program_sqnr_db"] < 60
    assert check["sqnr_db"] > check["program_sqnr_db"] + 10  # the emulation rounds x per block as onnxruntime does


def test_groups_onnxruntime_cannot_block_are_refused_at_export(tmp_path) -> None:
    with pytest.raises(LoweringError, match="groups of 48 columns: MatMulNBits .* power of two"):
        _export(tmp_path, _QLinear(QuantSpec(4, 48, False)), 300, kernel="nbits")
    assert not (tmp_path / "m.onnx").exists()
    # the int8 kernel needs no blocks: the same program lowers
    result, _, _ = _export(tmp_path, _QLinear(QuantSpec(4, 48, False)), 300, kernel="int8")
    assert result.lowered == {LINEAR: 1}


class _QEmbedding(nn.Module):
    def __init__(self, spec: QuantSpec, v: int = 300, h: int = 96) -> None:
        super().__init__()
        q = quantize_rtn(torch.randn(v, h, generator=torch.Generator().manual_seed(0)), spec)
        qweight, scales, zeros = q.packed()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.args = (spec.bits, q.group_len, h)
        self.table = q.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphpress.quantized_embedding(self.qweight, self.scales, self.zeros, ids, *self.args)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(8, None, True), QuantSpec(8, 16, False)],
                         ids=str)
def test_embedding_is_one_gather_block_quantized(tmp_path, spec: QuantSpec) -> None:
    module = _QEmbedding(spec)
    program = capture(module, (torch.randint(0, 300, (2, 5)),), dynamic_dims=[{0: "batch", 1: "seq"}])
    result = export_onnx(program, tmp_path / "e.onnx", rules=onnxruntime_rules(fp16_scales=False))
    assert result.lowered == {EMBEDDING: 1} and result.check["sqnr_db"] > 100
    ops = [n.op_type for n in onnx.load(str(tmp_path / "e.onnx")).graph.node]
    assert "GatherBlockQuantized" in ops
    ids = torch.randint(0, 300, (3, 4))
    assert torch.equal(torch.from_numpy(ort_forward(tmp_path / "e.onnx")(ids)), module.table[ids])


def test_without_rule_the_reference_decomposition_is_exported(tmp_path) -> None:
    module = _QLinear(QuantSpec(4, 32, False))
    program = capture(module, (torch.randn(2, 5, 300),), dynamic_dims=[{0: "batch", 1: "seq"}])
    result = export_onnx(program, tmp_path / "m.onnx", rules=RuleTable(), tolerance=1e-5)
    assert result.lowered == {} and result.check["floor_db"] == 60.0
    assert "MatMulNBits" not in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}


def test_table_refuses_two_rules_for_one_op_and_bad_options() -> None:
    rule = onnxruntime_rules().rules[0]
    with pytest.raises(ValueError, match="more than one rule"):
        onnxruntime_rules() + [Rule(rule.op, rule.lower)]
    with pytest.raises(TargetError, match="accuracy_level must be 0..4"):
        onnxruntime_rules(accuracy_level=7)
    with pytest.raises(TargetError, match="kernel must be one of nbits, int8"):
        onnxruntime_rules(kernel="fp8")


def test_tables_compose_their_prepare_and_finish_steps_in_order() -> None:
    seen: list[str] = []
    first = RuleTable(prepare=lambda gm: seen.append("prepare 1"), finish=lambda m: seen.append("finish 1"))
    second = RuleTable(finish=lambda m: seen.append("finish 2"))
    both = first + second
    assert both.prepare is first.prepare  # one step stays itself
    both.prepare(None)
    both.finish(None)
    assert seen == ["prepare 1", "finish 1", "finish 2"]
    assert (first + []).finish is first.finish and (second + RuleTable()).prepare is None


def test_tables_keep_their_opset_and_refuse_two_different_ones() -> None:
    assert (RuleTable(opset=21) + RuleTable()).opset == (RuleTable() + RuleTable(opset=21)).opset == 21
    assert (RuleTable(opset=21) + []).opset == 21
    with pytest.raises(ValueError, match="opsets 21 and 23 cannot be combined"):
        RuleTable(opset=21) + RuleTable(opset=23)
