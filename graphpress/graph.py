"""Small helpers for fx surgery on captured programs: parameters, op tests, aliasing, clean-up."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable

import torch
from torch import fx, nn

aten = torch.ops.aten


def is_op(node: fx.Node, *targets: object) -> bool:
    return node.op == "call_function" and node.target in targets


def get_tensor(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    return _resolve(gm, node.target)


def _resolve(gm: nn.Module, target: str) -> torch.Tensor:
    *path, leaf = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    return getattr(mod, leaf)


# buffers under this module hold tables derived from the model for a runtime (rotary angles by position): not the
# model's weights, so neither its size nor its Hugging Face state counts them
DERIVED = "derived_tables"


def is_derived(name: str) -> bool:
    return name.startswith(DERIVED + ".")


def set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor, buffer: bool = False,
               requires_grad: bool | None = None) -> None:
    """Create or replace the parameter (or buffer) at ``target``, creating parent modules as needed.

    ``buffer``: store a new tensor as a buffer (integer codes, quantization scales), not a parameter.
    ``requires_grad`` of a parameter: by default that of the parameter it replaces, else whether the program's
    parameters require gradients (a trainable program stays trainable through every rewrite).
    """
    if requires_grad is None:
        old = dict(gm.named_parameters()).get(target)
        requires_grad = old.requires_grad if old is not None else trainable(gm)
    *path, leaf = target.split(".")
    mod: nn.Module = gm
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if hasattr(mod, leaf) and leaf in mod._buffers:
        mod._buffers[leaf] = value.detach()
        return
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    if buffer:
        mod.register_buffer(leaf, value.detach())
    else:
        grad = requires_grad and value.is_floating_point()
        mod.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=grad))


def trainable(gm: nn.Module) -> bool:
    """Whether any float parameter of ``gm`` requires gradients."""
    return any(p.requires_grad for p in gm.parameters() if p.is_floating_point())


def delete_tensor(gm: fx.GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if hasattr(mod, leaf):
        delattr(mod, leaf)


def module_name(weight_target: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return weight_target.rsplit(".", 1)[0] if "." in weight_target else weight_target


def aliases(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Qualified name -> every name (itself included) that shares its storage (tied weights)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        if t.numel():
            groups[t.untyped_storage().data_ptr()].append(name)
    return {n: names for names in groups.values() for n in names}


def is_shared(gm: fx.GraphModule, weight: fx.Node) -> bool:
    """True when rewriting this get_attr's tensor would change something else too."""
    names = aliases(gm).get(weight.target, [weight.target])
    uses = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in names]
    return len(names) > 1 or len(uses) > 1 or len(weight.users) > 1


def new_get_attr(gm: fx.GraphModule, target: str, value: torch.Tensor, before: fx.Node,
                 buffer: bool = False) -> fx.Node:
    set_tensor(gm, target, value, buffer)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["val"] = value
    return node


def cleanup(gm: fx.GraphModule, drop: Iterable[str] = ()) -> fx.GraphModule:
    """Drop dead nodes and the parameters no get_attr reads any more; lint and recompile.

    Buffers stay: a captured model may keep ones its graph never reads (rotary ``original_inv_freq``); those the
    pass names in ``drop`` (codes, scales and zero points it replaced) go when nothing reads them any more.
    """
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters(remove_duplicate=False)] + list(drop):
        if name not in used:
            delete_tensor(gm, name)
    gm.graph.lint()
    gm.recompile()
    return gm


def last_dim(node: object) -> int | None:
    """The static size of the last dimension of a node's ``meta["val"]``, else None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[-1], int):
        return val.shape[-1]
    return None


def infer_val(node: fx.Node, mode: object = None) -> object:
    """Set ``node.meta["val"]`` by running its target on its inputs' ``meta["val"]`` under their fake mode.

    For call_function nodes a pass creates, so that later passes and exporters see shapes and dtypes
    (symbolic where the inputs' are). Real tensors among the inputs' vals (``new_get_attr``) are faked.
    ``mode``: the fake mode to use (default: the inputs'; a node with no tensor input needs it given).
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    missing = [a.name for a in node.all_input_nodes if "val" not in a.meta]
    if missing:
        raise ValueError(f"cannot infer meta['val'] of {node.name}: inputs {missing} carry none")
    mode = mode or detect_fake_mode([a.meta["val"] for a in node.all_input_nodes])
    if mode is None:
        raise ValueError(f"cannot infer meta['val'] of {node.name}: no input carries a fake tensor")

    def fake(a: fx.Node) -> object:
        v = a.meta["val"]
        return mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), fake)
    with mode:
        node.meta["val"] = fake_call(node.target, args, kwargs)
    return node.meta["val"]


def fake_call(target: object, args: tuple, kwargs: dict) -> object:
    """``target(*args, **kwargs)`` on fake values, without guarding their symbolic sizes to the example's.

    torch 2.11's aten.matmul of operands with more than two dims (and aten.linear without a bias, which calls
    it) reads their sizes as ints: every symbolic size becomes its example value, the program's batch and
    sequence turn static, and graphpress.channels, which takes symbolic sizes as 1, no longer follows the
    channels (torch 2.13 keeps them symbolic). Those two are computed here with mm/bmm on flattened operands:
    the same sizes and dtype, symbols kept."""
    if target is aten.linear.default and len(args) >= 2 and isinstance(args[1], torch.Tensor) \
            and args[1].dim() == 2:
        y = _fake_matmul(args[0], aten.t.default(args[1]))
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if y is not None:
            return y if bias is None else aten.add.Tensor(y, bias)
    elif target is aten.matmul.default and not kwargs:
        y = _fake_matmul(*args)
        if y is not None:
            return y
    return target(*args, **kwargs)  # type: ignore[operator]


def _fake_matmul(a: object, b: object) -> torch.Tensor | None:
    """``a @ b`` through mm/bmm for operands of two or more dims, one of them more (else None)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or min(a.dim(), b.dim()) < 2 \
            or max(a.dim(), b.dim()) < 3:
        return None
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    if b.dim() == 2:  # [..., n, k] @ [k, m]
        y = aten.mm.default(aten.reshape.default(a, [-1, k]), b)
        return aten.view.default(y, [*a.shape[:-1], m])
    batch = list(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    a3 = aten.reshape.default(aten.expand.default(a, [*batch, n, k]), [-1, n, k])
    b3 = aten.reshape.default(aten.expand.default(b, [*batch, k, m]), [-1, k, m])
    return aten.view.default(aten.bmm.default(a3, b3), [*batch, n, m])


def free_target(gm: nn.Module, target: str, avoid: Collection[str] = ()) -> str:
    """``target`` if no attribute lives there yet, else ``target_1``, ``target_2``, ... (for new parameters);
    never a name in ``avoid`` (a new tensor's recorded sources: graphpress.provenance.record)."""
    candidate, i = target, 0
    while True:
        try:
            _resolve(gm, candidate)
        except AttributeError:
            if candidate not in avoid:
                return candidate
        i += 1
        candidate = f"{target}_{i}"
