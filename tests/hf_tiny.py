"""Tiny random Hugging Face models of ten architectures, saved as a user would (``save_pretrained``), with or
without a tokenizer. For tests only: random weights say nothing about quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 320  # > the byte tokenizer's 256 bytes + 2 special tokens
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4)

# architecture -> (config class, model class, config options)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, num_key_value_heads=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(COMMON, num_key_value_heads=2, pad_token_id=0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(COMMON, num_key_value_heads=2, head_dim=16)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                num_attention_heads=4, word_embed_proj_dim=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(COMMON)),
    "bert": ("BertConfig", "BertModel", dict(COMMON)),
    "roberta": ("RobertaConfig", "RobertaModel", dict(COMMON, pad_token_id=1)),
}
CAUSAL = [a for a, (_, m, _) in ARCHITECTURES.items() if m.endswith(("ForCausalLM", "LMHeadModel"))]
POSITION_KEYS = ("max_position_embeddings", "n_positions")


def tiny_model(arch: str, positions: int | None = None, seed: int = 0) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, options = ARCHITECTURES[arch]
    options = dict(options)
    if positions is not None:
        key = "n_positions" if arch == "gpt2" else "max_position_embeddings"
        options[key] = positions + (2 if arch == "roberta" else 0)  # RoBERTa's positions start after padding
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**options)
    cls = getattr(transformers, model_cls)
    model = cls(config, add_pooling_layer=False) if arch in ("bert", "roberta") else cls(config)
    return model.eval()


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges (256 byte tokens + <pad> and <eos>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"pad_token": "<pad>", "eos_token": "<eos>"})
    return fast


def save_tiny(arch: str, directory: Path, *, tokenizer: bool = False, positions: int | None = None) -> Path:
    """Save a tiny random ``arch`` model (and the byte tokenizer) to ``directory``, as save_pretrained does."""
    tiny_model(arch, positions).save_pretrained(directory)
    if tokenizer:
        byte_tokenizer().save_pretrained(directory)
    return directory
