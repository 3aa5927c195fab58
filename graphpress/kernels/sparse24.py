"""2:4 sparse weights on NVIDIA's sparse tensor cores, through PyTorch's semi-structured sparse tensors
(``torch.sparse.to_sparse_semi_structured``: cuSPARSELt, or CUTLASS where cuSPARSELt is missing).

    linear(x, W [N, K], b), W with two zeros in every four consecutive inputs of a row (sparsify's "2:4")
        -> the same aten.linear on W stored compressed: half its values plus 2-bit indices (~0.56 of the bytes),
           multiplied by the sparse tensor cores; no op of the graph changes

``semi_structured(program, dtype)`` swaps the weights that a sparsify pass left in 2:4 (``gm.meta`` records
which, graphpress.passes.sparsify) for their compressed form in ``dtype`` (bfloat16 or float16: what sparse
tensor cores multiply), in place, once the program is on a CUDA device; run it under
``torch.autocast("cuda", dtype)``, which casts the activations and leaves the compressed weights as they are.
What it cannot swap is returned with the reason. The dense weight with the same zeros stays the reference:
tests compare the two products.
"""

from __future__ import annotations

import torch
from torch import fx

from graphpress.program import Program


def is_2_4(w: torch.Tensor) -> bool:
    """Whether every group of four consecutive input weights of every row of ``w`` [N, K] holds at most two
    nonzeros (K a multiple of 4)."""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def backend() -> type:
    """The semi-structured tensor class that compresses here: cuSPARSELt's, or CUTLASS's where this torch has
    no cuSPARSELt or is told to use CUTLASS."""
    from torch.sparse import semi_structured as ss

    cutlass = ss.SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available()
    return ss.SparseSemiStructuredTensorCUTLASS if cutlass else ss.SparseSemiStructuredTensorCUSPARSELT


def why_not(w: torch.Tensor) -> str | None:
    """Why ``w`` cannot become a semi-structured sparse tensor here, or None when it can."""
    if w.device.type != "cuda":
        return f"is on {w.device.type}: move the program to a CUDA device first (program.to('cuda'))"
    allowed = backend()._DTYPE_SHAPE_CONSTRAINTS
    if w.dtype not in allowed:
        return f"is {w.dtype}: sparse tensor cores take {', '.join(map(str, allowed))}"
    rows, cols = allowed[w.dtype].sparse_min_rows, allowed[w.dtype].sparse_min_cols
    if w.dim() != 2 or w.shape[0] % rows or w.shape[1] % cols:
        return f"is {tuple(w.shape)}: its dimensions must be multiples of ({rows}, {cols})"
    if not is_2_4(w):
        return "has more than two nonzeros in some group of four inputs (not 2:4)"
    return None


def compress(w: torch.Tensor) -> torch.Tensor:
    """``w`` [N, K] (2:4, on CUDA) as a semi-structured sparse tensor; ValueError saying why not."""
    reason = why_not(w)
    if reason is not None:
        raise ValueError(f"semi_structured: the weight {reason}")
    return _compressed(w)


def _compressed(w: torch.Tensor) -> torch.Tensor:
    return backend().from_dense(w.detach().contiguous())


def semi_structured(program: Program, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Swap each 2:4 weight of ``program`` (recorded by sparsify) read by a linear for its compressed form in
    ``dtype``, in place. Returns weight -> "2:4" for the swapped ones and weight -> reason for the others; a
    program with no 2:4 weight raises ValueError (nothing to run on sparse tensor cores)."""
    from graphpress.passes.sparsify import sparse_weights

    wanted = [t for t, p in sparse_weights(program.gm).items() if p == "2:4"]
    if not wanted:
        raise ValueError(f"semi_structured: {program.name} has no 2:4 weight (sparsify with pattern: '2:4' first)")
    read_by_linear = {n.args[1].target for n in program.gm.graph.nodes
                      if n.op == "call_function" and n.target == torch.ops.aten.linear.default
                      and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"}
    out = {}
    for target in wanted:
        if target not in read_by_linear:  # a later pass renamed or replaced it, or no linear reads it
            out[target] = "is not the weight of a linear in the program"
            continue
        module, _, name = target.rpartition(".")
        owner = program.gm.get_submodule(module) if module else program.gm
        w = getattr(owner, name).detach().to(dtype)
        out[target] = why_not(w) or "2:4"
        if out[target] != "2:4":
            continue
        if name in owner._buffers:
            owner._buffers[name] = _compressed(w)
        else:
            setattr(owner, name, torch.nn.Parameter(_compressed(w), requires_grad=False))
    return out
