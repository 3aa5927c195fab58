"""channel_cut.prune on tiny random models of every architecture: the pruned program equals the original with
the removed units silenced, and a model sliced by hand; grouped-query attention; refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from graphpress import channel_cut, channels
from tests.hf_tiny import ARCHITECTURES
from tests.test_channels import IDS, _out, _program


def _removal(an: channels.Analysis) -> set[int]:
    """Every 4th neuron of each MLP, and the second query head of each key/value group (the second head
    where there is one group per head)."""
    removed: set[int] = set()
    for fam in channels.families(an):
        removed |= set(fam.classes[::4])
    for site in an.sites:
        first: dict[int, int] = {}
        for h, g in enumerate(site.group):
            first.setdefault(g, h)
        grouped = len(first) < len(site.group)
        for h, g in enumerate(site.group):
            if (grouped and h == first[g] + 1) or (not grouped and h == 1):
                removed |= channels.head_classes(an, site, h)
    return removed


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_pruned_program_equals_the_original_with_the_removed_units_silenced(arch: str) -> None:
    """Removing units = zeroing the consumer columns that read them (every other path is unchanged)."""
    _, program = _program(arch)
    silenced = copy.deepcopy(program)
    an = channels.analyze(program.gm)
    removed = _removal(an)
    gone = an.removal(removed)
    for node, (_, cols, _) in an.linears.items():
        cut = torch.tensor([an.find(int(a)) in gone for a in cols])
        if cut.any():
            with torch.no_grad():
                silenced.gm.get_parameter(node.args[1].target)[:, cut] = 0
    before = program.num_parameters()
    channel_cut.prune(an, removed)
    assert program.num_parameters() < before
    torch.testing.assert_close(_out(program), _out(silenced), rtol=1e-5, atol=1e-5)


LLAMA_LIKE = ["llama", "qwen2", "mistral", "gemma"]


@pytest.mark.parametrize("arch", LLAMA_LIKE)
def test_pruned_program_equals_a_model_sliced_by_hand(arch: str) -> None:
    model, program = _program(arch)
    an = channels.analyze(program.gm)
    channel_cut.prune(an, _removal(an))
    cfg = copy.deepcopy(model.config)
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    inner = cfg.intermediate_size
    neurons = torch.tensor([j for j in range(inner) if j % 4])
    heads = torch.cat([torch.arange(h * d, (h + 1) * d) for h in (0, 2)])  # heads 1 and 3 removed
    cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim = len(neurons), 2, d
    sliced = {}
    for k, v in model.state_dict().items():
        if k.endswith(("gate_proj.weight", "up_proj.weight")):
            v = v[neurons]
        elif k.endswith("down_proj.weight"):
            v = v[:, neurons]
        elif ".q_proj." in k:
            v = v[heads]
        elif k.endswith("o_proj.weight"):
            v = v[:, heads]
        sliced[k] = v
    ref = type(model)(cfg).eval()
    ref.load_state_dict(sliced)
    with torch.no_grad():
        expected = ref(IDS).logits
    torch.testing.assert_close(_out(program), expected, rtol=1e-5, atol=1e-5)


def test_kv_group_goes_when_all_its_query_heads_go() -> None:
    _, program = _program("llama")
    an = channels.analyze(program.gm)
    removed = set()
    for site in an.sites:
        for h in (2, 3):  # both query heads of key/value group 1
            removed |= channels.head_classes(an, site, h)
    channel_cut.prune(an, removed)
    k = program.gm.get_parameter("model.layers.0.self_attn.k_proj.weight")
    assert k.shape[0] == 16  # one key/value head of 16 left
    assert _out(program).isfinite().all()


def test_uneven_cut_is_refused_with_the_node_named() -> None:
    _, program = _program("llama")
    an = channels.analyze(program.gm)
    site = an.sites[0]
    one = next(iter(an.class_set(site.q[0])))  # one rotary pair of one head, not the head
    with pytest.raises(channels.ChannelError, match="do not form a tensor"):
        channel_cut.prune(an, {one})
