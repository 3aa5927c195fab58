"""FoldBatchNorm: inference BatchNorm folds into the conv / linear before it; refused where that is not exact."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from graphpress.capture import capture
from graphpress.metrics import max_rel_error
from graphpress.passes import PASSES
from graphpress.passes.fold_batchnorm import BATCH_NORMS, FoldBatchNorm, fold_bn_into_weights
from graphpress.program import Program
from graphpress.runner import run_pipeline
from tests.conftest import capture_tiny

aten = torch.ops.aten


def bns(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BATCH_NORMS]


def fold(program: Program) -> tuple[Program, dict]:
    out, records = run_pipeline(program, [FoldBatchNorm()], verify=True)
    return out, records[0].stats


def randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 2 - 1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 1.5 + 0.5)
                if bn.affine:
                    bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                    bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
    return model.eval()


def test_registered() -> None:
    assert PASSES["fold_batchnorm"] is FoldBatchNorm
    assert FoldBatchNorm.exact


# --- the math -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 5, 5)),
        (nn.Conv2d(4, 6, 3, groups=2, bias=False), torch.randn(2, 4, 5, 5)),
        (nn.Conv1d(3, 5, 2), torch.randn(2, 3, 7)),
        (nn.Conv3d(2, 4, 2, bias=False), torch.randn(2, 2, 3, 3, 3)),
        (nn.Linear(7, 5), torch.randn(4, 7)),
    ],
)
@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_into_weights_matches_layer_then_bn(layer: nn.Module, x: torch.Tensor, affine: bool) -> None:
    torch.manual_seed(0)
    c = layer.weight.shape[0]
    bn = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim() + (x.dim() == 2)](c, affine=affine)
    bn = randomize_stats(bn)
    w, b = fold_bn_into_weights(
        layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    )
    assert w.shape == layer.weight.shape and b.shape == (c,)
    folded = type(layer)(*_init_args(layer))
    with torch.no_grad():
        folded.weight.copy_(w)
        folded.bias.copy_(b)
        assert max_rel_error(bn(layer(x)), folded(x)) <= 1e-5


def _init_args(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        1,
        layer.groups,
    )


def test_fold_bn_into_weights_rejects_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="4 outputs"):
        fold_bn_into_weights(torch.ones(4, 3), None, None, None, torch.zeros(5), torch.ones(5), 1e-5)


# --- the pass on the tiny models ----------------------------------------------------------------------------


def test_convnet_folds_every_batchnorm() -> None:
    program = capture_tiny("convnet")
    out, stats = fold(program)
    assert stats == {"folded": 3, "conv": 2, "linear": 1, "skipped": {}}
    assert not bns(out.gm)
    state = out.gm.state_dict()
    assert not [k for k in state if k.startswith("bn")]  # gamma, beta, running stats, num_batches_tracked
    assert set(state) == {f"{m}.{p}" for m in ("conv1", "conv2", "fc", "head") for p in ("weight", "bias")}
    # conv2 had no bias: the folded one is a new parameter under its name, read by the conv
    (conv2,) = [
        n
        for n in out.gm.graph.nodes
        if n.target is aten.conv2d.default and n.args[1].target == "conv2.weight"
    ]
    assert conv2.args[2].target == "conv2.bias"
    batch = (torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(7)),)
    assert max_rel_error(program(*batch), out(*batch)) <= 1e-4


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_no_batchnorm_no_change(name: str) -> None:
    out, stats = fold(capture_tiny(name))
    assert stats == {"folded": 0, "conv": 0, "linear": 0, "skipped": {}}


def test_decomposed_form() -> None:
    """After run_decompositions: aten.convolution -> _native_batch_norm_legit_no_training -> getitem 0."""
    model = randomize_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(model, (x,), strict=False).run_decompositions()
    program = _program(ep.module(), x)
    assert [n.target for n in bns(program.gm)] == [aten._native_batch_norm_legit_no_training.default]
    out, stats = fold(program)
    assert stats["folded"] == 1 and not bns(out.gm)
    assert not [n for n in out.gm.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)]
    x2 = torch.randn(2, 3, 6, 6)
    assert max_rel_error(model(x2), out(x2)) <= 1e-4


def _program(gm: fx.GraphModule, x: torch.Tensor) -> Program:
    return Program(
        gm=gm, example_inputs=(x,), input_names=("x",), output_names=("output",), dynamic_dims=({},)
    )


# --- what it must refuse ------------------------------------------------------------------------------------


class ConvTwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv's own output is read too


class TiedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


class ConvTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class NoRunningStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LinearOverSequence(nn.Module):
    """Linear writes features last, BatchNorm1d on [N, C, L] normalises dim 1: not the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


@pytest.mark.parametrize(
    "model, x, reason",
    [
        (ConvTwoUsers(), torch.randn(2, 3, 6, 6), "also read by"),
        (TiedConvs(), torch.randn(2, 3, 6, 6), "shared or tied"),
        (ConvTranspose(), torch.randn(2, 3, 6, 6), "transposed convolution"),
        (NoRunningStats(), torch.randn(2, 3, 6, 6), "no running statistics"),
        (LinearOverSequence(), torch.randn(2, 4, 4), "3-d output"),
    ],
    ids=["two-users", "tied", "transposed", "no-running-stats", "linear-3d"],
)
def test_refuses(model: nn.Module, x: torch.Tensor, reason: str) -> None:
    program = capture(randomize_stats(model), (x,), name=type(model).__name__)
    (bn,) = bns(program.gm)
    out, stats = fold(program)  # verify=True: a wrong fold would also fail here
    assert stats["folded"] == 0
    assert reason in stats["skipped"][bn.name]
    assert [n.name for n in bns(out.gm)] == [bn.name]
    x2 = torch.randn(3, *x.shape[1:])
    assert max_rel_error(program(x2), out(x2)) <= 1e-4


def test_refuses_training_mode() -> None:
    """capture() switches to eval; torch.export of a train-mode module keeps batch_norm(training=True)."""
    model = randomize_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    x = torch.randn(4, 3, 6, 6)
    program = _program(torch.export.export(model, (x,), strict=False).module(), x)
    (bn,) = bns(program.gm)
    assert bn.args[5] is True
    out, stats = fold(program)
    assert stats["folded"] == 0
    assert "training=True" in stats["skipped"][bn.name]
    assert len(bns(out.gm)) == 1
    assert "0.weight" in dict(out.gm.named_parameters())
