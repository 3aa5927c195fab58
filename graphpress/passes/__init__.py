"""Compression passes, one file per transformation family. ``PASSES`` maps a recipe name to its class."""

from __future__ import annotations

from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection
from graphpress.passes.fold_batchnorm import FoldBatchNorm
from graphpress.passes.fold_norms import FoldNormScales
from graphpress.passes.fuse import FuseRMSNorm, FuseRotary
from graphpress.passes.gptq import GPTQ
from graphpress.passes.merge_siblings import MergeSiblingLinears
from graphpress.passes.quantize_embedding import QuantizeEmbedding
from graphpress.passes.remove_noops import RemoveNoops
from graphpress.passes.smooth import AWQ, SmoothQuant
from graphpress.passes.w8a8 import W8A8
from graphpress.passes.weight_only import QuantizeRTN

PASSES: dict[str, type[Pass]] = {
    "remove_noops": RemoveNoops,
    "fold_batchnorm": FoldBatchNorm,
    "fold_norm_scales": FoldNormScales,
    "merge_sibling_linears": MergeSiblingLinears,
    "rtn": QuantizeRTN,
    "awq": AWQ,
    "smoothquant": SmoothQuant,
    "w8a8": W8A8,
    "gptq": GPTQ,
    "quantize_embedding": QuantizeEmbedding,
    "fuse_rms_norm": FuseRMSNorm,
    "fuse_rotary": FuseRotary,
}

__all__ = ["PASSES", "Pass", "PassContext", "PassError", "PassResult", "Selection"]
