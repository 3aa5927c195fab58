"""Write a float program (pruned or not) back as a plain Hugging Face directory.

    program  --program_state-->  {original HF name: tensor}    (merges cut apart, transposed copies undone)
    state, original config  --save_hf-->  out/ {config.json, model.safetensors, tokenizer files}

``save_hf`` makes the directory ``from_pretrained`` reads back without missing or unexpected weights:

    blocks    model.layers.{0, 1, 2, 3, 5} (4 removed)  =>  model.layers.{0..4},  num_hidden_layers = 5,
              per-layer lists (``layer_types``) keep the entries of the kept blocks
    widths    up_proj.weight [I', H], q_proj.weight [H' * d, H], ...  =>  intermediate_size = I', hidden_size = H,
              num_attention_heads = H', num_key_value_heads, head_dim = d written out when heads or the
              hidden size change

Widths are read off the shapes, not off parameter names: every tensor dimension is an affine function of the
config's width keys (``WIDTH_KEYS``), ``size = s0 + sum_k a_k * (x_k - x0_k)``. Building the model on the
meta device once per key, with that key doubled, gives each ``a_k``; each dimension of ``state`` is then one
equation, solved for the keys one unknown at a time (Phi-3's fused ``qkv_proj`` rows, ``(H + 2 KV) * d``,
once ``o_proj`` gave H). The model built from the result must have exactly the state's shapes.

Refused (ValueError, one line naming the tensor or key): an ``out`` that exists and is not empty; two
layers that give one key different widths (a config holds one width for all layers); a shape no config of
the class gives (fewer heads in GPT-2, OPT, GPT-NeoX, BERT: their head width is hidden_size / heads);
tensors missing or extra for the class (a BERT without its pooler), tied tensors with different values;
quantized tensors in ``program_state``; with ``expect``, a reloaded model whose output differs from the
program's (Gemma at a new hidden size: it scales embeddings by sqrt(hidden_size)). Written into a temporary
sibling of ``out`` and renamed at the end, so a failure leaves nothing behind. A GGUF load's ``quantization_config`` is dropped (the weights are
dequantized floats by then); a config without ``architectures`` (a GGUF load) gets the class of its
``model_type`` whose tensor names match the state's.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from graphpress import provenance
from graphpress.graph import is_derived

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from graphpress.program import Program

log = logging.getLogger(__name__)

# config keys that set a width inside every block (aliases such as GPT-2's n_head resolve through attribute_map)
WIDTH_KEYS = ("hidden_size", "intermediate_size", "ffn_dim", "n_inner", "num_attention_heads", "num_key_value_heads")
# keys whose change leaves each head's width alone only with head_dim written out
HEAD_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads")
# what a GGUF load leaves on the config: the weights are dequantized floats, and save_pretrained refuses it
DROPPED_KEYS = ("quantization_config",)
# where a class is looked for when the config names none (the first whose tensor names match wins)
_AUTO_MAPPINGS = tuple(f"MODEL_{task}MAPPING_NAMES" for task in (
    "FOR_CAUSAL_LM_", "", "FOR_MASKED_LM_", "FOR_SEQUENCE_CLASSIFICATION_", "FOR_TOKEN_CLASSIFICATION_",
    "FOR_QUESTION_ANSWERING_", "FOR_SEQ_TO_SEQ_CAUSAL_LM_"))
_BLOCK = re.compile(r"^((?:[^.]+\.)*?[^.]+)\.(\d+)\.")  # the first "<prefix>.<int>." of a name


def program_state(program: Program) -> dict[str, torch.Tensor]:
    """The program's parameters and buffers by their original Hugging Face names.

    Tensors a pass made from others (recorded in ``graphpress.provenance``) are replaced by their sources:
    merged weights cut back apart, transposed copies transposed back. Other tensors keep their names and
    share storage with the program; tied weights may come under one of their names only (a pass reads them
    through one), which ``save_hf`` accepts. Integer buffers never rewritten (BERT's ``position_ids``) stay.
    Raises ValueError naming the first quantized tensor: a recorded or parameter tensor that is not float.
    """
    gm = program.gm
    recorded = set(provenance.to_json(gm))
    params = dict(gm.named_parameters(remove_duplicate=False))
    tensors = {**params, **dict(gm.named_buffers(remove_duplicate=False))}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() and (name in recorded or name in params):
            raise ValueError(f"program_state {program.name}: {name} is {tensor.dtype} (quantized); hf/ is "
                             "written for float programs: export it before quantizing")
    state = {name: t.detach() for name, t in tensors.items() if name not in recorded and not is_derived(name)}
    state.update(provenance.unmerge(program))
    return state


def save_hf(
    state: Mapping[str, torch.Tensor],
    config: PretrainedConfig,
    out: str | os.PathLike[str],
    tokenizer: Any = None,
    expect: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
) -> Path:
    """Save ``state`` (HF names, possibly narrower, possibly without some blocks) as a Hugging Face directory.

    config: the original model's config (not modified). The class is ``config.architectures[0]``; the
    weights keep their dtypes. ``expect``: inputs (by name) and the first output the saved model must give
    for them once reloaded with ``from_pretrained`` (a class may derive something from a width that changed:
    Gemma scales its embeddings by sqrt(hidden_size)). Returns ``out``. Raises ValueError (see the module
    docstring) and leaves nothing behind.
    """
    out = Path(out)
    _check_free(out)
    config = _plain_config(config)
    cls = _model_class(config, state)
    layers = getattr(config, "num_hidden_layers", None) or 0
    blocks = renumber_blocks(state, _block_lists(_meta_model(cls, config), layers), layers)
    config = _with_layers(config, blocks.kept)
    config = _with_widths(cls, config, blocks)
    model = _loaded_model(cls, config, blocks)
    log.info("save_hf: writing %s to %s", cls.__name__, out)
    return _write(model, tokenizer, out, expect)


# ---- blocks -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """A state whose repeated blocks are numbered 0, 1, ...: ``kept`` their indices in the state given."""

    state: dict[str, torch.Tensor]
    lists: tuple[str, ...]
    kept: tuple[int, ...]

    def original(self, name: str) -> str:
        """The name a renumbered tensor had in the state given (what messages call it)."""
        m = _BLOCK.match(name)
        if not m or m.group(1) not in self.lists or int(m.group(2)) >= len(self.kept):
            return name
        return f"{m.group(1)}.{self.kept[int(m.group(2))]}.{name[m.end():]}"


def renumber_blocks(state: Mapping[str, torch.Tensor], lists: Iterable[str], layers: int) -> Blocks:
    """Rename ``<list>.<i>.*`` so the kept blocks of each of the model's block lists (``layers`` blocks each)
    are numbered 0, 1, ... in order. Every list must keep the same blocks, since one ``num_hidden_layers``
    counts them all."""
    lists = tuple(lists)
    kept_by_list = {p: sorted({int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and m.group(1) == p})
                    for p in lists}
    kept = kept_by_list[lists[0]] if lists else []
    for p in lists:
        if kept_by_list[p] != kept:
            raise ValueError(f"save_hf: the state keeps blocks {kept} of {lists[0]} but {kept_by_list[p]} of "
                             f"{p}; one num_hidden_layers cannot count both")
        if kept and kept[-1] >= layers:
            raise ValueError(f"save_hf: the state has block {kept[-1]} of {p}, but the config has {layers} "
                             "blocks")
    if lists and not kept:
        raise ValueError(f"save_hf: the state keeps none of the blocks of {lists[0]}")
    new_index = {old: new for new, old in enumerate(kept)}
    renamed = {}
    for key, tensor in state.items():
        m = _BLOCK.match(key)
        if m and m.group(1) in lists:
            key = f"{m.group(1)}.{new_index[int(m.group(2))]}.{key[m.end():]}"
        renamed[key] = tensor
    return Blocks(renamed, lists, tuple(kept))


def _block_lists(model: nn.Module, layers: int) -> list[str]:
    """The prefixes under which the model numbers its ``layers`` repeated blocks (num_hidden_layers)."""
    indices: dict[str, set[int]] = {}
    for key in model.state_dict():
        if m := _BLOCK.match(key):
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
    return [p for p, found in indices.items() if layers and found == set(range(layers))]


def _with_layers(config: PretrainedConfig, kept: tuple[int, ...]) -> PretrainedConfig:
    """The config with ``kept`` blocks: their count, and per-layer lists (a key naming layers whose value has
    one entry per block, such as ``layer_types``) cut to their entries."""
    layers = getattr(config, "num_hidden_layers", None)
    if not kept or kept == tuple(range(layers or 0)):
        return config
    config = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == layers:
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
    return config


# ---- widths -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Equation:
    """One dimension of one tensor: ``size = base + sum_k terms[k] * (x_k - x0_k)``."""

    name: str
    dim: int
    size: int
    base: int
    terms: dict[str, Fraction]


def solve_widths(equations: list[Equation], x0: Mapping[str, int]) -> dict[str, int]:
    """The width keys the equations determine, one unknown at a time; ValueError when two tensors (two
    layers) need different values of one key, or a size needs a width that is not a positive integer."""
    known: dict[str, Fraction] = {}
    while True:
        found: dict[str, tuple[Fraction, str]] = {}
        for eq in equations:
            free = [k for k in eq.terms if k not in known]
            if len(free) != 1:
                continue
            key = free[0]
            rest = sum((a * (known[k] - x0[k]) for k, a in eq.terms.items() if k in known), Fraction(0))
            value = x0[key] + (eq.size - eq.base - rest) / eq.terms[key]
            if value.denominator != 1 or value <= 0:
                raise ValueError(f"save_hf: {eq.name} has {eq.size} along dim {eq.dim}, which no whole {key} "
                                 "gives")
            if key in found and found[key][0] != value:
                raise ValueError(f"save_hf: {found[key][1]} gives {key}={found[key][0]} but {eq.name} gives "
                                 f"{value}: no setting of {key} gives both (a Hugging Face config holds one "
                                 f"{key} for every layer, and the class may tie it to another width: GPT-2's "
                                 "heads are hidden_size / heads wide)")
            found.setdefault(key, (value, eq.name))
        if not found:
            return {k: int(v) for k, v in known.items()}
        known.update({k: v for k, (v, _) in found.items()})


def _with_widths(cls: type[nn.Module], config: PretrainedConfig, blocks: Blocks) -> PretrainedConfig:
    """The config whose model has the state's shapes: the width keys solved from them, then checked."""
    probe = _explicit_head_dim(config)
    base = _shapes(_meta_model(cls, probe))
    x0: dict[str, int] = {}
    slopes: dict[str, dict[tuple[str, int], Fraction]] = {}
    for key in _width_keys(probe):
        found = _slopes(cls, probe, key, base)
        if found is not None:
            x0[key], slopes[key] = found
    changed = {k: v for k, v in solve_widths(_equations(blocks, base, slopes), x0).items() if v != x0[k]}
    result = copy.deepcopy(probe if set(changed) & set(HEAD_KEYS) else config)
    for key, value in changed.items():
        setattr(result, key, value)
    want = _shapes(_meta_model(cls, result))
    for name, tensor in blocks.state.items():
        if name in want and tuple(tensor.shape) != want[name]:
            settings = ", ".join(f"{k}={v}" for k, v in changed.items()) or "its original widths"
            raise ValueError(f"save_hf: {blocks.original(name)} has shape {list(tensor.shape)}, but "
                             f"{cls.__name__} with {settings} has {list(want[name])}: no setting of "
                             f"{', '.join(x0) or 'its config'} gives that shape")
    if changed:
        log.info("save_hf: %s", ", ".join(f"{k} {x0[k]} -> {v}" for k, v in changed.items()))
    return result


def _equations(
    blocks: Blocks, base: dict[str, tuple[int, ...]], slopes: dict[str, dict[tuple[str, int], Fraction]]
) -> list[Equation]:
    """One equation per dimension of every state tensor the base model also has (with the same rank)."""
    return [Equation(blocks.original(name), d, tensor.shape[d], base[name][d],
                     {k: s[(name, d)] for k, s in slopes.items() if (name, d) in s})
            for name, tensor in blocks.state.items() if name in base and tensor.dim() == len(base[name])
            for d in range(tensor.dim())]


def _slopes(
    cls: type[nn.Module], config: PretrainedConfig, key: str, base: dict[str, tuple[int, ...]]
) -> tuple[int, dict[tuple[str, int], Fraction]] | None:
    """(x0, {(tensor, dim): d size / d key}) for one width key, from its value and one probe at twice it;
    None when the key changes no shape or the class refuses the probe. A key set to None (GPT-2's n_inner)
    is probed at two values and its effective x0 read off the base shapes."""
    value = getattr(config, key)
    points = [value, 2 * value] if isinstance(value, int) and value > 0 else [1, 2]
    shapes = []
    for p in points:
        if p == value:
            shapes.append(base)
            continue
        trial = copy.deepcopy(config)
        setattr(trial, key, p)
        try:
            shapes.append(_shapes(_meta_model(cls, trial)))
        except (ValueError, RuntimeError) as e:  # e.g. a hidden size the new head count does not divide
            log.debug("save_hf: %s=%s refused by %s: %s", key, p, cls.__name__, e)
            return None
    slopes = {(name, d): Fraction(b[d] - a[d], points[1] - points[0])
              for name, a in shapes[0].items() if (b := shapes[1].get(name)) is not None and len(a) == len(b)
              for d in range(len(a)) if a[d] != b[d]}
    if not slopes:
        return None
    if points[0] == value:
        return value, slopes
    (name, d), slope = next(iter(slopes.items()))
    x0 = points[0] + (base[name][d] - shapes[0][name][d]) / slope
    return (int(x0), slopes) if x0.denominator == 1 else None


def _width_keys(config: PretrainedConfig) -> list[str]:
    attrs = config.to_dict()
    keys = [config.attribute_map.get(k, k) for k in WIDTH_KEYS]
    return [k for k in dict.fromkeys(keys) if k in attrs]


def _explicit_head_dim(config: PretrainedConfig) -> PretrainedConfig:
    """The config with head_dim written out (hidden_size / heads when it was implicit), so that changing the
    number of heads leaves each head's width alone."""
    heads = getattr(config, "num_attention_heads", None)
    if getattr(config, "head_dim", None) is not None or not heads or not getattr(config, "hidden_size", None):
        return config
    config = copy.deepcopy(config)
    config.head_dim = config.hidden_size // heads
    return config


# ---- the model --------------------------------------------------------------------------------------------


def _plain_config(config: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(config)
    for key in DROPPED_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    return config


def _model_class(config: PretrainedConfig, state: Mapping[str, torch.Tensor]) -> type[nn.Module]:
    import transformers
    from transformers.models.auto import modeling_auto

    if config.architectures:
        cls = getattr(transformers, config.architectures[0], None)
        if cls is None:
            raise ValueError(f"save_hf: config.architectures names {config.architectures[0]}, which "
                             f"transformers {transformers.__version__} does not define (remote code is not "
                             "supported)")
        return cls
    names = [getattr(modeling_auto, m).get(config.model_type) for m in _AUTO_MAPPINGS]
    for name in dict.fromkeys(n for n in names if isinstance(n, str)):
        cls = getattr(transformers, name, None)
        if cls is not None and _names_match(_meta_model(cls, config), state):
            return cls
    raise ValueError(f"save_hf: config.architectures is not set and no {config.model_type} class of "
                     "transformers has the state's tensor names; set config.architectures = [the model class "
                     "name]")


def _names_match(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has the model's tensor names, block numbers aside (tied copies may be absent)."""
    def unnumbered(names: Iterable[str]) -> set[str]:
        return {re.sub(r"(?<=\.)\d+(?=\.)", "#", n) for n in names}

    wanted = unnumbered(model.state_dict())
    given = unnumbered(state) - unnumbered(_nonpersistent(model))
    tied = unnumbered(n for group in _tied_groups(model) for n in group)
    return given <= wanted and wanted - given <= tied


def _meta_model(cls: type[nn.Module], config: PretrainedConfig) -> nn.Module:
    with torch.device("meta"):
        return cls(copy.deepcopy(config))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _nonpersistent(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_buffers()} - set(model.state_dict())


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _loaded_model(cls: type[nn.Module], config: PretrainedConfig, blocks: Blocks) -> nn.Module:
    """``cls(config)`` holding the state's own tensors (dtypes kept), checked as a strict load would be;
    non-persistent buffers, which the model computes itself, are dropped."""
    model = _meta_model(cls, config)
    tied = _tied_groups(model)  # before loading: assign gives every name a tensor of its own
    state = {k: v for k, v in blocks.state.items() if k not in _nonpersistent(model)}
    _check_names(cls.__name__, set(model.state_dict()), tied, state, blocks)
    model.load_state_dict(state, strict=False, assign=True)
    for group in tied:
        shared = model.get_parameter(next(n for n in group if n in state))
        for name in group:
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, shared)
    return model


def _check_names(
    model_name: str, wanted: set[str], tied: list[list[str]], state: Mapping[str, torch.Tensor], blocks: Blocks
) -> None:
    """Every tensor the model has given once, a tied group through any one of its names (equal if more);
    nothing else."""
    extra = sorted(set(state) - wanted)
    if extra:
        raise ValueError(f"save_hf: {model_name} has no tensor {blocks.original(extra[0])} "
                         f"(and {len(extra) - 1} more unexpected)")
    optional: set[str] = set()
    for group in tied:
        given = [n for n in group if n in state]
        if given:
            optional.update(group)
        for name in given[1:]:
            if not torch.equal(state[name], state[given[0]]):
                raise ValueError(f"save_hf: {name} and {given[0]} are tied in {model_name} but differ in the "
                                 "state; untie them in the config (tie_word_embeddings=False) first")
    missing = sorted(wanted - set(state) - optional)
    if missing:
        raise ValueError(f"save_hf: the state has no {blocks.original(missing[0])} (and {len(missing) - 1} "
                         f"more), which {model_name} has; from_pretrained would initialize it at random")


def _check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"save_hf: {out} exists and is not empty; choose a new directory or remove it")


def _check_reload(cls: type[nn.Module], folder: Path, inputs: dict[str, torch.Tensor], want: torch.Tensor) -> None:
    reloaded = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        got = reloaded(**inputs)[0]
    scale = float(want.abs().max()) or 1.0
    err = float((got.float() - want.float()).abs().max()) if got.shape == want.shape else float("inf")
    if err > 1e-3 * scale:
        raise ValueError(f"save_hf: {cls.__name__} reloaded from the corrected config does not compute what the "
                         f"program computes (largest difference {err:.3g} of {scale:.3g}): the class derives "
                         "something from a width that changed (Gemma scales its embeddings by sqrt(hidden_size))")


def _write(model: nn.Module, tokenizer: Any, out: Path,
           expect: tuple[dict[str, torch.Tensor], torch.Tensor] | None) -> Path:
    """save_pretrained into a temporary sibling of ``out``, checked against ``expect`` once reloaded, renamed
    to ``out`` once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if expect is not None:
            _check_reload(type(model), tmp, *expect)
        _check_free(out)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
