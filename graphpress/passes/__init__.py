"""Compression passes, one file per transformation family. ``PASSES`` maps a recipe name to its class;
``register_pass`` adds a user's pass (a plugin module calls it, and a recipe's ``plugins:`` or the CLI's
``--plugin`` imports that module)."""

from __future__ import annotations

import dataclasses

from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.passes.distill import Distill
from graphpress.passes.factorize import Factorize
from graphpress.passes.fake_quant import (
    FakeQuantize,
    FakeQuantizeActivations,
    FreezeFakeQuantize,
    ThawQuantized,
)
from graphpress.passes.fold_batchnorm import FoldBatchNorm
from graphpress.passes.fold_norms import FoldNormScales
from graphpress.passes.fuse import FuseRMSNorm, FuseRotary
from graphpress.passes.fuse_attention import FuseAttention
from graphpress.passes.gptq import GPTQ
from graphpress.passes.linearize import LinearizeMatmuls
from graphpress.passes.lora import LoRA, MergeLoRA
from graphpress.passes.merge_siblings import MergeSiblingLinears
from graphpress.passes.prune import PruneHeads, PruneHidden, PruneMLP
from graphpress.passes.prune_layers import PruneLayers
from graphpress.passes.quantize_embedding import QuantizeEmbedding
from graphpress.passes.quantize_kv_cache import QuantizeKVCache
from graphpress.passes.remove_noops import RemoveNoops
from graphpress.passes.smooth import AWQ, SmoothQuant
from graphpress.passes.sparsify import Sparsify
from graphpress.passes.w8a8 import W8A8
from graphpress.passes.weight_only import QuantizeRTN

PASSES: dict[str, type[Pass]] = {
    "remove_noops": RemoveNoops,
    "linearize_matmuls": LinearizeMatmuls,
    "fold_batchnorm": FoldBatchNorm,
    "fold_norm_scales": FoldNormScales,
    "merge_sibling_linears": MergeSiblingLinears,
    "prune_mlp": PruneMLP,
    "prune_hidden": PruneHidden,
    "factorize": Factorize,
    "sparsify": Sparsify,
    "prune_heads": PruneHeads,
    "prune_layers": PruneLayers,
    "rtn": QuantizeRTN,
    "awq": AWQ,
    "smoothquant": SmoothQuant,
    "w8a8": W8A8,
    "gptq": GPTQ,
    "quantize_embedding": QuantizeEmbedding,
    "fake_quantize": FakeQuantize,
    "fake_quantize_activations": FakeQuantizeActivations,
    "freeze_fake_quantize": FreezeFakeQuantize,
    "thaw_quantized": ThawQuantized,
    "lora": LoRA,
    "merge_lora": MergeLoRA,
    "distill": Distill,
    "fuse_rms_norm": FuseRMSNorm,
    "fuse_rotary": FuseRotary,
    "fuse_attention": FuseAttention,
    "quantize_kv_cache": QuantizeKVCache,
}



def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make ``cls`` usable by name in recipes (``- pass: NAME``); returns it, so it also works as a decorator.

    ``cls`` is a frozen dataclass subclassing ``Pass`` with a class attribute ``name``; a name already taken
    by another class is refused (the same class, or the same plugin module imported again, replaces itself)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_pass: {cls!r} is not a dataclass subclassing graphpress.passes.Pass")
    name = cls.name
    if not isinstance(name, str) or not name or name == Pass.name:
        raise ValueError(f"register_pass: {cls.__name__} needs a class attribute `name` (the recipe's pass name)")
    taken = PASSES.get(name, cls)
    reloaded = _origin(taken) == _origin(cls)  # the same plugin file imported again (as another module)
    if taken is not cls and not reloaded:
        raise ValueError(f"register_pass: the name {name!r} of {cls.__name__} is taken by {PASSES[name].__name__}")
    PASSES[name] = cls
    return cls


def _origin(cls: type) -> tuple[str, str]:
    return cls.__qualname__, getattr(getattr(cls.__call__, "__code__", None), "co_filename", "")


__all__ = ["PASSES", "Pass", "PassContext", "PassError", "PassResult", "Selection", "register_pass"]
