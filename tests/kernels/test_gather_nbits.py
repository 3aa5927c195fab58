from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.kernels.gather_nbits import gather_nbits_reference
from graphpress.kernels.matmul_nbits import dequantize_nbits
from graphpress.lowering.onnx import export_onnx
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.quant.pack import pack_matmulnbits
from graphpress.quant.qweight import QuantSpec
from graphpress.quant.rtn import quantize_rtn


def _packed(v: int, h: int, bits: int, block: int, symmetric: bool) -> dict[str, torch.Tensor | None]:
    w = torch.randn(v, h, generator=torch.Generator().manual_seed(0))
    p = pack_matmulnbits(quantize_rtn(w, QuantSpec(bits, block, symmetric)), block)
    zeros = None if p.zero_points is None else torch.from_numpy(p.zero_points)
    return {"qweight": torch.from_numpy(p.B), "scales": torch.from_numpy(p.scales), "zeros": zeros}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_reference_is_dequantize_then_index(bits: int, symmetric: bool) -> None:
    v, h, block = 50, 96, 32  # 3 blocks: an odd count of 4-bit zero points
    t = _packed(v, h, bits, block, symmetric)
    ids = torch.randint(0, v, (3, 7), generator=torch.Generator().manual_seed(1))
    table = dequantize_nbits(t["qweight"], t["scales"], t["zeros"], h, bits, block)  # [V, H]
    out = gather_nbits_reference(t["qweight"], t["scales"], t["zeros"], ids, bits, block, h)
    assert out.shape == (3, 7, h) and out.dtype == torch.float32
    assert torch.equal(out, table[ids])


def test_reference_refuses_a_block_that_does_not_divide_h() -> None:
    t = _packed(8, 96, 8, 32, False)
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        gather_nbits_reference(t["qweight"], t["scales"], t["zeros"], torch.zeros(2, dtype=torch.long), 8, 64, 96)


class _Tied(nn.Module):
    """One packed table read by gather_nbits (embedding) and by matmul_nbits (tied output projection)."""

    def __init__(self, v: int, h: int, bits: int, block: int, symmetric: bool, project: bool = True) -> None:
        super().__init__()
        self.v, self.h, self.bits, self.block, self.project = v, h, bits, block, project
        for name, t in _packed(v, h, bits, block, symmetric).items():
            self.register_buffer(name, t)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.ops.graphpress.gather_nbits(self.qweight, self.scales, self.zeros, ids, self.bits, self.block,
                                              self.h)
        if not self.project:
            return x
        return torch.ops.graphpress.matmul_nbits(torch.tanh(x), self.qweight, self.scales, self.zeros, None,
                                                 self.h, self.v, self.bits, self.block)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_in_onnxruntime_matches_reference(tmp_path, bits: int, symmetric: bool) -> None:
    module = _Tied(50, 96, bits, 32, symmetric, project=False)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    program = capture(module, (ids,), dynamic_dims=[{0: "batch", 1: "seq"}])
    result = export_onnx(program, tmp_path / "m.onnx", rules=onnxruntime_rules(accuracy_level=0), tolerance=1e-6)
    assert result.lowered == {"graphpress.gather_nbits.default": 1}
    # the Reshape of the packed table to GatherBlockQuantized's [V, H * bits / 8] view is left to onnxruntime
    assert {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node} == {"GatherBlockQuantized", "Reshape"}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_tied_table_is_stored_once_in_onnx(tmp_path, bits: int, symmetric: bool) -> None:
    # V * H * bits / 8 > 8192 bytes: below that the exporter constant-folds the reshape into a copy
    v, h, block = 512, 96, 32
    module = _Tied(v, h, bits, block, symmetric)
    ids = torch.randint(0, v, (2, 9), generator=torch.Generator().manual_seed(2))
    program = capture(module, (ids,), dynamic_dims=[{0: "batch", 1: "seq"}])
    path = tmp_path / "m.onnx"
    result = export_onnx(program, path, rules=onnxruntime_rules(accuracy_level=0), tolerance=1e-5)
    assert result.lowered == {"graphpress.gather_nbits.default": 1, "graphpress.matmul_nbits.default": 1}
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"GatherBlockQuantized", "MatMulNBits"} <= ops
    # one stored table, read by both ops: the file holds its bytes once
    table_bytes = v * h * bits // 8
    data = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8
            and len(i.raw_data) == table_bytes]
    assert len(data) == 1
    assert path.stat().st_size < 1.5 * table_bytes + 40_000
