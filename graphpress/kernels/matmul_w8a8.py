"""``graphpress::matmul_w8a8``: y = dequant(quant(x)) @ dequant(W) (+ bias), int8 weights and int8 activations.

Weights are quantized once, symmetric per output channel; activations are quantized on the fly, symmetric per
token (one scale per row of x). The integer product is exact, so the only rounding is the two quantizations:

    x:      [..., K] float32
    qweight [K, N] int8           codes in [-127, 127], stored transposed: the layout of ONNX MatMulInteger's B
    scales  [N] float32           w[n, k] = qweight[k, n] * scales[n]
    bias    [N] float32 or None

    x_s = absmax(x, -1) / 127  (1 for an all-zero row)        [..., 1]
    x_q = round_half_even(x / x_s)                            [..., K]  in [-127, 127]
    y   = (float(x_q @ qweight) * x_s) * scales (+ bias)      the products in exactly this order

That order is the order of the onnxruntime lowering (``graphpress.lowering.onnxruntime_rules``: Abs,
ReduceMax, Div, Round, MatMulInteger, Cast, Mul, Mul), whose every step is exact or correctly rounded, so this
reference and onnxruntime compute the same codes and the same sums from the same x (tests: max relative
difference ~1e-7). Within a whole model x itself differs by float rounding (onnxruntime fuses LayerNorm,
GELU, ...); a value on the other side of a rounding boundary changes its code by one, and such flips spread
through attention. Real models therefore agree less closely than the op: onnxruntime against torch measured
39 dB on MiniLM-L6 and 31 dB on SmolLM2-135M, against 26 and 24 dB of quantization error, and perturbing
MiniLM's LayerNorm weights by 1e-7 in torch alone moves its output as much.

The weight is stored as MatMulInteger's B, not in MatMulNBits' layout, because that is the op the lowering
uses (see the rule for the measurements). The integer product is computed here as a float64 matmul: exact
for |acc| <= 127 * 127 * K < 2^53, and on BLAS, unlike an int64 matmul.
"""

from __future__ import annotations

import torch

from graphpress.quant.int8 import quantize_per_token_int8


def matmul_w8a8_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    x_q, x_s = quantize_per_token_int8(x)  # [..., K] int8, [...]
    acc = (x_q.double() @ qweight.double()).float()  # [..., N]; exact integers, rounded once to float32
    y = acc * x_s[..., None] * scales
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


matmul_w8a8 = torch.library.custom_op("graphpress::matmul_w8a8", matmul_w8a8_reference, mutates_args=())


@matmul_w8a8.register_fake
def _(x, qweight, scales, bias):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
