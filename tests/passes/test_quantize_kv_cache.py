"""quantize_kv_cache: the cache as int8 codes with static per-channel scales; onnxruntime's GroupQueryAttention
computes exactly what the torch program computes (its int8 cache rounds and saturates as the reference does),
onnxruntime-genai generates with it as graphpress's own decode does, and what cannot be quantized is refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from graphpress import kv_cache
from graphpress.capture import capture
from graphpress.generate import decode, onnx_step
from graphpress.kernels.attention import cache_codes, cache_values
from graphpress.lowering.genai import write_genai_config
from graphpress.lowering.onnx import export_onnx, ort_session
from graphpress.passes import PASSES
from graphpress.recipes import load_recipe
from graphpress.runner import PipelineError, run_pipeline
from tests.hf_tiny import tiny_model

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
CALIBRATION = [(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(3)]


def _int8_cache(model: torch.nn.Module, calibration=CALIBRATION):  # noqa: ANN001, ANN202
    passes = [*load_recipe("exact").passes, PASSES["quantize_kv_cache"]()]
    return run_pipeline(capture(model, {"input_ids": IDS}), passes, verify=True, calibration=calibration)


@pytest.fixture(scope="module")
def int8():  # noqa: ANN201
    """The tiny Llama with its cache in int8, and its pass record (one pipeline for the module)."""
    model = tiny_model("llama")
    program, records = _int8_cache(model)
    return model, program, records[-1].to_json()


def test_codes_round_half_to_even_and_saturate() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 200.0, -300.0, 126.6]).view(1, 1, 7, 1)
    codes = cache_codes(x, torch.ones(1))
    assert codes.dtype == torch.int8 and codes.flatten().tolist() == [0, 2, 2, 0, 127, -128, 127]
    assert cache_values(codes, torch.full((1,), 0.5)).flatten().tolist() == [0, 1, 1, 0, 63.5, -64, 63.5]


def test_the_cache_is_int8_and_onnxruntime_computes_what_the_program_does(int8, tmp_path) -> None:
    _, program, record = int8
    stats = record["stats"]
    assert stats["layers"] == 2 and stats["bytes_per_token_before"] == 4 * stats["bytes_per_token_after"]
    # lossy, and close: the logits of the float cache within the quality floor
    assert 30 < record["error"]["sqnr_db"] < 100
    gm, cache = kv_cache.attach(program.gm)
    assert cache.dtype == "int8"
    exported = export_onnx(program, tmp_path / "model.onnx")
    assert exported.check["sqnr_db"] > 100  # the check runs the cache graph with an empty past
    model = onnx.load(str(tmp_path / "model.onnx"))
    pasts = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    assert {i.type.tensor_type.elem_type for i in pasts} == {onnx.TensorProto.INT8}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(len(n.input) == 14 and n.input[12] and n.input[13] for n in gqa)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
    # a past of six tokens' codes, four new tokens: the same logits, bit-equal codes in the presents
    session = ort_session(tmp_path / "model.onnx")
    codes = torch.Generator().manual_seed(3)
    inputs = kv_cache.example_inputs(torch.randint(0, 256, (1, 4)), cache, past=6)
    inputs = (*inputs[:3], *[torch.randint(-128, 128, x.shape, generator=codes, dtype=torch.int8) for x in inputs[3:]])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)})
    with torch.no_grad():
        want = gm(*inputs)
    torch.testing.assert_close(torch.as_tensor(got[0]), want[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.dtype == np.int8 and np.array_equal(a, b.numpy())


def test_onnxruntime_genai_generates_with_the_int8_cache_as_graphpress_decodes(int8, tmp_path) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    model, program, _ = int8
    export_onnx(program, tmp_path / "model.onnx")
    _, cache = kv_cache.attach(program.gm)
    write_genai_config(tmp_path, cache, model.config, None)
    prompt = list(range(5, 17))
    ours = decode(onnx_step(tmp_path / "model.onnx"), prompt, 16).tokens
    genai = og.Model(str(tmp_path))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(prompt) + 16, min_length=len(prompt) + 16, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[len(prompt):] == ours


def test_refuses_or_leaves_what_it_cannot_store_in_int8(int8) -> None:
    kv = PASSES["quantize_kv_cache"]()
    model, program, _ = int8
    # left as they are, with the reason: no cache (an encoder), an attention that is not fused
    no_cache = capture(model, {"input_ids": IDS}, cache=False)
    for unfused in (no_cache, capture(model, {"input_ids": IDS})):
        same, records = run_pipeline(unfused, [kv], calibration=CALIBRATION)
        stats = records[-1].to_json()["stats"]
        assert stats["layers"] == 0 and ("without a KV cache" in stats["skipped"]) == (unfused is no_cache)
        assert "read outside a fused attention" in stats["skipped"] or unfused is no_cache
    fused, _ = run_pipeline(capture(model, {"input_ids": IDS}), load_recipe("exact").passes)
    with pytest.raises(PipelineError, match="needs calibration"):
        run_pipeline(fused, [kv], calibration=[])
    with pytest.raises(PipelineError, match="already int8"):
        run_pipeline(program, [kv], calibration=CALIBRATION)
    with pytest.raises(ValueError, match="bits must be 8"):
        PASSES["quantize_kv_cache"](bits=4)
