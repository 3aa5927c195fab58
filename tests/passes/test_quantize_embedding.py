from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.graph import cleanup
from graphpress.lowering.onnx import export_onnx
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.metrics import sqnr
from graphpress.passes import PASSES, PassError
from graphpress.passes.base import PassContext
from graphpress.passes.quantize_embedding import QuantizeEmbedding
from graphpress.program import Program
from graphpress.runner import run_pipeline
from tests.conftest import capture_tiny, tiny_llama

aten = torch.ops.aten
gather_nbits = torch.ops.graphpress.quantized_embedding.default
matmul_nbits = torch.ops.graphpress.quantized_linear.default

V, H = 512, 64  # V * H * bits / 8 > 8192: the exporter's constant folding leaves a larger table alone

# measured SQNR of the logits / hidden states vs the float program (dB), floors ~3 dB below
FLOORS = {("llama", 8): 39.0, ("llama", 4): 15.0, ("bert", 8): 40.0, ("bert", 4): 17.0}


def _llama(tie: bool) -> Program:
    model = tiny_llama(tie=tie)
    model.resize_token_embeddings(V, mean_resizing=False)  # keeps the tie
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    return capture(model, {"input_ids": ids}, name="tiny-llama")


def _quantize(program: Program, **kw: object) -> tuple[Program, dict]:
    out, records = run_pipeline(program, [QuantizeEmbedding(**kw)])
    assert records[0].modified
    return out, records[0].stats


def _nodes(program: Program, op: object) -> list[torch.fx.Node]:
    return [n for n in program.gm.graph.nodes if n.op == "call_function" and n.target == op]


def _float_tables(program: Program, v: int, h: int) -> list[str]:
    return [name for name, t in program.gm.named_parameters(remove_duplicate=False)
            if t.is_floating_point() and tuple(t.shape) in ((v, h), (h, v))]


def _export(program: Program, path) -> onnx.ModelProto:  # noqa: ANN001
    # float compute: onnxruntime computes what the program computes
    result = export_onnx(program, path, rules=onnxruntime_rules(accuracy_level=0))
    assert result.check["sqnr_db"] > 50, result.check
    return onnx.load(str(path))


def _initializers_of(model: onnx.ModelProto, nbytes: int, dtype: int) -> list[str]:
    return [i.name for i in model.graph.initializer
            if i.data_type == dtype and len(i.raw_data) == nbytes]


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_table_is_one_packed_tensor_for_embedding_and_lm_head(tmp_path, bits: int) -> None:
    program = _llama(tie=True)
    ref = program(*program.example_inputs)
    out, stats = _quantize(program, bits=bits)

    assert stats["embeddings"] == 1 and stats["tied_linears"] == 1 and not stats["skipped"]
    assert not _nodes(out, aten.embedding.default)
    (gather,), (matmul,) = _nodes(out, gather_nbits), _nodes(out, matmul_nbits)
    assert gather.args[0].target == matmul.args[1].target == "model.embed_tokens.qweight"
    assert gather.args[1].target == matmul.args[2].target  # scales shared too
    codes = [name for name, t in out.gm.named_buffers() if t.dtype == torch.uint8 and t.shape[0] == V
             and t.numel() == V * H * bits // 8]
    assert codes == ["model.embed_tokens.qweight"]
    assert not _float_tables(out, V, H)
    # the program stores the table once, packed: 8 bits ~4x smaller, 4 bits ~8x, less scales and zeros
    # (one float and one zero point per 64 codes: 3.7x and 6.9x here)
    table = V * H * 4
    assert stats["bytes_before"] == table and table / stats["bytes_after"] > {8: 3.5, 4: 6.5}[bits]
    assert program.num_bytes() - out.num_bytes() == table - stats["bytes_after"]
    assert sqnr(ref, out(*out.example_inputs)) >= FLOORS["llama", bits]

    model = _export(out, tmp_path / "m.onnx")
    assert len(_initializers_of(model, V * H * bits // 8, onnx.TensorProto.UINT8)) == 1
    assert not _initializers_of(model, table, onnx.TensorProto.FLOAT)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1


def test_untied_model_quantizes_only_the_embedding(tmp_path) -> None:
    program = _llama(tie=False)
    ref = program(*program.example_inputs)
    out, stats = _quantize(program, bits=8)
    assert stats["embeddings"] == 1 and stats["tied_linears"] == 0
    assert not _nodes(out, matmul_nbits)
    assert _float_tables(out, V, H) == ["lm_head.weight"]  # a separate weight, for rtn / gptq
    assert sqnr(ref, out(*out.example_inputs)) >= FLOORS["llama", 8]
    model = _export(out, tmp_path / "m.onnx")
    assert len(_initializers_of(model, V * H, onnx.TensorProto.UINT8)) == 1
    assert len(_initializers_of(model, V * H * 4, onnx.TensorProto.FLOAT)) == 1  # lm_head only


def test_tie_output_false_keeps_a_float_copy_and_says_so() -> None:
    program = _llama(tie=True)
    out, stats = _quantize(program, bits=8, tie_output=False)
    assert stats["tied_linears"] == 0 and "lm_head" in stats["skipped"]
    assert stats["bytes_after"] > V * H * 4  # packed table plus the float one
    assert len(_nodes(out, gather_nbits)) == 1 and not _nodes(out, matmul_nbits)
    assert _float_tables(out, V, H) == ["lm_head.weight"]


@pytest.mark.parametrize("bits", [8, 4])
def test_bert_embeddings(tmp_path, bits: int) -> None:
    program = capture_tiny("bert")
    ref = program(*program.example_inputs)
    out, stats = _quantize(program, bits=bits, symmetric=True)
    assert stats["embeddings"] == 3 and stats["tied_linears"] == 0  # word, position, token type
    assert not _nodes(out, aten.embedding.default)
    assert all(n.args[2] is None for n in _nodes(out, gather_nbits))  # symmetric: the ops' default zero point
    assert sqnr(ref, out(*out.example_inputs)) >= FLOORS["bert", bits]
    _export(out, tmp_path / "m.onnx")


def test_targets_match_every_alias_and_the_calling_module() -> None:
    program = _llama(tie=True)
    # the embedding reads lm_head.weight; after cleanup() the name model.embed_tokens.weight is gone too
    assert [n.args[0].target for n in _nodes(program, aten.embedding.default)] == ["lm_head.weight"]
    cleanup(program.gm)
    for targets in (("embed_tokens",), ("^lm_head$",)):
        out, stats = _quantize(program, targets=targets)
        assert stats["embeddings"] == 1 and stats["tied_linears"] == 1
    with pytest.raises(PassError, match="match no embedding"):
        QuantizeEmbedding(targets=("embed_tokens",), ignore=("embed",))(program.clone().gm, PassContext(program))


@pytest.mark.parametrize("group_size", [128, None])  # H = 64: 128 does not divide it; None is one group per row
def test_group_size_that_does_not_divide_h_falls_back_to_a_divisor(group_size: int | None) -> None:
    program = capture_tiny("bert")
    ref = program(*program.example_inputs)
    out, stats = _quantize(program, group_size=group_size)
    assert set(stats["group_size"].values()) == {64}
    assert all(n.args[5] == 64 for n in _nodes(out, gather_nbits))
    assert sqnr(ref, out(*out.example_inputs)) >= FLOORS["bert", 8]


class _TransposedHead(nn.Module):
    """An output projection tied by hand as x @ W^T (aten.t + aten.matmul, not aten.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed(ids)) @ self.embed.weight.t()


def test_other_readers_of_the_table_keep_it_and_are_reported() -> None:
    program = capture(_TransposedHead().eval(), (torch.randint(0, 100, (2, 5)),))
    out, stats = _quantize(program)
    assert stats["embeddings"] == 1 and stats["tied_linears"] == 0
    assert stats["bytes_after"] > 100 * 64 * 4 and len(stats["skipped"]) == 1
    assert _float_tables(out, 100, 64) == ["embed.weight"]


class _Embed(nn.Module):
    def __init__(self, h: int, max_norm: float | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, h, max_norm=max_norm)
        self.head = nn.Linear(h, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def _run(module: nn.Module, **kw: object) -> None:
    program = capture(module.eval(), (torch.randint(0, 100, (2, 5)),))
    QuantizeEmbedding(**kw)(program.gm, PassContext(program))


@pytest.mark.parametrize("module, kw, message", [
    (_Embed(64), {"targets": ("^head$",)}, "match no embedding"),
    (_Embed(64, max_norm=1.0), {}, "max_norm"),
    (_Embed(63), {"bits": 4}, "no power of two >= 16 up to group_size=64 divides H=63"),
    (_Embed(40), {}, "divides H=40, so the table cannot be stored in whole groups; use group_size: null"),
])
def test_refuses(module: nn.Module, kw: dict, message: str) -> None:
    with pytest.raises(PassError, match=message):
        _run(module, **kw)


def test_registered() -> None:
    assert PASSES["quantize_embedding"] is QuantizeEmbedding
    assert not QuantizeEmbedding.exact
    with pytest.raises(ValueError):
        QuantizeEmbedding(bits=3)
