"""Every named recipe, unchanged, on tiny random models of several architectures: the passes run (verified),
the program exports to the onnxruntime target with the recipe's options, and onnxruntime agrees with the
torch program within the floor of the rules used (exact ones 60 dB, int8 activations 20 dB).

One recipe of each family runs on all ten architectures; the other recipes (the same passes with other
options, or two families composed) run on a decoder and an encoder: grouped-query Llama and BERT (GPT-2's
Conv1D and fused qkv, and every other architecture, meet each family through the recipes that run everywhere).
``pytest tests/test_recipes_architectures.py --all-architectures`` runs every recipe on all ten."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graphpress.capture import capture
from graphpress.lowering.onnx import export_onnx
from graphpress.lowering.targets import target_rules
from graphpress.program import Program
from graphpress.recipes import load_recipe, named_recipes
from graphpress.runner import PipelineError, run_pipeline
from tests.hf_tiny import ARCHITECTURES, CAUSAL, tiny_model

QUANTIZED = ("graphpress.quantized_linear.default", "graphpress.quantized_embedding.default")


def _program(arch: str) -> tuple[Program, list[tuple[torch.Tensor, ...]]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 16), generator=g)
    if arch in CAUSAL:
        program = capture(tiny_model(arch), (ids,), kind="causal-lm", name=arch)
        batches = [(torch.randint(3, 300, (1, 32), generator=g),) for _ in range(2)]
    else:
        program = capture(tiny_model(arch), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          kind="encoder", name=arch)
        batches = [(torch.randint(3, 300, (1, 32), generator=g), torch.ones(1, 32, dtype=torch.long))
                   for _ in range(2)]
    return program, batches


EVERYWHERE = ("exact", "w4-awq-gptq", "w8a8-smoothquant", "prune-20", "prune-depth-20", "lowrank-20", "sparse-2-4")
VARIANT_ARCHS = ("llama", "bert")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The cases: every recipe on every architecture with ``--all-architectures`` (the "one program" issue's
    bar, measured outside CI: BENCHMARKS.md), else the split above."""
    if "recipe" in metafunc.fixturenames:
        every = metafunc.config.getoption("all_architectures")
        cases = [(arch, recipe) for arch in ARCHITECTURES for recipe in named_recipes()
                 if every or recipe in EVERYWHERE or arch in VARIANT_ARCHS]
        metafunc.parametrize(("arch_program", "recipe"), cases, indirect=["arch_program"])


@pytest.fixture(scope="module")
def arch_program(request: pytest.FixtureRequest) -> tuple[str, Program, list]:
    return request.param, *_program(request.param)


def test_every_family_runs_everywhere() -> None:
    from graphpress.recipes import load_recipe as load

    families = {p.name for r in EVERYWHERE for p in load(r).passes}
    assert families >= {"gptq", "awq", "smoothquant", "prune_heads", "prune_mlp", "prune_layers", "factorize",
                        "sparsify"} & {p.name for r in named_recipes() for p in load(r).passes}
    assert all(r in named_recipes() for r in EVERYWHERE)


def test_named_recipe_runs_and_exports_on_every_architecture(arch_program, recipe: str, tmp_path) -> None:  # noqa: ANN001
    arch, program, batches = arch_program
    rec = load_recipe(recipe)
    passes, training = rec.passes, None
    if rec.needs_training():  # a few steps on random windows: what the recipe trains, not how well
        passes = [dataclasses.replace(p, tokens=4 * 2 * 32, batch=2, held_out=2) if p.name == "distill" else p
                  for p in passes]
        training = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(2))
        if arch not in CAUSAL:
            with pytest.raises(PipelineError, match="distill: trains causal language models"):
                run_pipeline(program, passes, calibration=batches, training=training)
            return
    out, records = run_pipeline(program, passes, calibration=batches, training=training)
    result = export_onnx(out, tmp_path / "m.onnx", rules=target_rules("onnxruntime", rec.target.get("onnxruntime")))
    check = result.check
    assert check["sqnr_db"] >= check["floor_db"]  # export_onnx enforces it; the floor is the rules'
    if recipe == "exact":
        assert check["max_rel"] <= 1e-4 and check["floor_db"] == 60.0
        return
    for p, record in zip(passes, records, strict=True):
        if p.name == "sparsify":  # sparsity reached the blocks of every architecture
            assert record.stats["sparsified"] >= 8 and record.stats["zeros"] >= 0.49, (arch, record.stats)
    if not any(getattr(p, "bits", None) for p in rec.passes):
        if any(p.name == "sparsify" for p in rec.passes):
            return  # zeros, the same shapes
        # pruning or factorizing alone reached every architecture and leaves a float program
        assert out.num_parameters() < 0.97 * program.num_parameters(), (arch, records[-1].stats)
        return
    # quantization reached the blocks of every architecture (GPT-2's Conv1D included) and the embedding
    assert result.lowered.get(QUANTIZED[0], 0) >= 8, (arch, result.lowered)
    assert result.lowered.get(QUANTIZED[1], 0) >= 1, (arch, result.lowered)
    # smaller even where an untied float head stays float (w8-rtn on a tiny llama: 0.52x)
    assert out.num_bytes() < 0.75 * program.num_bytes()
