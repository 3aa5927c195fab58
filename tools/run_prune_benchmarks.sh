#!/usr/bin/env bash
# Reproduce BENCHMARKS.md's pruning tables (issue 11): compress SmolLM2-135M with each pruning recipe (and the
# ShortGPT reference), then measure every artifact beside the fp32 export in one run of tools/bench.py
# (onnxruntime: quality on both texts, size, latency at 2 threads), reload each hf/ with from_pretrained
# (tools/bench_prune.py hf) and time the pruning pass alone (tools/bench_prune.py cost).
# Run on an otherwise idle machine.   bash tools/run_prune_benchmarks.sh [recipe ...]
source "$(dirname "$0")/bench_env.sh"
RECIPES=${*:-prune-20 prune-mlp-25 prune-depth-20 prune-20-w4 tools/study/prune-mlp-1024.yaml tools/study/prune-depth-shortgpt.yaml}
compress_recipes $RECIPES
# HELDOUT= (empty) measures the protocol's text only
.venv/bin/python tools/bench.py --reference "$OUT/exact" "${ARTIFACTS[@]}" --name smollm2-prune ${HELDOUT---heldout} \
  --runs 20 --json "$OUT/bench-prune.json" --markdown BENCHMARKS.md
.venv/bin/python tools/bench_prune.py hf "${ARTIFACTS[@]}" --bench "$OUT/bench-prune.json" --json "$OUT/prune-hf.json"
/usr/bin/time -v .venv/bin/python tools/bench_prune.py cost --recipe prune-mlp-25 prune_mlp.importance=activation \
  --json "$OUT/prune-cost.json" 2> "$OUT/prune-cost.log"
