"""onnxruntime time per op type for ONNX files (batch 1, 128 tokens, 2 threads, 8 runs).

    python tools/profile_ort.py out/bench/exact/model.onnx out/bench/w4-gptq/model.onnx
"""

import collections
import json
import sys

import numpy as np
import onnxruntime as ort

from graphpress import kv_cache


def main() -> None:
    for path in sys.argv[1:]:
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = 2, 1
        o.enable_profiling, o.log_severity_level = True, 3
        s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        x = {"input_ids": np.random.default_rng(0).integers(0, 40000, (1, 128)).astype(np.int64)}
        x = kv_cache.complete_feed(x, s.get_inputs())  # a causal LM's cache inputs: an empty past
        for _ in range(8):
            s.run(None, x)
        events = json.load(open(s.end_profiling()))
        by_op: collections.Counter[str] = collections.Counter()
        count: collections.Counter[str] = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by_op[e["args"]["op_name"]] += e["dur"]
                count[e["args"]["op_name"]] += 1
        print(path, "kernel ms per run", sum(by_op.values()) / 8 / 1000)
        for k, v in by_op.most_common(12):
            print(f"  {k:28s} {v / 8 / 1000:7.2f} ms  {count[k] // 8} nodes")


if __name__ == "__main__":
    main()
