"""What onnxruntime-genai needs beside a causal LM's ``model.onnx``: its ``genai_config.json``.

The file names the inputs and outputs the export uses (graphpress.kv_cache's names), the cache's layout and
the model's special tokens; the tokenizer files are written beside it by ``compress``. Where every present
key and value comes out of onnxruntime's GroupQueryAttention (graphpress::cached_attention lowered), the
kernel appends the new tokens in place, so the runtime keeps one buffer of the whole context for past and
present (``past_present_share_buffer: true``, no copy of the cache per token); where the graph concatenates,
it must not (``false``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from graphpress.kv_cache import CacheLayout

CONFIG = "genai_config.json"


def genai_config(cache: CacheLayout, config: Any, context: int | None, filename: str = "model.onnx",
                 share_buffer: bool = False) -> dict[str, Any]:
    """onnxruntime-genai's configuration for a decoder-only model exported with ``cache`` (a Hugging Face
    ``config`` gives the vocabulary, widths and special tokens)."""
    vocab = int(config.vocab_size)
    eos = getattr(config, "eos_token_id", None)
    bos = getattr(config, "bos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    eos = eos if eos is not None else (bos if bos is not None else 0)
    context = int(context or getattr(config, "max_position_embeddings", 0) or 2048)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": cache.head_dim,
        "hidden_size": int(getattr(config, "hidden_size", cache.heads * cache.head_dim)),
        "num_attention_heads": int(getattr(config, "num_attention_heads", cache.heads)),
        "num_hidden_layers": cache.layers,
        "num_key_value_heads": cache.heads,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    model = {"bos_token_id": bos if bos is not None else eos, "context_length": context, "decoder": decoder,
             "eos_token_id": eos, "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
             "type": "decoder", "vocab_size": vocab}
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def presents_in_place(model: str | os.PathLike[str]) -> bool:
    """Whether every present output of the ONNX file at ``model`` comes out of a GroupQueryAttention node (which
    can append to a past buffer shared with its present)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    presents = [o.name for o in graph.output if o.name.startswith("present.")]
    return bool(presents) and all(producers.get(p) == "GroupQueryAttention" for p in presents)


def write_genai_config(folder: str | os.PathLike[str], cache: CacheLayout, config: Any, context: int | None,
                       filename: str = "model.onnx") -> Path:
    path = Path(folder) / CONFIG
    share = presents_in_place(Path(folder) / filename)
    path.write_text(json.dumps(genai_config(cache, config, context, filename, share), indent=2) + "\n")
    return path
