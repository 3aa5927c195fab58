"""distill, thaw_quantized, lora / merge_lora on tiny programs: a distillation step lowers the loss, gradients
reach only the weights that train, a thawed grid computes what the codes did, a merged adapter equals the
unmerged one, checkpoints resume, and the refusals say what to do."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graphpress.distill import DistillError, TrainConfig, kl_loss, train
from graphpress.passes import PASSES
from graphpress.passes.base import PassContext
from graphpress.passes.distill import Distill, select
from graphpress.runner import PipelineError, run_pipeline
from tests.conftest import capture_tiny

P = PASSES
QLINEAR = "graphpress.quantized_linear.default"


def _windows(n: int = 24, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _calibration() -> list[tuple[torch.Tensor]]:
    return [(w,) for w in _windows(8, 16, seed=5).split(4)]


def _prep() -> list:
    return [P["remove_noops"](), P["linearize_matmuls"]()]


def _noisy(teacher):  # noqa: ANN001, ANN202
    """The teacher with noise on every projection: a student with something to recover."""
    student = teacher.clone()
    with torch.no_grad():
        for name, p in student.gm.named_parameters():
            if "proj" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    return student


def _peaked_llama():  # noqa: ANN202
    """The tiny llama with a head 8x larger: peaked next-token distributions, as a trained model has."""
    from graphpress.capture import capture
    from tests.conftest import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return capture(model, {"input_ids": ids}, name="tiny-llama")


def test_distillation_lowers_the_held_out_loss() -> None:
    """A damaged student trained against its teacher: the KL on windows it never trained on falls."""
    teacher = _peaked_llama()
    student = _noisy(teacher)
    result = train(student, teacher, _windows(), TrainConfig(tokens=24 * 16 * 6, batch=4, lr=1e-3, held_out=6,
                                                             warmup=0.0), list(student.gm.parameters()))
    assert result.steps == 36 and result.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result.held_out_after < 0.3 * result.held_out_before, result
    assert not student.gm.training  # back in inference mode


def test_distill_pass_trains_the_program_as_the_passes_left_it() -> None:
    """The pass trains the pruned program (every parameter), reports what it did and hands it back on the CPU in
    inference mode; the teacher is the program before the first pass."""
    passes = [*_prep(), P["prune_mlp"](ratio=0.5, roles=("block",)),
              Distill(tokens=24 * 16 * 2, batch=4, lr=3e-4, held_out=6, warmup=0.0)]
    pruned, _ = run_pipeline(_peaked_llama(), passes[:-1], calibration=_calibration())
    program, records = run_pipeline(_peaked_llama(), passes, calibration=_calibration(), training=_windows())
    stats = records[-1].stats
    assert stats["steps"] == 12 and stats["tokens"] == 12 * 4 * 16 and stats["frozen"] == {}
    assert stats["trainable_parameters"] == sum(p.numel() for p in program.gm.parameters())
    assert stats["held_out_before"] > 0 and len(stats["losses"]) == 12
    assert not program.gm.training and all(p.device.type == "cpu" for p in program.gm.parameters())
    moved = [(a - b).abs().max() for a, b in zip(program.gm.parameters(), pruned.gm.parameters(), strict=True)]
    assert min(moved) > 0  # every parameter trained


def test_gradients_reach_only_the_weights_that_train() -> None:
    """ov-freeze on a merged q/k/v projection: its value rows and the output projection get no gradient, the
    query/key rows and the MLP do; the head (tied to the embedding) is frozen as a whole."""
    program, _ = run_pipeline(capture_tiny("llama"), [*_prep(), P["merge_sibling_linears"]()])
    gm = program.gm
    params, masks, frozen = select(gm, (".*",), (), ("head", "attention_value", "attention_output"))
    qkv = dict(gm.named_parameters())["model.layers.0.self_attn.q_proj_k_proj_v_proj.weight"]
    assert frozen["model.layers.0.self_attn.o_proj.weight"] == "all"
    assert frozen["model.layers.0.self_attn.q_proj_k_proj_v_proj.weight"] == "rows 96:128"  # 2 kv heads of 16
    assert "lm_head.weight" in frozen or "model.embed_tokens.weight" in frozen
    hooks = [p.register_hook(lambda g, m=m: g * m) for p, m in masks.items()]
    program.train()
    program(_windows(2)).pow(2).mean().backward()
    for h in hooks:
        h.remove()
    for name, p in gm.named_parameters():
        if frozen.get(name) == "all":
            assert p.grad is None, name
        elif any(p is q for q in params):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert qkv.grad[96:].abs().sum() == 0 and qkv.grad[:96].abs().sum() > 0


def test_freezing_by_name_follows_merged_weights_to_their_sources() -> None:
    program, _ = run_pipeline(capture_tiny("llama"), [*_prep(), P["merge_sibling_linears"]()])
    _, masks, frozen = select(program.gm, (".*",), (r"\.v_proj\.",), ())
    assert frozen["model.layers.1.self_attn.q_proj_k_proj_v_proj.weight"] == "rows 96:128"
    assert len(masks) == 2


def test_thawed_grid_computes_what_the_codes_did_and_freezes_back_into_them() -> None:
    """thaw_quantized is exact (the runner checks it), fake quantization's forward equals the quantized op's
    reference, and rounding the untrained weights again gives the same codes."""
    rtn, _ = run_pipeline(capture_tiny("llama"), [*_prep(), P["rtn"](bits=4, group_size=32, roles=("block",))])
    thawed, records = run_pipeline(rtn, [P["thaw_quantized"]()])
    assert records[0].stats["thawed"] == 14
    assert not any(str(n.target) == QLINEAR for n in thawed.gm.graph.nodes)
    x = _windows(2, 12, seed=9)
    torch.testing.assert_close(thawed(x), rtn(x), rtol=1e-5, atol=1e-5)
    frozen, _ = run_pipeline(thawed, [P["freeze_fake_quantize"]()])
    codes = {n: t for n, t in frozen.gm.named_buffers() if n.endswith("qweight")}
    before = {n: t for n, t in rtn.gm.named_buffers() if n.endswith("qweight")}
    assert codes.keys() == before.keys() and all(torch.equal(codes[n], before[n]) for n in codes)
    assert frozen.num_bytes() == rtn.num_bytes()


def test_merged_lora_equals_unmerged() -> None:
    program, records = run_pipeline(capture_tiny("llama"), [*_prep(), P["lora"](rank=4, roles=("block",))])
    assert records[-1].stats["adapters"] == 14
    assert all(not p.requires_grad for n, p in program.gm.named_parameters() if n.endswith("proj.weight"))
    with torch.no_grad():  # as if trained: B away from zero
        for name, p in program.gm.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    x = _windows(2, 12, seed=4)
    unmerged = program(x)
    merged, records = run_pipeline(program, [P["merge_lora"]()])  # exact: checked by the runner too
    assert records[0].stats["merged"] == 14
    assert not any("lora" in n for n, _ in merged.gm.named_parameters())
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
    assert (merged(x) - capture_tiny("llama")(x)).abs().max() > 1e-3  # the adapters did change the model


def test_lora_beside_a_quantized_base_stays_unmerged_and_exports(tmp_path) -> None:  # noqa: ANN001
    from graphpress.lowering.onnx import export_onnx

    passes = [*_prep(), P["rtn"](bits=4, group_size=32, roles=("block",)), P["lora"](rank=4, roles=("block",)),
              Distill(tokens=24 * 16 * 2, batch=4, lr=1e-2, held_out=4, train=(r"\.lora_[ab]$",)), P["merge_lora"]()]
    program, records = run_pipeline(capture_tiny("llama"), passes, training=_windows(), calibration=_calibration())
    assert records[-2].stats["trainable_parameters"] == sum(
        p.numel() for n, p in program.gm.named_parameters() if "lora" in n)
    assert records[-1].stats["merged"] == 0 and len(records[-1].stats["skipped"]) == 14
    assert export_onnx(program, tmp_path / "m.onnx").check["sqnr_db"] > 20


def test_checkpoint_resumes_a_finished_run_without_training_again(tmp_path) -> None:  # noqa: ANN001
    teacher = capture_tiny("llama")
    student, _ = run_pipeline(teacher, [*_prep(), P["prune_mlp"](ratio=0.5, roles=("block",))],
                              calibration=_calibration())
    second = student.clone()
    config = TrainConfig(tokens=24 * 16 * 2, batch=4, lr=1e-3, held_out=4, checkpoint_every=3)
    first = train(student, teacher, _windows(), config, [p for p in student.gm.parameters()],
                  checkpoint=tmp_path / "ck")
    again = train(second, teacher, _windows(), config, [p for p in second.gm.parameters()],
                  checkpoint=tmp_path / "ck")
    assert again.resumed_from == first.steps == 12 and again.tokens == 0
    assert all(torch.equal(a, b) for a, b in zip(student.gm.parameters(), second.gm.parameters(), strict=True))


def test_hidden_state_loss_matches_blocks_by_name_through_a_projection() -> None:
    """prune_hidden changes the residual width: the hidden loss maps the student's block outputs to the
    teacher's with a learned projection."""
    passes = [*_prep(), P["prune_hidden"](ratio=0.25),
              Distill(tokens=24 * 16, batch=4, lr=1e-3, held_out=4, hidden=1.0)]
    _, records = run_pipeline(capture_tiny("llama"), passes, calibration=_calibration(), training=_windows())
    assert records[-1].stats["hidden_blocks"] == 2


def test_refusals_say_what_to_do() -> None:
    llama = capture_tiny("llama")
    with pytest.raises(PipelineError, match="nothing to train: every parameter is frozen"):
        run_pipeline(llama, [Distill(tokens=64, batch=2, held_out=2, train=("nothing-matches",))],
                     training=_windows())
    with pytest.raises(PipelineError, match="no training text"):
        run_pipeline(llama, [Distill(tokens=64)])
    with pytest.raises(PipelineError, match=r"no GPU here, and 10,000,000 training tokens on a model of .* would take about .* "
                                            r"run this recipe where a CUDA GPU is"):
        run_pipeline(llama, [Distill(tokens=10_000_000, batch=2, held_out=2, max_cpu_minutes=0.001, device="cpu")],
                     training=_windows())
    with pytest.raises(PipelineError, match="trains causal language models"):
        run_pipeline(capture_tiny("bert"), [Distill(tokens=64)], training=_windows())
    with pytest.raises(ValueError, match="unknown role 'values'"):
        Distill(freeze_roles=("values",))
    # a teacher of another vocabulary (the Python API takes any teacher)
    from graphpress.capture import capture
    from tests.conftest import tiny_llama

    model = tiny_llama(tie=False)
    model.lm_head = torch.nn.Linear(64, 100, bias=False)
    other = capture(model, {"input_ids": _windows(2, 12)}, name="other-vocabulary")
    student = llama.clone()
    ctx_params = list(student.gm.parameters())
    with pytest.raises(DistillError, match="teacher's vocabulary has 100 entries and the student's 128"):
        train(student, other, _windows(), TrainConfig(tokens=64, batch=2, held_out=2), ctx_params)
    assert PassContext(program=llama).teacher is None


def test_kl_loss_is_zero_for_equal_logits_and_scales_with_temperature() -> None:
    a = torch.randn(2, 5, 11)
    assert kl_loss(a, a).abs() < 1e-6
    b = torch.randn(2, 5, 11)
    manual = (torch.softmax(b, -1) * (torch.log_softmax(b, -1) - torch.log_softmax(a, -1))).sum(-1).mean()
    torch.testing.assert_close(kl_loss(a, b), manual)


def test_a_parameter_an_earlier_pass_froze_stays_frozen() -> None:
    """thaw_quantized(learn_scales=False) freezes the grid's scales: distill trains the weights only."""
    program, _ = run_pipeline(capture_tiny("llama"), [*_prep(), P["rtn"](bits=4, group_size=32, roles=("block",)),
                                                      P["thaw_quantized"](learn_scales=False)])
    params, _, frozen = select(program.gm, (".*",), (), ())
    names = {id(p): n for n, p in program.gm.named_parameters()}
    assert not any(names[id(p)].endswith("fq_scales") for p in params)
    assert frozen["model.layers.0.mlp.down_proj.fq_scales"] == "by an earlier pass"
    assert any(names[id(p)].endswith("down_proj.weight") for p in params)


def test_thaw_only_the_widths_asked_for() -> None:
    passes = [*_prep(), P["rtn"](bits=8, group_size=32, roles=("block",), targets=(r"\.0\.",)),
              P["rtn"](bits=4, group_size=32, roles=("block",)), P["thaw_quantized"](bits=(4,))]
    program, records = run_pipeline(capture_tiny("llama"), passes)
    assert records[-1].stats["thawed"] == 7 and len(records[-1].stats["skipped"]) == 7
    kept = [n for n in program.gm.graph.nodes if str(n.target) == QLINEAR]
    assert len(kept) == 7 and all(n.args[6] == 8 for n in kept)


def test_training_for_int8_kernels_rounds_activations_and_freezes_into_a_w4a8_program() -> None:
    """fake_quantize_activations on a thawed grid: each linear rounds its input and its weight's int8 rows as
    quantized_linear with activation_bits=8 does (what rtn with activation_bits=8 gives), gradients pass
    straight through both roundings, and freezing gives those codes with activation_bits=8. thaw_quantized
    leaves linears that already round their activations alone (exact only up to ties)."""
    rtn = P["rtn"](bits=4, group_size=32, roles=("block",))
    a8, _ = run_pipeline(capture_tiny("llama"), [*_prep(), dataclasses.replace(rtn, activation_bits=8)])
    _, records = run_pipeline(a8, [P["thaw_quantized"]()])
    assert records[0].stats["thawed"] == 0
    assert all("thaw the weight-only program" in why for why in records[0].stats["skipped"].values())
    thawed, records = run_pipeline(capture_tiny("llama"), [*_prep(), rtn, P["thaw_quantized"](),
                                                           P["fake_quantize_activations"]()])
    assert records[-1].stats["rounded"] == 14
    x = _windows(2, 12, seed=9)
    torch.testing.assert_close(thawed(x), a8(x), rtol=1e-6, atol=1e-6)
    thawed.train()
    thawed(x).float().square().mean().backward()
    thawed.eval()
    named = dict(thawed.gm.named_parameters())
    assert named["model.layers.0.self_attn.q_proj.weight"].grad.abs().sum() > 0  # before the first rounding
    frozen, _ = run_pipeline(thawed, [P["freeze_fake_quantize"]()])
    kept = [n for n in frozen.gm.graph.nodes if str(n.target) == QLINEAR]
    assert len(kept) == 14 and all(n.args[8] == 8 for n in kept)
    before = dict(a8.gm.named_buffers())
    assert all(torch.equal(t, before[n]) for n, t in frozen.gm.named_buffers() if n.endswith("qweight"))
    torch.testing.assert_close(frozen(x), a8(x), rtol=1e-6, atol=1e-6)
    # an input rounded without the weight's int8 rows (or the reverse) is no op's arithmetic: refused
    node = next(n for n in thawed.gm.graph.nodes if str(n.target) == "graphpress.fake_quantize_activations.default")
    node.replace_all_uses_with(node.args[0])
    with pytest.raises(PipelineError, match="without the other: no quantized_linear computes that"):
        run_pipeline(thawed, [P["freeze_fake_quantize"]()])
    with pytest.raises(PipelineError, match="no selected linear has a fake-quantized weight"):
        run_pipeline(capture_tiny("llama"), [*_prep(), P["fake_quantize_activations"]()])
    with pytest.raises(ValueError, match="gptq: activation_bits is 0 \\(float\\) or 8, not 4"):
        P["gptq"](activation_bits=4)


def test_grid_lr_moves_each_fake_quantized_weight_by_its_share_of_a_code() -> None:
    """grid_lr: a fake-quantized weight's learning rate (and its scales', when they train) is grid_lr times the
    median of its scales (AdamW's first step moves each element by its learning rate, less what Adam's epsilon
    takes off a small gradient); the other parameters keep lr."""
    from graphpress.passes.distill import grid_rates

    passes = [*_prep(), P["rtn"](bits=4, group_size=32, roles=("block",)), P["thaw_quantized"](learn_scales=False)]
    student, _ = run_pipeline(_peaked_llama(), passes)
    teacher = _peaked_llama()
    params, _, _ = select(student.gm, (".*",), (), ())
    named = dict(student.gm.named_parameters())
    rates = grid_rates(student.gm, params, 0.01)
    down = named["model.layers.0.mlp.down_proj.weight"]
    assert len(rates) == 14 and rates[down] == pytest.approx(0.01 * named[
        "model.layers.0.mlp.down_proj.fq_scales"].abs().median().item())
    assert grid_rates(student.gm, params, 0.0) == {}
    before = {n: p.detach().clone() for n, p in named.items()}
    config = TrainConfig(tokens=4 * 16, batch=4, lr=1e-3, grid_lr=0.01, held_out=4, warmup=0.0)
    train(student, teacher, _windows(8), config, params, rates=rates)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in named.items()}
    assert moved["model.layers.0.mlp.down_proj.weight"] == pytest.approx(rates[down], rel=1e-2)
    assert moved["model.norm.weight"] == pytest.approx(1e-3, rel=1e-2)
    assert moved["model.layers.0.mlp.down_proj.fq_scales"] == 0
    # learned scales (LSQ) take their weight's rate, about grid_lr of their own size a step (their gradient is 0
    # while every weight lies on its grid, so they only move once the weights have)
    student, _ = run_pipeline(_peaked_llama(), [*passes[:-1], P["thaw_quantized"](learn_scales=True)])
    params, _, _ = select(student.gm, (".*",), (), ())
    named = dict(student.gm.named_parameters())
    rates = grid_rates(student.gm, params, 0.01)
    assert len(rates) == 28 and rates[named["model.layers.0.mlp.down_proj.fq_scales"]] == rates[
        named["model.layers.0.mlp.down_proj.weight"]]


def test_a_thawed_conv1d_weight_keeps_its_transposed_source_under_a_fresh_name() -> None:
    """GPT-2's Conv1D stores W^T: the thawed linear weight comes from that tensor transposed. Once a later pass
    (here quantize_embedding) has dropped the unused original, its name is free, but naming the thawed weight
    after its own source would break the record (w4-kd-qat on GPT-2): it takes a fresh name instead."""
    from graphpress import provenance
    from graphpress.capture import capture
    from tests.hf_tiny import tiny_model

    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    passes = [*_prep(), P["rtn"](bits=4, group_size=16, roles=("block",)),
              P["quantize_embedding"](bits=8, symmetric=True, group_size=None), P["thaw_quantized"]()]
    program, records = run_pipeline(capture(tiny_model("gpt2"), (ids,), kind="causal-lm", name="gpt2"), passes)
    assert records[-1].stats["thawed"] > 0
    target = "transformer.h.0.attn.c_attn.weight"
    thawed = [n for n, _ in program.gm.named_parameters() if n.startswith(target)]
    assert thawed == [f"{target}_1"]
    assert provenance.sources_of(program.gm, thawed[0]) == [provenance.Piece(target, transposed=True)]
