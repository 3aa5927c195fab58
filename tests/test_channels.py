"""Channel-dependency analysis on tiny random models of every architecture in tests/hf_tiny.py: the groups it
finds, and the couplings it pins (graphpress.channel_cut's tests remove the groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphpress import channel_cut, channels
from graphpress.capture import capture
from graphpress.passes import PassContext
from graphpress.passes.linearize import LinearizeMatmuls
from graphpress.program import Program
from tests.hf_tiny import ARCHITECTURES, tiny_model

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _program(arch: str) -> tuple[nn.Module, Program]:
    model = tiny_model(arch)
    program = capture(model, {"input_ids": IDS})
    program.gm = LinearizeMatmuls()(program.gm, PassContext(program)).gm  # GPT-2's Conv1D: addmm -> linear
    return model, program


def _out(program: Program) -> torch.Tensor:
    return program.outputs(IDS)[0]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_groups_found_on_every_architecture(arch: str) -> None:
    model, program = _program(arch)
    an = channels.analyze(program.gm)
    cfg = model.config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * cfg.hidden_size
    fams = channels.families(an)
    assert len(fams) == layers and all(len(f.classes) == inner for f in fams), [len(f.classes) for f in fams]
    assert len(an.sites) == layers
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    for site in an.sites:
        assert len(site.group) == heads and len(set(site.group)) == kv
        per_head = [channels.head_classes(an, site, h) for h in range(heads)]
        assert all(not (per_head[a] & per_head[b]) for a in range(heads) for b in range(a))


class _Normed(nn.Module):
    """An MLP whose hidden channels are normalized: its neurons are coupled by the norm, not prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x)).cumsum(-1))


def test_couplings_the_analysis_cannot_resolve_are_pinned_with_their_node() -> None:
    program = capture(_Normed(), (torch.randn(2, 8),))
    an = channels.analyze(program.gm)
    assert channels.families(an) == []
    rows = an.params["up.weight"][0]
    why = an.why_fixed(an.class_set(rows))
    assert why is not None and "cumsum" in why
    with pytest.raises(channels.ChannelError, match="cumsum"):
        channel_cut.prune(an, an.class_set(rows[:2]))
