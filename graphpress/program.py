"""The program: what capture produces, passes rewrite and lowering exports.

A program is a ``torch.fx.GraphModule`` obtained through ``torch.export`` (parameters as ``get_attr``
nodes under their original qualified names, node ``meta`` with ``val`` and ``nn_module_stack``) plus the
facts that later stages need: its input names, which dimensions are dynamic, a sample batch for
verification, and what kind of model it came from (for evaluation). ``gm.meta["graphpress.provenance"]``
says which original tensors the rewritten ones came from (``graphpress.provenance``); clone, save and load
keep it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from graphpress import kv_cache, provenance
from graphpress.graph import is_derived


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
        """Run the program: without gradients, unless it is in training mode (``train()``)."""
        if self.gm.training and torch.is_grad_enabled():
            return self.gm(*inputs)
        with torch.no_grad():
            return self.gm(*inputs)

    def train(self, mode: bool = True) -> Program:
        """Training mode: calls record gradients for the parameters that require them (``parameters()``), so
        the program trains with ``torch.optim`` like a module. Every graphpress op has a backward."""
        # torch.export's modules refuse train()/eval() (their graph is fixed: dropout and batch norm were traced
        # in eval mode); the flag alone is what Program reads, so set it through nn.Module's own method
        torch.nn.Module.train(self.gm, mode)
        return self

    def eval(self) -> Program:
        return self.train(False)

    def to(self, device: str | torch.device) -> Program:
        """Move the program to ``device``, in place (as ``nn.Module.to``), and return it: its weights, its
        sample batch, and the device of every tensor the graph creates (torch.export records the capture's
        device in ops such as ``arange`` and ``full``). On CUDA, graphpress's ops run their kernels
        (graphpress.kernels.cuda)."""
        device = torch.device(device)
        self.gm.to(device)
        # nested graphs too: torch.export keeps autocast / grad-mode regions as submodules (wrap_with_autocast)
        for gm in [m for m in self.gm.modules() if isinstance(m, fx.GraphModule)]:
            _move_graph(gm, device)
        self.example_inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in self.example_inputs)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that require gradients (each stored tensor once)."""
        return [p for p in self.gm.parameters() if p.requires_grad]

    def outputs(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output as a list of tensors, in the order of ``output_names`` (never recording gradients)."""
        with torch.no_grad():
            out = self.gm(*inputs)
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

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the program in torch.export's format (a ``.pt2`` archive: graph, weights, sample batch) with
        graphpress's facts beside it, so ``Program.load`` gives it back without re-running passes."""
        path = Path(path)
        gm, inputs, dynamic_dims = self.gm, self.example_inputs, self.dynamic_dims
        cache = kv_cache.layout(self.gm)
        if cache is not None:  # saved with its cache attached: the marks are node metadata, which export drops
            gm, cache = kv_cache.attach(self.gm)
            inputs, dynamic_dims = kv_cache.example_inputs(inputs[0], cache), kv_cache.dynamic_dims(cache)
        ep = torch.export.export(gm, inputs, strict=False,
                                 dynamic_shapes=tuple({d: torch.export.Dim.DYNAMIC for d in dims}
                                                      for dims in dynamic_dims))
        facts = {"input_names": self.input_names, "output_names": self.output_names,
                 "dynamic_dims": [{str(d): n for d, n in dims.items()} for dims in self.dynamic_dims],
                 "name": self.name, "kind": self.kind, "provenance": provenance.to_json(self.gm),
                 "kv_cache": cache.to_json() if cache else None}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(ep, path, extra_files={_FACTS: json.dumps(facts)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Program:
        """A program saved by ``save`` (graphpress's ops are registered first, so any saved program loads)."""
        import graphpress.kernels  # noqa: F401  (defines torch.ops.graphpress.*)

        extra = {_FACTS: ""}
        ep = torch.export.load(str(path), extra_files=extra)
        if not extra[_FACTS]:
            raise ValueError(f"{path} was not saved by graphpress (Program.save): it holds no {_FACTS}")
        facts = json.loads(extra[_FACTS])
        args = ep.example_inputs[0] if ep.example_inputs else ()
        gm = torch.nn.Module.train(ep.module(), False)
        if facts.get("kv_cache"):
            kv_cache.detach(gm, kv_cache.CacheLayout.from_json(facts["kv_cache"]))
            args = args[:1]
        provenance.restore(gm, facts.get("provenance", {}))
        return cls(gm=gm, example_inputs=tuple(args), input_names=tuple(facts["input_names"]),
                   output_names=tuple(facts["output_names"]),
                   dynamic_dims=tuple({int(d): n for d, n in dims.items()} for dims in facts["dynamic_dims"]),
                   name=facts["name"], kind=facts["kind"])


_FACTS = "graphpress.json"


def _move_graph(gm: fx.GraphModule, device: torch.device) -> None:
    """The device arguments of ``gm``'s factories and casts, and its plain tensor constants, to ``device``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            names = [a.name for a in node.target._schema.arguments]
            if "device" in names:  # factories (arange, zeros, full...) and casts: the capture's device or none
                at = names.index("device")
                if at < len(node.args):
                    node.update_arg(at, device)
                else:
                    node.update_kwarg("device", device)
        elif node.op == "get_attr":  # constants that are neither parameters nor buffers
            owner, _, name = node.target.rpartition(".")
            module = gm.get_submodule(owner)
            value = getattr(module, name)
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                    and value.device != device and name not in module._buffers:
                setattr(module, name, value.to(device))
    gm.recompile()


def _unique_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if is_derived(name):
            continue
        seen.setdefault(t.untyped_storage().data_ptr() if t.numel() else id(t), t)
    return list(seen.values())
