"""The main job: load a model, capture it, run a recipe, export ONNX, evaluate, report.

The output directory is written in a scratch directory beside it and renamed into place at the end, so a
failure never leaves a half-written one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from graphpress import evaluation as ev
from graphpress.capture import capture
from graphpress.lowering.onnx import export_onnx, ort_forward
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.models import DEFAULT_MODEL, LoadedModel, ModelNotFoundError, load_model
from graphpress.program import Program
from graphpress.recipes import Recipe, load_recipe
from graphpress.runner import run_pipeline

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 32  # sample batch for capture and verification: 2 rows of this many tokens


class OutputExistsError(FileExistsError):
    pass


@dataclass
class Source:
    """What to compress: a loaded model with its tokenizer, or a plain module from a Python file."""

    name: str
    model: torch.nn.Module
    kind: str
    tokenizer: Any = None
    example_inputs: dict[str, torch.Tensor] | tuple[torch.Tensor, ...] | None = None
    source: str = ""


def resolve_source(ref: str | None) -> Source:
    """A model name, a Hugging Face directory, or ``file.py:function`` returning (module, example_inputs)."""
    ref = ref or DEFAULT_MODEL
    if ":" in ref and ref.split(":", 1)[0].endswith(".py"):
        return _from_python_file(ref)
    loaded: LoadedModel = load_model(ref)
    return Source(loaded.name, loaded.model, loaded.kind, loaded.tokenizer, None, loaded.source)


def _from_python_file(ref: str) -> Source:
    path, fn_name = ref.split(":", 1)
    if not Path(path).is_file():
        raise ModelNotFoundError(f"model file {path} does not exist")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    factory: Callable[[], tuple[torch.nn.Module, Any]] | None = getattr(module, fn_name, None)
    if factory is None:
        raise ModelNotFoundError(f"{path} has no function {fn_name!r} returning (module, example_inputs)")
    model, inputs = factory()
    return Source(fn_name, model.eval(), "module", None, inputs, ref)


def sample_inputs(src: Source) -> dict[str, torch.Tensor] | tuple[torch.Tensor, ...]:
    """A real 2-row batch from the calibration end of the text (never the evaluation part)."""
    if src.example_inputs is not None:
        return src.example_inputs
    if src.kind == "causal-lm":
        ids = ev.token_stream(src.tokenizer)
        return {"input_ids": ev.calibration_windows(ids, 2, SAMPLE_TOKENS)}
    enc = src.tokenizer(ev.sentences(2, from_end=True), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def calibration_batches(src: Source, recipe: Recipe) -> list[tuple[torch.Tensor, ...]]:
    if not recipe.needs_calibration():
        return []
    if src.kind == "causal-lm":
        n, length = recipe.calibration.get("windows", 64), recipe.calibration.get("length", ev.WINDOW)
        batch = recipe.calibration.get("batch", 8)  # windows per forward: fewer, larger matmuls
        windows = ev.calibration_windows(ev.token_stream(src.tokenizer), n, length)
        return [(chunk,) for chunk in windows.split(batch)]
    if src.kind == "encoder":
        texts = ev.sentences(recipe.calibration.get("sentences", 256), from_end=True)
        out = []
        for i in range(0, len(texts), 32):
            enc = src.tokenizer(texts[i : i + 32], padding=True, truncation=True,
                                max_length=ev.SENTENCE_MAX_TOKENS, return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out
    raise ValueError(f"recipe {recipe.name} needs calibration data, which a plain module ({src.name}) lacks")


def evaluate_source(src: Source, forward: ev.Forward, progress: bool = False) -> dict[str, Any] | None:
    if src.kind not in ("causal-lm", "encoder"):
        return None
    reference = ev.torch_forward(src.model, src.kind) if src.kind == "encoder" else None
    return ev.evaluate(src.kind, forward, src.tokenizer, reference, progress=progress).to_json()


def compress(
    model: str | None,
    out: str | Path,
    recipe: str | None = None,
    *,
    evaluate: bool = True,
    verify: bool = True,
    force: bool = False,
    progress: bool = True,
    threads: int = 0,
) -> dict[str, Any]:
    """Compress ``model`` with ``recipe`` into ``out`` (model.onnx + report.json); return the report."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"output directory {out} exists and is not empty: choose another or pass --force")
    rec = load_recipe(recipe)  # a bad recipe fails before the model loads
    start = time.perf_counter()
    src = resolve_source(model)
    program: Program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    calibration = calibration_batches(src, rec)
    compressed, records = run_pipeline(program, rec.passes, verify=verify, calibration=calibration,
                                       progress=progress)
    with staged(out) as tmp:
        exported = export_onnx(compressed, tmp / "model.onnx", rules=onnxruntime_rules(**rec.lowering),
                               metadata={"source": src.source, "recipe": rec.name})
        report: dict[str, Any] = {
            "model": {"name": src.name, "source": src.source, "kind": src.kind},
            "recipe": rec.to_json(),
            "passes": [r.to_json() for r in records],
            "parameters": {"before": program.num_parameters(), "after": compressed.num_parameters()},
            "bytes": {"before": program.num_bytes(), "after": compressed.num_bytes(), "onnx_file": exported.bytes},
            "onnx": {**exported.to_json(), "path": "model.onnx"},
            "evaluation": None,
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        }
        if evaluate and src.kind in ("causal-lm", "encoder"):
            report["evaluation"] = {
                "before": evaluate_source(src, ev.torch_forward(src.model, src.kind), progress),
                "after_torch": evaluate_source(src, ev.torch_forward(compressed, src.kind), progress),
                "after_onnx": evaluate_source(src, ort_forward(exported.path, threads), progress),
            }
        report["seconds"] = time.perf_counter() - start
        (tmp / "report.json").write_text(json.dumps(clean_json(report), indent=2))
    return report


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A scratch directory beside ``out`` that becomes ``out`` (a rename) only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def clean_json(x: Any) -> Any:
    """Strict JSON: non-finite floats become None, tuples lists, other objects strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [clean_json(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)
