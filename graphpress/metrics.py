"""Error measures between a reference output and a rewritten one."""

from __future__ import annotations

import math

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
