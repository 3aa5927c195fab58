"""Error measures between a reference output and a rewritten one."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - out|^2); inf when equal."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def max_abs_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (ref.double() - out.double()).abs().max().item() if ref.numel() else 0.0


def max_rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |ref - out| / max |ref|: relative to the output's scale, so elements near zero do not blow up."""
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    err = max_abs_error(ref, out)
    return err / scale if scale > 0 else err


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    return {"max_abs": max_abs_error(ref, out), "max_rel": max_rel_error(ref, out), "sqnr_db": sqnr(ref, out)}


def compare_outputs(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor], names: Sequence[str]
                    ) -> tuple[dict[str, float], str]:
    """``compare`` on every output; the worst of each measure, and the name of the output with the worst
    relative error."""
    if len(ref) != len(out):
        raise ValueError(f"{len(out)} outputs where {len(ref)} were expected")
    errors = [compare(r, o) for r, o in zip(ref, out, strict=True)]
    worst = max(range(len(errors)), key=lambda i: errors[i]["max_rel"])
    merged = {"max_abs": max(e["max_abs"] for e in errors), "max_rel": errors[worst]["max_rel"],
              "sqnr_db": min(e["sqnr_db"] for e in errors)}
    return merged, names[worst] if worst < len(names) else str(worst)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a causal LM's logits [B, T, V] against the next token of ``ids`` [B, T]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1), reduction=reduction)


def lm_loss(out: object, batch: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The next-token loss of a causal language model's output on its batch (token ids first); None when the
    program is not one (its first output is not logits [B, T, V] over the ids [B, T])."""
    logits = out[0] if isinstance(out, (tuple, list)) else out
    ids = batch[0] if batch else None
    if (not isinstance(logits, torch.Tensor) or not isinstance(ids, torch.Tensor) or logits.dim() != 3
            or ids.dim() != 2 or ids.is_floating_point() or logits.shape[:2] != ids.shape
            or int(ids.max()) >= logits.shape[-1]):
        return None
    return next_token_loss(logits, ids)
