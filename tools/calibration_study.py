"""Which calibration generalizes: a recipe's passes calibrated on different sources and settings, each torch
program scored on the protocol's text and on the held-out news text (graphpress.evaluation).

    python tools/calibration_study.py fp32 pydoc:64 mix:64 python:64 generated:64 "mix:64 gptq.damp=0.1" \
        "mix:64 -awq" --recipe w4-awq-gptq --generate-device cuda --json study.json

A config is ``SOURCE:N`` (``pydoc``: the last N windows of the protocol's text, as graphpress calibrated before
issue 10; ``python``: standard-library docstrings; ``generated``: windows the model samples; ``mix``: half each,
interleaved, graphpress's default) then options: ``PASS.KEY=VALUE`` changes a pass's option, ``-PASS`` drops
a pass. ``fp32`` scores the uncompressed model. Calibration is never the held-out text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from graphpress import calibration_text as ct
from graphpress import evaluation as ev
from graphpress.capture import capture
from graphpress.compress import resolve_source, sample_inputs
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline

GENERATE_DEVICE = "cpu"


def windows(source: str, n: int, src: Any, length: int) -> torch.Tensor:
    if source == "pydoc":
        return ev.calibration_windows(ev.token_stream(src.tokenizer), n, length)
    if source == "python":
        return ct.python_windows(src.tokenizer, n, length)
    if source == "generated":  # sampled where --generate-device says, once (graphpress's cache)
        src.model.to(GENERATE_DEVICE)
        try:
            return ct.generated_windows(src.model, src.tokenizer, n, length)
        finally:
            src.model.to("cpu")
    if source == "mix":
        parts = [windows("python", n - n // 2, src, length), windows("generated", n // 2, src, length)]
        return ct.interleave(parts)
    sys.exit(f"calibration_study: unknown source {source!r}")


def passes_for(recipe: str, options: list[str]) -> list[Any]:
    passes = list(load_recipe(recipe).passes)
    for opt in options:
        if opt.startswith("-"):
            passes = [p for p in passes if p.name != opt[1:]]
            continue
        key, _, value = opt.partition("=")
        name, _, field = key.partition(".")
        passes = [dataclasses.replace(p, **{field: yaml.safe_load(value)}) if p.name == name else p
                  for p in passes]
    return passes


def score(forward: Any, src: Any) -> dict[str, float]:
    return {text: ev.evaluate("causal-lm", forward, src.tokenizer, text=text).value for text in ev.TEXTS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w4-awq-gptq")
    p.add_argument("--length", type=int, default=ev.WINDOW)
    p.add_argument("--generate-device", default="cpu", help="where the model samples its windows (cuda: faster)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    global GENERATE_DEVICE
    GENERATE_DEVICE = args.generate_device
    src = resolve_source(args.model)
    device = torch.device("cpu")  # the passes' shape propagation needs concrete sizes for CUDA attention

    def forward_of(module: Any) -> Any:
        def forward(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = module(ids.to(device))
                out = out.logits if hasattr(out, "logits") else out
                out = out[0] if isinstance(out, (tuple, list)) else out
                return out.float().cpu()
        return forward

    results = []
    for config in args.configs:
        start = time.perf_counter()
        head, *options = config.split()
        if head == "fp32":
            row = {"config": config, **score(forward_of(lambda ids: src.model(ids, use_cache=False)), src)}
        else:
            source, _, n = head.partition(":")
            ids = windows(source, int(n or 64), src, args.length)
            batches = [(chunk.to(device),) for chunk in ids.split(8)]
            program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
            out, records = run_pipeline(program, passes_for(args.recipe, options), verify=False, calibration=batches)
            row = {"config": config, **score(forward_of(out), src),
                   "pass_seconds": {r.name: round(r.seconds, 1) for r in records if r.seconds >= 1}}
            del program, out
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"recipe": args.recipe, "model": args.model, "results": results},
                                            indent=2))
    base = next((r for r in results if r["config"] == "fp32"), None)
    print("| config | protocol | held-out |\n|---|---|---|")
    for r in results:
        rel = {t: f" ({(r[t] / base[t] - 1) * 100:+.1f} %)" if base and r is not base else "" for t in ev.TEXTS}
        print(f"| {r['config']} | {r['protocol']:.4f}{rel['protocol']} | {r['heldout']:.4f}{rel['heldout']} |")


if __name__ == "__main__":
    main()
