"""Train a W4 fake-quantized program on CPU and measure the distillation loss against the fp32 model.

    python tools/bench_qat.py [--model smollm2-135m] [--steps 50] [--lr 1e-5] [--length 256] [--batch 2]
                              [--json out.json]

The student is the captured model with remove_noops, linearize_matmuls, fuse_rotary (so the backward runs
through graphpress::rotary_embedding) and fake_quantize (int4, asymmetric, groups of 128, learned scales) on
every linear of the repeated blocks; the teacher is the fp32 program. Loss: KL(teacher || student) over the
vocabulary, per token. Training and held-out text is neither the evaluation nor the calibration text: the
docstrings of the standard library's modules, classes and functions (``inspect.getdoc``), cut into windows
of ``--length`` tokens; the last ``--held-out`` windows are never trained on. Reports the held-out loss before
and after, the steps' wall time and, after freezing the grid into codes (freeze_fake_quantize), the ONNX
export's check against the trained program.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from graphpress.capture import capture
from graphpress.compress import resolve_source, sample_inputs
from graphpress.lowering.onnx import export_onnx
from graphpress.passes import PASSES
from graphpress.passes.fake_quant import FakeQuantize, FreezeFakeQuantize
from graphpress.runner import run_pipeline

SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "pydoc_data", "lib2to3", "ensurepip",
        "venv", "__main__")


def stdlib_docstrings() -> str:
    """Docstrings of the standard library's public modules and their classes and functions, in a fixed order."""
    parts = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and not m.name.startswith(SKIP))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - platform modules that do not import here are skipped
                continue
            for obj in [module, *(v for k, v in sorted(vars(module).items()) if not k.startswith("_")
                                  and (inspect.isclass(v) or inspect.isfunction(v))
                                  and getattr(v, "__module__", None) == name)]:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--held-out", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)

    src = resolve_source(args.model)
    ids = torch.tensor(src.tokenizer(stdlib_docstrings())["input_ids"])
    windows = ids[: ids.numel() // args.length * args.length].view(-1, args.length)
    train, held_out = windows[: -args.held_out], windows[-args.held_out:]
    needed = args.steps * args.batch
    print(f"text: {ids.numel()} tokens, {len(train)} training windows ({needed} used), {len(held_out)} held out")

    teacher = capture(src.model, sample_inputs(src), name=src.name, kind=src.kind)
    passes = [PASSES["remove_noops"](), PASSES["linearize_matmuls"](), PASSES["fuse_rotary"](),
              FakeQuantize(bits=4, group_size=128, roles=("block",))]
    student, records = run_pipeline(teacher, passes, verify=False)
    print(f"fake-quantized {records[-1].stats['fake_quantized']} linears; "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M trainable parameters")

    def loss_on(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = torch.log_softmax(teacher(batch), -1)
        out = torch.log_softmax(student(batch), -1)
        return torch.nn.functional.kl_div(out.flatten(0, 1), target.flatten(0, 1), log_target=True,
                                          reduction="batchmean")

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(loss_on(held_out[i: i + 2]).item() for i in range(0, len(held_out), 2)) / (len(held_out) / 2)

    before = held_out_loss()
    print(f"held-out KL before training: {before:.5f}")
    student.train()
    optim = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        batch = train[(step * args.batch) % len(train):][: args.batch]
        loss = loss_on(batch)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
        if step % 10 == 9:
            print(f"step {step + 1}: train KL {sum(losses[-10:]) / 10:.5f} ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    student.eval()
    after = held_out_loss()
    print(f"held-out KL after {args.steps} steps: {after:.5f} ({after / before:.3f}x), {seconds:.0f} s training")

    frozen, _ = run_pipeline(student, [FreezeFakeQuantize()], verify=True)  # exact: checked against the trained
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(frozen, Path(tmp) / "model.onnx")
    print(f"frozen and exported: {exported.bytes / 1e6:.1f} MB, onnxruntime vs program {exported.check}")
    result = {"model": args.model, "steps": args.steps, "lr": args.lr, "batch": args.batch, "length": args.length,
              "train_windows": len(train), "held_out_windows": len(held_out), "held_out_kl_before": before,
              "held_out_kl_after": after, "train_kl": losses, "train_seconds": seconds,
              "onnx_bytes": exported.bytes, "onnx_check": exported.check}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
