from __future__ import annotations

import pytest
import torch

from graphpress.calibration import BlockStream, linear_weights
from tests.conftest import capture_tiny


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_stream_reproduces_program_and_sees_every_block_linear(name: str) -> None:
    program = capture_tiny(name)
    batches = [tuple(x[i : i + 1] for x in program.example_inputs) for i in range(2)]
    stream = BlockStream(program.gm, batches)
    assert stream.block_names[0].endswith(".0") and len(stream.block_names) == 2
    seen: dict[str, list[str]] = {}
    outputs: dict[str, list] = {}

    def on_part(part, forward) -> None:  # noqa: ANN001
        outputs[part.name] = forward(lambda w, x: seen.setdefault(part.name, []).append(w))

    stream.run(on_part)
    got = torch.cat([o if isinstance(o, torch.Tensor) else o[0] for o in outputs[stream.parts[-1].name]])
    torch.testing.assert_close(got, program(*program.example_inputs), rtol=0, atol=0)
    block = stream.block_names[1]
    expected = [w for _, w in linear_weights(next(p for p in stream.parts if p.name == block))]
    assert len(expected) == (7 if name == "llama" else 6)
    assert sorted(set(seen[block])) == sorted(expected) and len(seen[block]) == 2 * len(expected)


def test_rewriting_a_block_in_place_reaches_later_parts() -> None:
    program = capture_tiny("llama")
    stream = BlockStream(program.gm, [program.example_inputs])
    weight = program.gm.get_parameter("model.layers.0.mlp.down_proj.weight")
    results = {}

    def on_part(part, forward) -> None:  # noqa: ANN001
        if part.name == "model.layers.0":
            with torch.no_grad():
                weight.zero_()
        results[part.name] = forward(None)

    stream.run(on_part)
    assert not torch.equal(results["suffix"][0], capture_tiny("llama")(*program.example_inputs))


def test_refuses_model_without_blocks() -> None:
    with pytest.raises(ValueError, match="no repeated blocks"):
        BlockStream(capture_tiny("convnet").gm, [capture_tiny("convnet").example_inputs])


def test_stream_stops_after_the_last_wanted_part_and_drops_its_outputs() -> None:
    program = capture_tiny("llama")
    stream = BlockStream(program.gm, [program.example_inputs])
    seen: list[str] = []
    outputs: dict[str, list] = {}

    def on_part(part, forward) -> None:  # noqa: ANN001
        seen.append(part.name)
        outputs[part.name] = forward(None)

    stream.run(on_part, weights={"model.layers.0.mlp.down_proj.weight"})
    assert seen == ["prefix", "model.layers.0"]  # layer 1 and the head (logits) never run
    assert outputs["model.layers.0"] == [None]
