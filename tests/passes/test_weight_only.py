from __future__ import annotations

import onnx
import pytest
import torch

from graphpress.lowering.onnx import check_onnx, export_onnx
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.metrics import sqnr
from graphpress.passes.weight_only import QuantizeRTN
from graphpress.runner import PipelineError, run_pipeline
from tests.conftest import capture_tiny

QLINEAR = torch.ops.graphpress.quantized_linear.default


def _count(program, target) -> int:  # noqa: ANN001
    return sum(1 for n in program.gm.graph.nodes if n.target == target)


@pytest.mark.parametrize(("bits", "group", "floor"), [(8, None, 38.0), (8, 32, 40.0), (4, 32, 18.0)])
def test_rtn_replaces_selected_linears_within_sqnr_floor(bits: int, group: int | None, floor: float) -> None:
    program = capture_tiny("llama")
    out, records = run_pipeline(program, [QuantizeRTN(bits=bits, group_size=group, targets=(r"\.layers\.",))])
    assert records[0].stats["quantized"] == 14  # 7 linears x 2 layers; lm_head is not targeted
    assert _count(out, QLINEAR) == 14 and _count(out, torch.ops.aten.linear.default) == 1
    assert not any(n.endswith("q_proj.weight") for n, _ in out.gm.named_parameters())  # float weights gone
    assert records[0].bytes_after < records[0].bytes_before
    x = (torch.randint(0, 128, (3, 20)),)
    assert sqnr(program(*x), out(*x)) >= floor


def test_rtn_pads_input_dim_not_divisible_by_group() -> None:
    program = capture_tiny("llama")  # hidden 64, intermediate 96: down_proj K=96 is 1.5 groups of 64
    out, _ = run_pipeline(program, [QuantizeRTN(bits=4, group_size=64, targets=("down_proj",))])
    node = next(n for n in out.gm.graph.nodes if n.target == QLINEAR)
    K, bits, group = node.args[5:8]
    assert (K, bits, group) == (96, 4, 64)
    assert out.gm.get_buffer(node.args[1].target).shape == (64, 64)  # 2 groups of 64 codes, 2 per byte


def test_rtn_exports_packed_and_matches_in_onnxruntime(tmp_path) -> None:
    program = capture_tiny("llama")
    out, _ = run_pipeline(program, [QuantizeRTN(bits=4, group_size=32, targets=(r"\.layers\.",))])
    # float compute: onnxruntime computes the program's float product (scales rounded to float16 values)
    result = export_onnx(out, tmp_path / "m.onnx", rules=onnxruntime_rules(accuracy_level=0))
    assert result.lowered == {"graphpress.quantized_linear.default": 14}
    assert result.check["sqnr_db"] > 60 and result.check["floor_db"] == 60.0, result.check
    # int8 activations per block (the target's default) leave the float program behind, measurably
    export_onnx(out, tmp_path / "f.onnx", rules=onnxruntime_rules(accuracy_level=4), check=False)
    assert check_onnx(out, tmp_path / "f.onnx")["sqnr_db"] < result.check["sqnr_db"] - 10
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 14
    # the only float matrices left are scales [N, K / 32] and the (untargeted, tied) embedding / lm_head
    float_2d = [t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type == 1
                and min(t.dims) > 3 and sorted(t.dims) != [64, 128]]
    assert not float_2d, float_2d


def test_rtn_refusals() -> None:
    program = capture_tiny("llama")
    with pytest.raises(PipelineError, match="match no linear layer"):
        run_pipeline(program, [QuantizeRTN(targets=("no_such_module",))])
    with pytest.raises(ValueError, match="bits=3"):
        QuantizeRTN(bits=3)
    with pytest.raises(ValueError, match="group_size=7"):
        QuantizeRTN(group_size=7)  # 4-bit codes of an odd group would share a byte with the next group
    with pytest.raises(PipelineError, match="match no linear layer"):
        run_pipeline(program, [QuantizeRTN(targets=("lm_head",), ignore=("lm_head",))])


def test_tied_head_is_skipped_with_reason() -> None:
    program = capture_tiny("llama")
    _, records = run_pipeline(program, [QuantizeRTN(bits=8)])
    skipped = records[0].stats["skipped"]
    assert "shared with" in skipped["lm_head"], skipped



def test_tie_is_seen_after_cleanup_dropped_the_alias_name() -> None:
    from graphpress.passes.merge_siblings import MergeSiblingLinears

    program = capture_tiny("llama")
    # merge_sibling_linears cleans up, which drops the unread model.embed_tokens.weight name
    out, records = run_pipeline(program, [MergeSiblingLinears(), QuantizeRTN(bits=8)])
    assert "model.embed_tokens.weight" not in dict(out.gm.named_parameters(remove_duplicate=False))
    assert "lm_head" in records[1].stats["skipped"]
