"""Text generation with a KV cache: from a compressed output directory (onnxruntime, the export's cache
inputs and outputs, graphpress.kv_cache) or from a Hugging Face model (torch). One decoding loop serves both:
a *step* takes the new token ids and returns the last position's logits, keeping its own cache.

``graphpress generate TARGET --prompt TEXT`` streams the text and ends with the time to first token (the
prompt's prefill and the first token) and the decode speed (tokens per second after the first).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphpress import kv_cache

Step = Callable[[np.ndarray], np.ndarray]  # new ids [1, n] -> logits of the last position [vocab]
TOP_K = 50  # sampling keeps the 50 likeliest tokens (transformers' default), at temperature 1


class GenerationError(ValueError):
    """A target that cannot generate, or a prompt it cannot take."""


@dataclass
class Generation:
    tokens: list[int]  # the new tokens
    prompt_tokens: int
    first_token_ms: float  # prefill of the prompt and the first new token
    tokens_per_second: float | None  # new tokens after the first, per second of their decoding
    runtime: str

    def to_json(self) -> dict[str, Any]:
        return {"new_tokens": len(self.tokens), "prompt_tokens": self.prompt_tokens,
                "first_token_ms": self.first_token_ms, "tokens_per_second": self.tokens_per_second,
                "runtime": self.runtime}


def decode(step: Step, prompt: Sequence[int], max_new_tokens: int, *, greedy: bool = True,
           eos: Sequence[int] = (), seed: int = 0, on_token: Callable[[int], None] | None = None,
           runtime: str = "") -> Generation:
    """Feed ``prompt``, then one token at a time: the likeliest (``greedy``) or one sampled from the top
    ``TOP_K``; stop at an ``eos`` token (kept) or after ``max_new_tokens``."""
    rng = np.random.default_rng(seed)
    tokens: list[int] = []
    start = time.perf_counter()
    logits = step(np.asarray([list(prompt)], dtype=np.int64))
    first = second = time.perf_counter()
    while len(tokens) < max_new_tokens:
        token = _choose(logits, greedy, rng)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(tokens) == 1:
            first = second = time.perf_counter()
        if token in eos or len(tokens) == max_new_tokens:
            break
        logits = step(np.asarray([[token]], dtype=np.int64))
    end = time.perf_counter()
    decoded = len(tokens) - 1
    return Generation(tokens, len(prompt), (first - start) * 1e3,
                      decoded / (end - second) if decoded > 0 and end > second else None, runtime)


def _choose(logits: np.ndarray, greedy: bool, rng: np.random.Generator) -> int:
    logits = np.asarray(logits, dtype=np.float64)
    if greedy:
        return int(logits.argmax())
    top = np.argpartition(-logits, min(TOP_K, logits.size - 1))[:TOP_K]
    p = np.exp(logits[top] - logits[top].max())
    return int(top[rng.choice(len(top), p=p / p.sum())])


def onnx_step(path: str | Path, threads: int = 0) -> Step:
    """A step over an exported causal LM with its KV cache (onnxruntime, default session options apart from
    ``threads``)."""
    from graphpress.lowering.onnx import ort_session

    session = ort_session(path, threads)
    names = {i.name for i in session.get_inputs()}
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if not pasts or not {"attention_mask", "position_ids"} <= names:
        raise GenerationError(f"{path} takes no KV cache (inputs: {', '.join(sorted(names))}): compress the model "
                              "again with this graphpress, which exports causal LMs with their cache")
    outputs = [o.name for o in session.get_outputs()]
    state: dict[str, Any] = {"feed": kv_cache.complete_feed({"input_ids": np.zeros((1, 0), np.int64)},
                                                             session.get_inputs()), "length": 0}

    def step(ids: np.ndarray) -> np.ndarray:
        past, n = state["length"], ids.shape[1]
        feed = {k: v for k, v in state["feed"].items() if k.startswith("past_key_values.")}
        feed.update(input_ids=ids, attention_mask=np.ones((1, past + n), np.int64),
                    position_ids=np.arange(past, past + n, dtype=np.int64)[None])
        out = dict(zip(outputs, session.run(None, feed), strict=True))
        for k in list(feed):
            if k.startswith("past_key_values."):
                feed[k] = out[k.replace("past_key_values.", "present.", 1)]
        state["feed"], state["length"] = feed, past + n
        return out["logits"][0, -1]

    return step


def torch_step(model: torch.nn.Module) -> Step:
    """A step over a Hugging Face causal LM with its own cache (torch)."""
    import inspect

    from transformers import DynamicCache

    state: dict[str, Any] = {"cache": DynamicCache(), "length": 0}
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def step(ids: np.ndarray) -> np.ndarray:
        past, n = state["length"], ids.shape[1]
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(1, past + n, dtype=torch.long),
                        use_cache=True, **{key: state["cache"]})
        state["length"] = past + n
        return out.logits[0, -1].float().numpy()

    return step


def check_prompt(prompt: Sequence[int], context: int | None, target: str) -> None:
    if not prompt:
        raise GenerationError("the prompt is empty: pass --prompt TEXT")
    if context and len(prompt) >= context:
        raise GenerationError(f"the prompt is {len(prompt)} tokens, but {target} attends to {context} positions: "
                              "shorten the prompt")
