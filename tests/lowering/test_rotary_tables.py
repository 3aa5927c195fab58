from __future__ import annotations

import torch

from graphpress import kv_cache
from graphpress.passes.fuse_attention import FUSED
from tests.hf_tiny import tiny_model
from tests.passes.test_fuse_attention import _fused


def test_the_export_computes_the_rotary_tables_where_they_give_the_stored_ones_bit_for_bit() -> None:
    from graphpress.graph import get_tensor, is_derived, set_tensor
    from graphpress.lowering.rotary_tables import computed_rotary_tables
    from graphpress.lowering.rules import structural_copy
    from graphpress.passes.fuse_attention import mask_case

    program, _ = _fused(tiny_model("llama", positions=64))
    stored = [n for n in program.gm.graph.find_nodes(op="get_attr") if is_derived(n.target)]
    values = [get_tensor(program.gm, n).clone() for n in stored]
    gm = structural_copy(program.gm)
    assert computed_rotary_tables(gm) == 1
    fused = list(gm.graph.find_nodes(op="call_function", target=FUSED))
    tables = fused[0].args[8:10]
    assert all(n.op == "call_function" for n in tables) and all(f.args[8:10] == tables for f in fused)
    assert not any(is_derived(n.target) for n in gm.graph.find_nodes(op="get_attr"))
    cache = kv_cache.layout(gm)
    got = kv_cache.input_subgraph(gm, list(tables))(*mask_case(cache, 1, 0, 1, 0))
    for a, b in zip(got, values, strict=True):
        assert torch.equal(a, b)
    # the program keeps its stored tables (its reference never reads them: computing them would cost every call)
    assert sum(is_derived(n.target) for n in program.gm.graph.find_nodes(op="get_attr")) == 2
    # tables the subgraph does not give bit for bit stay stored
    wrong = structural_copy(program.gm)
    set_tensor(wrong, stored[0].target, values[0] + 1e-6, buffer=True)
    assert computed_rotary_tables(wrong) == 0
    assert wrong.graph.find_nodes(op="call_function", target=FUSED)[0].args[8].op == "get_attr"
    assert torch.equal(get_tensor(program.gm, stored[0]), values[0])  # the program's own table untouched
