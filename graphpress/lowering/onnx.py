"""Program -> ONNX file (torch.onnx dynamo exporter), checked against the program in onnxruntime.

Custom ops reach ONNX through the rule table (``graphpress.lowering.rules``); the exported file keeps batch and
sequence dynamic, records where the model came from in its metadata (so ``graphpress eval`` finds the
reference and tokenizer), and stores the weights of a model over 32 MB beside it (``model.onnx.data``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir
import onnx_ir.passes.common
import onnxscript
import torch
from onnx import numpy_helper

from graphpress import kv_cache
from graphpress.errors import one_line
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.lowering.rules import RuleTable, TargetError, apply_rules, emulation
from graphpress.metrics import compare_outputs
from graphpress.program import Program

log = logging.getLogger(__name__)

# weights over this many bytes go to PATH.data beside the graph (onnx external data): onnxruntime then reads
# them straight into its tensors instead of out of a parsed copy of the whole protobuf; a session on the 90 MB
# W4 SmolLM2 peaked 52 MB lower (BENCHMARKS.md, issue 14). Protobuf refuses a file over 2 GiB in any case.
EXTERNAL_DATA_THRESHOLD = 32_000_000
META_PREFIX = "graphpress."
# ONNX opset of every export: 23 has RMSNormalization, Attention and RotaryEmbedding as single ops
OPSET = 23


class LoweringError(RuntimeError):
    """The program could not be exported, or onnxruntime disagrees with it."""


@dataclass
class ExportResult:
    path: Path
    bytes: int  # the .onnx file plus its external data, if any
    lowered: dict[str, int]  # custom op -> nodes lowered by rules
    check: dict[str, float] | None  # torch program vs onnxruntime on the sample batch
    # the KV cache the file takes and returns (graphpress.kv_cache), or why it has none; None: not a causal LM
    kv_cache: dict[str, Any] | str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "bytes": self.bytes, "lowered": self.lowered, "check": self.check,
                "kv_cache": self.kv_cache}


def export_onnx(
    program: Program,
    path: str | os.PathLike[str],
    *,
    rules: RuleTable | None = None,
    check: bool = True,
    tolerance: float | None = None,
    metadata: dict[str, str] | None = None,
    opset: int = OPSET,
) -> ExportResult:
    """Export ``program`` to ``path``; with ``check``, run it in onnxruntime and compare with torch.

    The check passes when the SQNR of onnxruntime's output against the torch program (computing what the
    rules' emulations say the runtime computes: int8 activations, float16 scales) reaches the floor of the
    rules used (``Rule.check_sqnr_db``: 60 dB for exact lowerings and plain float programs; a wrong layout
    lands near 0 dB), or, when ``tolerance`` is given, when the max relative error is at most ``tolerance``.
    ``rules``: the target's table, to which a caller adds its own (``onnxruntime_rules() + RuleTable((Rule(op,
    fn),))``).
    """
    path = Path(path)
    rules = rules if rules is not None else onnxruntime_rules()
    opset = rules.opset if rules.opset is not None else opset
    size, lowered, floor, cache = _write(program, path, rules, metadata, opset)  # copies freed before the check
    log.info("exported %s to %s (%.1f MB, lowered %s)", program.name, path, size / 1e6, lowered)
    result = ExportResult(path, size, lowered, None, cache)
    if check:
        # against what the runtime is meant to compute (the rules' emulations) and against the program itself
        result.check = c = {**check_onnx(program, path, emulated=emulation(program.gm, rules)), "floor_db": floor}
        ok = c["max_rel"] <= tolerance if tolerance is not None else c["sqnr_db"] >= floor
        if not ok:
            bound = f"max rel {tolerance:g}" if tolerance is not None else f"SQNR {floor:g} dB"
            raise LoweringError(
                f"onnxruntime disagrees with the torch program of {program.name}: max relative error "
                f"{c['max_rel']:.3g}, SQNR {c['sqnr_db']:.1f} dB (bound: {bound}) in {path}"
            )
    return result


def _write(program: Program, path: Path, rules: RuleTable, metadata: dict[str, str] | None, opset: int
           ) -> tuple[int, dict[str, int], float, dict[str, Any] | str | None]:
    """Export ``program`` to ``path``; the file's size, the nodes lowered per op, the check's floor and its KV
    cache. Each copy of the weights (the exporter's model, its proto) is dropped as soon as the next one
    exists."""
    gm, lowered, floor = apply_rules(program.gm, rules)
    gm, sig, cache = _signature(program, gm)
    try:
        exported = torch.onnx.export(
            gm,
            sig.inputs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=tuple({d: torch.export.Dim.DYNAMIC for d in dims} for dims in sig.dynamic_dims),
            input_names=list(sig.input_names),
            output_names=list(sig.output_names),
            optimize=False,
            verbose=False,
        )
        # constant folding and cleanup only: the exporter's own opset-23 fusions (optimize=True) also rewrite
        # rotary patterns into a RotaryEmbedding that fails for a batch of more than one row (cos/sin of
        # batch 1); graphpress fuses norms and rotaries itself, checked (passes/fuse.py)
        fold_and_clean(exported.model)
        if rules.finish is not None:
            rules.finish(exported.model)
    except Exception as e:  # the exporter raises many types; name the model, the op and what to try
        refusal = _cause(e, TargetError)
        if refusal is not None:
            raise LoweringError(f"cannot export {program.name}: {refusal}") from e
        unruled = _ops_without_rule(gm)
        hint = (f"the program calls {', '.join(unruled)}, which has no lowering rule: add a Rule for it to the "
                "table (graphpress.lowering.rules)" if unruled else
                "an op without an ONNX translation needs a rule in graphpress.lowering (see rules.py)")
        raise LoweringError(
            f"cannot export {program.name} to ONNX: {hint}. The exporter said: {type(e).__name__}: "
            f"{one_line(e, 300)}"
        ) from e
    del gm
    proto = exported.model_proto
    del exported  # the exporter's in-memory model: the proto holds the weights now
    model = compact(proto)
    name_dynamic_dims(model, sig.dynamic_dims)
    for key, value in {"model": program.name, "kind": program.kind, **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, str(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = program.num_bytes() > EXTERNAL_DATA_THRESHOLD
    data = path.with_name(path.name + ".data")
    if large:
        data.unlink(missing_ok=True)  # the weights of the file being replaced: onnx would append to them
    # tensors under 1 KB (shapes, axes) stay in the graph, where onnxruntime's shape inference reads them
    onnx.save_model(model, path, save_as_external_data=large, location=data.name if large else None)
    if large:  # onnx creates the data file readable by its owner only: as readable as the graph beside it
        data.chmod(path.stat().st_mode & 0o777)
    size = path.stat().st_size + (data.stat().st_size if large else 0)
    return size, lowered, floor, cache


@dataclass
class _Signature:
    inputs: tuple[torch.Tensor, ...]
    input_names: Sequence[str]
    output_names: Sequence[str]
    dynamic_dims: Sequence[dict[int, str]]


def _signature(program: Program, gm: torch.fx.GraphModule
               ) -> tuple[torch.fx.GraphModule, _Signature, dict[str, Any] | str | None]:
    """The graph to export and its inputs and outputs: a causal LM's with its KV cache attached
    (graphpress.kv_cache), so one file serves prefill and decode; the cache's layout, or why there is none."""
    plain = _Signature(program.example_inputs, program.input_names, program.output_names, program.dynamic_dims)
    cache = kv_cache.layout(gm)
    if cache is None:
        return gm, plain, program.meta.get("kv_cache") if program.kind == "causal-lm" else None
    try:
        attached, cache = kv_cache.attach(gm)
    except kv_cache.CacheError as e:
        log.warning("%s: exported without its KV cache: %s", program.name, e)
        return gm, plain, f"exported without a KV cache: {e}"
    sig = _Signature(kv_cache.example_inputs(program.example_inputs[0], cache), cache.input_names(),
                     cache.output_names(), kv_cache.dynamic_dims(cache))
    return attached, sig, cache.to_json()


def _cause(e: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in e's chain (the exporter wraps what a rule raised)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _ops_without_rule(gm: torch.fx.GraphModule) -> list[str]:
    """Custom ops (outside aten and prims) still in the graph after the rules were applied."""
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"
           and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace not in ("aten", "prims")}
    return sorted(o.removesuffix(".default").replace(".", "::", 1) for o in ops)


def fold_and_clean(model: onnx_ir.Model, iterations: int = 2) -> None:
    """Constant folding and cleanup, in place: onnxscript's ``optimize_ir`` without its algebraic rewrite
    rules, which ran for over 8 minutes on a 4-bit SmolLM2 graph (onnxscript 0.7.2) for simplifications that
    onnxruntime's own graph optimizer makes at session start."""
    common = onnx_ir.passes.common
    common.InlinePass()(model)
    for _ in range(iterations):
        folded = onnxscript.optimizer.fold_constants_ir(model, onnx_shape_inference=True, should_fold=_should_fold)
        common.RemoveUnusedNodesPass()(model)
        if not folded.modified:
            break
    for cleanup in (common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
                    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                    common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
                    common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass()):
        cleanup(model)


_PACKED = (onnx_ir.DataType.UINT8, onnx_ir.DataType.INT8)
_VIEWS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")


GROWTH = 1 << 12  # bytes a folded constant may add to the file over the constants it is computed from


def _should_fold(node: onnx_ir.Node) -> bool | None:
    """Constant folding must not make the file larger than the program needs (None: onnxscript's own rules).

    - Packed integers (uint8 / int8 codes, zero points) are not unpacked into a larger initializer: a node
      reading a constant 8-bit integer tensor is left for the runtime. A view of codes that nothing else reads
      is folded, whatever its size: the file then holds the codes in the layout their kernel reads, and
      onnxruntime does not hold both layouts at session start. A view of shared codes (the tied embedding's
      table, gathered as it is and multiplied as blocks) stays, so the codes are stored once.
    - A node whose output is larger than its constant inputs by more than ``GROWTH`` bytes (the rotary tables
      computed from a few inverse frequencies and a Range of positions, 2 MB for SmolLM2) stays: the runtime
      computes it once when it loads the model, and the file keeps the few numbers it is computed from."""
    inputs = [v for v in node.inputs if v is not None and v.const_value is not None]
    packed = [v for v in inputs if v.dtype in _PACKED]
    if packed:
        return node.domain == "" and node.op_type in _VIEWS and all(len(v.uses()) == 1 for v in packed)
    out = sum(_nbytes(v) or 0 for v in node.outputs)
    return False if out > sum(v.const_value.nbytes for v in inputs) + GROWTH else None


def _nbytes(value: onnx_ir.Value) -> int | None:
    """The bytes of a value whose dtype and static shape are known, else None."""
    shape, dtype = value.shape, value.dtype
    if shape is None or dtype is None or not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape) * dtype.itemsize


def name_dynamic_dims(model: onnx.ModelProto, dynamic_dims: Sequence[dict[int, str]]) -> None:
    """The exporter names dynamic dimensions after its symbols (``s77``): name them as the program does
    (``batch``, ``seq``) in the graph's inputs and outputs."""
    renames: dict[str, str] = {}
    for value, dims in zip(model.graph.input, dynamic_dims, strict=False):
        for d, name in dims.items():
            dim = value.type.tensor_type.shape.dim
            if d < len(dim) and dim[d].dim_param and dim[d].dim_param not in renames:
                renames[dim[d].dim_param] = name
    if not renames:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: renames[m.group(1)], dim.dim_param)


def compact(model: onnx.ModelProto, min_elements: int = 1024) -> onnx.ModelProto:
    """Shrink the file without changing a single output bit.

    - drop the exporter's per-node metadata (fx node text, stack traces: megabytes on an LLM), the node
      names (optional in ONNX; ~0.2 MB over the ~6,000 nodes of a W4 SmolLM2) and the intermediate value_info;
    - store float32 initializers whose every value is exactly a float16 (quantization scales, which the
      quantizers round so) as float16 plus a Cast, which onnxruntime folds back at session start;
    - store initializers that are mostly zeros (graphpress.passes.sparsify) as sparse initializers when that
      is smaller: values and int64 linear indices, 12 bytes a nonzero float32 against 4 bytes a weight, so
      only above two thirds of zeros (a 50 % sparse or 2:4 weight stays dense); readers densify them at load.
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
    del model.graph.value_info[:]  # intermediate shape annotations: onnxruntime infers its own
    casts, sparse = [], []
    for i, init in enumerate(model.graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        a = numpy_helper.to_array(init)
        if a.size < min_elements:
            continue
        nonzero = np.flatnonzero(a)
        if nonzero.size * (a.itemsize + 8) < 0.9 * a.nbytes:
            model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
                numpy_helper.from_array(a.reshape(-1)[nonzero], init.name),
                numpy_helper.from_array(nonzero.astype(np.int64), f"{init.name}.indices"), list(a.shape)))
            sparse.append(i)
            continue
        half = a.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), a):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, f"{name}.fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}.fp16"], [name], to=onnx.TensorProto.FLOAT,
                                           name=f"{name}.cast"))
    for i in reversed(sparse):
        del model.graph.initializer[i]
    if casts:
        nodes = casts + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def ort_session(path: str | os.PathLike[str], threads: int = 0) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_forward(path: str | os.PathLike[str], threads: int = 0) -> Any:
    """``forward(*tensors) -> np.ndarray`` over an onnxruntime session of ``path``."""
    session = ort_session(path, threads)
    names = [i.name for i in session.get_inputs()]
    first = [session.get_outputs()[0].name]

    def forward(*inputs: torch.Tensor) -> np.ndarray:
        feed = {n: (x.numpy() if isinstance(x, torch.Tensor) else x) for n, x in zip(names, inputs, strict=False)}
        return session.run(first, kv_cache.complete_feed(feed, session.get_inputs()))[0]

    return forward


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}


def check_onnx(program: Program, path: str | os.PathLike[str], inputs: tuple[torch.Tensor, ...] | None = None,
               emulated: torch.fx.GraphModule | None = None) -> dict[str, float]:
    """Run the file in onnxruntime and the program in torch on the same batch; compare every output (the
    worst of each measure). With ``emulated`` (the program computing what the runtime is meant to compute,
    ``rules.emulation``), the measures are against it, and ``program_sqnr_db`` / ``program_max_rel`` against
    the program itself."""
    inputs = inputs or _other_batch(program)
    session = ort_session(path)
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=False)}
    feed = kv_cache.complete_feed(feed, session.get_inputs())
    out = [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)][: len(program.output_names)]
    del session
    plain = compare_outputs(program.outputs(*inputs), out, program.output_names)[0]
    if emulated is None:
        return plain
    reference = dataclasses.replace(program, gm=emulated).outputs(*inputs)
    return {**compare_outputs(reference, out, program.output_names)[0], "program_sqnr_db": plain["sqnr_db"],
            "program_max_rel": plain["max_rel"]}


def _other_batch(program: Program) -> tuple[torch.Tensor, ...]:
    """The sample batch with one more row, so the check also exercises a dynamic batch size."""
    return tuple(torch.cat([x, x[:1]]) if x.dim() else x for x in program.example_inputs)

