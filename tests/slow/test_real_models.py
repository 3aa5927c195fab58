"""Slow tier: the embedded real models (SmolLM2-135M, MiniLM-L6). Skipped with `-m "not slow"`."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from graphpress import evaluation as ev
from graphpress.capture import capture
from graphpress.cli import main
from graphpress.compress import resolve_source, sample_inputs
from graphpress.metrics import max_rel_error
from graphpress.passes import PASSES
from graphpress.program import Program
from graphpress.runner import run_pipeline

pytestmark = pytest.mark.slow

EXACT = ["remove_noops", "fold_batchnorm", "fold_norm_scales", "merge_sibling_linears"]


@lru_cache(maxsize=2)
def _program(name: str) -> tuple[Program, object]:
    src = resolve_source(name)
    return capture(src.model, sample_inputs(src), name=name, kind=src.kind), src


def _fresh_batch(program: Program, src) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """Real text of another shape than the sample: 3 rows."""
    if program.kind == "causal-lm":
        return (ev.eval_windows(ev.token_stream(src.tokenizer))[:3, :100],)
    enc = src.tokenizer(ev.sentences(3), padding=True, return_tensors="pt")
    return (enc["input_ids"], enc["attention_mask"])


@pytest.mark.parametrize("model", ["smollm2-135m", "minilm-l6"])
@pytest.mark.parametrize("pass_name", EXACT)
def test_exact_pass_holds_1e4_on_real_models(model: str, pass_name: str) -> None:
    program, src = _program(model)
    out, records = run_pipeline(program, [PASSES[pass_name]()], exact_tolerance=1e-4)
    batch = _fresh_batch(program, src)
    assert max_rel_error(program(*batch), out(*batch)) <= 1e-4
    assert records[0].error["max_rel"] <= 1e-4


def test_all_exact_passes_together_fire_on_smollm2() -> None:
    program, src = _program("smollm2-135m")
    out, records = run_pipeline(program, [PASSES[n]() for n in EXACT])
    stats = {r.name: r.stats for r in records}
    assert stats["fold_norm_scales"]["folded_norms"] == 60  # 30 layers x (input, post-attention) norms
    assert stats["merge_sibling_linears"]["groups"] == 60  # q/k/v and gate/up in each layer
    batch = _fresh_batch(program, src)
    assert max_rel_error(program(*batch), out(*batch)) <= 1e-4


def test_default_compress_keeps_the_fp32_perplexity_in_onnxruntime(tmp_path: Path) -> None:
    out = tmp_path / "default"
    assert main(["compress", "--out", str(out)]) == 0  # --eval-torch: tests/test_cli.py, on a tiny model
    report = json.loads((out / "report.json").read_text())
    evals = report["evaluation"]
    assert report["model"]["name"] == "smollm2-135m"
    assert evals["before"]["value"] == pytest.approx(14.94, abs=0.05)  # the protocol's fp32 perplexity
    assert evals["after_onnx"]["value"] == pytest.approx(evals["before"]["value"], rel=0.005)
