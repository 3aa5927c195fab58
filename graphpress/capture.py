"""Capture: nn.Module -> Program (an fx.GraphModule through non-strict ``torch.export``).

Hugging Face models are captured with the KV cache off and one tensor out: ``logits`` for causal LMs,
``last_hidden_state`` for encoders; other modules with every tensor they return. The capture goes through a
view of the user's model whose class only overrides ``forward``; the view shares the parameters, so
qualified names stay the model's own (``model.layers.0.self_attn.q_proj.weight``) and the user's model is
never modified.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import operator
import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from graphpress import kv_cache
from graphpress.errors import describe, one_line
from graphpress.graph import free_target
from graphpress.program import Program

log = logging.getLogger(__name__)


HF_OUTPUT = {"causal-lm": "logits", "encoder": "last_hidden_state"}  # the one output of a Hugging Face model


class CaptureError(RuntimeError):
    """A model that torch.export could not trace; the message names the module and source line."""


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    *,
    dynamic_dims: Sequence[Mapping[int, str]] | None = None,
    name: str | None = None,
    kind: str | None = None,
    cache: bool = True,
) -> Program:
    """Capture ``model`` as a Program.

    example_inputs: positional values, or a mapping input name -> value, as ``model.forward`` takes them.
    Tensors become the program's inputs; other values (floats, flags, None) are constants of the program.
    dynamic_dims: per tensor input, {dim: name} of dynamic dimensions. Default: Hugging Face models get
    {0: "batch", 1: "seq"} on every input; other modules {0: "batch"} on every tensor input. A dynamic
    dimension of size 1 in the example (a batch of one sentence) is widened to 2 for the trace, since
    torch.export specializes size 1; the program and its ONNX export stay dynamic there.
    Outputs: ``logits`` (causal LMs) or ``last_hidden_state`` (encoders) for Hugging Face models; else every
    tensor the forward returns, flattened (``output``, or ``output_0, output_1, ...``; a dict's keys).
    cache: a Hugging Face causal LM given only ``input_ids`` is traced with its KV cache as inputs and outputs
    (graphpress.kv_cache), then detached from it, so the program is still ``input_ids -> logits`` and lowering
    gives the cache back. A model whose cache cannot be traced this way is captured without one (logged,
    and ``program.meta["kv_cache"]`` says why).
    """
    name = name or type(model).__name__
    named, positional = _bind_inputs(model, example_inputs, name)
    input_names = tuple(k for k, v in named.items() if isinstance(v, torch.Tensor))
    constants = {k: v for k, v in named.items() if not isinstance(v, torch.Tensor)}
    for k, v in constants.items():
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(v)):
            raise CaptureError(f"cannot capture {name}: input {k!r} holds tensors inside a {type(v).__name__}; "
                               "pass each tensor as an input of its own (or wrap the model)")
    if positional and constants:
        raise CaptureError(f"cannot capture {name}: its forward takes *args, so every example input must be a "
                           f"tensor (got {', '.join(constants)}); bind the others in a wrapper module")
    if not input_names:
        raise CaptureError(f"cannot capture {name}: its example inputs hold no tensor; pass at least one tensor")
    hf_kind = _hf_kind(model)
    kind = kind or hf_kind or "module"
    if dynamic_dims is None:
        default = {0: "batch", 1: "seq"} if hf_kind else {0: "batch"}
        dynamic_dims = tuple({d: n for d, n in default.items() if d < named[k].dim()} for k in input_names)
    dynamic_dims = tuple(dict(d) for d in dynamic_dims)
    if len(dynamic_dims) != len(input_names):
        raise ValueError(f"dynamic_dims has {len(dynamic_dims)} entries for {len(input_names)} tensor inputs of {name}")
    inputs = tuple(_widen(named[k], dims) for k, dims in zip(input_names, dynamic_dims, strict=True))

    meta: dict[str, Any] = {}
    if hf_kind == "causal-lm" and cache:
        if input_names == ("input_ids",) and not constants and not positional:
            try:
                program = _capture_with_cache(model, inputs[0], dynamic_dims[0], name, kind)
                log.info("captured %s with its KV cache: %d nodes", name, len(program.gm.graph.nodes))
                return program
            except (CaptureError, kv_cache.CacheError) as e:
                meta["kv_cache"] = f"captured without a KV cache: {one_line(e, 300)}"
                log.info("%s: %s", name, meta["kv_cache"])
        else:
            meta["kv_cache"] = "captured without a KV cache: the example inputs are more than input_ids"
    was_training = model.training
    model.eval()
    try:
        with _module_tracker(model) as active, _quiet_torch(), contextlib.redirect_stderr(io.StringIO()) as err:
            output_names, flatten = _outputs(model, hf_kind, input_names, inputs, constants, positional, name,
                                             active)
            view = _view(model, hf_kind, input_names, constants, flatten, positional)
            shapes = tuple({d: torch.export.Dim.DYNAMIC for d in dims} for dims in dynamic_dims)
            try:
                ep = torch.export.export(view, inputs, dynamic_shapes=shapes, strict=False)
            except Exception as e:  # torch.export raises many types; all become one actionable error
                log.debug("torch.export of %s failed; partial graph:\n%s", name, err.getvalue())
                raise CaptureError(_explain(name, e, active)) from e
    finally:
        model.train(was_training)
    gm = torch.nn.Module.train(ep.module(), False)  # inference until Program.train() (ep.module() refuses eval())
    inline_regions(gm)
    log.info("captured %s: %d nodes", name, len(gm.graph.nodes))
    return Program(
        gm=gm,
        example_inputs=inputs,
        input_names=input_names,
        output_names=output_names,
        dynamic_dims=dynamic_dims,
        name=name,
        kind=kind,
        meta=meta,
    )


# torch.export keeps a region run under torch.no_grad() or torch.autocast(...) as a submodule called by one of
# these (operand positions after the flags): passes would have to look inside, and a device move misses it
_REGIONS = {"wrap_with_set_grad_enabled": 2, "wrap_with_autocast": 5}


def inline_regions(gm: fx.GraphModule) -> int:
    """Replace each grad-mode or autocast region by its nodes, and drop export's dtype and device assertions, in
    place; return how many nodes were inlined or dropped.

    A program computes the same without them: it runs without gradients unless it trains, where every op of a
    no-grad region reads buffers only (rotary tables, masks), and its dtypes are the ones export recorded (an
    autocast-disabled region's casts are explicit nodes)."""
    inlined = 0
    for node in list(gm.graph.nodes):
        first = _REGIONS.get(getattr(node.target, "__name__", "")) if node.op == "call_function" else None
        if first is None:
            continue
        sub_node, operands = node.args[first - 1], node.args[first:]
        sub = getattr(gm, sub_node.target)
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, operands, strict=True))
        result: Any = None
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    result = fx.node.map_arg(n.args[0], env.__getitem__)
                    break
                if n.op == "get_attr":  # a constant of the region: moved onto the program
                    target = free_target(gm, n.target.replace(".", "_"))
                    setattr(gm, target, getattr(sub, n.target))
                    env[n] = gm.graph.get_attr(target)
                    env[n].meta = dict(n.meta)
                    continue
                env[n] = gm.graph.node_copy(n, env.__getitem__)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(result[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
        inlined += 1
    for node in list(gm.graph.nodes):  # export's record of a cast's dtype and device: it would refuse the same
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)  # program on another device or under autocast
            inlined += 1
    if inlined:
        gm.graph.lint()
        gm.recompile()
    return inlined


def _capture_with_cache(model: nn.Module, ids: torch.Tensor, dims: dict[int, str], name: str, kind: str
                        ) -> Program:
    """Trace ``model`` with its cache as inputs and outputs, then detach the cache (graphpress.kv_cache)."""
    layout = _cache_layout(model, ids, name)
    inputs = kv_cache.example_inputs(ids, layout)
    names = ["input_ids", "attention_mask", "position_ids", *[f"past_{i}" for i in range(2 * layout.layers)]]
    view = _cache_view(model, names, layout)
    shapes = tuple({d: torch.export.Dim.DYNAMIC for d in dd} for dd in kv_cache.dynamic_dims(layout))
    was_training = model.training
    model.eval()
    try:
        with _module_tracker(model) as active, _quiet_torch(), contextlib.redirect_stderr(io.StringIO()):
            try:
                ep = torch.export.export(view, inputs, dynamic_shapes=shapes, strict=False)
            except Exception as e:  # torch.export raises many types
                raise CaptureError(_explain(name, e, active)) from e
    finally:
        model.train(was_training)
    gm = torch.nn.Module.train(ep.module(), False)
    inline_regions(gm)
    kv_cache.detach(gm, layout)
    return Program(gm=gm, example_inputs=(ids,), input_names=("input_ids",), output_names=(HF_OUTPUT["causal-lm"],),
                   dynamic_dims=(dict(dims),), name=name, kind=kind)


def _cache_layout(model: nn.Module, ids: torch.Tensor, name: str) -> kv_cache.CacheLayout:
    """Layers, key/value heads and head size of the cache the model fills for two tokens."""
    try:
        with torch.no_grad():
            out = model(input_ids=ids[:1, :2], use_cache=True)
    except Exception as e:
        raise CaptureError(f"cannot run {name} with a cache: {type(e).__name__}: {one_line(e, 200)}") from e
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise CaptureError(f"{name} returns no cache of key/value layers ({type(cache).__name__})")
    shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in layers
              if getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None}
    if len(shapes) != 1 or len(next(iter(shapes))[0]) != 4 or next(iter(shapes))[0] != next(iter(shapes))[1]:
        raise CaptureError(f"{name}'s cache layers are not all keys and values of one shape ({sorted(shapes)})")
    (_, heads, _, head_dim), _ = next(iter(shapes))
    dtype = str(layers[0].keys.dtype).removeprefix("torch.")
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 0
    return kv_cache.CacheLayout(len(layers), heads, head_dim, dtype, int(positions))


def _cache_view(model: nn.Module, names: list[str], layout: kv_cache.CacheLayout) -> nn.Module:
    """A view of ``model`` whose forward takes ids, mask, positions and the past tensors and returns the
    logits and the present tensors."""
    from transformers import DynamicCache

    cls = type(model)
    key = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"

    def forward(self: nn.Module, *args: torch.Tensor) -> Any:
        ids, mask, positions, *past = args
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(layout.layers)])
        out = cls.forward(self, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{key: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])

    P = inspect.Parameter
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD) for n in names])
    view = copy.copy(model)
    view.__class__ = type(f"{cls.__name__}Captured", (cls,), {"forward": forward})
    return view


def _bind_inputs(model: nn.Module, example_inputs: Any, name: str) -> tuple[dict[str, Any], bool]:
    """Example inputs by parameter name of ``model.forward`` (positional ones bound to the signature), and
    whether they must be passed by position (a forward taking ``*args``, or without a signature)."""
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs), False
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError(f"cannot capture {name}: example inputs must be a tuple of positional inputs or a "
                           f"dict of named ones, not {describe(example_inputs)}")
    try:
        bound = inspect.signature(model.forward).bind(*example_inputs)
    except TypeError as e:
        raise CaptureError(f"cannot capture {name}: its {len(example_inputs)} example inputs do not fit "
                           f"forward{inspect.signature(model.forward)}: {e}") from e
    except ValueError:  # no signature (a builtin forward): name them by position
        return {f"input_{i}": x for i, x in enumerate(example_inputs)}, True
    params = inspect.signature(model.forward).parameters
    if any(params[k].kind is inspect.Parameter.VAR_POSITIONAL for k in bound.arguments):
        return {f"input_{i}": x for i, x in enumerate(example_inputs)}, True
    return dict(bound.arguments), False


def _widen(x: torch.Tensor, dims: Mapping[int, str]) -> torch.Tensor:
    """Repeat ``x`` to size 2 along each dynamic dimension of size 1 (torch.export specializes size 1)."""
    reps = [2 if d in dims and x.shape[d] == 1 else 1 for d in range(x.dim())]
    return x.repeat(*reps) if any(r > 1 for r in reps) else x


def _outputs(model: nn.Module, hf_kind: str | None, input_names: tuple[str, ...], inputs: tuple[torch.Tensor, ...],
             constants: dict[str, Any], positional: bool, name: str, active: list[str]
             ) -> tuple[tuple[str, ...], bool]:
    """Output names, and whether the forward's result is flattened: HF models name one output; other modules
    are run once eagerly (which also reports a model that fails on its own inputs before any tracing)."""
    if hf_kind:
        return (HF_OUTPUT[hf_kind],), False
    try:
        with torch.no_grad():
            out = model(*inputs) if positional else model(**dict(zip(input_names, inputs, strict=True)), **constants)
    except Exception as e:
        raise CaptureError(_explain(name, e, active, "fails on its example inputs")) from e
    leaves, _ = pytree.tree_flatten_with_path(out)
    tensors = [(path, v) for path, v in leaves if isinstance(v, torch.Tensor)]
    if not tensors:
        raise CaptureError(f"cannot capture {name}: its forward returns no tensor ({describe(out)})")
    if len(tensors) == 1 and isinstance(out, torch.Tensor):
        return ("output",), False
    names = [_leaf_name(path, i) for i, (path, _) in enumerate(tensors)]
    return tuple(names if len(set(names)) == len(names) else [f"output_{i}" for i in range(len(names))]), True


def _leaf_name(path: tuple[Any, ...], index: int) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    if keys and all(keys) and not any(isinstance(getattr(k, "idx", None), int) for k in path):
        return ".".join(keys)
    return f"output_{index}"


def _hf_kind(model: nn.Module) -> str | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    return "causal-lm" if model.can_generate() else "encoder"


def _view(model: nn.Module, hf_kind: str | None, input_names: tuple[str, ...], constants: dict[str, Any],
          flatten: bool, positional: bool) -> nn.Module:
    """A shallow view of ``model`` whose forward takes the tensor inputs positionally and returns tensors.

    The view shares the model's parameter and submodule dicts, so qualified names and tensors are the
    model's own, and the model itself is never modified. Constants are bound; Hugging Face models run
    without a KV cache and return one tensor; other modules return their tensors flattened.
    """
    cls = type(model)

    def forward(self: nn.Module, *args: torch.Tensor) -> Any:
        if positional:
            out = cls.forward(self, *args)
        else:
            kwargs = {**dict(zip(input_names, args, strict=True)), **constants}
            if hf_kind == "causal-lm":
                kwargs["use_cache"] = False
            out = cls.forward(self, **kwargs)
        if hf_kind:
            return getattr(out, HF_OUTPUT[hf_kind])
        if flatten:
            return tuple(v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor))
        return out

    # torch.export binds dynamic_shapes to the signature: name the inputs instead of *args
    P = inspect.Parameter
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD) for n in input_names]
    )
    view = copy.copy(model)  # shares _parameters/_modules dicts: names and tensors are the model's own
    view.__class__ = type(f"{cls.__name__}Captured", (cls,), {"forward": forward})
    return view


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch logs tracebacks of failed fake-tensor ops through its own handler (not sys.stderr): keep them
    for --verbose only."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        torch_log.setLevel(level)


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


def _explain(name: str, e: BaseException, active: list[str], what: str = "") -> str:
    frames = traceback.extract_tb(e.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f.filename.startswith(torch_dir) and "graphpress" not in f.filename]
    where = f"{user[-1].filename}:{user[-1].lineno} `{(user[-1].line or '').strip()}`" if user else "unknown line"
    module = active[-1] if active else "the top-level forward"
    cause = one_line(e, 300).rstrip(".") or type(e).__name__
    if what:
        return (f"cannot capture {name}: it {what}: {type(e).__name__} in module {module} at {where}: {cause}. "
                "Check the example inputs' shapes and types against the model's forward.")
    return (
        f"cannot capture {name}: {type(e).__name__} in module {module} at {where}: {cause}. "
        "Try: run the model once in eval mode with these inputs; make data-dependent control flow "
        "static (or use torch.cond); pass fewer dynamic_dims; or capture the submodule that works."
    )

