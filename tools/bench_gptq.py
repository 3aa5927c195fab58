"""Time GPTQ on a real model and record the process's peak resident memory.

    python tools/bench_gptq.py [--model smollm2-135m] [--recipe w4-awq-gptq] [--windows 64] [--length 512]
                               [--json out.json]

Loads the model, captures it, runs the recipe's remove_noops, merge_sibling_linears and gptq passes (its other
passes are left out: this times GPTQ alone; w4-awq-gptq: int4, groups of 128, asymmetric, act_order, ridge)
with calibration windows from the end of the text. Reports the GPTQ pass's wall time and the peak RSS of the
whole process (model loading included).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from graphpress.capture import capture
from graphpress.compress import calibration_batches, resolve_source, sample_inputs
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w4-awq-gptq")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    recipe.calibration.update(windows=args.windows, length=args.length)
    passes = [q for q in recipe.passes if q.name in ("remove_noops", "merge_sibling_linears", "gptq")]
    start = time.perf_counter()
    src = resolve_source(args.model)
    program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    calibration = calibration_batches(src, recipe)
    loaded = time.perf_counter() - start
    rss_loaded = peak_rss_mb()
    _, records = run_pipeline(program, passes, verify=False, calibration=calibration, in_place=True)
    gptq = next(r for r in records if r.name == "gptq")
    result = {
        "model": args.model, "windows": args.windows, "length": args.length, "threads": torch.get_num_threads(),
        "load_and_capture_s": loaded, "gptq_s": gptq.seconds, "gptq_stats": {k: v for k, v in gptq.stats.items()
                                                                            if k != "skipped"},
        "peak_rss_mb_after_load": rss_loaded, "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
