"""GPU kernel benchmark (issue 15): graphpress's W4A16 and W8A8 Triton kernels against bf16 cuBLAS (``F.linear``),
PyTorch's built-in int4 kernel (``aten._weight_int4pack_mm``, tinygemm) and cuBLAS int8 (``torch._int_mm``),
measured in the same run.

The issue's method: every op timed by CUDA-graph replay (launch overhead excluded), each graph cycling through
enough copies of the weights (>= 4x the 60 MB L2, at least two) that no weight is read from cache; the time
of one product is the replays' time over replays x copies. Int4 weights are random codes in groups of 128 with
zero points and fp16 scales (what the GPU lowering stores); every kernel's output is checked against an fp32
product of the same dequantized weights (SQNR).

    PYTHONPATH=. python tools/bench_gpu_kernels.py --json $OUT/kernels.json            # W4A16, M 1 4 16 256
    PYTHONPATH=. python tools/bench_gpu_kernels.py --w8a8 --json $OUT/w8a8.json        # W8A8, M 256 1024 4096
    PYTHONPATH=. python tools/bench_gpu_kernels.py --sparse24 --json $OUT/sparse24.json  # 2:4 bf16, M 1024 4096

Prints one row per shape and M: microseconds per product, speedup over bf16, the weight bytes' bandwidth, the
kernel the tuner chose. W8A8 rows time the whole op (both activation kernels and the product, as a model calls
it) and the product alone (the issue's "quantize step fused or cheap": the difference is its cost), against
bf16 and against cuBLAS's int8 product of the same integers without any scaling (``torch._int_mm``).
Weights: random int8 codes per channel; the reference is the fp32 product of the same int8 activations.
2:4 rows (the sparsity issue): bf16 weights with the two smallest of every four inputs zeroed, compressed by
graphpress.kernels.sparse24 (PyTorch's semi-structured tensors: cuSPARSELt) and multiplied by ``F.linear``, then
the same with cuSPARSELt's algorithm searched for the shape (``torch._cslt_sparse_mm_search``, where this torch
has it); the reference is the fp32 product of the same dense weight with the same zeros.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from graphpress.kernels.tuning import bucket

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


def linear_us(weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """Microseconds per ``F.linear(x, w)``, cycling through ``weights`` (graph_time_us)."""
    return graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in weights])


def copy_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = graph_time_us([lambda: b.copy_(a)], replays=10)
    return 2 * a.numel() / t / 1e6  # TB/s, bytes read plus written


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - out).pow(2).sum().item(), 1e-300))


def bf16_copies(n: int, k: int, gen: torch.Generator, stored: float = 2.0) -> list[torch.Tensor]:
    """bf16 weights [n, k], as many copies as overflow the L2 once stored at ``stored`` bytes a weight."""
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            for _ in range(copies_for(int(n * k * stored)))]


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


def geomeans(result: dict, labels: tuple[str, ...], groups: list[list[int]]) -> None:
    for label in labels:
        for ms in groups:
            speedups = [r[f"{label}_speedup"] for r in result["rows"] if r["m"] in ms and f"{label}_speedup" in r]
            if speedups:
                geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
                result[f"{label}_geomean_m{'-'.join(map(str, ms))}"] = geo
                print(f"{label}: geometric mean speedup over bf16 at M in {ms}: {geo:.2f}x (min {min(speedups):.2f}x)")


def bench_w4(args: argparse.Namespace, gen: torch.Generator, result: dict) -> None:
    from graphpress.kernels import triton_w4a16
    from graphpress.kernels.quantized import dequantize
    from graphpress.kernels.triton_w4a16 import w4a16_linear

    print(f"{'shape':10} {'M':>5} {'bf16 us':>8} {'w4 us':>8} {'x bf16':>7} {'TB/s':>5} {'SQNR':>5} "
          f"{'tinygemm us':>11} {'x bf16':>7} kernel", flush=True)
    for name in args.shapes:
        n, k = SHAPES[name]
        dense = bf16_copies(n, k, gen)
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
            t_bf16 = linear_us(dense, x)
            t_w4 = graph_time_us([lambda q=q, x=x, k=k: w4a16_linear(x, q[0], q[1], q[2], None, k, GROUP)
                                  for q in quant])
            ref = x.float() @ ref_w.T
            out = w4a16_linear(x, *quant[0], None, k, GROUP)
            chosen = [c for key, c in triton_w4a16.TUNER.chosen.items() if key[:3] == (bucket(m), n, k)]
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_us": t_bf16, "w4_us": t_w4,
                   "w4_speedup": t_bf16 / t_w4, "w4_tb_s": w4_bytes / t_w4 / 1e6, "w4_sqnr_db": sqnr_db(ref, out),
                   "w4_config": list(chosen[0]) if chosen else None}
            if tiny:
                row["tinygemm_us"] = graph_time_us([lambda f=f, x=x: f(x) for f in tiny])
                row["tinygemm_speedup"] = t_bf16 / row["tinygemm_us"]
                row["tinygemm_sqnr_db"] = sqnr_db(ref, tiny[0](x))
            result["rows"].append(row)
            print(f"{name:10} {m:5d} {t_bf16:8.1f} {t_w4:8.1f} {row['w4_speedup']:7.2f} {row['w4_tb_s']:5.2f} "
                  f"{row['w4_sqnr_db']:5.1f} {row.get('tinygemm_us', float('nan')):11.1f} "
                  f"{row.get('tinygemm_speedup', float('nan')):7.2f} {row['w4_config']}", flush=True)
        del dense, quant, tiny
        torch.cuda.empty_cache()
    small, large = [m for m in args.m if m <= 16], [m for m in args.m if m > 16]
    geomeans(result, ("w4", "tinygemm"), [ms for ms in (small, large) if ms])


def bench_w8a8(args: argparse.Namespace, gen: torch.Generator, result: dict) -> None:
    from graphpress.kernels import triton_w8a8
    from graphpress.kernels.triton_w8a8 import launch, prepared, quantize_rows, w8a8_linear

    print(f"{'shape':10} {'M':>5} {'bf16 us':>8} {'w8a8 us':>8} {'x bf16':>7} {'gemm us':>8} {'x bf16':>7} "
          f"{'_int_mm us':>10} {'SQNR':>5} kernel", flush=True)
    for name in args.shapes:
        n, k = SHAPES[name]
        dense = bf16_copies(n, k, gen)
        weights = []
        for _ in range(copies_for(n * k)):
            qweight = torch.randint(1, 256, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
            scales = torch.rand(n, 1, device="cuda", generator=gen) * 0.001 + 1e-4
            weights.append((qweight, scales, prepared(qweight, scales, None, k, 8, k)))
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            t_bf16 = linear_us(dense, x)
            t_op = graph_time_us([lambda w=w, x=x, k=k: w8a8_linear(x, w[0], w[1], None, None, k, 8, k) for w in weights])
            c, r, sz = quantize_rows(x)
            key = (bucket(m), n, k, x.dtype, False)
            config = triton_w8a8.TUNER.chosen[key]
            t_gemm = graph_time_us([lambda w=w, a=(config, c, r, sz): launch(*a, *w[2], None, torch.bfloat16)
                                    for w in weights])
            t_int = graph_time_us([lambda w=w, c=c: torch._int_mm(c, w[2][0].T) for w in weights])
            q, s, _ = weights[0][2]
            ref = ((c.double() + 128 - sz[1].double()) @ q.double().T) * (sz[0].double() * s.double())
            ref = ref * r.double()[:, None]
            out = launch(config, c, r, sz, *weights[0][2], None, x.dtype)
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_us": t_bf16, "w8a8_us": t_op,
                   "w8a8_speedup": t_bf16 / t_op, "gemm_us": t_gemm, "gemm_speedup": t_bf16 / t_gemm,
                   "int_mm_us": t_int, "int_mm_speedup": t_bf16 / t_int, "w8a8_sqnr_db": sqnr_db(ref, out),
                   "w8a8_config": list(config)}
            result["rows"].append(row)
            print(f"{name:10} {m:5d} {t_bf16:8.1f} {t_op:8.1f} {row['w8a8_speedup']:7.2f} {t_gemm:8.1f} "
                  f"{row['gemm_speedup']:7.2f} {t_int:10.1f} {row['w8a8_sqnr_db']:5.1f} {config}", flush=True)
        del dense, weights
        torch.cuda.empty_cache()
    geomeans(result, ("w8a8", "gemm", "int_mm"), [list(args.m)])


def bench_sparse24(args: argparse.Namespace, gen: torch.Generator, result: dict) -> None:
    from graphpress.kernels.sparse24 import backend, compress
    from graphpress.sparsity import Pattern, magnitude

    result["backend"] = backend().BACKEND
    print(f"{'shape':10} {'M':>5} {'bf16 us':>8} {'2:4 us':>8} {'x bf16':>7} {'searched':>8} {'x bf16':>7} {'SQNR':>5}",
          flush=True)
    for name in args.shapes:
        n, k = SHAPES[name]
        # compressed: half the values plus 2-bit indices, 1.125 bytes a weight; as many copies as that overflows L2
        dense = [w.masked_fill(magnitude(w, Pattern(n=2, m=4)), 0) for w in bf16_copies(n, k, gen, stored=1.125)]
        sparse = [compress(w) for w in dense]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            t_bf16 = linear_us(dense, x)
            t_24 = linear_us(sparse, x)
            out = torch.nn.functional.linear(x, sparse[0])
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_us": t_bf16, "sparse24_us": t_24,
                   "sparse24_speedup": t_bf16 / t_24, "sparse24_sqnr_db": sqnr_db(x.float() @ dense[0].float().T, out)}
            try:  # the algorithm cuSPARSELt finds fastest for this shape (x^T as linear passes it), on every copy
                alg = torch._cslt_sparse_mm_search(sparse[0].packed, x.t(), transpose_result=True)
                alg = alg[0] if isinstance(alg, tuple) else alg
                for w in sparse:
                    w.alg_id_cusparselt = alg
                row["searched_us"] = linear_us(sparse, x)
                row["searched_speedup"], row["alg_id"] = t_bf16 / row["searched_us"], alg
            except (AttributeError, RuntimeError, TypeError) as e:  # said in the output, not fatal
                result["search_error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                for w in sparse:
                    w.alg_id_cusparselt = 0
            result["rows"].append(row)
            print(f"{name:10} {m:5d} {t_bf16:8.1f} {t_24:8.1f} {row['sparse24_speedup']:7.2f} "
                  f"{row.get('searched_us', float('nan')):8.1f} {row.get('searched_speedup', float('nan')):7.2f} "
                  f"{row['sparse24_sqnr_db']:5.1f}", flush=True)
        del dense, sparse
        torch.cuda.empty_cache()
    geomeans(result, ("sparse24", "searched"), [list(args.m)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--w8a8", action="store_true", help="the W8A8 kernels (default M: 256 1024 4096)")
    ap.add_argument("--sparse24", action="store_true", help="2:4 sparse bf16 against dense (default M: 1024 4096)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.m = args.m or ([256, 1024, 4096] if args.w8a8 else [1024, 4096] if args.sparse24 else [1, 4, 16, 256])
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_tb_s": copy_bandwidth(), "rows": []}
    print(f"{result['device']}, torch {result['torch']}, copy {result['copy_tb_s']:.2f} TB/s", flush=True)
    (bench_w8a8 if args.w8a8 else bench_sparse24 if args.sparse24 else bench_w4)(args, gen, result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
