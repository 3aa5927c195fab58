"""The main job: load a model, capture it, run a recipe, export ONNX, evaluate, report.

The output directory is written in a staging directory beside it and renamed into place at the end, so a
failure never leaves a half-written one, and only an earlier graphpress output is ever replaced
(graphpress.outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from graphpress import cache
from graphpress import calibration_file as cf
from graphpress import calibration_text as ct
from graphpress import evaluation as ev
from graphpress import training_text as tt
from graphpress.calibration_file import UserCalibration
from graphpress.capture import capture
from graphpress.errors import describe, one_line
from graphpress.kv_cache import CacheLayout
from graphpress.latency import latencies
from graphpress.lowering.genai import write_genai_config
from graphpress.lowering.onnx import ExportResult, export_onnx, ort_forward
from graphpress.lowering.targets import DEFAULT_TARGET, target_rules
from graphpress.memory import release_memory
from graphpress.models import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelNotFoundError,
    context_length,
    directory_kind,
    load_model,
    missing_tokenizer,
)
from graphpress.outputs import check_output, staged_output
from graphpress.program import Program
from graphpress.recipes import DEFAULT_WINDOWS, Recipe, import_file, load_recipe
from graphpress.runner import run_pipeline

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 32  # sample batch for capture and verification: 2 rows of this many tokens
LATENCY_TOKENS = 128  # latency before/after: batch 1, this many tokens (or the model's context)
LATENCY_RUNS = 10


@dataclass
class Source:
    """What to compress: a loaded model with its tokenizer, or a plain module from a Python file."""

    name: str
    model: torch.nn.Module | None  # None once compress has captured it (the program holds its weights)
    kind: str
    tokenizer: Any = None
    example_inputs: dict[str, Any] | tuple[Any, ...] | None = None
    source: str = ""
    # why there is no tokenizer (a Hugging Face directory saved without one)
    no_tokenizer: str = ""

    context: int | None = None  # the model's maximum positions, when it has one

    def __post_init__(self) -> None:
        if self.model is not None and self.context is None:
            self.context = context_length(self.model)

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


@dataclass
class Calibration:
    """The calibration batches for the passes, and where they came from (for the report; None when the
    recipe needs no calibration and none was given)."""

    batches: list[tuple[torch.Tensor, ...]]
    origin: dict[str, Any] | None


def calibration_batches(src: Source, recipe: Recipe, given: UserCalibration | None = None
                        ) -> list[tuple[torch.Tensor, ...]]:
    return prepare_calibration(src, recipe, given).batches


def prepare_calibration(src: Source, recipe: Recipe, given: UserCalibration | None = None) -> Calibration:
    """Batches from the user's token ids or text (``given``, see graphpress.calibration_file), or from the
    end of the built-in text, shaped as ``recipe.calibration`` says; refuses what cannot calibrate."""
    if src.kind == "module":
        if recipe.needs_calibration():
            raise ValueError(f"recipe {recipe.name} needs calibration data, which a plain module ({src.name}) "
                             "lacks" + (": --calibration is for language models and encoders" if given else ""))
    else:
        if src.tokenizer is None:
            refuse_without_text(src.kind, src.no_tokenizer or f"{src.name} has no tokenizer", recipe, given)
        if given is not None and given.ids is not None:
            cf.check_vocabulary(given, src.model.get_input_embeddings().num_embeddings, src.name)
    if not recipe.needs_calibration():
        return Calibration([], None if given is None else {
            **given.to_json(), "used": False, "note": f"recipe {recipe.name} runs no pass that needs calibration"})
    if src.kind == "causal-lm":
        batches, origin = _causal_calibration(src, recipe.calibration, given)
        unit, n = "windows", origin["asked"]
    else:
        batches, origin = _encoder_calibration(src, recipe.calibration, given)
        unit, n = "sentences", origin["asked"]
    if given is None:
        return Calibration(batches, {"source": "built-in", **origin})
    origin = {**given.to_json(), **origin}
    if origin[unit] < n:
        origin["note"] = f"{origin[unit]} calibration {unit} from {given.origin}, fewer than the {n} recipe " \
                         f"{recipe.name} asks for"
        log.info("%s", origin["note"])
    return Calibration(batches, origin)


def _causal_calibration(src: Source, cal: dict[str, int], given: UserCalibration | None
                        ) -> tuple[list[tuple[torch.Tensor, ...]], dict[str, Any]]:
    n, batch = cal.get("windows", DEFAULT_WINDOWS), cal.get("batch", 8)  # batch: windows per forward
    length = ev.window_length(src.context, cal.get("length", ev.WINDOW))
    if given is not None and given.ids is not None:
        windows, cut = cf.causal_batches(given.ids, n, length, batch)
        return [(w,) for w in windows], {"asked": n, "windows": min(n, len(given.ids)), "length": length,
                                         "rows": len(given.ids), "cut": cut}
    if given is None:
        ids, origin = _default_windows(src, n, length, cal.get("generated"))
        return [(chunk,) for chunk in ids.split(batch)], {"asked": n, "windows": len(ids), "length": length,
                                                          **origin}
    stream = src.tokenizer(given.text, add_special_tokens=False)["input_ids"]
    ids = cf.text_windows(stream, n, length, given.origin)
    # ids: [windows, length]
    return [(chunk,) for chunk in ids.split(batch)], {"asked": n, "windows": len(ids), "length": ids.shape[1]}


def _encoder_calibration(src: Source, cal: dict[str, int], given: UserCalibration | None
                         ) -> tuple[list[tuple[torch.Tensor, ...]], dict[str, Any]]:
    n, max_tokens = cal.get("sentences", 256), ev.window_length(src.context, ev.SENTENCE_MAX_TOKENS)
    if given is not None and given.ids is not None:
        batches, cut = cf.padded_batches(given.ids[:n], max_tokens, _pad_id(src))
        return list(batches), {"asked": n, "sentences": min(n, len(given.ids)), "max_tokens": max_tokens,
                               "rows": len(given.ids), "cut": cut}
    texts = ct.python_sentences(n) if given is None else ev.split_sentences(given.text or "")[:n]
    out: list[tuple[torch.Tensor, ...]] = []
    for i in range(0, len(texts), 32):
        enc = src.tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=max_tokens,
                            return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    origin = {"asked": n, "sentences": len(texts), "max_tokens": max_tokens}
    if given is None:
        origin["python"] = {"sentences": len(texts), "text": _PYTHON_TEXT}
    return out, origin


_PYTHON_TEXT = f"docstrings of Python {sys.version_info.major}.{sys.version_info.minor}'s standard library"


def _default_windows(src: Source, n: int, length: int, generated: int | None
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The built-in calibration set (graphpress.calibration_text): ``generated`` windows sampled from the model
    (half by default, none for a model that cannot sample) and the rest Python's docstrings, interleaved so
    that any first batches (a pass's ``max_batches``) hold both."""
    if generated is None:
        generated = n // 2 if ct.can_generate(src.model) else 0
    if generated and not ct.can_generate(src.model):
        raise ValueError(f"calibration: generated windows need a model that can sample (generate), and "
                         f"{src.name} cannot: set generated: 0 under calibration")
    parts, origin = [], {}
    if n - generated:
        try:
            parts.append(ct.python_windows(src.tokenizer, n - generated, length))
        except ct.TooLittleText as e:
            raise ev.CalibrationError(
                f"asked for {n} calibration windows of {length} tokens ({e.asked} of Python's docstrings, which "
                f"hold {e.available}): ask for fewer or shorter windows, or give --calibration FILE") from e
        origin["python"] = {"windows": n - generated, "text": _PYTHON_TEXT}
    if generated:
        parts.append(ct.generated_windows(src.model, src.tokenizer, generated, length, progress=True))
        origin["generated"] = {"windows": generated, "seed": ct.SEED, "sampling": "temperature 1 from BOS"}
    ids = ct.interleave(parts)
    origin["sha256"] = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return ids, origin


def prepare_training(src: Source, recipe: Recipe) -> tuple[torch.Tensor, dict[str, Any]]:
    """The recipe's training text (graphpress.training_text), sampled on the GPU when there is one."""
    if src.kind != "causal-lm":
        raise ValueError(f"recipe {recipe.name} trains (distill), which needs a causal language model; "
                         f"{src.name} is {'a plain module' if src.kind == 'module' else 'an ' + src.kind}")
    src.need_text(f"recipe {recipe.name}'s training")
    spec = recipe.training
    length = ev.window_length(src.context, spec.get("length", ev.WINDOW))
    generated = spec.get("generated", 0)
    if generated and not ct.can_generate(src.model):
        raise ValueError(f"training: generated windows need a model that can sample (generate), and {src.name} "
                         "cannot: set generated: 0 under training")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tt.training_windows(src.model, src.tokenizer, spec["windows"], length, generated, device, progress=True)


def refuse_without_text(kind: str, no_tokenizer: str, recipe: Recipe, given: UserCalibration | None) -> None:
    """Refuse a recipe whose passes need calibration text when the model has no tokenizer (``no_tokenizer``
    says why, naming the model) and no token ids were given, or a text file given for such a model."""
    if not no_tokenizer or (given is not None and given.ids is not None):
        return
    unit = "sentence" if kind == "encoder" else "window"
    if given is not None:
        raise cf.CalibrationFileError(
            f"calibration file {given.origin} is text ({given.why_text}), but {no_tokenizer} to read it: give "
            f"token ids, one {unit} per line")
    if not recipe.needs_calibration():
        return
    needs = next(p.name for p in recipe.passes if getattr(p, "needs_calibration", False))
    raise ModelNotFoundError(
        f"recipe {recipe.name}: pass {needs} needs calibration text, but {no_tokenizer}: pass "
        f"--calibration FILE (token ids, one {unit} per line; calibration= in Python) or save the tokenizer "
        "beside the model")


def _pad_id(src: Source) -> int:
    pad = getattr(src.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(src.model, "config", None), "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


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
    calibration: str | Path | Sequence[Sequence[int]] | None = None,
    target: str = DEFAULT_TARGET,
    target_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compress ``model`` with ``recipe`` into ``out`` (model.onnx, report.json, the tokenizer when there is
    one); return the report. With ``evaluate``: quality (of the model, and of the ONNX file in onnxruntime;
    of the compressed torch program too with ``evaluate_torch``), and onnxruntime latency of the uncompressed
    export against the compressed one. ``calibration``: a file of token ids (one window per line) or text, or
    rows of token ids, instead of the built-in text (see graphpress.calibration_file). ``out``, the recipe and
    the calibration file are checked before any work (see graphpress.outputs). ``target``: the lowering target
    (graphpress.lowering.targets), with the recipe's options for it updated by ``target_options``."""
    out = Path(out)
    protected = model_dirs(model)
    check_output(out, force=force, protected=protected)
    rec = load_recipe(recipe)  # a bad recipe, target or calibration file fails before the model loads
    options = {**rec.target.get(target, {}), **(target_options or {})}
    rules = target_rules(target, options)
    given = cf.read_calibration(calibration) if calibration is not None else None
    no_tokenizer = missing_tokenizer(model or DEFAULT_MODEL)  # a directory saved without one, before loading it
    if no_tokenizer:
        refuse_without_text(directory_kind(Path(model or DEFAULT_MODEL)), no_tokenizer, rec, given)
    start = time.perf_counter()
    timer = _Timer()
    with timer("load"):
        src = resolve_source(model)
    if rec.needs_training() and src.model is not None:  # before hours of sampling and calibrating on a CPU
        parameters = sum(p.numel() for p in src.model.parameters())
        sampled = rec.training.get("generated", 0) * rec.training.get("length", ev.WINDOW)
        for p in rec.passes:
            if getattr(p, "needs_training", False):
                p.refuse_on_cpu(parameters, sampled)
    with timer("calibration data"):
        cal = prepare_calibration(src, rec, given)
    cal_origin = cal.origin
    training, training_origin = None, None
    if rec.needs_training():
        with timer("training text"):
            training, training_origin = prepare_training(src, rec)
    with timer("capture"):
        program: Program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    before = {"parameters": program.num_parameters(), "bytes": program.num_bytes()}
    fingerprint = cache.key(ct.model_fingerprint(program.gm), program.name, src.kind,
                            [(tuple(x.shape), x.dtype) for x in program.example_inputs if hasattr(x, "shape")])
    feed = latency_feed(src, program) if evaluate else None
    model_config = getattr(src.model, "config", None)
    hf_config = model_config if rec.structural() else None
    # from here on the program is the model: the passes rewrite it in place, so that the weights they replace
    # are freed, and "before" is the uncompressed program's export, evaluated in the same runtime
    src.model = None
    with contextlib.ExitStack() as stack:
        reference = None
        if evaluate:
            with timer("reference export"):
                reference = _reference_export(program, fingerprint, stack)
            release_memory()
        with timer("passes"):
            compressed, records = run_pipeline(program, rec.passes, verify=verify, calibration=cal.batches,
                                               training=training, progress=progress, in_place=True)
        del program, cal, training
        release_memory()
        with staged_output(out, force=force, protected=protected) as tmp:
            with timer("export"):
                exported = export_onnx(compressed, tmp / "model.onnx", rules=rules, metadata={
                    "source": src.source, "recipe": rec.name, "context": src.context or ""})
            if src.tokenizer is not None and hasattr(src.tokenizer, "save_pretrained"):
                src.tokenizer.save_pretrained(tmp)  # `graphpress eval` and runtimes read it beside model.onnx
            genai = _genai(exported, model_config, src, tmp) if src.kind == "causal-lm" else None
            hf = None
            if hf_config is not None:
                with timer("hf"):
                    hf = _save_hf(compressed, hf_config, tmp / "hf", src.tokenizer)
            report: dict[str, Any] = {
                "model": {"name": src.name, "source": src.source, "kind": src.kind, "context": src.context},
                "recipe": rec.to_json(),
                "target": {"name": target, "options": options},
                "calibration": cal_origin,
                "training": training_origin,
                "passes": [r.to_json() for r in records],
                "parameters": {"before": before["parameters"], "after": compressed.num_parameters()},
                "bytes": {"before": before["bytes"], "after": compressed.num_bytes(), "onnx_file": exported.bytes},
                "onnx": {**exported.to_json(), "path": "model.onnx"},
                "hf": hf,
                "genai": genai,
                "evaluation": None,
                "latency": None,
                "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            }
            if not evaluate_torch:
                del compressed
                release_memory()
            if reference is not None and feed is not None:
                with timer("evaluation"):
                    report["evaluation"] = _evaluations(src, compressed if evaluate_torch else None,
                                                        reference, exported.path, threads, progress)
                with timer("latency"):
                    report["latency"] = _latency(feed, reference.path, exported.path, threads)
                report["bytes"]["onnx_file_before"] = reference.bytes
            report["seconds"] = time.perf_counter() - start
            report["timings"] = timer.seconds
            (tmp / "report.json").write_text(json.dumps(clean_json(report), indent=2))
    return report


def _genai(exported: ExportResult, config: Any, src: Source, folder: Path) -> dict[str, Any]:
    """onnxruntime-genai's config beside a causal LM's model.onnx (graphpress.lowering.genai), or why not."""
    if not isinstance(exported.kv_cache, dict):
        return {"skipped": exported.kv_cache or "the export has no KV cache"}
    if config is None or not hasattr(config, "vocab_size"):
        return {"skipped": f"{src.name} has no Hugging Face config to describe it"}
    if src.tokenizer is None or not hasattr(src.tokenizer, "save_pretrained"):
        return {"skipped": f"{src.no_tokenizer or src.name + ' has no tokenizer'}: onnxruntime-genai needs one"}
    path = write_genai_config(folder, CacheLayout.from_json(exported.kv_cache), config, src.context)
    return {"path": path.name}


def _save_hf(program: Program, config: Any, folder: Path, tokenizer: Any) -> dict[str, Any]:
    """A pruned Hugging Face model written back as a plain directory (graphpress.hf_export), checked to give the
    program's outputs once reloaded; a program the writer cannot express (quantized tensors, widths that
    differ between layers, a class that computes differently at the new widths) gets the reason instead."""
    from graphpress.hf_export import program_state, save_hf

    inputs = dict(zip(program.input_names, program.example_inputs, strict=True))
    try:
        save_hf(program_state(program), config, folder, tokenizer if hasattr(tokenizer, "save_pretrained") else None,
                expect=(inputs, program.outputs(*program.example_inputs)[0]))
    except ValueError as e:
        return {"skipped": str(e)}
    return {"path": folder.name}


@dataclass
class _Reference:
    path: Path
    bytes: int
    key: str  # names the file's contents: the model, its capture and the code that exported it


def _reference_export(program: Program, fingerprint: str, stack: contextlib.ExitStack) -> _Reference:
    """The uncompressed program's export, the "before" of every evaluation. It depends only on the model and
    graphpress's code, so it is kept in the cache (graphpress.cache: a second recipe on the same model skips
    this export and its evaluation); in a temporary folder when the cache cannot be written."""
    # <model>-<code>: a new graphpress replaces the export an older one kept for the same model
    key = f"{fingerprint[:16]}-{cache.key(cache.code_version(), torch.__version__, onnxruntime.__version__)[:16]}"

    def build(folder: Path) -> None:
        export_onnx(program, folder / "model.onnx", check=False)

    folder = cache.cached("reference", key, build)
    if folder is not None:
        cache.prune("reference", f"{fingerprint[:16]}-", keep=key)
    if folder is None:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphpress-reference-")))
        build(folder)
    path = folder / "model.onnx"
    return _Reference(path, sum(p.stat().st_size for p in folder.iterdir() if p.is_file()), key)


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


def _evaluations(src: Source, compressed: Program | None, reference: _Reference, onnx_path: Path, threads: int,
                 progress: bool) -> dict[str, Any] | None:
    """Quality before (the uncompressed program's export ``reference``; a causal LM's perplexity is kept in the
    cache beside it) and after (``onnx_path``; and the compressed torch program when given), each in its own
    onnxruntime session, one at a time (an encoder's evaluation compares with the reference, so that one stays
    open beside it)."""
    if src.kind not in ("causal-lm", "encoder"):
        return None
    if src.tokenizer is None:
        return {"skipped": f"{src.no_tokenizer}: evaluation needs text"}
    ref = ort_forward(reference.path, threads) if src.kind == "encoder" else None

    def run(forward: ev.Forward) -> dict[str, Any]:
        result = ev.evaluate(src.kind, forward, src.tokenizer, ref, progress=progress, context=src.context)
        return result.to_json()

    if ref is not None:
        result = {"before": run(ref)}
    else:
        tokens = hashlib.sha256(ev.token_stream(src.tokenizer).numpy().tobytes()).hexdigest()
        name = cache.key(reference.key, tokens, src.context, threads)
        result = {"before": cache.cached_json("evaluation", name, lambda: run(ort_forward(reference.path, threads)))}
    release_memory()
    if compressed is not None:
        result["after_torch"] = run(ev.torch_forward(compressed, src.kind))
    result["after_onnx"] = run(ort_forward(onnx_path, threads))
    release_memory()
    return result


def _latency(feed: dict[str, Any], reference: Path, onnx_path: Path, threads: int) -> dict[str, Any]:
    """onnxruntime latency of the uncompressed program's export and of the compressed file, interleaved in one
    run."""
    before, after = latencies([reference, onnx_path], [feed, feed], threads, runs=LATENCY_RUNS, warmup=2,
                              rounds=2)
    return {"inputs": {k: list(v.shape) for k, v in feed.items()}, "before": before, "after": after}


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
