"""Each layout is checked against onnxruntime itself: one-node models built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphpress.metrics import max_rel_error
from graphpress.quant.pack import (
    pack_bits,
    pack_gather_block_quantized,
    pack_matmulnbits,
    unpack_bits,
    unpack_gather_block_quantized,
    unpack_matmulnbits,
)
from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.quant.rtn import quantize_rtn

OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def _session(node: onnx.NodeProto, inputs: list, outputs: list, inits: list) -> ort.InferenceSession:
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs, inits), opset_imports=OPSETS)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_matmulnbits(packed, a: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    """Y [M, N] = onnxruntime MatMulNBits(A [M, K], packed)."""
    inits = [numpy_helper.from_array(packed.B, "B"), numpy_helper.from_array(packed.scales, "scales")]
    names = ["A", "B", "scales"]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, "zero_points"))
        names.append("zero_points")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", accuracy_level=accuracy_level,
                            **packed.attrs())
    sess = _session(node, [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a.shape))],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [a.shape[0], packed.N])], inits)
    return sess.run(None, {"A": a})[0]


def run_gather(packed, idx: np.ndarray) -> np.ndarray:
    """onnxruntime GatherBlockQuantized(packed, idx [...]) -> [..., H]."""
    inits = [numpy_helper.from_array(packed.data, "data"), numpy_helper.from_array(packed.scales, "scales")]
    names = ["data", "idx", "scales"]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, "zero_points"))
        names.append("zero_points")
    node = helper.make_node("GatherBlockQuantized", names, ["Y"], domain="com.microsoft", **packed.attrs())
    sess = _session(node, [helper.make_tensor_value_info("idx", TensorProto.INT64, list(idx.shape))],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*idx.shape, packed.hidden])], inits)
    return sess.run(None, {"idx": idx})[0]


def _q(n: int, k: int, spec: QuantSpec, seed: int = 0) -> QuantizedWeight:
    return quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), spec)


# (K, group, block): divisible, not divisible (576 = 4.5 * 128, 96 = 3 * 32), block < group, per channel
SHAPES = [(512, 128, None), (576, 128, None), (96, 32, None), (576, 128, 32), (96, None, 64)]


def test_nibble_order() -> None:
    assert pack_bits(np.array([[1, 2, 3]], np.uint8), 4).tolist() == [[0x21, 0x03]]  # even index: low nibble
    codes = np.random.default_rng(0).integers(0, 16, (3, 7, 33)).astype(np.uint8)
    assert np.array_equal(unpack_bits(pack_bits(codes, 4), 4, 33), codes)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_round_trip(bits: int, symmetric: bool) -> None:
    q = _q(40, 576, QuantSpec(bits, 128, symmetric))
    p = pack_matmulnbits(q)
    assert p.B.shape == (40, 5, 128 * bits // 8) and p.scales.shape == (40, 5)
    assert (p.zero_points is None) == symmetric
    if not symmetric:
        assert p.zero_points.shape == (40, -(-5 * bits // 8))
    back = unpack_matmulnbits(p)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert torch.equal(back.zeros, q.zeros) and back.spec == q.spec


@pytest.mark.parametrize("k, group, block", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_matches_onnxruntime(bits: int, symmetric: bool, k: int, group: int | None,
                                         block: int | None) -> None:
    q = _q(24, k, QuantSpec(bits, group, symmetric))
    a = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    ref = a @ q.dequantize().T
    # symmetric: once relying on the op's default zero point 2^(bits-1), once writing it out
    for zp in (None, True):
        y = run_matmulnbits(pack_matmulnbits(q, block, zero_points=zp), a.numpy())
        assert max_rel_error(ref, torch.from_numpy(y)) < 1e-5


def test_matmulnbits_int8_compute_mode() -> None:
    # accuracy_level 4 quantizes A to int8 inside onnxruntime: lossy, but on the same weights
    q = _q(32, 576, QuantSpec(4, 128, True))
    a = torch.randn(3, 576, generator=torch.Generator().manual_seed(2))
    y = run_matmulnbits(pack_matmulnbits(q), a.numpy(), accuracy_level=4)
    assert max_rel_error(a @ q.dequantize().T, torch.from_numpy(y)) < 2e-2


@pytest.mark.parametrize("h, group, block", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_matches_onnxruntime(bits: int, symmetric: bool, h: int, group: int | None,
                                                    block: int | None) -> None:
    v = 50
    q = _q(v, h, QuantSpec(bits, group, symmetric))
    idx = np.random.default_rng(0).integers(0, v, (2, 7)).astype(np.int64)
    ref = q.dequantize()[torch.from_numpy(idx)]  # [2, 7, H]
    for zp in (None, True):
        p = pack_gather_block_quantized(q, block, zero_points=zp)
        assert p.data.shape == (v, h * bits // 8)
        assert max_rel_error(ref, torch.from_numpy(run_gather(p, idx))) < 1e-6


def test_gather_block_quantized_round_trip() -> None:
    q = _q(50, 576, QuantSpec(4, 128, False))
    back = unpack_gather_block_quantized(pack_gather_block_quantized(q))
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert torch.equal(back.zeros, q.zeros)


def test_pack_refusals() -> None:
    q = _q(8, 128, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="larger than the weight's group size"):
        pack_matmulnbits(q, 64)
    with pytest.raises(ValueError, match="power of two"):
        pack_matmulnbits(q, 24)
    with pytest.raises(ValueError, match="zero_points=False"):
        pack_matmulnbits(q, zero_points=False)  # asymmetric: the default zero point would be wrong
    with pytest.raises(ValueError, match="odd"):
        pack_gather_block_quantized(_q(8, 97, QuantSpec(4, 32)))
