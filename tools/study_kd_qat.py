"""Which KD-QAT settings keep training stable from a GPTQ grid (CPU, small batches): a study, not a bar.

    python tools/study_kd_qat.py --steps 40 --batch 4 --length 256 --config lr=2e-5 --config lr=5e-6 ...

The student is w4-kd-qat's program just before ``distill`` (AWQ, GPTQ, thaw_quantized), built once and kept at
``--cache`` (a Program.save archive); the teacher is the captured float model. Each ``--config`` (comma-separated
distill options: lr, grid_lr, warmup, freeze_roles=a+b, freeze=regex+regex, learn_scales) trains a fresh copy for
``--steps`` steps on installed packages' docstrings (graphpress.training_text; never evaluation or calibration
text) and reports the KL on held-out training windows before and after, and the training loss every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from graphpress import training_text as tt
from graphpress.capture import capture
from graphpress.compress import prepare_calibration, resolve_source, sample_inputs
from graphpress.distill import train
from graphpress.passes.distill import grid_rates, select
from graphpress.program import Program
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline


def parse(config: str) -> dict:
    out: dict = {}
    for item in filter(None, config.split(",")):
        key, value = item.split("=", 1)
        if key in ("freeze_roles", "freeze", "train"):
            out[key] = tuple(value.split("+"))
        elif key == "learn_scales":
            out[key] = value == "true"
        else:
            out[key] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="w4-kd-qat")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kd-qat-student.pt2"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    rec = load_recipe(args.recipe)
    at = next(i for i, p in enumerate(rec.passes) if p.name == "distill")
    src = resolve_source(None)
    teacher = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    if not args.cache.is_file():
        cal = prepare_calibration(src, rec)
        student, _ = run_pipeline(teacher, rec.passes[:at], calibration=cal.batches, verify=False)
        student.save(args.cache)
    windows = tt.package_windows(src.tokenizer, args.steps * args.batch + 16, args.length)
    base = rec.passes[at]
    results = []
    for config in args.config or [""]:
        options = parse(config)
        learn_scales = options.pop("learn_scales", None)
        student = Program.load(args.cache)
        if learn_scales is not None:
            for name, p in student.gm.named_parameters():
                if name.endswith("fq_scales"):
                    p.requires_grad_(learn_scales)
        d = dataclasses.replace(base, tokens=args.steps * args.batch * args.length, batch=args.batch, held_out=16,
                                **options)
        params, masks, _ = select(student.gm, d.train, d.freeze, d.freeze_roles)
        start = time.perf_counter()
        result = train(student, teacher, windows, d.config(), params, masks, rates=grid_rates(student.gm, params, d.grid_lr))
        row = {"config": config, "held_out_before": result.held_out_before, "held_out_after": result.held_out_after,
               "losses": [round(x, 4) for x in result.losses], "seconds": time.perf_counter() - start,
               "trainable": sum(p.numel() for p in params)}
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        print("  losses:", row["losses"][:: max(1, len(row["losses"]) // 20)], flush=True)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
