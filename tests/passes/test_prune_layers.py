"""prune_layers: blocks found with their residual stream on every architecture, removal equal to a model
whose block list was cut by hand, both importances, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.passes.linearize import LinearizeMatmuls
from graphpress.passes.prune_layers import PruneLayers, blocks
from graphpress.runner import PipelineError, run_pipeline
from tests.hf_tiny import ARCHITECTURES, tiny_model

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def _block_list(model: nn.Module) -> tuple[nn.Module, str]:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "encoder.layer"):
        owner = model
        try:
            for part in path.split(".")[:-1]:
                owner = getattr(owner, part)
            getattr(owner, path.split(".")[-1])
        except AttributeError:
            continue
        return owner, path.split(".")[-1]
    raise AssertionError(f"no block list in {type(model).__name__}")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_removed_block_equals_a_model_with_its_block_list_cut_by_hand(arch: str) -> None:
    model = tiny_model(arch)
    program = capture(model, {"input_ids": IDS})
    assert [b.name.rsplit(".", 1)[1] for b in blocks(program.gm)] == ["0", "1"]
    out, records = run_pipeline(program, [LinearizeMatmuls(), PruneLayers(count=1, importance="influence",
                                                                          bridge=False)], calibration=[(IDS,)])
    gone = int(records[-1].stats["removed_blocks"][0].rsplit(".", 1)[1])
    owner, attr = _block_list(model)
    setattr(owner, attr, nn.ModuleList([b for i, b in enumerate(getattr(owner, attr)) if i != gone]))
    with torch.no_grad():
        ref = model(IDS)
    expected = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
    torch.testing.assert_close(out.outputs(IDS)[0], expected, rtol=1e-5, atol=1e-5)
    assert out.num_parameters() < program.num_parameters()


def test_loss_search_picks_the_block_whose_removal_costs_least() -> None:
    from graphpress.passes.prune_layers import blocks as find
    from graphpress.passes.prune_layers import calibration_loss

    model = tiny_model("llama")
    program = capture(model, {"input_ids": IDS})
    calib = [(IDS,)]
    found = find(program.gm)
    losses = [calibration_loss(program.gm, found, {i}, calib) for i in range(len(found))]
    _, records = run_pipeline(program, [PruneLayers(count=1, importance="loss")], calibration=calib)
    assert records[0].stats["removed_blocks"] == [found[min(range(2), key=losses.__getitem__)].name]


def test_bridge_carries_what_the_removed_blocks_added() -> None:
    """Refitting the kept block's last residual write to the removed span's output brings the program's
    last hidden state closer to the original's on calibration inputs."""
    import copy

    from graphpress.passes.prune_layers import bridge, remove_blocks

    model = tiny_model("llama")
    calib = [(torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    program = capture(model, {"input_ids": IDS})
    errors = {}
    for refit in (False, True):
        gm = copy.deepcopy(program.gm)
        found = blocks(gm)
        names = bridge(gm, found, [1], calib, damp=0.01) if refit else []
        remove_blocks(gm, [found[1]])
        assert names == (["model.layers.0.mlp.down_proj.weight"] if refit else [])
        errors[refit] = sum(float(((gm(*b)[0] - program.gm(*b)[0]) ** 2).sum()) for b in calib)
    assert errors[True] < 0.8 * errors[False], errors


def test_refusals() -> None:
    program = capture(tiny_model("llama"), {"input_ids": IDS})
    with pytest.raises(PipelineError, match="leaves none"):
        run_pipeline(program, [PruneLayers(count=2)], calibration=[(IDS,)])
    with pytest.raises(PipelineError, match="needs calibration"):
        run_pipeline(program, [PruneLayers(count=1)])
    with pytest.raises(ValueError, match=r"give one of ratio \(fraction removed\) or count \(blocks removed\)"):
        PruneLayers()
    with pytest.raises(ValueError, match="importance must be"):
        PruneLayers(count=1, importance="random")


class _TwoOut(nn.Module):
    """Blocks that hand on two values: no single residual stream to pass through."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Pair() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.layers:
            x, y = layer(x, y)
        return x + y


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self.a(y), y * 2


def test_block_with_two_streams_is_refused_with_its_name() -> None:
    program = capture(_TwoOut(), (torch.randn(2, 8),))
    with pytest.raises(PipelineError, match=r"block layers\.0 hands on 2 values"):
        run_pipeline(program, [PruneLayers(count=1)], calibration=[(torch.randn(2, 8),)])
