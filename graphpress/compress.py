"""The main job: load a model, capture it, run a recipe, export ONNX, evaluate, report.

The output directory is written in a staging directory beside it and renamed into place at the end, so a
failure never leaves a half-written one, and only an earlier graphpress output is ever replaced
(graphpress.outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from graphpress import evaluation as ev
from graphpress.capture import capture
from graphpress.errors import describe, one_line
from graphpress.latency import latencies
from graphpress.lowering.onnx import export_onnx, ort_forward
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.models import DEFAULT_MODEL, LoadedModel, ModelNotFoundError, context_length, load_model
from graphpress.outputs import check_output, staged_output
from graphpress.program import Program
from graphpress.recipes import Recipe, import_file, load_recipe
from graphpress.runner import run_pipeline

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 32  # sample batch for capture and verification: 2 rows of this many tokens
LATENCY_TOKENS = 128  # latency before/after: batch 1, this many tokens (or the model's context)
LATENCY_RUNS = 10


@dataclass
class Source:
    """What to compress: a loaded model with its tokenizer, or a plain module from a Python file."""

    name: str
    model: torch.nn.Module
    kind: str
    tokenizer: Any = None
    example_inputs: dict[str, Any] | tuple[Any, ...] | None = None
    source: str = ""
    # why there is no tokenizer (a Hugging Face directory saved without one)
    no_tokenizer: str = ""

    @property
    def context(self) -> int | None:
        return context_length(self.model)

    def need_text(self, what: str) -> None:
        """Refuse ``what`` (something that needs text) when there is no tokenizer."""
        if self.tokenizer is None:
            reason = self.no_tokenizer or f"{self.name} is a plain module, not a language model"
            raise ModelNotFoundError(f"{what} needs text, but {reason}: save the tokenizer beside the model "
                                     "(tokenizer.save_pretrained(DIR)) or choose a recipe without calibration")


def model_dirs(ref: str | None) -> list[Path]:
    """The directories that hold the model's own files (an output directory must never replace them)."""
    ref = ref or DEFAULT_MODEL
    if ":" in ref and ref.split(":", 1)[0].endswith(".py"):
        return [Path(ref.split(":", 1)[0]).parent]
    return [Path(ref)] if Path(ref).is_dir() else []


def resolve_source(ref: str | None) -> Source:
    """A model name, a Hugging Face directory, or ``file.py:function`` returning (module, example_inputs)."""
    ref = ref or DEFAULT_MODEL
    if ":" in ref and ref.split(":", 1)[0].endswith(".py"):
        return _from_python_file(ref)
    loaded: LoadedModel = load_model(ref)
    return Source(loaded.name, loaded.model, loaded.kind, loaded.tokenizer, None, loaded.source,
                  loaded.no_tokenizer)


def _from_python_file(ref: str) -> Source:
    path, fn_name = ref.split(":", 1)
    if not Path(path).is_file():
        raise ModelNotFoundError(f"model file {path} does not exist")
    try:
        module = import_file(Path(path), f"graphpress_model_{Path(path).stem}")
        factory: Callable[[], Any] | None = getattr(module, fn_name, None)
        if not callable(factory):
            raise ModelNotFoundError(f"{path} has no function {fn_name!r} returning (module, example_inputs)")
        result = factory()
    except ModelNotFoundError:
        raise
    except Exception as e:  # the user's code: name the file, the line and the error
        raise ModelNotFoundError(f"{ref} failed: {type(e).__name__} at {_user_line(e, path)}: {one_line(e)}") from e
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ModelNotFoundError(f"{ref} must return (module, example_inputs): a tuple of an nn.Module and its "
                                 f"inputs, not {describe(result)}")
    model, inputs = result
    if not isinstance(inputs, (tuple, list, dict, torch.Tensor)):
        raise ModelNotFoundError(f"{ref} returned example inputs that are {describe(inputs)}: return a tuple of "
                                 "positional inputs or a dict of named ones")
    return Source(fn_name, model.eval(), "module", None, inputs, str(Path(path).resolve()) + ":" + fn_name)


def _user_line(e: BaseException, path: str) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).name == Path(path).name]
    return f"{path}:{frames[-1].lineno}" if frames else path


def sample_inputs(src: Source, tokens: int = SAMPLE_TOKENS, rows: int = 2) -> dict[str, Any] | tuple[Any, ...]:
    """The sample batch for capture and verification: real text from the calibration end of the corpus
    (never the evaluation part), or random token ids within the vocabulary when there is no tokenizer."""
    if src.example_inputs is not None:
        return src.example_inputs
    tokens = ev.window_length(src.context, tokens)
    if src.tokenizer is None:
        vocab = src.model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids} if src.kind == "causal-lm" else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if src.kind == "causal-lm":
        ids = ev.token_stream(src.tokenizer)
        return {"input_ids": ev.calibration_windows(ids, rows, tokens, ev.window_length(src.context))}
    enc = src.tokenizer(ev.sentences(rows, from_end=True), padding=True, truncation=True, max_length=tokens,
                        return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def calibration_batches(src: Source, recipe: Recipe) -> list[tuple[torch.Tensor, ...]]:
    if not recipe.needs_calibration():
        return []
    if src.kind == "module":
        raise ValueError(f"recipe {recipe.name} needs calibration data, which a plain module ({src.name}) lacks")
    src.need_text(f"recipe {recipe.name} (calibration)")
    if src.kind == "causal-lm":
        n = recipe.calibration.get("windows", 64)
        length = ev.window_length(src.context, recipe.calibration.get("length", ev.WINDOW))
        batch = recipe.calibration.get("batch", 8)  # windows per forward: fewer, larger matmuls
        windows = ev.calibration_windows(ev.token_stream(src.tokenizer), n, length, ev.window_length(src.context))
        return [(chunk,) for chunk in windows.split(batch)]
    texts = ev.sentences(recipe.calibration.get("sentences", 256), from_end=True)
    out = []
    for i in range(0, len(texts), 32):
        enc = src.tokenizer(texts[i : i + 32], padding=True, truncation=True,
                            max_length=ev.window_length(src.context, ev.SENTENCE_MAX_TOKENS), return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def evaluate_source(src: Source, forward: ev.Forward, progress: bool = False) -> dict[str, Any] | None:
    if src.kind not in ("causal-lm", "encoder") or src.tokenizer is None:
        return None
    reference = ev.torch_forward(src.model, src.kind) if src.kind == "encoder" else None
    return ev.evaluate(src.kind, forward, src.tokenizer, reference, progress=progress,
                       context=src.context).to_json()


def latency_feed(src: Source, program: Program, tokens: int = LATENCY_TOKENS) -> dict[str, Any]:
    """One row of ``tokens`` token ids (Hugging Face models), or the first row of the sample batch."""
    if src.kind in ("causal-lm", "encoder"):
        inputs = sample_inputs(dataclasses.replace(src, tokenizer=None), tokens, rows=1)
        assert isinstance(inputs, dict)
        return {k: v.numpy() for k, v in inputs.items()}
    return {k: (x[:1] if x.dim() else x).numpy() for k, x in zip(program.input_names, program.example_inputs,
                                                                   strict=True)}


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
    evaluate_torch: bool = False,
) -> dict[str, Any]:
    """Compress ``model`` with ``recipe`` into ``out`` (model.onnx, report.json, the tokenizer when there is
    one); return the report. With ``evaluate``: quality (of the model, and of the ONNX file in onnxruntime;
    of the compressed torch program too with ``evaluate_torch``), and onnxruntime latency of the uncompressed
    export against the compressed one. ``out`` is checked before any work (see graphpress.outputs)."""
    out = Path(out)
    protected = model_dirs(model)
    check_output(out, force=force, protected=protected)
    rec = load_recipe(recipe)  # a bad recipe fails before the model loads
    start = time.perf_counter()
    timer = _Timer()
    with timer("load"):
        src = resolve_source(model)
    with timer("capture"):
        program: Program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    with timer("calibration data"):
        calibration = calibration_batches(src, rec)
    with timer("passes"):
        compressed, records = run_pipeline(program, rec.passes, verify=verify, calibration=calibration,
                                           progress=progress)
    with staged_output(out, force=force, protected=protected) as tmp:
        with timer("export"):
            exported = export_onnx(compressed, tmp / "model.onnx", rules=onnxruntime_rules(**rec.lowering),
                                   metadata={"source": src.source, "recipe": rec.name, "context": src.context or ""})
        if src.tokenizer is not None and hasattr(src.tokenizer, "save_pretrained"):
            src.tokenizer.save_pretrained(tmp)  # `graphpress eval` and runtimes read it beside model.onnx
        report: dict[str, Any] = {
            "model": {"name": src.name, "source": src.source, "kind": src.kind, "context": src.context},
            "recipe": rec.to_json(),
            "passes": [r.to_json() for r in records],
            "parameters": {"before": program.num_parameters(), "after": compressed.num_parameters()},
            "bytes": {"before": program.num_bytes(), "after": compressed.num_bytes(), "onnx_file": exported.bytes},
            "onnx": {**exported.to_json(), "path": "model.onnx"},
            "evaluation": None,
            "latency": None,
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        }
        if evaluate:
            with timer("evaluation"):
                report["evaluation"] = _evaluations(src, compressed if evaluate_torch else None, exported.path,
                                                    threads, progress)
            with timer("latency"):
                report["latency"], report["bytes"]["onnx_file_before"] = _latency(src, program, exported.path,
                                                                                  threads)
        report["seconds"] = time.perf_counter() - start
        report["timings"] = timer.seconds
        (tmp / "report.json").write_text(json.dumps(clean_json(report), indent=2))
    return report


class _Timer:
    """Seconds spent in each stage of a run, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - t, 2)


def _evaluations(src: Source, compressed: Program | None, onnx_path: Path, threads: int, progress: bool
                 ) -> dict[str, Any] | None:
    if src.kind not in ("causal-lm", "encoder"):
        return None
    if src.tokenizer is None:
        return {"skipped": f"{src.no_tokenizer}: evaluation needs text"}
    result = {"before": evaluate_source(src, ev.torch_forward(src.model, src.kind), progress)}
    if compressed is not None:
        result["after_torch"] = evaluate_source(src, ev.torch_forward(compressed, src.kind), progress)
    result["after_onnx"] = evaluate_source(src, ort_forward(onnx_path, threads), progress)
    return result


def _latency(src: Source, program: Program, onnx_path: Path, threads: int
             ) -> tuple[dict[str, Any], int]:
    """onnxruntime latency of the uncompressed program's export (made in a temporary directory) and of the
    compressed file, interleaved in one run; and the uncompressed file's size."""
    feed = latency_feed(src, program)
    with tempfile.TemporaryDirectory(prefix="graphpress-reference-") as ref_dir:
        reference = export_onnx(program, Path(ref_dir) / "model.onnx", check=False)
        before, after = latencies([reference.path, onnx_path], [feed, feed], threads, runs=LATENCY_RUNS,
                                  warmup=2, rounds=2)
    shape = {k: list(v.shape) for k, v in feed.items()}
    return {"inputs": shape, "before": before, "after": after}, reference.bytes


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
