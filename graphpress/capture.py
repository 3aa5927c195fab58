"""Capture: nn.Module -> Program (an fx.GraphModule through non-strict ``torch.export``).

Hugging Face models are captured with the KV cache off and one tensor out: ``logits`` for causal LMs,
``last_hidden_state`` for encoders. The capture goes through a view of the user's model whose class only
overrides ``forward``; the view shares the parameters, so qualified names stay the model's own
(``model.layers.0.self_attn.q_proj.weight``) and the user's model is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import traceback
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from graphpress.program import Program

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """A model that torch.export could not trace; the message names the module and source line."""


def capture(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    dynamic_dims: Sequence[Mapping[int, str]] | None = None,
    name: str | None = None,
    kind: str | None = None,
) -> Program:
    """Capture ``model`` as a Program.

    example_inputs: positional tensors, or a mapping input name -> tensor (Hugging Face models take
    ``input_ids`` and, for encoders, ``attention_mask``).
    dynamic_dims: per input, {dim: name} of dynamic dimensions. Default: Hugging Face models get
    {0: "batch", 1: "seq"} on every input; other modules {0: "batch"} on every tensor input.
    """
    if isinstance(example_inputs, Mapping):
        input_names = tuple(example_inputs)
        inputs = tuple(example_inputs[k] for k in input_names)
    else:
        inputs = tuple(example_inputs)
        input_names = _positional_names(model, len(inputs))
    hf_kind = _hf_kind(model)
    kind = kind or hf_kind or "module"
    name = name or type(model).__name__
    if dynamic_dims is None:
        default = {0: "batch", 1: "seq"} if hf_kind else {0: "batch"}
        dynamic_dims = tuple(dict(default) if isinstance(t, torch.Tensor) else {} for t in inputs)
    dynamic_dims = tuple(dict(d) for d in dynamic_dims)
    if len(dynamic_dims) != len(inputs):
        raise ValueError(f"dynamic_dims has {len(dynamic_dims)} entries for {len(inputs)} inputs of {name}")

    view, output_names = (_hf_view(model, hf_kind, input_names) if hf_kind else (model, ("output",)))
    shapes = tuple({d: torch.export.Dim.DYNAMIC for d in dims} for dims in dynamic_dims)
    was_training = model.training
    model.eval()
    try:
        # torch.export prints the partial graph of a failed trace to stderr: keep it for --verbose only
        with _module_tracker(model) as active, contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                ep = torch.export.export(view, inputs, dynamic_shapes=shapes, strict=False)
            except Exception as e:  # torch.export raises many types; all become one actionable error
                log.debug("torch.export of %s failed; partial graph:\n%s", name, err.getvalue())
                raise CaptureError(_explain(name, e, active)) from e
    finally:
        model.train(was_training)
    gm = ep.module()
    log.info("captured %s: %d nodes", name, len(gm.graph.nodes))
    return Program(
        gm=gm,
        example_inputs=inputs,
        input_names=input_names,
        output_names=output_names,
        dynamic_dims=dynamic_dims,
        name=name,
        kind=kind,
    )


def _positional_names(model: nn.Module, n: int) -> tuple[str, ...]:
    """The forward's own parameter names, when it has that many plain ones; else input_0, input_1, ..."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) >= n:
        return tuple(p.name for p in params[:n])
    return tuple(f"input_{i}" for i in range(n))


def _hf_kind(model: nn.Module) -> str | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    return "causal-lm" if model.can_generate() else "encoder"


def _hf_view(model: nn.Module, kind: str, input_names: tuple[str, ...]) -> tuple[nn.Module, tuple[str, ...]]:
    """A shallow view of ``model`` whose forward takes positional tensors and returns one tensor."""
    cls = type(model)
    output = "logits" if kind == "causal-lm" else "last_hidden_state"

    def forward(self: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(input_names, args, strict=True))
        if kind == "causal-lm":
            kwargs["use_cache"] = False
        return getattr(cls.forward(self, **kwargs), output)

    # torch.export binds dynamic_shapes to the signature: name the inputs instead of *args
    P = inspect.Parameter
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD) for n in input_names]
    )

    view = copy.copy(model)  # shares _parameters/_modules dicts: names and tensors are the model's own
    view.__class__ = type(f"{cls.__name__}Captured", (cls,), {"forward": forward})
    return view, (output,)


@contextlib.contextmanager
def _module_tracker(model: nn.Module) -> Iterator[list[str]]:
    """Keeps the stack of module names whose forward is running, to name the failing one."""
    active: list[str] = []
    handles = []

    def enter(label: str) -> None:
        active.append(label)

    def leave() -> None:
        if active:
            active.pop()

    for qualname, mod in model.named_modules():
        label = f"{qualname or '<root>'} ({type(mod).__name__})"
        # hooks return None so they never replace a module's inputs or outputs
        handles.append(mod.register_forward_pre_hook(lambda m, a, _l=label: enter(_l)))
        handles.append(mod.register_forward_hook(lambda m, a, o: leave()))
    try:
        yield active
    finally:
        for h in handles:
            h.remove()


def _explain(name: str, e: BaseException, active: list[str]) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f.filename.startswith(torch_dir) and "graphpress" not in f.filename]
    where = f"{user[-1].filename}:{user[-1].lineno} `{(user[-1].line or '').strip()}`" if user else "unknown line"
    module = active[-1] if active else "the top-level forward"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (
        f"cannot capture {name}: {type(e).__name__} in module {module} at {where}: {first}. "
        "Try: run the model once in eval mode with these inputs; make data-dependent control flow "
        "static (or use torch.cond); pass fewer dynamic_dims; or capture the submodule that works."
    )

