"""``graphpress::rotary_embedding``: rotary position embedding in the rotate-half form (Llama, Mistral, Qwen...).

    x   [B, H, S, D] float           queries or keys, heads before sequence
    cos [B or 1, 1, S, D] float      cos of position * frequency, the D/2 frequencies repeated twice
    sin like cos
    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

The reference is those four ops (what the model computed before ``fuse_rotary``); the onnxruntime lowering is
one ONNX RotaryEmbedding (opset 23), which reads cos[..., :D/2] and so needs the halves to repeat, which
``fuse_rotary`` checks before it fuses. The op is linear in x, so its backward is the transposed rotation.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_transposed(y: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``rotate_half``: <rotate_half(x), y> = <x, rotate_half_transposed(y)>."""
    half = y.shape[-1] // 2
    return torch.cat((y[..., half:], -y[..., :half]), dim=-1)


def rotary_embedding_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


rotary_embedding = torch.library.custom_op("graphpress::rotary_embedding", rotary_embedding_reference,
                                           mutates_args=())


@rotary_embedding.register_fake
def _(x, cos, sin):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, cos, sin = inputs
    ctx.save_for_backward(x, cos, sin)


def _backward(ctx, grad):  # noqa: ANN001, ANN202
    x, cos, sin = ctx.saved_tensors
    grad_x = grad * cos + rotate_half_transposed(grad * sin) if ctx.needs_input_grad[0] else None
    grad_cos = (grad * x).sum_to_size(cos.shape) if ctx.needs_input_grad[1] else None
    grad_sin = (grad * rotate_half(x)).sum_to_size(sin.shape) if ctx.needs_input_grad[2] else None
    return grad_x, grad_cos, grad_sin


rotary_embedding.register_autograd(_backward, setup_context=_setup)
