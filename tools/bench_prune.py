"""Pruning benchmarks beside `graphpress compress` and tools/bench.py.

    python tools/bench_prune.py hf out/prune-20 out/prune-mlp-25 [--heldout] [--bench B.json] [--json F]
        each OUT/hf/ reloaded with transformers' from_pretrained (warnings about weights counted), its
        perplexity in PyTorch on the protocol's text beside the ONNX file's (from OUT/report.json, or from
        tools/bench.py's JSON)

    python tools/bench_prune.py cost --recipe prune-mlp-25 [--model smollm2-135m] [PASS.KEY=VALUE ...]
        the recipe's passes alone on the model (capture and calibration data prepared first, not counted):
        seconds and the process's peak resident memory (ru_maxrss, which includes loading the model)

Calibration is the recipe's (graphpress's built-in mix unless --calibration names a file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from graphpress import evaluation as ev


def hf(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    for out in args.outs:
        out = Path(out)
        report = json.loads((out / "report.json").read_text())
        if not (out / "hf").is_dir():
            rows.append({"artifact": str(out), "hf": report.get("hf")})
            continue
        records: list[str] = []

        class Catch(logging.Handler):
            def __init__(self, into: list[str]) -> None:
                super().__init__(logging.WARNING)
                self.into = into

            def emit(self, record: logging.LogRecord) -> None:
                self.into.append(record.getMessage())

        handler = Catch(records)
        logging.getLogger("transformers").addHandler(handler)
        try:
            model = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
        finally:
            logging.getLogger("transformers").removeHandler(handler)
        tokenizer = AutoTokenizer.from_pretrained(out / "hf")
        forward = ev.torch_forward(lambda ids, m=model: m(ids, use_cache=False).logits, "causal-lm")
        row: dict[str, Any] = {"artifact": str(out), "recipe": report["recipe"]["name"],
                               "parameters": sum(p.numel() for p in model.parameters()),
                               "warnings": [r for r in records if "weight" in r.lower()]}
        for text in ("protocol", "heldout") if args.heldout else ("protocol",):
            value = ev.evaluate("causal-lm", forward, tokenizer, text=text).value
            row[f"hf_{text}"] = value
        onnx = (report.get("evaluation") or {}).get("after_onnx", {}).get("value")
        if args.bench:  # the same file's perplexity from tools/bench.py's JSON (compress run with --no-eval)
            measured = json.loads(args.bench.read_text())["artifacts"]
            onnx = next((r["quality"]["value"] for r in measured if Path(r["artifact"]) == out), onnx)
        row["onnx_protocol"] = onnx
        if onnx:
            row["hf_vs_onnx"] = row["hf_protocol"] / onnx - 1
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    from graphpress.capture import capture
    from graphpress.compress import prepare_calibration, resolve_source, sample_inputs
    from graphpress.recipes import load_recipe
    from graphpress.runner import run_pipeline

    rec = load_recipe(args.recipe)
    for opt in args.options:
        key, _, value = opt.partition("=")
        name, _, field = key.partition(".")
        rec.passes = [dataclasses.replace(p, **{field: yaml.safe_load(value)}) if p.name == name else p
                      for p in rec.passes]
    src = resolve_source(args.model)
    cal = prepare_calibration(src, rec, None)
    program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    src.model = None
    before = program.num_parameters()
    start = time.perf_counter()
    out, records = run_pipeline(program, rec.passes, verify=False, calibration=cal.batches, in_place=True)
    seconds = time.perf_counter() - start
    row = {"recipe": rec.name, "options": args.options, "seconds": round(seconds, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "parameters": {"before": before, "after": out.num_parameters()},
           "calibration": {k: v for k, v in cal.origin.items() if k != "sha256"},
           "passes": {r.name: round(r.seconds, 1) for r in records}}
    print(json.dumps(row), flush=True)
    return [row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hf")
    h.add_argument("outs", nargs="+")
    h.add_argument("--heldout", action="store_true")
    h.add_argument("--bench", type=Path, default=None, help="tools/bench.py's JSON, for the ONNX perplexity")
    c = sub.add_parser("cost")
    c.add_argument("--recipe", required=True)
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("options", nargs="*", help="PASS.KEY=VALUE")
    for q in (h, c):
        q.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    rows = hf(args) if args.command == "hf" else cost(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
