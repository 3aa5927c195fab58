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


def _rerun_after_rewrite(weight: str, other: str | None = None, unseen: bool = False) -> tuple[list, list]:
    """Stream a tiny llama, rewrite ``weight`` (and ``other``, undeclared; ``unseen``: behind the version
    counter's back) in layer 0 between two runs declaring ``weight`` as the change; return the outputs of
    layer 0's second run and of a full run."""
    program = capture_tiny("llama")
    batches = [tuple(x[i : i + 1] for x in program.example_inputs) for i in range(2)]
    stream = BlockStream(program.gm, batches)
    got: list = []

    def on_part(part, forward) -> None:  # noqa: ANN001
        if part.name != "model.layers.0":
            return
        forward(None, changes={weight})
        with torch.no_grad():
            for w in filter(None, (weight, other)):
                p = program.gm.get_parameter(w)
                (p.data if unseen and w == other else p).mul_(0.5)
        got.extend(forward(None))

    later = "model.layers.1.mlp.down_proj.weight"  # layer 0's outputs are kept only if a later part is wanted
    stream.run(on_part, weights={weight, later})
    stream = BlockStream(program.gm, batches)
    full: list = []
    stream.run(lambda part, forward: full.extend(forward(None)) if part.name == "model.layers.0" else None,
               weights={weight, later})
    return got, full


def _outputs(values: list) -> list[torch.Tensor]:
    return [t for v in values for t in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(t, torch.Tensor)]


def test_second_run_recomputes_what_the_declared_change_reaches() -> None:
    got, full = _rerun_after_rewrite("model.layers.0.mlp.down_proj.weight")
    for a, b in zip(_outputs(got), _outputs(full), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_second_run_recomputes_everything_when_an_undeclared_tensor_changed() -> None:
    got, full = _rerun_after_rewrite("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight")
    for a, b in zip(_outputs(got), _outputs(full), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_replay_keeps_only_the_border_of_the_change() -> None:
    from graphpress.calibration import _Replay

    program = capture_tiny("llama")
    stream = BlockStream(program.gm, [program.example_inputs])
    part = next(p for p in stream.parts if p.name == "model.layers.0")
    replay = _Replay(part, [[None]] * 20, {"model.layers.0.mlp.down_proj.weight"}, 1)
    ops = sorted(str(n.target) for n in replay.reached if n.op == "call_function")
    assert ops == ["aten.add.Tensor", "aten.linear.default"]
    assert len(replay.border) == 2  # the down projection's input and the residual stream


def test_second_run_reuses_the_values_the_change_does_not_reach() -> None:
    got, full = _rerun_after_rewrite("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                                     unseen=True)  # so the replay cannot know: its kept values are stale
    assert not all(torch.equal(a, b) for a, b in zip(_outputs(got), _outputs(full), strict=True))


def test_stack_batches_concatenates_consecutive_batches_of_one_shape() -> None:
    from graphpress.calibration import stack_batches

    program = capture_tiny("llama")
    b = [(torch.full((1, 8), i),) for i in range(5)] + [(torch.zeros(1, 4, dtype=torch.long),)]
    stacked = stack_batches(program.gm, b, 2)
    assert [tuple(x[0].shape) for x in stacked] == [(2, 8), (2, 8), (1, 8), (1, 4)]
    assert stacked[1][0][:, 0].tolist() == [2, 3]
    assert stack_batches(program.gm, b, 1) == b
    traced = torch.fx.symbolic_trace(torch.nn.Linear(8, 8))  # no symbolic batch dimension known: left alone
    assert stack_batches(traced, b, 2) == b

