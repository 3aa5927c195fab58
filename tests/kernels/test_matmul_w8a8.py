"""graphpress::matmul_w8a8: the reference against float and the int8 math, its export, and onnxruntime's result."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.kernels import REFERENCES
from graphpress.kernels.matmul_w8a8 import matmul_w8a8_reference
from graphpress.lowering.onnx import export_onnx, ort_forward
from graphpress.metrics import max_rel_error, sqnr
from graphpress.quant.int8 import (
    dynamic_quantize_linear,
    quantize_rows_uint8,
    quantize_symmetric_int8_per_channel,
)


class _W8A8(nn.Module):
    """One matmul_w8a8 on a random weight [N, K], quantized per channel."""

    def __init__(self, k: int, n: int, bias: bool, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(n, k, generator=g) * 0.05
        q, s = quantize_symmetric_int8_per_channel(self.w)
        self.register_buffer("qweight", q.T.contiguous())  # [K, N]
        self.register_buffer("scales", s)
        self.bias = nn.Parameter(torch.randn(n, generator=g)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphpress.matmul_w8a8(x, self.qweight, self.scales, self.bias)


def _activations(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 4  # rows of varied range
    x[0, 0] = 0  # an all-zero token
    return x


def test_registered_reference() -> None:
    assert REFERENCES[torch.ops.graphpress.matmul_w8a8.default] is matmul_w8a8_reference


def test_reference_is_the_int8_math_and_close_to_float() -> None:
    m = _W8A8(256, 48, bias=True)
    x = _activations((2, 9, 256))
    y = matmul_w8a8_reference(x, m.qweight, m.scales, m.bias)
    assert y.shape == (2, 9, 48) and y.dtype == torch.float32
    codes, scale, zero, rows = quantize_rows_uint8(x)
    q, s = quantize_symmetric_int8_per_channel(m.w)
    acc = (codes.long() - zero.long()) @ q.long().T  # int64 accumulation
    assert torch.equal(y, acc.float() * (scale * s) * rows[..., None] + m.bias)
    assert torch.equal(y[0, 0], m.bias.detach())  # the zero token gives exactly the bias
    assert sqnr(x @ m.w.T + m.bias, y) >= 35.0  # two 8-bit roundings: measured 40.0 dB


def test_rows_are_quantized_each_on_its_own_range() -> None:
    x = torch.tensor([[1e-3, -2e-3, 0.5e-3], [100.0, -50.0, 25.0]])  # ranges 1e5 apart
    codes, scale, zero, rows = quantize_rows_uint8(x)
    assert torch.equal(rows, torch.tensor([2e-3, 100.0]))
    back = (codes.float() - zero.float()) * scale * rows[:, None]
    assert max_rel_error(x[0], back[0]) <= 1 / 127 and max_rel_error(x[1], back[1]) <= 1 / 127
    # one scale for the tensor would leave the small row at zero
    c, s, z = dynamic_quantize_linear(x)
    assert torch.equal(c[0], z.expand(3))


def test_float64_accumulation_is_exact_past_float32_integers() -> None:
    # |acc| ~ 127 * 127 * 2048 = 33M > 2^24: a float32 matmul would round partial sums, float64 does not
    k = 2048
    qweight = torch.full((k, 2), 127, dtype=torch.int8)
    qweight[::2, 1] = -127
    x = torch.ones(1, k)
    x[0, 1::2] = -1.0
    y = matmul_w8a8_reference(x, qweight, torch.ones(2), None)
    codes, scale, zero, rows = quantize_rows_uint8(x)
    acc = (codes.long() - zero.long()) @ qweight.long()  # [1, 2] exact integers
    assert acc.abs().max() > 2**24 or acc.abs().min() == 0
    assert torch.equal(y, acc.float() * scale * rows[..., None])


def test_op_survives_export_with_dynamic_shapes() -> None:
    m = _W8A8(64, 16, bias=False).eval()
    program = capture(m, (torch.randn(2, 5, 64),), dynamic_dims=[{0: "batch", 1: "seq"}])
    ops = [n.target for n in program.gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.graphpress.matmul_w8a8.default in ops
    x = torch.randn(3, 7, 64)
    assert torch.equal(program(x), m(x))


@pytest.mark.parametrize(("k", "n", "bias"), [(64, 16, True), (576, 96, False), (1536, 40, True)])
def test_onnxruntime_agrees_with_the_reference_to_float_rounding(tmp_path, k: int, n: int, bias: bool) -> None:
    m = _W8A8(k, n, bias).eval()
    program = capture(m, (torch.randn(2, 5, k),), dynamic_dims=[{0: "batch", 1: "seq"}])
    path = tmp_path / "w8a8.onnx"
    result = export_onnx(program, path)
    assert result.lowered == {"graphpress.matmul_w8a8.default": 1}
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 1 and "MatMul" not in ops
    x = _activations((3, 11, k), seed=2)
    out = torch.from_numpy(ort_forward(path)(x))
    # the same int8 codes and exact integer sums: only float32 rounding of the scaling may differ
    assert max_rel_error(m(x), out) <= 1e-6
