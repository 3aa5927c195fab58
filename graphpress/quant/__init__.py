"""Pure tensor math of weight quantization (no graph code): formats, quantizers, scales, ONNX layouts."""

from graphpress.quant.gptq import gptq_quantize, hessian_accumulate, output_error
from graphpress.quant.int8 import (
    int8_matmul_reference,
    quantize_per_token_int8,
    quantize_symmetric_int8_per_channel,
)
from graphpress.quant.pack import (
    GatherBlockQuantizedWeight,
    MatMulNBitsWeight,
    pack_gather_block_quantized,
    pack_matmulnbits,
    unpack_gather_block_quantized,
    unpack_matmulnbits,
)
from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.quant.rtn import quantize_rtn
from graphpress.quant.scaling import awq_search_scales, smoothquant_scales

__all__ = [
    "GatherBlockQuantizedWeight",
    "MatMulNBitsWeight",
    "QuantSpec",
    "QuantizedWeight",
    "awq_search_scales",
    "gptq_quantize",
    "hessian_accumulate",
    "int8_matmul_reference",
    "output_error",
    "pack_gather_block_quantized",
    "pack_matmulnbits",
    "quantize_per_token_int8",
    "quantize_rtn",
    "quantize_symmetric_int8_per_channel",
    "smoothquant_scales",
    "unpack_gather_block_quantized",
    "unpack_matmulnbits",
]
