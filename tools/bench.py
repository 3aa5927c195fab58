"""Benchmark ONNX artifacts beside a reference export, measured in the same run.

For each artifact (an .onnx file or a `graphpress compress` output directory): quality on the evaluation
protocol (perplexity for causal LMs, cosine similarity for encoders) in onnxruntime (with ``--heldout``, on the
held-out news text too, each beside the reference's), file size (with external
data), and onnxruntime latency — batch 1, 128 tokens, N threads, median of R runs after W warm-up runs, the
runs taken in rounds, the artifacts in turn, one session alive at a time (see ``latencies``).
Writes JSON and replaces the table between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in a Markdown file.

    python tools/bench.py --reference out/fp32 out/w4 out/w8a8 --name smollm2 --json bench.json \
        --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphpress import evaluation as ev
from graphpress.compress import clean_json, resolve_source
from graphpress.latency import ROUNDS, latencies
from graphpress.lowering.onnx import onnx_metadata, ort_forward


def onnx_path(artifact: str) -> Path:
    p = Path(artifact)
    p = p / "model.onnx" if p.is_dir() else p
    if not p.is_file():
        sys.exit(f"bench: {artifact} is neither an .onnx file nor a directory holding model.onnx")
    return p


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def measure(artifact: str, args: argparse.Namespace, sources: dict[str, Any]
            ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Size and quality of one artifact, and the batch its latency is measured on."""
    path = onnx_path(artifact)
    meta = onnx_metadata(path)
    source = meta.get("source") or sys.exit(f"bench: {path} names no source model (not written by graphpress)")
    if source not in sources:
        sources[source] = resolve_source(source)
    src = sources[source]
    ids = ev.eval_windows(ev.token_stream(src.tokenizer))[0, : args.tokens][None] if src.kind == "causal-lm" \
        else src.tokenizer(" ".join(ev.sentences(64)), truncation=True, max_length=args.tokens,
                           return_tensors="pt")["input_ids"]
    feed = {"input_ids": ids.numpy()}
    if src.kind == "encoder":
        feed["attention_mask"] = np.ones_like(feed["input_ids"])
    result: dict[str, Any] = {"artifact": artifact, "model": src.name, "recipe": meta.get("recipe", "?"),
                              "bytes": file_bytes(path)}
    if not args.no_quality:
        reference = ev.torch_forward(src.model, src.kind) if src.kind == "encoder" else None
        forward = ort_forward(path, args.eval_threads)
        result["quality"] = ev.evaluate(src.kind, forward, src.tokenizer, reference).to_json()
        if args.heldout:
            result["heldout"] = ev.evaluate(src.kind, forward, src.tokenizer, reference, text="heldout").to_json()
    print(json.dumps(clean_json(result)), file=sys.stderr)
    return result, feed


def markdown_table(rows: list[dict[str, Any]], reference: dict[str, Any]) -> str:
    ref_ms = reference["latency"]["median_ms"]
    heldout = "heldout" in reference
    extra = " held-out text | " if heldout else ""
    lines = [f"| artifact | recipe | quality |{extra} size MB | size × ref | latency ms (median) | latency × ref |",
             "|---|---|---|---|---|---|---|" + ("---|" if heldout else "")]

    def cell(r: dict[str, Any], key: str) -> str:
        q, ref = r.get(key), reference.get(key)
        if not q:
            return "-"
        change = f" ({(q['value'] / ref['value'] - 1) * 100:+.1f} %)" if r is not reference and ref else ""
        return f"{q['metric']} {q['value']:.4f}{change}"

    for r in [reference, *rows]:
        held = f" {cell(r, 'heldout')} |" if heldout else ""
        lines.append(
            f"| {r['artifact']}{' (reference)' if r is reference else ''} | {r['recipe']} | {cell(r, 'quality')} |"
            f"{held} {r['bytes'] / 1e6:.1f} | {r['bytes'] / reference['bytes']:.3f} | "
            f"{r['latency']['median_ms']:.1f} | {r['latency']['median_ms'] / ref_ms:.3f} |"
        )
    return "\n".join(lines)


def update_markdown(path: Path, name: str, body: str) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="*", help=".onnx files or compress output directories")
    p.add_argument("--reference", required=True, help="the fp32 export, measured in the same run")
    p.add_argument("--name", default="default", help="table name in the Markdown file")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads for latency")
    p.add_argument("--eval-threads", type=int, default=0, help="onnxruntime threads for quality (0: all)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--heldout", action="store_true",
                   help="also the held-out news text (graphpress.evaluation; pip install --no-deps gensim==4.4.0)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    if args.runs < 10:
        sys.exit("bench: --runs must be at least 10")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    sources: dict[str, Any] = {}
    measured = [measure(a, args, sources) for a in [args.reference, *args.artifacts]]
    everything = [r for r, _ in measured]
    timed = latencies([onnx_path(r["artifact"]) for r in everything], [feed for _, feed in measured],
                      args.threads, args.runs, args.warmup)
    for r, latency in zip(everything, timed, strict=True):
        r["latency"] = latency
    reference, rows = everything[0], everything[1:]
    for r in rows:
        r["latency_vs_reference"] = r["latency"]["median_ms"] / reference["latency"]["median_ms"]
        r["bytes_vs_reference"] = r["bytes"] / reference["bytes"]
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": __import__("os").cpu_count()},
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
              "reference": reference, "artifacts": rows}
    table = markdown_table(rows, reference)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(clean_json(report), indent=2, default=str))
    if args.markdown:
        note = (f"Measured by `python tools/bench.py` on {report['machine']['cpus']} CPUs "
                f"({report['machine']['platform']}); latency: batch 1, {args.tokens} tokens, {args.threads} "
                f"threads, median of {args.runs} runs in {ROUNDS} rounds across artifacts, {args.warmup} warm-up runs per "
                f"round, one session alive at a time.")
        update_markdown(args.markdown, args.name, f"{note}\n\n{table}")


if __name__ == "__main__":
    main()
