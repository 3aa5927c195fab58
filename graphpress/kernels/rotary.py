"""``graphpress::rotary_embedding``: rotary position embedding in the rotate-half form (Llama, Mistral, Qwen...).

    x   [B, H, S, D] float           queries or keys, heads before sequence
    cos [B or 1, 1, S, D] float      cos of position * frequency, the D/2 frequencies repeated twice
    sin like cos
    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

The reference is those four ops (what the model computed before ``fuse_rotary``); the onnxruntime lowering is
one ONNX RotaryEmbedding (opset 23), which reads cos[..., :D/2] and so needs the halves to repeat, which
``fuse_rotary`` checks before it fuses.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


rotary_embedding = torch.library.custom_op("graphpress::rotary_embedding", rotary_embedding_reference,
                                           mutates_args=())


@rotary_embedding.register_fake
def _(x, cos, sin):  # noqa: ANN001, ANN202
    return torch.empty_like(x)
