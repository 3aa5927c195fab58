"""Pure tensor math of weight quantization (no graph code): the format, quantizers, scales."""

from graphpress.quant.gptq import gptq_quantize, hessian_accumulate, output_error
from graphpress.quant.int8 import (
    int8_matmul_reference,
    quantize_per_token_int8,
    quantize_symmetric_int8_per_channel,
)
from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.quant.rtn import quantize_rtn
from graphpress.quant.scaling import awq_search_scales, smoothquant_scales

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "awq_search_scales",
    "gptq_quantize",
    "hessian_accumulate",
    "int8_matmul_reference",
    "output_error",
    "quantize_per_token_int8",
    "quantize_rtn",
    "quantize_symmetric_int8_per_channel",
    "smoothquant_scales",
]
