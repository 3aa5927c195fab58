"""``graphpress`` command line: compress and eval.

    graphpress compress [MODEL] [--recipe R] --out DIR
    graphpress eval TARGET [--json FILE]
    graphpress generate TARGET --prompt TEXT [--max-new-tokens N] [--greedy]

Bad input (unknown model, missing file, unreadable recipe, uncapturable model, occupied output directory,
too little calibration text) ends with one line on stderr naming what is wrong and what to do, and exit 1
(a traceback only with --verbose). SIGINT and SIGTERM remove what the run staged (exit 130 / 143).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from graphpress.errors import one_line

log = logging.getLogger("graphpress")


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C, so staged output is removed."""


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        # progress bars only where they redraw in place; libraries read this when tqdm is first imported
        os.environ.setdefault("TQDM_DISABLE", "1")
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        what = "SIGTERM" if isinstance(e, Interrupted) else "SIGINT"
        print(f"graphpress: interrupted ({what}): the run did not finish; nothing half-written is left",
              file=sys.stderr)
        return 143 if isinstance(e, Interrupted) else 130
    except Exception as e:  # every failure ends as one actionable line, not a traceback
        if args.verbose:
            traceback.print_exc()
        print(f"graphpress: error: {one_line(e) or type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise Interrupted()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _parser() -> argparse.ArgumentParser:
    from graphpress.models import DEFAULT_MODEL, MODELS
    from graphpress.recipes import named_recipes

    p = argparse.ArgumentParser(prog="graphpress", description="Compress PyTorch models and export ONNX.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    p.add_argument("--version", action="version", version=f"graphpress {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="capture MODEL, run a recipe, export DIR/model.onnx and DIR/report.json")
    c.add_argument("model", nargs="?", default=None,
                   help=f"model name ({', '.join(MODELS)}), a Hugging Face directory, or file.py:function "
                        f"returning (module, example_inputs); default {DEFAULT_MODEL}")
    c.add_argument("--recipe", default=None,
                   help=f"named recipe ({', '.join(named_recipes())}) or a YAML file; default: exact passes only")
    c.add_argument("--out", required=True, type=Path,
                   help="output directory: new, empty, or an earlier graphpress output (with --force)")
    c.add_argument("--force", action="store_true",
                   help="replace an earlier graphpress output (never a directory holding other files)")
    c.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module (a .py file or a module name) that registers passes, before the recipe "
                        "is read; may be repeated")
    c.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                   help="calibration data instead of the built-in text: token ids, one window (encoders: one "
                        "sentence) per line, or plain text for a model with a tokenizer")
    c.add_argument("--target", default="onnxruntime", metavar="NAME",
                   help="lowering target (default onnxruntime); the recipe's target: section gives its options")
    c.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a target option over the recipe's (repeatable), e.g. kernel=nbits, accuracy_level=0")
    c.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation and latency")
    c.add_argument("--eval-torch", action="store_true",
                   help="also evaluate the compressed torch program (beside the ONNX file in onnxruntime)")
    c.add_argument("--no-verify", action="store_true", help="skip the per-pass numerical check")
    c.add_argument("--threads", type=int, default=0, help="onnxruntime threads for evaluation (0: all)")
    c.set_defaults(func=_compress)

    e = sub.add_parser("eval", help="evaluate a model name, a model directory or an .onnx file")
    e.add_argument("target", help="a model name, a Hugging Face directory, a graphpress output directory or "
                                  "an .onnx file written by graphpress")
    e.add_argument("--reference", default=None,
                   help="the uncompressed model (name or directory) when the one recorded in the ONNX file "
                        "is not there any more")
    e.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this file")
    e.add_argument("--text", choices=("protocol", "heldout"), default="protocol",
                   help="the protocol's text, or the held-out news text (needs `pip install --no-deps "
                        "gensim==4.4.0`)")
    e.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="generate text from a causal LM: a model name, a Hugging Face directory "
                                        "or a graphpress output directory (onnxruntime, with its KV cache)")
    g.add_argument("target", help="a model name, a Hugging Face directory or a graphpress output directory")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    g.add_argument("--greedy", action="store_true",
                   help="the likeliest token each step (default: sampled from the 50 likeliest)")
    g.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    g.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    g.set_defaults(func=_generate)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graphpress")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _compress(args: argparse.Namespace) -> int:
    from graphpress.compress import compress
    from graphpress.lowering.targets import parse_option
    from graphpress.recipes import load_plugin

    for plugin in args.plugin:
        load_plugin(plugin)
    options = dict(parse_option(o) for o in args.target_option)

    report = compress(args.model, args.out, args.recipe, evaluate=not args.no_eval, verify=not args.no_verify,
                      force=args.force, threads=args.threads, evaluate_torch=args.eval_torch,
                      calibration=args.calibration, target=args.target, target_options=options)
    print_summary(report, args.out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from graphpress import evaluation as ev
    from graphpress.compress import clean_json, resolve_source
    from graphpress.lowering.onnx import onnx_metadata, ort_forward
    from graphpress.models import load_tokenizer

    target = args.target
    start = time.perf_counter()
    onnx_file = _onnx_file(target)
    if onnx_file is not None:
        meta = onnx_metadata(onnx_file)
        if "source" not in meta:
            raise ValueError(f"{onnx_file} was not written by graphpress: it names no source model to evaluate "
                             "against")
        kind = meta.get("kind", "module")
        if kind not in ("causal-lm", "encoder"):
            raise ValueError(f"{target}: no evaluation protocol for a plain module")
        tokenizer, _ = load_tokenizer(onnx_file.parent)
        context = int(meta["context"]) if meta.get("context", "").isdigit() else None
        reference_model = None
        if kind == "encoder" or tokenizer is None:
            ref = args.reference or meta["source"]
            try:
                src = resolve_source(ref)
            except Exception as e:
                raise ValueError(f"{target} needs its uncompressed model ({'reference' if kind == 'encoder' else 'tokenizer'}), "
                                 f"but {ref} cannot be loaded ({one_line(e, 160)}): pass --reference MODEL") from e
            tokenizer = tokenizer or src.tokenizer
            reference_model, context = src.model, src.context
        forward = ort_forward(onnx_file, args.threads)
        runtime, name = "onnxruntime", meta.get("model", onnx_file.stem)
    else:
        src = resolve_source(target)
        kind, tokenizer, context, reference_model, name = src.kind, src.tokenizer, src.context, src.model, src.name
        if kind not in ("causal-lm", "encoder"):
            raise ValueError(f"{target}: no evaluation protocol for a plain module")
        if tokenizer is None:
            src.need_text("evaluation")
        forward = ev.torch_forward(src.model, src.kind)
        runtime = "torch"
    if tokenizer is None:
        raise ValueError(f"{target}: evaluation needs text, and no tokenizer was found beside it or its source")
    reference = ev.torch_forward(reference_model, kind) if kind == "encoder" else None
    result = ev.evaluate(kind, forward, tokenizer, reference, progress=True, context=context,
                         text=args.text).to_json()
    result = {"target": target, "model": name, "runtime": runtime, **result,
              "seconds": time.perf_counter() - start}
    if args.json:
        args.json.write_text(json.dumps(clean_json(result), indent=2))
    shortened = f" (windows shortened to the model's {result['window']} positions)" \
        if result.get("shortened_from") else ""
    which = ", held-out text" if args.text == "heldout" else ""
    print(f"{result['metric']}: {result['value']:.4f} ({runtime}{which}){shortened}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from graphpress import generate as gen
    from graphpress.compress import resolve_source
    from graphpress.lowering.onnx import onnx_metadata
    from graphpress.models import load_tokenizer

    target = args.target
    if args.max_new_tokens < 1:
        raise gen.GenerationError(f"--max-new-tokens is {args.max_new_tokens}: ask for at least 1")
    onnx_file = _onnx_file(target)
    if onnx_file is not None:
        kind = onnx_metadata(onnx_file).get("kind", "module")
        context_text = onnx_metadata(onnx_file).get("context", "")
        if kind != "causal-lm":
            what = "an encoder (it embeds text)" if kind == "encoder" else "a plain module"
            raise gen.GenerationError(f"{target} holds {what}: generate needs a causal language model")
        tokenizer, why = load_tokenizer(onnx_file.parent)
        if tokenizer is None:
            raise gen.GenerationError(f"{why}: save the model's tokenizer beside {onnx_file.name} "
                                      "(tokenizer.save_pretrained(DIR))")
        context = int(context_text) if context_text.isdigit() else None
        step, runtime = gen.onnx_step(onnx_file, args.threads), "onnxruntime"
    else:
        src = resolve_source(target)
        if src.kind != "causal-lm":
            raise gen.GenerationError(f"{target} is {'an encoder' if src.kind == 'encoder' else 'a plain module'}: "
                                      "generate needs a causal language model")
        src.need_text("generation")
        tokenizer, context = src.tokenizer, src.context
        step, runtime = gen.torch_step(src.model), "torch"
    prompt = list(tokenizer(args.prompt)["input_ids"])
    gen.check_prompt(prompt, context, target)
    room = context - len(prompt) if context else args.max_new_tokens
    eos = tokenizer.eos_token_id
    shown = ""
    tokens: list[int] = []

    def show(token: int) -> None:
        nonlocal shown
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next token
            print(text[len(shown):], end="", flush=True)
            shown = text

    result = gen.decode(step, prompt, min(args.max_new_tokens, room), greedy=args.greedy,
                        eos=() if eos is None else (eos,), seed=args.seed, on_token=show, runtime=runtime)
    speed = f", {result.tokens_per_second:.1f} tokens/s" if result.tokens_per_second else ""
    print(f"\n[{runtime}: {result.prompt_tokens} prompt tokens, {len(result.tokens)} new; time to first token "
          f"{result.first_token_ms:.0f} ms{speed}]")
    return 0


def _onnx_file(target: str) -> Path | None:
    """The ONNX file ``target`` names (a file, or an output directory holding model.onnx), or None."""
    from graphpress.outputs import MANIFEST

    path = Path(target)
    if path.is_dir() and (path / "model.onnx").is_file() and (path / MANIFEST).is_file():
        return path / "model.onnx"
    if target.endswith(".onnx"):
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {target} does not exist")
        return path
    return None


def print_summary(report: dict[str, Any], out: Path, console: Any = None) -> None:
    """The passes (one row each) and what a user asks first: size, quality and latency, before and after.
    Fits 80 columns; every detail is in report.json."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{report['model']['name']}, recipe {report['recipe']['name']}", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    for col, justify in (("pass", "left"), ("effect", "left"), ("s", "right"), ("nodes", "right"),
                         ("MB", "right"), ("SQNR dB", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in report["passes"]:
        err = r.get("error") or {}
        sq = err.get("sqnr_db")
        table.add_row(
            r["name"], ("exact" if r["exact"] else "lossy") if r["modified"] else "none", f"{r['seconds']:.1f}",
            f"{r['nodes_before']}→{r['nodes_after']}", f"{r['bytes_before'] / 1e6:.1f}→{r['bytes_after'] / 1e6:.1f}",
            "-" if not err else ("inf" if sq is None else f"{sq:.1f}"),
        )
    console.print(table)
    check = report["onnx"]["check"]
    agree = (f"; onnxruntime vs torch program SQNR {_db(check['sqnr_db'])} dB (floor {check['floor_db']:g})"
             if check else "")
    console.print(f"wrote {out / 'model.onnx'} and report.json{agree}")
    hf = report.get("hf") or {}
    if hf.get("path"):
        console.print(f"wrote {out / hf['path']}: the pruned model as a Hugging Face directory (from_pretrained)")
    elif hf.get("skipped"):
        console.print(f"no Hugging Face copy: {hf['skipped']}")
    target = report.get("target") or {}
    if target:
        options = ", ".join(f"{k}={v}" for k, v in target.get("options", {}).items())
        console.print(f"target {target['name']}" + (f" ({options})" if options else ""))
    rows = _before_after(report)
    if rows:
        summary = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("", "before", "after", ""):
            summary.add_column(col, justify="right" if col else "left", no_wrap=True)
        for row in rows:
            summary.add_row(*row)
        console.print(summary)
    note = (report.get("calibration") or {}).get("note")
    if note:
        console.print(f"calibration: {note}")
    skipped = (report.get("evaluation") or {}).get("skipped")
    if skipped:
        console.print(f"evaluation skipped: {skipped}")


def _before_after(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    size = report["bytes"]
    if size.get("onnx_file_before"):
        b, a = size["onnx_file_before"], size["onnx_file"]
        rows.append(("ONNX size", f"{b / 1e6:.1f} MB", f"{a / 1e6:.1f} MB", f"{a / b:.2f}×"))
    ev = report.get("evaluation") or {}
    if ev.get("before") and ev.get("after_onnx"):
        b, a = ev["before"], ev["after_onnx"]
        note = f"torch {ev['after_torch']['value']:.4f}" if ev.get("after_torch") else ""
        if a.get("shortened_from"):
            note += f"; windows of {a['window']}"
        rows.append((a["metric"], f"{b['value']:.4f}", f"{a['value']:.4f}", note))
    lat = report.get("latency")
    if lat:
        b, a = lat["before"]["median_ms"], lat["after"]["median_ms"]
        shape = "×".join(str(d) for d in next(iter(lat["inputs"].values())))
        rows.append(("latency", f"{b:.1f} ms", f"{a:.1f} ms", f"{a / b:.2f}× ({shape})"))
    return rows


def _db(x: float | None) -> str:
    return "inf" if x is None else f"{x:.1f}"


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=logging.WARNING, handlers=[RichHandler(show_path=False)], format="%(message)s")
    logging.getLogger("graphpress").setLevel(level)
    if not verbose:
        # the exporters and transformers are chatty about things the user cannot act on
        for name in ("torch.onnx", "torch.export", "torch._export", "transformers", "torch.fx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stderr.isatty():  # progress bars only where they redraw in place
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
