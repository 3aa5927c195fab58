"""End-to-end decoding on the GPU (issue 15): a Llama-architecture model with 7B shapes and random weights
(4096 hidden, 32 layers, 32 query / 8 key-value heads, 11008 MLP, 32000 vocabulary), its KV cache in PyTorch,
one decode step captured in a CUDA graph and replayed; tokens per second at batch 1 and 16 for bf16 weights
(``F.linear``, cuBLAS) against the same model with every linear (lm_head too) as graphpress::quantized_linear:
W4 (4-bit codes in groups of 128 with zero points, fp16 scales: graphpress.kernels.triton_w4a16) and W8A8
(int8 per channel, activations per token: graphpress.kernels.triton_w8a8).

    PYTHONPATH=. python tools/bench_gpu_decode.py --json $OUT/decode.json

Each step attends over a cache of ``--context`` positions (filled with random keys and values: the weights
are random, only the time matters); the time of a step is the median of 5 timings of 20 graph replays.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, VOCAB, HEAD_DIM = 4096, 32, 32, 8, 11008, 32000, 128


class Linear:
    """y = x @ W^T for W [n, k], stored as ``kind`` says (random values: speed only)."""

    def __init__(self, n: int, k: int, kind: str, gen: torch.Generator) -> None:
        self.kind, self.k = kind, k
        if kind == "bf16":
            self.w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5
        elif kind == "w4":
            groups = k // 128
            self.qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
            self.scales = (torch.rand(n, groups, device="cuda", generator=gen) * 0.2 * k**-0.5).half()
            self.zeros = torch.randint(0, 256, (n, (groups + 1) // 2), dtype=torch.uint8, device="cuda",
                                       generator=gen)
        else:  # w8a8
            self.qweight = torch.randint(1, 256, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
            self.scales = torch.rand(n, 1, device="cuda", generator=gen) * 0.02 * k**-0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bf16":
            return F.linear(x, self.w)
        if self.kind == "w4":
            return torch.ops.graphpress.quantized_linear(x, self.qweight, self.scales, self.zeros, None, self.k, 4, 128)
        return torch.ops.graphpress.quantized_linear(x, self.qweight, self.scales, None, None, self.k, 8, self.k, 8)


def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    v = x.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class Model:
    def __init__(self, kind: str, batch: int, context: int, gen: torch.Generator) -> None:
        qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        self.embed = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.layers = [dict(norm1=torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16),
                            norm2=torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16),
                            qkv=Linear(qkv, HIDDEN, kind, gen), o=Linear(HIDDEN, HEADS * HEAD_DIM, kind, gen),
                            gate_up=Linear(2 * MLP, HIDDEN, kind, gen), down=Linear(HIDDEN, MLP, kind, gen))
                       for _ in range(LAYERS)]
        self.norm = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.head = Linear(VOCAB, HIDDEN, kind, gen)
        shape = (LAYERS, batch, KV_HEADS, context, HEAD_DIM)
        self.k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
        angles = torch.arange(context, device="cuda").float()[:, None] * inv[None]
        self.cos = torch.cat((angles.cos(), angles.cos()), -1).bfloat16()
        self.sin = torch.cat((angles.sin(), angles.sin()), -1).bfloat16()
        self.positions = torch.arange(context, device="cuda")

    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens [B] at position ``pos`` (a 1-element tensor) -> logits [B, vocab]."""
        b = tokens.shape[0]
        h = self.embed[tokens][:, None]  # [B, 1, H]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [1, 1, D]
        mask = (self.positions <= pos)[None, None, None]  # the cache up to pos
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer["norm1"])
            q, k, v = layer["qkv"](x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
            q = rotate(q.view(b, 1, HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
            k = rotate(k.view(b, 1, KV_HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v.view(b, 1, KV_HEADS, HEAD_DIM).transpose(1, 2))
            a = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, enable_gqa=True)
            h = h + layer["o"](a.transpose(1, 2).reshape(b, 1, HEADS * HEAD_DIM))
            x = rms_norm(h, layer["norm2"])
            gate, up = layer["gate_up"](x).chunk(2, dim=-1)
            h = h + layer["down"](F.silu(gate) * up)
        return self.head(rms_norm(h, self.norm))[:, 0]


def weight_bytes(model: Model) -> int:
    total = 0
    for lin in [model.head] + [layer[n] for layer in model.layers for n in ("qkv", "o", "gate_up", "down")]:
        total += sum(t.numel() * t.element_size() for t in vars(lin).values() if isinstance(t, torch.Tensor))
    return total


def measure(kind: str, batch: int, context: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    model = Model(kind, batch, context, gen)
    tokens = torch.randint(0, VOCAB, (batch,), device="cuda", generator=gen)
    pos = torch.tensor([context // 2], device="cuda")
    start = time.perf_counter()
    model.step(tokens, pos)  # tunes each shape, lays the weights out: before the capture
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.step(tokens, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.step(tokens, pos)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 20)
    ms = sorted(times)[2]
    row = {"kind": kind, "batch": batch, "context": context, "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms,
           "weight_gb": weight_bytes(model) / 1e9, "first_step_s": warm, "finite": bool(torch.isfinite(logits).all()),
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    del model, graph, logits
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=["bf16", "w4", "w8a8"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import graphpress.kernels  # noqa: F401  (torch.ops.graphpress.*, their CUDA kernels)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    print(f"{'kind':6} {'batch':>5} {'ms/step':>8} {'tok/s':>8} {'x bf16':>7} {'weights GB':>10} {'first step s':>12}")
    for batch in args.batch:
        base = None
        for kind in args.kinds:
            row = measure(kind, batch, args.context)
            base = base or (row["ms_per_step"] if kind == "bf16" else None)
            row["speedup"] = base / row["ms_per_step"] if base else math.nan
            result["rows"].append(row)
            print(f"{kind:6} {batch:5d} {row['ms_per_step']:8.3f} {row['tokens_per_s']:8.1f} {row['speedup']:7.2f} "
                  f"{row['weight_gb']:10.2f} {row['first_step_s']:12.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
