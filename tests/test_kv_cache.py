"""The KV cache: captured as inputs and outputs, detached for the passes, attached again for lowering; the
export's greedy decoding equals transformers' with its own cache."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from graphpress import kv_cache
from graphpress.capture import capture
from graphpress.generate import decode, onnx_step
from graphpress.lowering.onnx import export_onnx
from graphpress.program import Program
from tests.hf_tiny import tiny_model


def _greedy_hf(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # grouped-query attention; GPT-2's own attention and heads
def test_the_export_decodes_as_transformers_does_with_its_cache(arch: str, tmp_path) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    program = capture(model, {"input_ids": ids})
    cache = kv_cache.layout(program.gm)
    heads = 2 if arch == "llama" else 4  # the key/value heads: grouped-query attention keeps its smaller cache
    assert (cache.layers, cache.heads, cache.head_dim, cache.dtype) == (2, heads, 16, "float32")
    assert cache.positions == (model.config.n_positions if arch == "gpt2" else model.config.max_position_embeddings)
    # detached: the program the passes see computes what the model computes without a cache, bit for bit
    assert program.input_names == ("input_ids",) and program.output_names == ("logits",)
    torch.testing.assert_close(program(ids), model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)
    result = export_onnx(program, tmp_path / "model.onnx")
    assert result.kv_cache == cache.to_json()
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == cache.input_names()
    assert [o.name for o in graph.output] == cache.output_names()
    past = graph.input[3].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in past] == ["batch", heads, "past_seq", 16]
    prompt = list(range(5, 17))
    assert decode(onnx_step(tmp_path / "model.onnx"), prompt, 20).tokens == _greedy_hf(model, prompt, 20)


def test_a_saved_program_keeps_its_cache(tmp_path) -> None:
    model = tiny_model("llama")
    program = capture(model, {"input_ids": torch.randint(0, 256, (2, 8))})
    loaded = Program.load(program.save(tmp_path / "p.pt2"))
    assert kv_cache.layout(loaded.gm) == kv_cache.layout(program.gm)
    ids = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(loaded(ids), program(ids))
    gm, _ = kv_cache.attach(loaded.gm)  # every mark survived the round trip
    assert len(list(gm.graph.find_nodes(op="placeholder"))) == 3 + 4


def test_attach_refuses_a_program_whose_present_a_pass_removed() -> None:
    program = capture(tiny_model("llama"), {"input_ids": torch.randint(0, 256, (2, 8))})
    present = next(n for n in program.gm.graph.nodes if n.meta.get(kv_cache.MARK) == ("present", "present.1.value"))
    del present.meta[kv_cache.MARK]
    with pytest.raises(kv_cache.CacheError, match=r"present\.1\.value"):
        kv_cache.attach(program.gm)


def test_a_causal_lm_given_more_than_input_ids_is_captured_without_a_cache() -> None:
    ids = torch.randint(0, 256, (2, 8))
    program = capture(tiny_model("llama"), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert kv_cache.layout(program.gm) is None and "more than input_ids" in program.meta["kv_cache"]
    assert kv_cache.layout(capture(tiny_model("llama"), {"input_ids": ids}, cache=False).gm) is None


def test_complete_feed_runs_the_whole_sequence_without_earlier_tokens() -> None:
    class Arg:
        def __init__(self, name: str, shape: list, type: str = "tensor(float)") -> None:
            self.name, self.shape, self.type = name, shape, type

    inputs = [Arg("input_ids", ["batch", "seq"]), Arg("attention_mask", ["batch", "total_seq"]),
              Arg("position_ids", ["batch", "seq"]), Arg("past_key_values.0.key", ["batch", 3, "past_seq", 8])]
    feed = kv_cache.complete_feed({"input_ids": np.zeros((2, 5), np.int64)}, inputs)
    assert feed["attention_mask"].shape == (2, 5) and feed["attention_mask"].all()
    assert feed["position_ids"].tolist() == [list(range(5))] * 2
    assert feed["past_key_values.0.key"].shape == (2, 3, 0, 8)
    plain = {"input_ids": np.zeros((1, 2), np.int64)}
    assert kv_cache.complete_feed(plain, inputs[:1]) is plain
