"""The grouped integer weight format shared by RTN, GPTQ, AWQ and the ONNX lowering.

    w [N, K]  ->  codes [N, Kp] uint8,  scales [N, G] float32,  zeros [N, G] uint8
    w_hat[n, k] = (codes[n, k] - zeros[n, k // g]) * scales[n, k // g]

with g the group length (``group_size``, or K for per-output-channel), G = ceil(K / g) and Kp = G * g.
``packed()`` stores it as the program does (graphpress.kernels.quantized: codes packed along K, zero points
packed alike, None for symmetric); every target's layout is a relayout of those bytes, never a
requantization.

Conventions
- Codes are unsigned, 0 .. 2^b - 1, for both modes, so one format covers both.
- Asymmetric: the range [lo, hi] always contains 0 (lo = min(w, 0), hi = max(w, 0));
  scale = (hi - lo) / (2^b - 1), zero = clamp(round(-lo / scale), 0, 2^b - 1). Zero is then exact.
- Symmetric: zero = 2^(b-1) (the implied zero point of unsigned codes), so codes - zero lies in
  [-2^(b-1), 2^(b-1) - 1]. The scale's sign is chosen so that the group's largest-magnitude weight lands
  exactly on -2^(b-1) (the side with the extra code): scale = -w_extreme / 2^(b-1), negative when the extreme
  is positive. Symmetric scales may therefore be negative; the dequantization formula is unchanged.
  Measured on random weights [576, 1536] (int4, group 128, with range search), SQNR in dB:
      absmax / 7: 19.86   absmax / 7.5: 19.91   absmax / 8: 19.89   max(-lo / 8, hi / 7): 19.91   signed: 20.29
  and the signed choice is the best of these for groups 32, 128 and per channel, 4 and 8 bits, normal and
  heavy-tailed (Student t, 3 dof) weights, by 0.3 to 0.5 dB at 4 bits (it is llama.cpp's Q4_0 rule).
- Padding: columns K..Kp are zero weights; they quantize to the zero point and dequantize to exactly 0.
  Because every range contains 0, zero padding cannot move lo, hi or absmax, and it adds no error to a
  range search: the statistics are those of the real columns alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight: bit width, group length along K (None: one group per output row), mode."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"QuantSpec: bits={self.bits} is not supported; use 4 or 8")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 2 or g * self.bits % 8):
            raise ValueError(
                f"QuantSpec: group_size={g} must be an integer >= 2 whose codes fill whole bytes "
                f"({8 // self.bits if self.bits < 8 else 1} divides it), or None for one group per output channel"
            )

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def midpoint(self) -> int:
        return 1 << (self.bits - 1)

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def n_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_len(in_features))

    def padded_k(self, in_features: int) -> int:
        return self.n_groups(in_features) * self.group_len(in_features)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [N, K] as unsigned codes [N, Kp] with per-group scales and zero points [N, G]."""

    codes: torch.Tensor  # [N, Kp] uint8
    scales: torch.Tensor  # [N, G] float32
    zeros: torch.Tensor  # [N, G] uint8; symmetric: all 2^(bits-1)
    spec: QuantSpec
    in_features: int  # K, before padding

    def __post_init__(self) -> None:
        n, k, s = self.codes.shape[0], self.in_features, self.spec
        want = {"codes": ((n, s.padded_k(k)), torch.uint8), "scales": ((n, s.n_groups(k)), torch.float32),
                "zeros": ((n, s.n_groups(k)), torch.uint8)}
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"QuantizedWeight: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} "
                    f"for K={k} and {s}"
                )

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def group_len(self) -> int:
        return self.spec.group_len(self.in_features)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec, in_features: int
    ) -> QuantizedWeight:
        """Build from codes [N, K] or [N, Kp] (any dtype holding integers); padding gets the zero point."""
        n, kp, g = codes.shape[0], spec.padded_k(in_features), spec.group_len(in_features)
        # codes of padding columns = zero point of their group, so they dequantize to exactly 0
        full = zeros.to(torch.uint8).repeat_interleave(g, dim=1).clone()  # [N, Kp]
        full[:, :in_features] = codes[:, :in_features].round().to(torch.uint8)
        return cls(full.reshape(n, kp), scales.float().contiguous(), zeros.to(torch.uint8).contiguous(), spec,
                   in_features)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight [N, ceil(Kp * bits / 8)], scales [N, G], zeros [N, ceil(G * bits / 8)] or None when
        symmetric): the tensors of ``graphpress::quantized_linear`` / ``quantized_embedding``."""
        zeros = None if self.spec.symmetric else pack_codes(self.zeros, self.spec.bits)
        return pack_codes(self.codes, self.spec.bits), self.scales, zeros

    def dequantize(self) -> torch.Tensor:
        """w_hat [N, K] float32, padding dropped."""
        n, g = self.out_features, self.group_len
        c = self.codes.float().view(n, -1, g)  # [N, G, g]
        w = (c - self.zeros.float()[..., None]) * self.scales[..., None]
        return w.reshape(n, -1)[:, : self.in_features]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] -> bytes [..., ceil(n * bits / 8)]; 4 bits: element 2i low nibble, 2i+1 high."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return ((codes[..., 0::2] & 0xF) | (codes[..., 1::2] << 4)).contiguous()


def check_weight(w: torch.Tensor, what: str) -> None:
    """Refuse what no quantizer here can handle, naming the caller."""
    if w.ndim != 2:
        raise ValueError(f"{what}: weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{what}: weight of shape {tuple(w.shape)} is empty; nothing to quantize")
    # NaN or inf anywhere makes the sum NaN or inf: one reduction, no [N, K] mask, for the common case (the
    # scale searches call this on every candidate); a finite overflow falls through to the exact test
    if not torch.isfinite(w.sum()) and not torch.isfinite(w).all():
        raise ValueError(f"{what}: weight of shape {tuple(w.shape)} has NaN or inf entries")


def group_columns(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w [N, K] -> [N, G, g] float32, the last group padded with zero columns."""
    n, k = w.shape
    kp = spec.padded_k(k)
    w = w.float()
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    return w.reshape(n, spec.n_groups(k), spec.group_len(k))


def minmax_qparams(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both float, same shape as lo / hi) that cover [min(lo, 0), max(hi, 0)]."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if spec.symmetric:
        # the extreme weight maps onto codes - zero = -2^(b-1); the scale is negative when it is positive
        scale = torch.where(-lo >= hi, -lo, -hi) / spec.midpoint
    else:
        scale = (hi - lo) / spec.qmax
    # an all-zero group: any nonzero scale represents it exactly
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    if spec.symmetric:
        zero = torch.full_like(scale, float(spec.midpoint))
    else:
        zero = torch.round(-lo / scale).clamp(0, spec.qmax)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Float codes clamp(round(w / scale) + zero, 0, qmax); scale and zero broadcast against w."""
    return torch.round(w / scale).add_(zero).clamp_(0, spec.qmax)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Quantize then dequantize: (codes - zero) * scale."""
    return quantize_codes(w, scale, zero, spec).sub_(zero).mul_(scale)
