"""Which onnxruntime lowering of a W8A8 linear is fastest on this CPU? (numbers quoted in onnxruntime_rules.py)

    python tools/bench_w8a8.py [--threads 2] [--tokens 128] [--rounds 15]

For SmolLM2-sized matmuls, x [1, T, K] @ W^T with W [N, K], one single-node (or few-node) ONNX model per option:
    fp32         MatMul                                              (the baseline)
    nbits-B      com.microsoft::MatMulNBits bits=8 block_size=B accuracy_level=4  (x quantized per block of B)
    dq-matmul    DynamicQuantizeLinear + MatMulInteger + Mul         (x quantized per tensor, uint8 asymmetric)
    dqmm         com.microsoft::DynamicQuantizeMatMul                (x quantized per tensor, uint8 asymmetric)
    per-token    Abs, ReduceMax, Div, Round, Add 128, Cast + MatMulInteger(u8, s8) + Mul, Mul
                 (x quantized per token, symmetric int8 stored as uint8 with zero point 128)
    rows-dqmm    Abs, ReduceMax, Div + DynamicQuantizeMatMul + Mul   (each row scaled to absmax 1 first: per
                 token, 255 levels; graphpress's lowering of W8A8 quantized_linear)
Times are the minimum and the 25th percentile over rounds interleaved across options (other jobs share the
machine, so the minimum is the better estimate of the uncontended time); SQNR is against the float product on activations with varied row ranges, with and without one outlier channel (x20).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (K, N) of SmolLM2-135M: q/k/v merged, gate/up merged, down, tied lm_head
SHAPES = [(576, 960), (576, 3072), (1536, 576), (576, 49152)]


def _weight(k: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.02).astype(np.float32)  # [N, K]
    ws = (np.abs(w).max(1) / 127).astype(np.float32)  # [N]
    wq = np.clip(np.round(w / ws[:, None]), -127, 127).astype(np.int8)  # [N, K]
    return w, wq, ws


def build(option: str, k: int, n: int, t: int) -> tuple[bytes, np.ndarray]:
    """Serialized model for ``option`` and the float weight [N, K] it approximates."""
    w, wq, ws = _weight(k, n)
    c = numpy_helper.from_array
    inits, nodes = [], []
    if option == "fp32":
        inits = [c(w.T.copy(), "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    elif option.startswith("nbits-"):
        bs = int(option.split("-")[1])
        kb = -(-k // bs)
        codes = np.full((n, kb * bs), 128, np.uint8)
        codes[:, :k] = (wq.astype(np.int16) + 128).astype(np.uint8)
        inits = [c(codes.reshape(n, kb, bs), "B"), c(np.repeat(ws[:, None], kb, 1), "S")]
        nodes = [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                  block_size=bs, accuracy_level=4)]
    elif option == "dq-matmul":
        inits = [c(wq.T.copy(), "Wq"), c(ws, "Ws")]
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("MatMulInteger", ["xq", "Wq", "xz"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["xs", "Ws"], ["sc"]),
                 helper.make_node("Mul", ["accf", "sc"], ["y"])]
    elif option == "dqmm":
        inits = [c(wq.T.copy(), "Wq"), c(ws, "Ws")]
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "Wq", "Ws"], ["y"], domain="com.microsoft")]
    elif option == "per-token":
        inits = [c(wq.T.copy(), "Wq"), c(ws, "Ws"), c(np.array(127, np.float32), "c127"),
                 c(np.array(128, np.float32), "c128"), c(np.array(128, np.uint8), "z128"),
                 c(np.array([-1], np.int64), "axis")]
        nodes = [helper.make_node("Abs", ["x"], ["xa"]),
                 helper.make_node("ReduceMax", ["xa", "axis"], ["amax"], keepdims=1),
                 helper.make_node("Div", ["amax", "c127"], ["xs"]),
                 helper.make_node("Div", ["x", "xs"], ["xd"]),
                 helper.make_node("Round", ["xd"], ["xr"]),
                 helper.make_node("Add", ["xr", "c128"], ["xu"]),
                 helper.make_node("Cast", ["xu"], ["xq"], to=TensorProto.UINT8),
                 helper.make_node("MatMulInteger", ["xq", "Wq", "z128"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["accf", "xs"], ["y1"]),
                 helper.make_node("Mul", ["y1", "Ws"], ["y"])]
    elif option == "rows-dqmm":
        inits = [c(wq.T.copy(), "Wq"), c(ws, "Ws"), c(np.array([-1], np.int64), "axis")]
        nodes = [helper.make_node("Abs", ["x"], ["xa"]),
                 helper.make_node("ReduceMax", ["xa", "axis"], ["amax"], keepdims=1),
                 helper.make_node("Div", ["x", "amax"], ["xn"]),
                 helper.make_node("DynamicQuantizeMatMul", ["xn", "Wq", "Ws"], ["yn"], domain="com.microsoft"),
                 helper.make_node("Mul", ["yn", "amax"], ["y"])]
    else:
        raise ValueError(option)
    graph = helper.make_graph(nodes, option, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString(), w


def activations(k: int, t: int, outlier: bool) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, t, k)) * rng.uniform(0.2, 3.0, (1, t, 1))  # rows of varied range
    if outlier:
        x[..., 7] *= 20
    return x.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    options = ["fp32", "nbits-64", "nbits-128", "nbits-256", "dq-matmul", "dqmm", "per-token", "rows-dqmm"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = args.threads, 1, 3
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, T={args.tokens}")
    print("| K x N | option | ms (min) | ms (p25) | SQNR dB | SQNR dB, outlier channel |")
    print("|---|---|---|---|---|---|")
    for k, n in SHAPES:
        sessions, sqnr = {}, {}
        for opt in options:
            model, w = build(opt, k, n, args.tokens)
            s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            sessions[opt] = s
            sqnr[opt] = []
            for outlier in (False, True):
                x = activations(k, args.tokens, outlier)
                ref, y = x @ w.T, s.run(None, {"x": x})[0]
                sqnr[opt].append(10 * np.log10((ref**2).sum() / ((ref - y) ** 2).sum()))
        x = activations(k, args.tokens, False)
        reps = max(1, int(5e6 // (k * n)))
        times: dict[str, list[float]] = {opt: [] for opt in options}
        for _ in range(args.rounds):
            for opt, s in sessions.items():
                s.run(None, {"x": x})
                start = time.perf_counter()
                for _ in range(reps):
                    s.run(None, {"x": x})
                times[opt].append((time.perf_counter() - start) / reps * 1e3)
        for opt in options:
            print(f"| {k} x {n} | {opt} | {min(times[opt]):.3f} | {np.percentile(times[opt], 25):.3f} | {sqnr[opt][0]:.1f} | "
                  f"{sqnr[opt][1]:.1f} |")


if __name__ == "__main__":
    main()
