"""``graphpress`` command line: compress and eval.

    graphpress compress [MODEL] [--recipe R] --out DIR
    graphpress eval TARGET [--json FILE]

Bad input (unknown model, missing file, unreadable recipe, uncapturable model, occupied output directory,
too little calibration text) ends with one line on stderr naming what is wrong and what to do, and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from graphpress.models import DEFAULT_MODEL, MODELS

log = logging.getLogger("graphpress")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("graphpress: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure ends as one actionable line, not a traceback
        if args.verbose:
            log.exception("failed")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"graphpress: error: {msg}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    from graphpress.recipes import named_recipes

    p = argparse.ArgumentParser(prog="graphpress", description="Compress PyTorch models and export ONNX.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="capture MODEL, run a recipe, export DIR/model.onnx and DIR/report.json")
    c.add_argument("model", nargs="?", default=None,
                   help=f"model name ({', '.join(MODELS)}), a Hugging Face directory, or file.py:function "
                        f"returning (module, example_inputs); default {DEFAULT_MODEL}")
    c.add_argument("--recipe", default=None,
                   help=f"named recipe ({', '.join(named_recipes())}) or a YAML file; default: exact passes only")
    c.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    c.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    c.add_argument("--no-verify", action="store_true", help="skip the per-pass numerical check")
    c.add_argument("--threads", type=int, default=0, help="onnxruntime threads for evaluation (0: all)")
    c.set_defaults(func=_compress)

    e = sub.add_parser("eval", help="evaluate a model name, a model directory or an .onnx file")
    e.add_argument("target")
    e.add_argument("--json", type=Path, default=None, help="where to write the JSON result")
    e.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    e.set_defaults(func=_eval)
    return p


def _compress(args: argparse.Namespace) -> int:
    from graphpress.compress import compress

    report = compress(args.model, args.out, args.recipe, evaluate=not args.no_eval, verify=not args.no_verify,
                      force=args.force, threads=args.threads)
    _summary(report)
    print(f"wrote {args.out / 'model.onnx'} and {args.out / 'report.json'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from graphpress import evaluation as ev
    from graphpress.compress import clean_json, resolve_source
    from graphpress.lowering.onnx import onnx_metadata, ort_forward

    target = args.target
    start = time.perf_counter()
    if target.endswith(".onnx"):
        if not Path(target).is_file():
            raise FileNotFoundError(f"ONNX file {target} does not exist")
        meta = onnx_metadata(target)
        if "source" not in meta:
            raise ValueError(f"{target} was not written by graphpress: it names no source model to evaluate against")
        src = resolve_source(meta["source"])
        forward = ort_forward(target, args.threads)
        runtime = "onnxruntime"
    else:
        src = resolve_source(target)
        forward = ev.torch_forward(src.model, src.kind)
        runtime = "torch"
    if src.kind not in ("causal-lm", "encoder"):
        raise ValueError(f"{target}: no evaluation protocol for a plain module")
    reference = ev.torch_forward(src.model, src.kind) if src.kind == "encoder" else None
    result = ev.evaluate(src.kind, forward, src.tokenizer, reference, progress=True).to_json()
    result = {"target": target, "model": src.name, "runtime": runtime, **result,
              "seconds": time.perf_counter() - start}
    out = args.json or (Path(target).with_suffix(".eval.json") if target.endswith(".onnx")
                        else Path(f"eval-{src.name}.json"))
    out.write_text(json.dumps(clean_json(result), indent=2))
    print(json.dumps(clean_json(result), indent=2))
    print(f"{result['metric']}: {result['value']:.4f}")
    return 0


def _summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"graphpress: {report['model']['name']} with recipe {report['recipe']['name']}")
    for col in ("pass", "exact", "changed", "seconds", "nodes", "params", "MB", "max rel err", "SQNR dB"):
        table.add_column(col)
    for r in report["passes"]:
        err = r.get("error") or {}
        sq = err.get("sqnr_db")
        table.add_row(
            r["name"], "yes" if r["exact"] else "lossy", "yes" if r["modified"] else "no", f"{r['seconds']:.2f}",
            f"{r['nodes_before']} → {r['nodes_after']}", f"{r['params_before']:,} → {r['params_after']:,}",
            f"{r['bytes_before'] / 1e6:.1f} → {r['bytes_after'] / 1e6:.1f}",
            f"{err['max_rel']:.2e}" if err else "-", "inf" if sq is None and err else (f"{sq:.1f}" if sq else "-"),
        )
    console = Console()
    console.print(table)
    console.print(f"ONNX file: {report['bytes']['onnx_file'] / 1e6:.1f} MB; onnxruntime vs torch max rel err "
                  f"{report['onnx']['check']['max_rel']:.2e}")
    evals = report.get("evaluation")
    if evals:
        parts = [f"{k}: {v['value']:.4f}" for k, v in evals.items() if v]
        console.print(f"{evals['before']['metric']} — " + ", ".join(parts))


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, handlers=[RichHandler(show_path=False)], format="%(message)s")
    logging.getLogger("graphpress").setLevel(level)
    if not verbose:
        # the exporters and transformers are chatty about things the user cannot act on
        for name in ("torch.onnx", "torch.export", "torch._export", "transformers", "torch.fx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


if __name__ == "__main__":
    sys.exit(main())
