"""fuse_rms_norm / fuse_rotary: the decomposed patterns become one op each, exactly; the ONNX file holds
RMSNormalization / RotaryEmbedding / Attention; matches with a second reader or unrepeated halves are left."""

from __future__ import annotations

import onnx
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.graph import aten, is_op
from graphpress.lowering.onnx import export_onnx, ort_forward
from graphpress.metrics import max_rel_error
from graphpress.passes import PASSES
from graphpress.passes.fuse import FuseRMSNorm, FuseRotary
from graphpress.program import Program
from graphpress.runner import run_pipeline
from tests.passes.test_fold_norms import fresh_batch

ROTARY = torch.ops.graphpress.rotary_embedding.default


def count(program: Program, target: object) -> int:
    return sum(1 for n in program.gm.graph.nodes if is_op(n, target))


def test_llama_norms_and_rotaries_fuse_exactly_and_export_as_single_ops(llama: Program, tmp_path) -> None:
    passes = [PASSES["remove_noops"](), PASSES["fold_norm_scales"](), FuseRMSNorm(), FuseRotary()]
    out, records = run_pipeline(llama, passes, verify=True)
    # tiny llama: 2 layers x 2 norms + the final norm; q and k rotated in each layer
    assert records[2].stats == {"fused": 5, "skipped": {}}
    assert records[3].stats == {"fused": 4, "skipped": {}}
    assert count(out, aten.rms_norm.default) == 5 and count(out, ROTARY) == 4
    assert count(out, aten.rsqrt.default) == 0 and count(out, aten.neg.default) == 0
    batch = fresh_batch(llama)
    assert max_rel_error(llama(*batch), out(*batch)) <= 1e-5
    path = tmp_path / "m.onnx"
    export_onnx(out, path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # onnxruntime's RMS norm, four of them fused with the residual add before them
    assert ops.count("SkipSimplifiedLayerNormalization") == 4 and ops.count("SimplifiedLayerNormalization") == 1
    assert ops.count("RotaryEmbedding") == 4 and ops.count("Attention") == 2
    assert "Softmax" not in ops and "ReduceMean" not in ops
    assert max_rel_error(out(*batch), torch.from_numpy(ort_forward(path)(*batch))) <= 1e-4


class _Norms(nn.Module):
    """Two RMSNorms over the last dim; the second one's inverse RMS is also returned."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        inv = torch.rsqrt((a * a).mean(-1, keepdim=True) + 1e-5)
        return a * inv, inv


def test_norm_whose_intermediate_is_read_elsewhere_is_left() -> None:
    program = capture(_Norms(), (torch.randn(2, 3, 16),))
    out, records = run_pipeline(program, [FuseRMSNorm()], verify=True)
    assert records[0].stats["fused"] == 1
    assert list(records[0].stats["skipped"].values()) == ["an intermediate of the norm has another reader"]
    norm = next(n for n in out.gm.graph.nodes if is_op(n, aten.rms_norm.default))
    assert norm.args[2] is not None and norm.args[3] == 1e-6  # the weight multiply became the norm's weight
    x = torch.randn(2, 3, 16)  # static shapes: captured without dynamic dims
    for a, b in zip(program(x), out(x), strict=True):
        assert max_rel_error(a, b) <= 1e-6


class _Rotary(nn.Module):
    """q [B, H, S, D] rotated with cos/sin whose halves repeat (RoPE) or not."""

    def __init__(self, repeat: bool, until: int | None = None) -> None:
        super().__init__()
        self.repeat, self.until = repeat, until  # until: the halves repeat only for positions below it

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        s, d = q.shape[2], q.shape[3]
        pos = torch.arange(s, dtype=torch.float32)[:, None]
        freq = 1.0 / 100 ** (torch.arange(d // 2, dtype=torch.float32) / (d // 2))
        angles = pos * freq
        second = angles if self.repeat else angles * 2
        if self.until is not None:
            second = torch.where(pos < self.until, angles, angles * 2)
        angles = torch.cat((angles, second), -1)[None, None]
        rotated = torch.cat((-q[..., d // 2:], q[..., : d // 2]), -1)
        return q * angles.cos() + rotated * angles.sin()


def test_rotary_fuses_only_when_the_halves_repeat(tmp_path) -> None:
    q = torch.randn(2, 3, 5, 8)
    fused, records = run_pipeline(capture(_Rotary(True), (q,)), [FuseRotary()], verify=True)
    assert records[0].stats == {"fused": 1, "skipped": {}}
    path = tmp_path / "rot.onnx"
    export_onnx(fused, path)
    assert "RotaryEmbedding" in [n.op_type for n in onnx.load(str(path)).graph.node]
    kept, records = run_pipeline(capture(_Rotary(False), (q,)), [FuseRotary()], verify=True)
    assert records[0].stats["fused"] == 0 and count(kept, ROTARY) == 0
    assert "halves of cos differ" in next(iter(records[0].stats["skipped"].values()))


def test_rotary_whose_halves_repeat_only_on_the_sample_positions_is_left() -> None:
    q = torch.randn(2, 3, 5, 8)  # positions 0..4 on the sample; the probe batch reaches 0..14
    program = capture(_Rotary(True, until=5), (q,), dynamic_dims=[{0: "batch", 2: "seq"}])
    kept, records = run_pipeline(program, [FuseRotary()], verify=True)
    assert records[0].stats["fused"] == 0 and count(kept, ROTARY) == 0
    assert "halves of cos differ on the probe batch" in next(iter(records[0].stats["skipped"].values()))
