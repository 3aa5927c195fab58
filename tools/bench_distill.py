"""Recovery training, measured: a training recipe (prune-20-kd, w4-kd-qat...) run as ``graphpress compress`` runs
it, with the program's perplexity on the protocol's text and on the held-out news text measured (torch, on the
GPU when there is one) before any pass, just before ``distill`` and just after it; then the ONNX export, written
with the tokenizer so that ``graphpress eval DIR [--text heldout]`` scores the artifact in onnxruntime.

    PYTHONPATH=. python tools/bench_distill.py --recipe prune-20-kd --out DIR [--tokens N] [--json F]

The share of the gap to the uncompressed model that training recovers, on each text, is
(before - after) / (before - fp32); the issue asks that the held-out share be at least 0.7x the protocol's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import fx

from graphpress import evaluation as ev
from graphpress.capture import capture
from graphpress.compress import prepare_calibration, prepare_training, resolve_source, sample_inputs
from graphpress.lowering.onnx import export_onnx
from graphpress.lowering.targets import target_rules
from graphpress.passes.base import Pass, PassContext, PassResult
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline

TEXTS = ("protocol", "heldout")


@dataclass(frozen=True)
class Probe(Pass):
    """Measures the program where it stands in the pipeline; changes nothing."""

    name: ClassVar[str] = "probe"
    exact: ClassVar[bool] = True
    label: str = ""
    tokenizer: Any = None

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, False, {self.label: measure(ctx.program, self.tokenizer)})


def measure(program, tokenizer) -> dict[str, float]:  # noqa: ANN001
    device = "cuda" if torch.cuda.is_available() else "cpu"
    home = program.example_inputs[0].device
    program.to(device)
    try:
        forward = ev.torch_forward(program, program.kind)
        out = {}
        for text in TEXTS:
            result = ev.evaluate(program.kind, lambda ids: forward(ids.to(device)).float().cpu(), tokenizer,
                                 text=text)
            out[text] = result.value
            print(f"  {text}: {result.value:.4f}", flush=True)
        return out
    finally:
        program.to(home)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="prune-20-kd")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=None, help="distill's training tokens (default: the recipe's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rec = load_recipe(args.recipe)
    timings = {}
    t = time.perf_counter()
    src = resolve_source(args.model)
    at = next(i for i, p in enumerate(rec.passes) if p.name == "distill")
    passes = list(rec.passes)
    if args.tokens:
        passes[at] = dataclasses.replace(passes[at], tokens=args.tokens)
    probe = [Probe(label=label, tokenizer=src.tokenizer) for label in ("fp32", "before", "after")]
    passes = [probe[0], *passes[:at], probe[1], passes[at], probe[2], *passes[at + 1:]]
    cal = prepare_calibration(src, rec)
    timings["load and calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    training, origin = prepare_training(src, rec)
    timings["training text"] = time.perf_counter() - t
    print(f"training text: {json.dumps(origin)}", flush=True)
    program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    src.model = None
    t = time.perf_counter()
    program, records = run_pipeline(program, passes, calibration=cal.batches, training=training, in_place=True,
                                    progress=True)
    timings["passes"] = time.perf_counter() - t
    probes = {k: v for r in records if r.name == "probe" for k, v in r.stats.items()}
    distill = next(r for r in records if r.name == "distill")
    t = time.perf_counter()
    options = rec.target.get("onnxruntime", {})
    exported = export_onnx(program, args.out / "model.onnx", rules=target_rules("onnxruntime", options),
                           metadata={"source": src.source, "recipe": rec.name, "context": src.context or ""})
    src.tokenizer.save_pretrained(args.out)
    timings["export"] = time.perf_counter() - t
    shares = {text: (probes["before"][text] - probes["after"][text]) / (probes["before"][text] - probes["fp32"][text])
              for text in TEXTS}
    result = {"recipe": args.recipe, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "training_text": origin, "perplexity_torch": probes,
              "recovered_share": shares, "heldout_over_protocol": shares["heldout"] / shares["protocol"],
              "distill": {k: v for k, v in distill.stats.items() if k != "frozen"},
              "frozen": len(distill.stats.get("frozen", {})), "onnx_bytes": exported.bytes,
              "onnx_check": exported.check, "seconds": {k: round(v, 1) for k, v in timings.items()},
              "passes": [(r.name, round(r.seconds, 1)) for r in records]}
    print(json.dumps({k: result[k] for k in ("perplexity_torch", "recovered_share", "heldout_over_protocol",
                                             "onnx_bytes", "seconds")}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
