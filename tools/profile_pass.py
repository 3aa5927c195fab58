"""Time one pass of a recipe on the default model, alone: the program captured, the recipe's passes before it run,
then that pass timed (wall, and the process's peak RSS after it), optionally under cProfile.

    python tools/profile_pass.py --recipe sparse-50 --pass sparsify [--set refine=0,swaps=0] [--profile FILE]

Calibration is what ``graphpress compress`` prepares for the recipe (cached). The bars on a pass's cost (issue 12's
factorize, issue 13's SparseGPT: ≤ 120 s / ≤ 200 s over all 210 linears with 64 windows of 512) are read here.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import pstats
import resource
import time
from pathlib import Path

import torch
import yaml

from graphpress.capture import capture
from graphpress.compress import prepare_calibration, resolve_source, sample_inputs
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--pass", dest="name", required=True, help="the (first) pass of that name is timed")
    ap.add_argument("--set", default="", help="options of the timed pass: key=value,...")
    ap.add_argument("--model", default=None)
    ap.add_argument("--profile", type=Path, default=None, help="write cProfile's cumulative listing here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rec = load_recipe(args.recipe)
    at = next(i for i, p in enumerate(rec.passes) if p.name == args.name)
    timed = rec.passes[at]
    if args.set:
        options = dict(kv.split("=", 1) for kv in args.set.split(","))
        timed = dataclasses.replace(timed, **{k: yaml.safe_load(v) for k, v in options.items()})
    src = resolve_source(args.model)
    cal = prepare_calibration(src, rec)
    program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    src.model = None
    program, _ = run_pipeline(program, rec.passes[:at], calibration=cal.batches, in_place=True)
    profiler = cProfile.Profile() if args.profile else None
    t = time.perf_counter()
    if profiler:
        profiler.enable()
    program, records = run_pipeline(program, [timed], calibration=cal.batches, in_place=True, verify=False)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - t
    result = {"recipe": rec.name, "pass": dataclasses.asdict(timed), "seconds": round(seconds, 1),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "threads": torch.get_num_threads(), "calibration": cal.origin, "stats": records[-1].stats}
    print(json.dumps(result, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if profiler:
        with args.profile.open("w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    main()
