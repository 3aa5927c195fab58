"""RemoveNoops: eval dropout, identity views, same-dtype casts and export asserts go; live ops and guards stay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphpress.capture import capture
from graphpress.metrics import max_rel_error
from graphpress.passes import PASSES
from graphpress.passes.remove_noops import ASSERTS, DROPOUTS, RemoveNoops
from graphpress.program import Program
from graphpress.runner import run_pipeline
from tests.conftest import capture_tiny

aten = torch.ops.aten
CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default)

# what the pass must find in the tiny models (torch 2.13, transformers' eager attention):
#  llama (captured with its KV cache, then detached): 16 identities; 15 same-dtype casts; no guards module
#         (detaching drops it).
#  bert:  5 eval dropouts; 6 identities; 2 bool->bool casts; the guards check seq <= 128: kept.
# (capture already drops torch.export's _assert_tensor_metadata nodes, 17 and 3 of them: see
# test_asserts_of_a_program_not_made_by_capture_go)
#  convnet: 1 eval dropout; its guards check the 3x8x8 image size: kept.
EXPECTED = {
    "llama": {"dropout": 0, "identity": 16, "cast": 15, "assert": 0, "guards": 0},
    "bert": {"dropout": 5, "identity": 6, "cast": 2, "assert": 0, "guards": 0},
    "convnet": {"dropout": 1, "identity": 0, "cast": 0, "assert": 0, "guards": 0},
}
# the tiny llama is captured with its KV cache, whose detaching drops torch.export's input guards with the
# inputs they checked (graphpress.kv_cache); the others keep a guards module that checks something
GUARDS_KEPT = {"llama": False, "bert": True, "convnet": True}
# casts that change the dtype and must survive: llama's int64 -> fp32 positions (two), bert's int64 -> bool mask
REAL_CASTS = {"llama": 2, "bert": 1, "convnet": 0}


def fresh_batch(name: str) -> tuple[torch.Tensor, ...]:
    """A batch of another size than the example one, so the dynamic dimensions are exercised too."""
    g = torch.Generator().manual_seed(7)
    if name == "convnet":
        return (torch.randn(5, 3, 8, 8, generator=g),)
    ids = torch.randint(0, 128, (3, 9), generator=g)
    if name == "llama":
        return (ids,)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return ids, mask


def first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[index,return-value]


def all_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of the graph and of its subgraphs (higher-order ops such as wrap_with_set_grad_enabled)."""
    return [n for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes]


def calls(gm: fx.GraphModule, *targets: object) -> list[fx.Node]:
    return [n for n in all_nodes(gm) if n.op == "call_function" and n.target in targets]


def remove(program: Program, *, verify: bool = True, in_place: bool = False) -> tuple[Program, dict]:
    out, records = run_pipeline(program, [RemoveNoops()], verify=verify, in_place=in_place)
    return out, records[0].stats


@pytest.fixture(scope="module")
def tiny() -> dict[str, Program]:
    return {name: capture_tiny(name) for name in EXPECTED}


def test_registered() -> None:
    assert PASSES["remove_noops"] is RemoveNoops
    assert RemoveNoops.exact


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tiny_models(tiny: dict[str, Program], name: str) -> None:
    program = tiny[name]
    out, stats = remove(program)
    assert {k: stats[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert set(stats["skipped"]) == ({"_guards_fn"} if GUARDS_KEPT[name] else set())

    assert not calls(out.gm, *DROPOUTS)
    assert not calls(out.gm, *ASSERTS)
    casts = calls(out.gm, *CASTS)
    assert all(n.meta["val"].dtype != n.args[0].meta["val"].dtype for n in casts)
    assert len(casts) == REAL_CASTS[name]
    assert hasattr(out.gm, "_guards_fn") == GUARDS_KEPT[name]
    # a fixed point: nothing left to remove
    assert sum(remove(out)[1][k] for k in EXPECTED[name]) == 0

    batch = fresh_batch(name)
    assert max_rel_error(first(program(*batch)), first(out(*batch))) <= 1e-4


def test_kept_guards_still_reject_bad_inputs(tiny: dict[str, Program]) -> None:
    out, _ = remove(tiny["convnet"])
    with pytest.raises(AssertionError, match="Guard failed"):
        out(torch.randn(2, 3, 16, 16))


def test_guards_dropped_where_torchs_input_hook_checks_the_same() -> None:
    # not deep-copied: the module keeps torch's input pre-hook and range_constraints
    program = capture_tiny("convnet")
    out, stats = remove(program, in_place=True)
    assert stats["guards"] == 1 and not hasattr(out.gm, "_guards_fn")
    with pytest.raises(RuntimeError, match=r"shape\[2\] to be equal to 8"):
        out(torch.randn(2, 3, 16, 16))


class EvenBatch(nn.Module):
    """A branch on the batch size: export keeps the guard ``x.size(0) % 2 == 0``, no range implies it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] % 2 == 0 else x * 3


def test_tracer_guard_keeps_guards() -> None:
    program = capture(EvenBatch(), (torch.randn(4, 3),))
    out, stats = remove(program, in_place=True)
    assert stats["guards"] == 0 and "_guards_fn" in stats["skipped"]
    with pytest.raises(AssertionError, match="Guard failed"):
        out(torch.randn(3, 3))  # eager would take the other branch


class Casts(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.half().float() + x.to(torch.float32)  # two real casts, one no-op
        return y.clone()  # a copy handed to the caller: must stay a copy


def test_keeps_real_casts_and_returned_copy() -> None:
    program = capture(Casts(), (torch.randn(2, 4),))
    out, stats = remove(program)
    assert stats["cast"] == 1 and stats["identity"] == 0
    assert "flows to an output" in stats["skipped"]["clone"]
    kept = [(n.args[0].meta["val"].dtype, n.meta["val"].dtype) for n in calls(out.gm, *CASTS)]
    assert kept == [(torch.float32, torch.float16), (torch.float16, torch.float32)]
    assert len(calls(out.gm, aten.clone.default)) == 1


def test_keeps_cast_without_meta() -> None:
    program = capture(Casts(), (torch.randn(2, 4),))
    (noop,) = [n for n in calls(program.gm, aten.to.dtype) if n.args[1] == n.args[0].meta["val"].dtype]
    del noop.meta["val"]
    out, stats = remove(program)
    assert stats["cast"] == 0
    assert "no meta" in stats["skipped"][noop.name]
    assert len(calls(out.gm, *CASTS)) == 3


class CopyThenMutate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.clone()
        z.add_(1)  # without the copy this would change x as well
        return x * z


def test_keeps_copy_in_mutating_graph() -> None:
    program = capture(CopyThenMutate(), (torch.randn(2, 4),))
    out, stats = remove(program)  # verify=True: dropping the clone would change the output
    assert stats["identity"] == 0
    assert "in-place" in stats["skipped"]["clone"]
    assert len(calls(out.gm, aten.clone.default)) == 1


class Dropouts(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # functional dropout with training=True survives model.eval()
        return F.dropout(x, 0.5, training=True) + F.dropout(x, 0.0, training=True)


def test_keeps_training_dropout() -> None:
    program = capture(Dropouts(), (torch.randn(2, 4),))
    out, stats = remove(program, verify=False)  # live dropout: outputs are random
    assert stats["dropout"] == 1  # only the p=0 one
    (live,) = calls(out.gm, *DROPOUTS)
    assert live.args[1:] == (0.5, True)
    assert "train=True" in stats["skipped"][live.name]


def test_asserts_of_a_program_not_made_by_capture_go() -> None:
    """A GraphModule straight from torch.export keeps its dtype assertions; the pass removes them."""
    from graphpress.program import Program

    class Cast(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.float32) * 2

    x = torch.randn(2, 4, dtype=torch.float16)
    gm = torch.export.export(Cast(), (x,), strict=False).module()
    assert calls(gm, aten._assert_tensor_metadata.default)
    program = Program(gm=gm, example_inputs=(x,), input_names=("x",), output_names=("y",), dynamic_dims=({},))
    out, records = run_pipeline(program, [RemoveNoops()])
    assert records[0].stats["assert"] >= 1 and not calls(out.gm, aten._assert_tensor_metadata.default)
    torch.testing.assert_close(out(x), x.float() * 2)
