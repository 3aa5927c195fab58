"""The program: what capture produces, passes rewrite and lowering exports.

A program is a ``torch.fx.GraphModule`` obtained through ``torch.export`` (parameters as ``get_attr``
nodes under their original qualified names, node ``meta`` with ``val`` and ``nn_module_stack``) plus the
facts that later stages need: its input names, which dimensions are dynamic, a sample batch for
verification, and what kind of model it came from (for evaluation).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx


@dataclass
class Program:
    gm: fx.GraphModule
    # example inputs, positional, in the order of ``input_names``; also the verification batch
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    # per input: {dim index: name} of the dimensions that stay dynamic (batch, seq)
    dynamic_dims: tuple[dict[int, str], ...]
    name: str = "model"
    # "causal-lm", "encoder" or "module": selects the evaluation protocol
    kind: str = "module"
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.gm(*inputs)

    def outputs(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output as a list of tensors, in the order of ``output_names``."""
        out = self(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def clone(self) -> Program:
        """A deep copy: passes may rewrite weights in place, so each stage works on its own copy."""
        return dataclasses.replace(self, gm=copy.deepcopy(self.gm), meta=dict(self.meta))

    def num_parameters(self) -> int:
        return sum(t.numel() for t in _unique_tensors(self.gm))

    def num_bytes(self) -> int:
        """Bytes of all parameters and buffers, each stored tensor counted once (tied weights once)."""
        return sum(t.numel() * t.element_size() for t in _unique_tensors(self.gm))

    def num_nodes(self) -> int:
        return len(self.gm.graph.nodes)

    def torch_dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        return tuple({d: torch.export.Dim.DYNAMIC for d in dims} for dims in self.dynamic_dims)


def _unique_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for _, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        seen.setdefault(t.untyped_storage().data_ptr() if t.numel() else id(t), t)
    return list(seen.values())
