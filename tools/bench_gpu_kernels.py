"""GPU kernel benchmark (issue 15): graphpress's W4A16 Triton kernel against bf16 cuBLAS (``F.linear``) and
PyTorch's built-in int4 kernel (``aten._weight_int4pack_mm``, tinygemm), measured in the same run.

The issue's method: every op timed by CUDA-graph replay (launch overhead excluded), each graph cycling through
enough copies of the weights (>= 4x the 60 MB L2, at least two) that no weight is read from cache; the time
of one product is the replays' time over replays x copies. Int4 weights are random codes in groups of 128 with
zero points and fp16 scales (what the GPU lowering stores); every kernel's output is checked against an fp32
product of the same dequantized weights (SQNR).

    PYTHONPATH=. python tools/bench_gpu_kernels.py --json $OUT/kernels.json

Prints one row per shape and M: microseconds per product, speedup over bf16, the weight bytes' bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

SHAPES = {  # name: (N, K) for y = x @ W^T, W [N, K]
    "7B qkv": (12288, 4096), "8B qkv": (6144, 4096), "7B o": (4096, 4096), "7B up": (22016, 4096),
    "7B down": (4096, 11008), "70B qkv": (10240, 8192), "70B up": (57344, 8192), "70B down": (8192, 28672),
}
L2_BYTES = 60e6
GROUP = 128


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(4 * L2_BYTES / nbytes))


def graph_time_us(fns: list, replays: int = 20) -> float:
    """Microseconds per call of the fns, one graph that calls each once, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm-up (and tuning) outside the capture
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * len(fns)))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = graph_time_us([lambda: b.copy_(a)], replays=10)
    return 2 * a.numel() / t / 1e6  # TB/s, bytes read plus written


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - out).pow(2).sum().item(), 1e-300))


def int4_weights(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = k // GROUP
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
    scales = (torch.rand(n, groups, device="cuda", generator=gen) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 256, (n, (groups + 1) // 2), dtype=torch.uint8, device="cuda", generator=gen)
    return qweight, scales, zeros


def tinygemm(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int):  # noqa: ANN201
    """PyTorch's int4 kernel on the same codes: its packing, and its (scale, zero) pairs [G, N, 2] in bf16, where
    w = (code - 8) * scale + zero (zero = (8 - z) * scale gives the same weight)."""
    from graphpress.kernels.quantized import unpack_uint8

    n, groups = scales.shape
    packed = torch.ops.aten._convert_weight_to_int4pack(qweight.contiguous(), 8)
    z = unpack_uint8(zeros, 4, groups).float()
    sz = torch.stack((scales.float(), (8 - z) * scales.float()), dim=-1).transpose(0, 1).contiguous().bfloat16()
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 256])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from graphpress.kernels.quantized import dequantize
    from graphpress.kernels.triton_w4a16 import w4a16_linear

    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_tb_s": copy_bandwidth(), "rows": []}
    print(f"{result['device']}, torch {result['torch']}, copy {result['copy_tb_s']:.2f} TB/s", flush=True)
    print(f"{'shape':10} {'M':>5} {'bf16 us':>8} {'w4 us':>8} {'x bf16':>7} {'TB/s':>5} {'SQNR':>5} "
          f"{'tinygemm us':>11} {'x bf16':>7}", flush=True)
    for name in args.shapes:
        n, k = SHAPES[name]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
                 for _ in range(copies_for(n * k * 2))]
        quant = [int4_weights(n, k, gen) for _ in range(copies_for(n * k // 2))]
        w4_bytes = sum(t.numel() * t.element_size() for t in quant[0])
        try:
            tiny = [tinygemm(*q, k) for q in quant]
        except (RuntimeError, NotImplementedError) as e:  # said in the output, not fatal
            tiny = []
            result["tinygemm_error"] = f"{type(e).__name__}: {e}"[:300]
        ref_w = dequantize(*quant[0], k, 4, GROUP).float()
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            outs: dict[str, torch.Tensor] = {}
            t_bf16 = graph_time_us([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in dense])
            t_w4 = graph_time_us([lambda q=q, x=x, k=k: w4a16_linear(x, q[0], q[1], q[2], None, k, GROUP) for q in quant])
            ref = x.float() @ ref_w.T
            outs["w4"] = w4a16_linear(x, *quant[0], None, k, GROUP)
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_us": t_bf16, "w4_us": t_w4,
                   "w4_speedup": t_bf16 / t_w4, "w4_tb_s": w4_bytes / t_w4 / 1e6, "w4_sqnr_db": sqnr_db(ref, outs["w4"])}
            if tiny:
                row["tinygemm_us"] = graph_time_us([lambda f=f, x=x: f(x) for f in tiny])
                row["tinygemm_speedup"] = t_bf16 / row["tinygemm_us"]
                row["tinygemm_sqnr_db"] = sqnr_db(ref, tiny[0](x))
            result["rows"].append(row)
            print(f"{name:10} {m:5d} {t_bf16:8.1f} {t_w4:8.1f} {row['w4_speedup']:7.2f} {row['w4_tb_s']:5.2f} "
                  f"{row['w4_sqnr_db']:5.1f} {row.get('tinygemm_us', float('nan')):11.1f} "
                  f"{row.get('tinygemm_speedup', float('nan')):7.2f}", flush=True)
        del dense, quant, tiny
        torch.cuda.empty_cache()
    for label in ("w4", "tinygemm"):
        for ms in ([m for m in args.m if m <= 16], [m for m in args.m if m > 16]):
            speedups = [r[f"{label}_speedup"] for r in result["rows"] if r["m"] in ms and f"{label}_speedup" in r]
            if speedups:
                geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
                result[f"{label}_geomean_m{'le16' if max(ms) <= 16 else 'gt16'}"] = geo
                print(f"{label}: geometric mean speedup over bf16 at M in {ms}: {geo:.2f}x (min {min(speedups):.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
