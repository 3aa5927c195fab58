"""Greedy generation in onnxruntime-genai from a graphpress output directory against transformers' greedy
generation (with its own KV cache) from the uncompressed model: token for token, three prompts.

    python tools/check_genai_greedy.py OUT_DIR [--model smollm2-135m] [--tokens 64]

Prints one line per prompt (equal, or where the two first differ) and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
)


def main() -> int:
    import onnxruntime_genai as og
    import torch

    from graphpress.compress import resolve_source

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    src = resolve_source(args.model)
    model = og.Model(str(args.out))
    failed = 0
    for text in PROMPTS:
        prompt = list(src.tokenizer(text)["input_ids"])
        params = og.GeneratorParams(model)
        total = len(prompt) + args.tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        got: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            got.append(int(generator.get_next_tokens()[0]))
        with torch.no_grad():
            ref = src.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        want = ref[0, len(prompt):].tolist()
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        same = first is None and len(got) == len(want)
        failed += not same
        print(f"{'equal' if same else f'differs at token {first}'} ({len(got)} tokens): {text!r} -> "
              f"{src.tokenizer.decode(got)[:60]!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
