"""Run graphpress ONNX artifacts in OpenVINO beside onnxruntime: quality on the evaluation protocol in both, and
latency in both (batch 1, N tokens, default settings: onnxruntime's default session options on the CPU
provider, OpenVINO's default CPU compilation), one runtime's model alive at a time.

    pip install openvino   # not a graphpress dependency
    python tools/bench_openvino.py out/w4-qdq out/fp32 --json ov.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphpress import evaluation as ev
from graphpress import kv_cache
from graphpress.compress import clean_json, resolve_source
from graphpress.lowering.onnx import onnx_metadata, ort_forward, ort_session

sys.path.insert(0, str(Path(__file__).parent))
from bench import file_bytes, onnx_path  # noqa: E402


def standard_onnx(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return all(o.domain in ("", "ai.onnx") for o in model.opset_import)


def openvino_model(path: Path) -> Any:
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU")


def openvino_forward(path: Path) -> Any:
    compiled = openvino_model(path)
    names = [i.get_any_name() for i in compiled.inputs]
    declared = ort_session(path).get_inputs()  # names, shapes and types of the cache inputs, if any

    def forward(*inputs: Any) -> np.ndarray:
        feed = {n: (x.numpy() if hasattr(x, "numpy") else x) for n, x in zip(names, inputs, strict=False)}
        return compiled(kv_cache.complete_feed(feed, declared))[0]

    return forward


def timed(run: Any, feed: dict[str, np.ndarray], runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        run(feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(feed)
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": runs}


def measure(artifact: str, args: argparse.Namespace) -> dict[str, Any]:
    path = onnx_path(artifact)
    meta = onnx_metadata(path)
    src = resolve_source(meta.get("source") or sys.exit(f"bench_openvino: {path} names no source model"))
    if src.kind != "causal-lm":
        sys.exit(f"bench_openvino: {artifact} is a {src.kind}; this benchmark measures causal LMs")
    ids = ev.eval_windows(ev.token_stream(src.tokenizer))[0, : args.tokens][None].numpy()
    feed = kv_cache.complete_feed({"input_ids": ids}, ort_session(path).get_inputs())  # a causal LM's cache: empty
    result: dict[str, Any] = {"artifact": artifact, "recipe": meta.get("recipe", "?"), "bytes": file_bytes(path),
                              "standard_onnx": standard_onnx(path)}
    if result["standard_onnx"]:
        import onnx

        onnx.checker.check_model(str(path), full_check=True)  # raises on any violation
        result["checker"] = "onnx.checker full check passed"
    for runtime, forward in (("onnxruntime", lambda: ort_forward(path)), ("openvino", lambda: openvino_forward(path))):
        if runtime == "openvino" and not standard_onnx(path):
            result["openvino_error"] = "not run: the file uses contrib-op domains"
            continue
        if not args.no_quality:
            result[f"{runtime}_quality"] = ev.evaluate(src.kind, forward(), src.tokenizer,
                                                         context=src.context).to_json()
        run = functools.partial(ort_session(path).run, None) if runtime == "onnxruntime" else openvino_model(path)
        result[f"{runtime}_latency"] = timed(run, feed, args.runs, args.warmup)
        del run
        print(json.dumps(clean_json(result)), file=sys.stderr)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+", help=".onnx files or compress output directories")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = [measure(a, args) for a in args.artifacts]
    for r in rows:
        q = {k: r[f"{k}_quality"]["value"] for k in ("onnxruntime", "openvino") if f"{k}_quality" in r}
        ov = r["openvino_latency"]["median_ms"] if "openvino_latency" in r else r.get("openvino_error")
        print(f"{r['artifact']}: {r['bytes'] / 1e6:.1f} MB, quality {q}, latency ms onnxruntime "
              f"{r['onnxruntime_latency']['median_ms']:.1f}, openvino {ov}")
    if args.json:
        args.json.write_text(json.dumps(clean_json({"settings": vars(args), "rows": rows}), indent=2, default=str))


if __name__ == "__main__":
    main()
