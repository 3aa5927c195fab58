"""graphpress custom ops (``torch.ops.graphpress.*``): a pure-PyTorch reference for each, and kernels.

``REFERENCES`` maps each op to its reference function, which lowering traces for ops that have no rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from graphpress.kernels.gather_nbits import gather_nbits_reference
from graphpress.kernels.matmul_nbits import matmul_nbits_reference
from graphpress.kernels.matmul_w8a8 import matmul_w8a8_reference
from graphpress.kernels.rotary import rotary_embedding_reference

REFERENCES: dict[object, Callable[..., torch.Tensor]] = {
    torch.ops.graphpress.matmul_nbits.default: matmul_nbits_reference,
    torch.ops.graphpress.matmul_w8a8.default: matmul_w8a8_reference,
    torch.ops.graphpress.gather_nbits.default: gather_nbits_reference,
    torch.ops.graphpress.rotary_embedding.default: rotary_embedding_reference,
}
