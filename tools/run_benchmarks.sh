#!/usr/bin/env bash
# Reproduce the BENCHMARKS.md tables: compress SmolLM2-135M with the fp32 reference (exact passes) and each
# quantization recipe, MiniLM-L6 with W8A8, then measure all artifacts in one run of tools/bench.py.
# Run on an otherwise idle machine: latency is measured with 2 onnxruntime threads.
#   bash tools/run_benchmarks.sh [recipe ...]
source "$(dirname "$0")/bench_env.sh"
RECIPES=${*:-w4-awq-gptq w4-gptq w8a8-smoothquant w4-rtn w4-awq w8-rtn}
for r in exact $RECIPES; do
  if [ ! -f "$OUT/$r/model.onnx" ]; then
    /usr/bin/time -v $G compress smollm2-135m --recipe "$r" --out "$OUT/$r" --eval-torch 2> "$OUT/$r.log"
  fi
done
if [ ! -f "$OUT/minilm-exact/model.onnx" ]; then
  $G compress minilm-l6 --out "$OUT/minilm-exact" 2> "$OUT/minilm-exact.log"
fi
if [ ! -f "$OUT/minilm-w8a8/model.onnx" ]; then
  $G compress minilm-l6 --recipe w8a8-smoothquant --out "$OUT/minilm-w8a8" 2> "$OUT/minilm-w8a8.log"
fi
.venv/bin/python tools/bench_gptq.py --json "$OUT/gptq.json" > /dev/null 2> "$OUT/gptq.log"
artifacts=()
for r in $RECIPES; do artifacts+=("$OUT/$r"); done
.venv/bin/python tools/bench.py --reference "$OUT/exact" "${artifacts[@]}" --name smollm2 --heldout \
  --runs 40 --json "$OUT/bench-smollm2.json" --markdown BENCHMARKS.md
.venv/bin/python tools/bench.py --reference "$OUT/minilm-exact" "$OUT/minilm-w8a8" --name minilm \
  --runs 40 --json "$OUT/bench-minilm.json" --markdown BENCHMARKS.md
