"""graphpress custom ops (``torch.ops.graphpress.*``): a pure-PyTorch reference for each, with a backward.

``REFERENCES`` maps each op to its reference function, which lowering traces for ops that have no rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from graphpress.kernels import cuda as _cuda  # noqa: F401  (registers the CUDA implementations)
from graphpress.kernels.attention import cached_attention_reference
from graphpress.kernels.quantized import (
    fake_quantize_activations_reference,
    fake_quantize_reference,
    quantized_embedding_reference,
    quantized_linear_reference,
)
from graphpress.kernels.rotary import rotary_embedding_reference

REFERENCES: dict[object, Callable[..., torch.Tensor]] = {
    torch.ops.graphpress.quantized_linear.default: quantized_linear_reference,
    torch.ops.graphpress.quantized_embedding.default: quantized_embedding_reference,
    torch.ops.graphpress.fake_quantize.default: fake_quantize_reference,
    torch.ops.graphpress.fake_quantize_activations.default: fake_quantize_activations_reference,
    torch.ops.graphpress.rotary_embedding.default: rotary_embedding_reference,
    torch.ops.graphpress.cached_attention.default: cached_attention_reference,
}
