from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.kernels.matmul_nbits import dequantize_nbits, matmul_nbits_reference
from graphpress.kernels.matmul_w8a8 import matmul_w8a8_reference
from graphpress.lowering.onnx import export_onnx, ort_forward
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.lowering.rules import Rule, RuleTable
from graphpress.metrics import sqnr


class _Packed(nn.Module):
    """One graphpress::matmul_nbits with random packed 4-bit codes; K=40 is not a multiple of the block."""

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.N, self.K, self.bits, self.block = 16, 40, bits, 32
        k_blocks = 2
        self.register_buffer("qweight", torch.randint(0, 256, (16, k_blocks, 32 * bits // 8), generator=g,
                                                      dtype=torch.uint8))
        self.register_buffer("scales", torch.rand(16, k_blocks, generator=g) * 0.1)
        self.register_buffer("zeros", torch.randint(0, 256, (16, k_blocks * bits // 8), generator=g,
                                                    dtype=torch.uint8))
        self.bias = nn.Parameter(torch.randn(16, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphpress.matmul_nbits(x, self.qweight, self.scales, self.zeros, self.bias,
                                                 self.K, self.N, self.bits, self.block)


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_rule_matches_reference_in_onnxruntime(tmp_path, bits: int) -> None:
    module = _Packed(bits)
    x = torch.randn(2, 5, 40)
    program = capture(module, (x,), dynamic_dims=[{0: "batch", 1: "seq"}])
    result = export_onnx(program, tmp_path / "m.onnx", rules=onnxruntime_rules(accuracy_level=0), tolerance=1e-5)
    assert result.lowered == {"graphpress.matmul_nbits.default": 1}
    ops = [(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ("com.microsoft", "MatMulNBits") in ops
    # no float copy of the weight in the file: the only [N, K] float tensor would be a dequantized one
    inits = onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    assert not any(list(t.dims) == [16, 40] for t in inits)
    # the reference dequantization is what onnxruntime computes (another batch and sequence length)
    x2 = torch.randn(3, 7, 40)
    w = dequantize_nbits(module.qweight, module.scales, module.zeros, 40, bits, 32)
    ref = x2 @ w.T + module.bias
    out = torch.from_numpy(ort_forward(tmp_path / "m.onnx")(x2))
    assert sqnr(ref, out) > 100


class _Int8Kernel(nn.Module):
    """matmul_nbits with kernel="int8" on 4-bit codes large enough (12 kB) that the exporter does not fold them."""

    def __init__(self, zeros: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.N, self.K, self.block = 64, 300, 128  # K padded to 3 blocks
        self.register_buffer("qweight", torch.randint(0, 256, (64, 3, 64), generator=g, dtype=torch.uint8))
        self.register_buffer("scales", torch.rand(64, 3, generator=g) * 0.1)
        self.register_buffer("zeros", torch.randint(0, 256, (64, 2), generator=g, dtype=torch.uint8)
                             if zeros else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphpress.matmul_nbits(x, self.qweight, self.scales, self.zeros, None,
                                                 self.K, self.N, 4, self.block, 4, "int8")


@pytest.mark.parametrize("zeros", [False, True])
def test_int8_kernel_keeps_packed_codes_and_matches_reference(tmp_path, zeros: bool) -> None:
    module = _Int8Kernel(zeros)
    program = capture(module, (torch.randn(2, 5, 300),), dynamic_dims=[{0: "batch", 1: "seq"}])
    path = tmp_path / "m.onnx"
    result = export_onnx(program, path, tolerance=1e-5)
    assert result.lowered == {"graphpress.matmul_nbits.default": 1}
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeMatMul", "Floor"} <= ops and "MatMulNBits" not in ops  # unpacked at load
    assert not any(300 in t.dims and 64 in t.dims for t in model.graph.initializer)  # no int8/float weight
    x = torch.randn(3, 7, 300) * torch.rand(3, 7, 1) * 5
    out = torch.from_numpy(ort_forward(path)(x))
    assert torch.allclose(out, module(x), rtol=1e-5, atol=1e-6)
    w = dequantize_nbits(module.qweight, module.scales, module.zeros, 300, 4, 128)
    assert 30 < sqnr(x @ w.T, module(x)) < 60  # requantized weight and int8 activations: measured ~38 dB


def test_int8_kernel_is_exact_for_8bit_codes_sharing_a_row_scale() -> None:
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(1, 256, (8, 2, 64), generator=g, dtype=torch.uint8)  # 8-bit, symmetric: zero 128
    codes[:, 0, 0] = 1  # every row reaches -127, so the requantization scale is the row's own scale
    scales = (torch.rand(8, 1, generator=g) + 0.5).expand(8, 2).contiguous()
    x = torch.randn(4, 128, generator=g)
    got = matmul_nbits_reference(x, codes, scales, None, None, 128, 8, 8, 64, 4, "int8")
    q = (codes.reshape(8, 128).int() - 128).to(torch.int8)
    assert torch.equal(got, matmul_w8a8_reference(x, q.T, scales[:, 0], None))


def test_unknown_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="kernel must be one of"):
        matmul_nbits_reference(torch.randn(1, 32), torch.zeros(1, 1, 16, dtype=torch.uint8), torch.ones(1, 1),
                               None, None, 32, 1, 4, 32, 0, "fp8")


def test_accuracy_level_4_stays_close(tmp_path) -> None:
    program = capture(_Packed(), (torch.randn(2, 5, 40),), dynamic_dims=[{0: "batch", 1: "seq"}])
    check = export_onnx(program, tmp_path / "m.onnx", rules=onnxruntime_rules(accuracy_level=4),
                        tolerance=2e-2).check
    assert check["sqnr_db"] > 35


def test_without_rule_the_reference_decomposition_is_exported(tmp_path) -> None:
    program = capture(_Packed(), (torch.randn(2, 5, 40),), dynamic_dims=[{0: "batch", 1: "seq"}])
    result = export_onnx(program, tmp_path / "m.onnx", rules=RuleTable(), tolerance=1e-5)
    assert result.lowered == {}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "MatMulNBits" not in ops


def test_table_refuses_two_rules_for_one_op() -> None:
    rule = onnxruntime_rules().rules[0]
    with pytest.raises(ValueError, match="more than one rule"):
        onnxruntime_rules() + [Rule(rule.op, rule.lower)]
    with pytest.raises(ValueError, match="accuracy_level"):
        onnxruntime_rules(accuracy_level=7)
