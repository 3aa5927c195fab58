"""A compressed program on the GPU (issue 15): the same ``Program`` the CPU recipes make, moved to CUDA
(``Program.to``), where graphpress's ops run on the Triton kernels; its perplexity on the pinned evaluation
text against the same program's on the CPU.

Two steps, because the GPU machine cannot load the model itself:

    # here (CPU): compress, save the program (torch.export's .pt2), its CPU perplexity and the windows
    python tools/bench_gpu_program.py save --recipe w4-awq-gptq --out /tmp/gpu-program
    # on the GPU machine (the folder carried over): the same windows through the program on CUDA
    PYTHONPATH=. python tools/bench_gpu_program.py gpu /tmp/gpu-program --json $OUT/program.json

``save`` runs the recipe's passes exactly as ``graphpress compress`` does (same calibration, same
pipeline) and evaluates the torch program on the protocol's windows; ``gpu`` evaluates the loaded program
on the GPU in its own dtype (fp32: the W4 kernels take fp32 activations, split into two bf16 halves), and says
which kernel ran how many quantized linears.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def save(recipe_name: str, out: Path, model: str | None) -> dict:
    from graphpress.capture import capture
    from graphpress.compress import prepare_calibration, resolve_source, sample_inputs
    from graphpress.evaluation import eval_windows, perplexity, token_stream, torch_forward
    from graphpress.recipes import load_recipe
    from graphpress.runner import run_pipeline

    rec = load_recipe(recipe_name)
    src = resolve_source(model)
    cal = prepare_calibration(src, rec)
    program = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    start = time.perf_counter()
    program, _ = run_pipeline(program, rec.passes, calibration=cal.batches, in_place=True)
    seconds = time.perf_counter() - start
    windows = eval_windows(token_stream(src.tokenizer))
    ppl = perplexity(torch_forward(program, src.kind), windows, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    program.save(out / "program.pt2")
    torch.save(windows, out / "windows.pt")
    facts = {"recipe": recipe_name, "model": src.name, "cpu_perplexity": ppl, "passes_seconds": seconds,
             "torch": torch.__version__, "program_bytes": program.num_bytes()}
    (out / "cpu.json").write_text(json.dumps(facts, indent=1))
    return facts


def gpu(folder: Path) -> dict:
    from graphpress.evaluation import perplexity, torch_forward
    from graphpress.kernels import cuda
    from graphpress.program import Program

    cpu = json.loads((folder / "cpu.json").read_text())
    windows = torch.load(folder / "windows.pt")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **cpu}
    program = Program.load(folder / "program.pt2").to("cuda")
    forward = torch_forward(program, program.kind)
    cuda.CALLS.clear()
    start = time.perf_counter()
    ppl = perplexity(lambda ids: forward(ids.cuda()).float().cpu(), windows)
    torch.cuda.synchronize()
    result.update(gpu_perplexity=ppl, vs_cpu=ppl / cpu["cpu_perplexity"] - 1,
                  gpu_seconds=time.perf_counter() - start, kernels=dict(cuda.CALLS))
    print(f"GPU: perplexity {ppl:.4f} (CPU program {cpu['cpu_perplexity']:.4f}, {100 * result['vs_cpu']:+.3f} %), "
          f"kernels {dict(cuda.CALLS)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    s = sub.add_parser("save")
    s.add_argument("--recipe", default="w4-awq-gptq")
    s.add_argument("--model")
    s.add_argument("--out", type=Path, required=True)
    g = sub.add_parser("gpu")
    g.add_argument("folder", type=Path)
    g.add_argument("--json")
    args = ap.parse_args(argv)
    result = save(args.recipe, args.out, args.model) if args.step == "save" else gpu(args.folder)
    print(json.dumps(result, indent=1))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
