"""fuse_attention: each layer's attention over the KV cache becomes one graphpress::cached_attention, exactly, on
every causal architecture whose mask is causal; onnxruntime runs it as GroupQueryAttention and decodes as
transformers does; a sliding-window mask and a program without a cache are left alone."""

from __future__ import annotations

import onnx
import pytest
import torch

from graphpress import kv_cache
from graphpress.capture import capture
from graphpress.generate import decode, onnx_step
from graphpress.lowering.genai import presents_in_place
from graphpress.lowering.onnx import export_onnx, ort_session
from graphpress.passes import PASSES
from graphpress.passes.fuse_attention import FUSED
from graphpress.program import Program
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline
from tests.hf_tiny import CAUSAL, tiny_model

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


def _fused(model: torch.nn.Module) -> tuple[Program, dict]:
    program, records = run_pipeline(capture(model, {"input_ids": IDS}), load_recipe("exact").passes, verify=True)
    record = records[-1].to_json()
    assert record["name"] == "fuse_attention" and record["error"]["sqnr_db"] > 100  # exact
    return program, record["stats"]


@pytest.mark.parametrize("arch", [a for a in CAUSAL if a != "mistral"])
def test_every_layer_fuses_and_the_cached_program_computes_what_the_model_does(arch: str) -> None:
    model = tiny_model(arch)
    program, stats = _fused(model)
    assert stats == {"fused": 2, "skipped": {}}
    gm, cache = kv_cache.attach(program.gm)
    assert sum(n.target is FUSED for n in gm.graph.nodes) == 2
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
    # three new tokens after five: logits and presents as transformers computes them with its own cache
    from transformers import DynamicCache

    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], past_key_values=DynamicCache(), use_cache=True)
        pasts = [t for layer in first.past_key_values.layers for t in (layer.keys, layer.values)]
        ref = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
        got = gm(ids[:, 5:], torch.ones(2, 8, dtype=torch.long), torch.arange(5, 8).expand(2, 3), *pasts)
    torch.testing.assert_close(got[0], ref.logits, rtol=1e-5, atol=1e-5)
    presents = [t for layer in ref.past_key_values.layers for t in (layer.keys, layer.values)]
    for a, b in zip(got[1:], presents, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_onnxruntime_runs_group_query_attention_and_decodes_as_transformers(tmp_path) -> None:
    model = tiny_model("llama")
    program, _ = _fused(model)
    export_onnx(program, tmp_path / "model.onnx")
    nodes = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("GroupQueryAttention") == 2 and "Attention" not in ops and "Transpose" not in ops
    # q, k and v packed from the fused projection, rotated inside the kernel from the tables by position
    gqa = next(n for n in nodes if n.op_type == "GroupQueryAttention")
    assert {a.name: a.i for a in gqa.attribute}["do_rotary"] == 1 and gqa.input[1:3] == ["", ""]
    assert "RotaryEmbedding" not in ops and ops.count("Split") == 2  # the two MLPs' gate/up
    tables = {tuple(n.input[7:9]) for n in nodes if n.op_type == "GroupQueryAttention"}
    assert len(tables) == 1  # the layers share one pair of rotary tables
    stored = {t.name for t in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer}
    assert not stored & set(*tables)  # computed from the inverse frequencies when the runtime loads the model
    assert presents_in_place(tmp_path / "model.onnx")  # onnxruntime-genai may share past and present buffers
    prompt = list(range(5, 17))
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert decode(onnx_step(tmp_path / "model.onnx"), prompt, 20).tokens == out[0, len(prompt):].tolist()
    # a past and several new tokens at once (batch 1: onnxruntime's kernel takes no batch of such chunks)
    session = ort_session(tmp_path / "model.onnx")
    gm, cache = kv_cache.attach(program.gm)
    inputs = kv_cache.example_inputs(torch.randint(0, 256, (1, 4)), cache, past=6)
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)})
    with torch.no_grad():
        want = gm(*inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(torch.as_tensor(a), b, rtol=1e-4, atol=1e-5)


def test_a_fused_program_saves_and_loads_with_its_cache(tmp_path) -> None:
    program, _ = _fused(tiny_model("llama"))
    loaded = Program.load(program.save(tmp_path / "p.pt2"))
    torch.testing.assert_close(loaded(IDS), program(IDS))
    gm, _ = kv_cache.attach(loaded.gm)
    assert sum(n.target is FUSED for n in gm.graph.nodes) == 2
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")][3:5] == ["past_key_values_0_key",
                                                                            "past_key_values_0_value"]


def test_a_sliding_window_is_not_fused(tmp_path) -> None:
    model = tiny_model("mistral")
    model.config.sliding_window = 3  # shorter than the mask check's sequences
    program, stats = _fused(model)
    assert stats["fused"] == 0 and len(stats["skipped"]) == 2
    assert all("not the causal, padding mask" in why for why in stats["skipped"].values())
    export_onnx(program, tmp_path / "model.onnx")  # the graph concatenates: no buffer to share
    assert not presents_in_place(tmp_path / "model.onnx")
    # the default window (4096) is longer than any short check: the long past finds it
    _, stats = _fused(tiny_model("mistral"))
    assert stats["fused"] == 0 and all("past 524288" in why for why in stats["skipped"].values())


def test_attention_without_a_cache_is_left_alone() -> None:
    program = capture(tiny_model("llama"), {"input_ids": IDS}, cache=False)
    out, records = run_pipeline(program, [PASSES["fuse_attention"]()], verify=True)
    stats = records[-1].to_json()["stats"]
    assert stats["fused"] == 0 and set(stats["skipped"].values()) == {"the program was captured without a KV cache"}
    encoder = capture(tiny_model("bert"), {"input_ids": IDS})
    _, records = run_pipeline(encoder, [PASSES["fuse_attention"]()], verify=True)
    assert records[-1].to_json()["stats"]["fused"] == 0

