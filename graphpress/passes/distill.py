"""distill: recover what earlier passes lost by training the program against the uncompressed model.

The student is the program as the passes before left it (pruned, fake-quantized, with LoRA adapters...); the
teacher is the program before any pass (the runner keeps a copy when a recipe has this pass). Losses, schedule
and checkpoints: graphpress.distill. Text: the recipe's ``training`` section (graphpress.training_text), never
the evaluation, held-out or calibration text.

Which parameters train (of those that require gradients: a parameter an earlier pass froze stays frozen):
    train          regexes: only parameters whose names (or the names they came from, graphpress.provenance)
                   match train; default every float parameter
    freeze         regexes: parameters, or rows of merged ones, whose (source) names match stay as they are
    freeze_roles   roles (graphpress.roles): the linears' weights, biases and fake-quantization scales stay;
                   ``attention_value`` freezes only the value rows of a merged q/k/v projection.
                   KD-QAT's ov-freeze is ``[attention_value, attention_output]``.

``grid_lr`` sets a fake-quantized weight's learning rate in units of its grid step (the median of its scales)
instead of ``lr``: AdamW moves every weight by about its learning rate a step, and grids differ from layer to
layer (AWQ's scaling, 8 against 4 bits) by more than an order of magnitude. Scales that train (thaw_quantized's
``learn_scales``) take the same rate, which moves each by about ``grid_lr`` of its size a step.

Where it trains: ``device: auto`` takes the GPU when there is one. On a CPU a run that would take longer than
``max_cpu_minutes`` (estimated from the model's size and the CPU's measured matmul rate) is refused with the
estimate before it starts (run it where a GPU is, or ask for fewer tokens); ``compress`` asks before any work. Checkpoints go to graphpress's cache, keyed by the student, the teacher, the text and the
settings: the same compress run again resumes where the last one stopped (or skips a finished training).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import fx, nn

from graphpress import cache, provenance
from graphpress import calibration_text as ct
from graphpress.distill import DistillError, TrainConfig, estimate_seconds, pick_device, train
from graphpress.graph import aliases, get_tensor, is_op
from graphpress.passes.base import Pass, PassContext, PassError, PassResult, check_selection
from graphpress.passes.fake_quant import FAKE, linear_tensors
from graphpress.roles import attention_rows, linear_roles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distill(TrainConfig, Pass):
    """Knowledge distillation from the uncompressed program (logit KL, optional CE and hidden-state MSE); the
    training options are graphpress.distill.TrainConfig's."""

    name: ClassVar[str] = "distill"
    exact: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True
    needs_training: ClassVar[bool] = True

    train: tuple[str, ...] = (".*",)
    freeze: tuple[str, ...] = ()
    freeze_roles: tuple[str, ...] = ()
    max_cpu_minutes: float = 30.0

    def __post_init__(self) -> None:
        check_selection(self, regexes=("train", "freeze"), roles=("freeze_roles",), who="distill: ")
        if self.tokens < 1 or self.batch < 1 or self.lr <= 0 or self.grid_lr < 0:
            raise ValueError("distill: tokens, batch and lr must be positive, grid_lr positive or 0 (off)")
        if min(self.kl, self.ce, self.hidden) < 0 or not (self.kl or self.ce or self.hidden):
            raise ValueError("distill: the loss weights kl, ce and hidden are >= 0, and one of them > 0")
        try:
            pick_device(self.device)
        except RuntimeError as e:
            raise ValueError(f"distill: unknown device {self.device!r} (auto, cpu, cuda, cuda:1...)") from e

    def refuse_on_cpu(self, parameters: int, sampled_tokens: int = 0) -> None:
        """Before any work: refuse a training that would run on this CPU for longer than ``max_cpu_minutes``
        (estimated from the model's size and this CPU's measured matmul rate), saying how long and what to do."""
        if pick_device(self.device).type != "cpu":
            return
        minutes = estimate_seconds(parameters, self.tokens, sampled_tokens) / 60
        if minutes > self.max_cpu_minutes:
            raise PassError(
                f"{self.name}: no GPU here, and {self.tokens:,} training tokens on a model of {parameters / 1e6:.3g}M "
                f"parameters would take about {_duration(minutes)} on this CPU (max_cpu_minutes: "
                f"{self.max_cpu_minutes:g}): run this recipe where a CUDA GPU is, or lower distill's tokens")

    def config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.program.kind != "causal-lm":
            raise PassError(f"{self.name}: trains causal language models (the KL of next-token logits), and "
                            f"{ctx.program.name} is {'an encoder' if ctx.program.kind == 'encoder' else 'a plain module'}: "
                            "drop distill from the recipe")
        if ctx.teacher is None:
            raise PassError(f"{self.name}: no teacher: run it through run_pipeline (which keeps the program "
                            "before the first pass as the teacher) or give PassContext(teacher=...)")
        if ctx.training is None:
            raise PassError(f"{self.name}: no training text: give the recipe a 'training' section (windows, "
                            "length, generated) or run_pipeline(training=ids [windows, length])")
        params, masks, frozen = select(gm, self.train, self.freeze, self.freeze_roles)
        config = self.config()
        device = pick_device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PassError(f"{self.name}: device {self.device} asked for, but no CUDA GPU is here")
        self.refuse_on_cpu(sum(p.numel() for p in gm.parameters()))
        windows = ctx.training
        key = cache.key("distill", ct.model_fingerprint(gm), ct.model_fingerprint(ctx.teacher.gm),
                        _text_key(windows), sorted(asdict(self).items()), cache.code_version())
        checkpoint = cache.cache_dir() / "training" / f"run-{key}"
        try:
            result = train(ctx.program, ctx.teacher, windows, config, params, masks, checkpoint=checkpoint,
                           progress=ctx.progress, rates=grid_rates(gm, params, self.grid_lr))
        except DistillError as e:
            raise PassError(f"{self.name}: {e}") from None
        stats = {**result.to_json(), "trainable_parameters": sum(p.numel() for p in params),
                 "frozen": frozen, "checkpoint": str(checkpoint)}
        log.info("distill: %d steps on %s, %.0f s; held-out KL %.4f -> %.4f", result.steps, result.device,
                 result.seconds, result.held_out_before, result.held_out_after)
        return PassResult(gm, True, stats)


def grid_rates(gm: fx.GraphModule, params: list[nn.Parameter], grid_lr: float) -> dict[nn.Parameter, float]:
    """Each trained fake-quantized weight's peak learning rate, and its scales' when they train (LSQ):
    ``grid_lr`` times the median of its grid's scales, so that a step moves the weight by ``grid_lr`` of a code
    and a scale by about ``grid_lr`` of its size. Nothing when grid_lr is 0."""
    if not grid_lr:
        return {}
    trained = set(params)
    out = {}
    for node in gm.graph.nodes:
        if is_op(node, FAKE):
            weight, scales = (get_tensor(gm, a) for a in node.args[:2])
            if scales is None:
                continue
            rate = grid_lr * scales.detach().abs().float().median().item()
            out.update({t: rate for t in (weight, scales) if t in trained})
    return out


def _duration(minutes: float) -> str:
    return f"{minutes:.0f} minutes" if minutes < 120 else f"{minutes / 60:.1f} hours"


def _text_key(windows: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:24]


def select(gm: fx.GraphModule, train_: tuple[str, ...], freeze: tuple[str, ...], freeze_roles: tuple[str, ...]
           ) -> tuple[list[nn.Parameter], dict[nn.Parameter, torch.Tensor], dict[str, str]]:
    """The parameters that train, row masks (1 trains, 0 stays) of those frozen in part, and what was frozen
    (name -> "all", "by an earlier pass" or the rows). Parameters that do not train get ``requires_grad=False``;
    one that already has it (an earlier pass froze it) stays frozen."""
    named = dict(gm.named_parameters())
    rows: dict[str, list[slice]] = {}  # parameter name -> frozen rows (slice(None): all)
    for name in named:
        pieces = provenance.sources_of(gm, name) or [provenance.Piece(name)]
        if not any(re.search(p, name) or any(re.search(p, s.source) for s in pieces) for p in train_):
            rows.setdefault(name, []).append(slice(None))
        for pattern in freeze:
            if re.search(pattern, name):
                rows.setdefault(name, []).append(slice(None))
                continue
            for s in pieces:
                if re.search(pattern, s.source):
                    rows.setdefault(name, []).append(slice(None) if s.whole or s.dim != 0 else slice(s.start, s.stop))
    canonical = {alias: name for name in named for alias in aliases(gm).get(name, [name])}
    for node, part in _role_rows(gm, freeze_roles):
        for target in linear_tensors(node):
            if target in canonical:
                rows.setdefault(canonical[target], []).append(part)
    params: list[nn.Parameter] = []
    masks: dict[nn.Parameter, torch.Tensor] = {}
    frozen: dict[str, str] = {}
    for name, p in named.items():
        cuts = rows.get(name, [])
        if not p.requires_grad:  # an earlier pass froze it (lora's base, thaw_quantized's scales)
            if p.is_floating_point():
                frozen[name] = "by an earlier pass"
            continue
        if not p.is_floating_point() or any(c == slice(None) for c in cuts):
            p.requires_grad_(False)
            if p.is_floating_point():
                frozen[name] = "all"
            continue
        p.requires_grad_(True)
        params.append(p)
        if cuts:
            mask = torch.ones(p.shape[0], *[1] * (p.dim() - 1), dtype=p.dtype)
            for c in cuts:
                mask[c] = 0
            masks[p] = mask
            frozen[name] = ", ".join(f"rows {c.start}:{min(c.stop, p.shape[0])}" for c in cuts)
    return params, masks, frozen


def _role_rows(gm: fx.GraphModule, roles: tuple[str, ...]) -> list[tuple[fx.Node, slice]]:
    if not roles:
        return []
    out = []
    attention = attention_rows(gm)
    for node, found in linear_roles(gm).items():
        for role in set(roles) & found:
            out.append((node, attention[role].get(node, slice(None)) if role in attention else slice(None)))
    return out
