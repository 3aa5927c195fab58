"""The W8A8 Triton kernels against the op's reference (graphpress.kernels.quantized.w8a8_product): the same
int8 activations exactly, and outputs at SQNR >= 45 dB against the fp32 product of the same integers. GPU only."""

from __future__ import annotations

import pytest
import torch

from graphpress.kernels.quantized import quantized_linear_reference
from graphpress.metrics import sqnr
from graphpress.quant.int8 import quantize_rows_uint8
from graphpress.quant.qweight import QuantSpec
from graphpress.quant.rtn import quantize_rtn
from tests.kernels.cuda_graphs import replays_like_eager

pytestmark = pytest.mark.gpu


def _case(m: int, n: int, k: int, bits: int, group: int, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = quantize_rtn(torch.randn(n, k, generator=g) * 0.05, QuantSpec(bits, group, bits == 8))
    qweight, scales, zeros = q.packed()
    x = torch.randn(m, k, generator=g) * 4
    x[0] = 0  # an all-zero row
    b = torch.randn(n, generator=g) if bias else None
    return x, qweight, scales, zeros, b


@pytest.mark.parametrize(("m", "n", "k", "bits", "group", "bias"), [
    (256, 4096, 4096, 8, 4096, False),
    (300, 1000, 1000, 8, 1000, True),  # M, N, K off the tiles
    (64, 512, 1536, 4, 128, True),  # 4-bit grouped weights requantized per channel (the reference's rule)
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activations_and_products_match_the_reference(m, n, k, bits, group, bias, dtype) -> None:  # noqa: ANN001
    from graphpress.kernels.triton_w8a8 import candidates, launch, prepared, quantize_rows

    x, qweight, scales, zeros, b = _case(m, n, k, bits, group, bias, seed=m)
    x = x.to(dtype)
    ref = quantized_linear_reference(x.float(), qweight, scales, zeros, b, k, bits, group, 8)
    codes, _, zero, rows = quantize_rows_uint8(x.float())
    cuda = [t.cuda() if t is not None else None for t in (x, qweight, scales, zeros, b)]
    c, r, sz = quantize_rows(cuda[0])
    assert torch.equal(c.cpu().to(torch.int16) + 128, codes.to(torch.int16))
    assert torch.equal(r.cpu(), rows) and sz[1].item() == zero.item()
    q, s, qsum = prepared(cuda[1], cuda[2], cuda[3], k, bits, group)
    for config in candidates(k):  # plain and tensor-descriptor loads (K a multiple of 16)
        out = launch(config, c, r, sz, q, s, qsum, cuda[4], dtype)
        assert out.dtype == dtype and out.shape == (m, n)
        assert sqnr(ref, out.float().cpu()) >= 45, config


def test_the_op_runs_w8a8_on_cuda_and_under_cuda_graphs() -> None:
    from graphpress.kernels import cuda, triton_w8a8

    x, qweight, scales, zeros, b = _case(32, 2048, 2048, 8, 2048, True, seed=5)
    ref = quantized_linear_reference(x, qweight, scales, zeros, b, 2048, 8, 2048, 8)
    x = x.cuda().bfloat16()
    args = (qweight.cuda(), scales.cuda(), None, b.cuda(), 2048, 8, 2048, 8)
    before = cuda.CALLS["w8a8"]
    out = torch.ops.graphpress.quantized_linear(x[None], *args)[0]  # tunes the shape before the capture
    assert cuda.CALLS["w8a8"] == before + 1 and triton_w8a8.TUNER.chosen
    assert sqnr(ref, out.float().cpu()) >= 40  # against fp32 activations: bf16 input rounding included
    replays_like_eager(x, args)
