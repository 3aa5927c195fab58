"""Program.save / Program.load: a compressed program reloads in a fresh process without re-running passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graphpress.lowering.onnx import export_onnx, ort_forward
from graphpress.program import Program
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline
from tests.conftest import capture_tiny

RELOAD = """
import sys
from graphpress.lowering.onnx import export_onnx
from graphpress.program import Program
program = Program.load(sys.argv[1])
assert program.output_names == ("logits",) and program.dynamic_dims[0] == {0: "batch", 1: "seq"}
export_onnx(program, sys.argv[2])
"""


def test_a_w4_program_reloads_in_a_fresh_process_and_exports_the_same(tmp_path: Path) -> None:
    program = capture_tiny("llama")
    calibration = [(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2)),)]
    compressed, _ = run_pipeline(program, load_recipe("w4-rtn").passes, calibration=calibration)
    saved = compressed.save(tmp_path / "w4.pt2")
    first = export_onnx(compressed, tmp_path / "first.onnx")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(saved), str(tmp_path / "second.onnx")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    ids = torch.randint(0, 128, (3, 21), generator=torch.Generator().manual_seed(3))
    a = ort_forward(first.path)(ids)
    b = ort_forward(tmp_path / "second.onnx")(ids)
    np.testing.assert_array_equal(a, b)
    reloaded = Program.load(saved)  # and in this process, it computes what the program did
    torch.testing.assert_close(reloaded(ids), compressed(ids))


def test_loading_what_graphpress_did_not_save_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    ep = torch.export.export(model, (torch.randn(2, 3),))
    torch.export.save(ep, tmp_path / "plain.pt2")
    with pytest.raises(ValueError, match="not saved by graphpress"):
        Program.load(tmp_path / "plain.pt2")


def test_the_provenance_record_survives_save_and_load(tmp_path: Path) -> None:
    from graphpress.passes.merge_siblings import MergeSiblingLinears
    from graphpress.provenance import KEY, unmerge

    program = capture_tiny("llama")
    merged, _ = run_pipeline(program, [MergeSiblingLinears()], verify=False)
    reloaded = Program.load(merged.save(tmp_path / "merged.pt2"))
    assert reloaded.gm.meta[KEY] == merged.gm.meta[KEY] and len(merged.gm.meta[KEY]) == 4
    originals = dict(program.gm.named_parameters())
    unmerged = unmerge(reloaded)
    assert "model.layers.1.self_attn.v_proj.weight" in unmerged
    for name, t in unmerged.items():
        assert torch.equal(t, originals[name]), name


def test_to_moves_the_weights_and_the_tensors_the_graph_makes(tmp_path: Path) -> None:
    """On the meta device every tensor the graph makes must follow (arange and zeros name no device in the
    exported graph: they would make CPU tensors, and mixing them with meta ones fails the run); a reloaded
    program moves too."""
    program = capture_tiny("llama")
    calibration = [(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2)),)]
    compressed, _ = run_pipeline(program.clone(), load_recipe("w4-rtn").passes, calibration=calibration)
    factories = {n.target for n in program.gm.graph.nodes if n.op == "call_function"} & {
        torch.ops.aten.arange.default, torch.ops.aten.zeros.default}
    assert factories  # what the test is about
    for p in (program, compressed, Program.load(compressed.save(tmp_path / "w4.pt2"))):
        moved = p.to("meta")
        assert moved is p and all(t.device.type == "meta" for t in list(p.gm.parameters()) + list(p.gm.buffers()))
        out = p(torch.zeros(2, 7, dtype=torch.long, device="meta"))
        out = out[0] if isinstance(out, (tuple, list)) else out
        assert out.device.type == "meta" and out.shape == (2, 7, 128)
