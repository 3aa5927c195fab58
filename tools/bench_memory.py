"""Peak resident memory and wall time of whole `graphpress compress` runs, one recipe at a time (issue 9's bar:
every named recipe on SmolLM2 at most 3 GB, evaluation included), read with `/usr/bin/time -v`.

    python tools/bench_memory.py [RECIPE ...] [--out DIR] [--markdown FILE]

With no recipe: every named recipe that runs on this machine (those that train need a CUDA GPU: on a CPU they
stop before any work, so they are left out). Each run writes DIR/NAME (model.onnx, report.json) and DIR/NAME.log;
a NAME whose report.json exists is read, not run again. Run it on an otherwise idle machine: the wall times
are only comparable so. The first run on a model also samples and caches its calibration text (GRAPHPRESS_CACHE).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from graphpress.recipes import load_recipe, named_recipes

GRAPHPRESS = Path(sys.executable).with_name("graphpress")


def runnable_here(name: str) -> bool:
    return torch.cuda.is_available() or not load_recipe(name).needs_training()


def measure(recipe: str, out: Path, model: str) -> dict[str, object]:
    name = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
    folder, log = out / name, out / f"{name}.log"
    if not (folder / "report.json").exists():
        cmd = ["/usr/bin/time", "-v", str(GRAPHPRESS), "compress", model, "--recipe", recipe, "--out", str(folder),
               "--force"]
        with log.open("w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    text = log.read_text()
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    report = json.loads((folder / "report.json").read_text())
    evaluation = report.get("evaluation") or {}
    after = (evaluation.get("after_onnx") or {}).get("value")
    return {"recipe": name, "wall": wall, "peak_gib": peak_kib / 2**20, "peak_gb": peak_kib * 1024 / 1e9,
            "onnxruntime": after, "file_bytes": report["bytes"]["onnx_file"],
            "timings": report.get("timings")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path("out/memory"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = args.recipes or [r for r in named_recipes() if runnable_here(r)]
    rows = []
    print("| recipe | wall | peak RSS | onnxruntime perplexity | file |\n|---|---|---|---|---|", flush=True)
    for recipe in recipes:
        row = measure(recipe, args.out, args.model)
        rows.append(row)
        value = "—" if row["onnxruntime"] is None else f"{row['onnxruntime']:.4f}"
        print(f"| `{row['recipe']}` | {row['wall']} | {row['peak_gb']:.2f} GB ({row['peak_gib']:.2f} GiB) | {value} | "
              f"{row['file_bytes'] / 1e6:.1f} MB |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
