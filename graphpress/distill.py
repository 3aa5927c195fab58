"""Recovery training: a compressed program (the student) learns from the uncompressed one (the teacher).

    loss = kl * T^2 * KL(softmax(t / T) || softmax(s / T))              per token, over the vocabulary
         + ce * cross-entropy(s, next token)                           on the training text itself
         + hidden * mean over matched blocks of |P h_s - h_t|^2 / var(h_t)   block outputs, matched by name

Blocks are matched through the module tree (``model.layers.7`` in both); where the widths differ (a pruned
hidden size) a learned projection P maps the student's to the teacher's, trained with it and then dropped.
AdamW, linear warm-up then cosine decay to ``min_lr`` of the peak, gradient clipping, bf16 autocast on a GPU,
checkpoints every ``checkpoint_every`` steps (the run resumes from the last one), a progress bar with the loss
and tokens per second. Rows of a parameter can be frozen (``masks``: the value share of a merged q/k/v
projection): their gradients are zeroed, and AdamW without weight decay then leaves them as they were.

Only the math of training lives here; which parameters train and where the text comes from is the pass's
business (graphpress.passes.distill).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from graphpress.calibration import partition
from graphpress.program import Program

log = logging.getLogger(__name__)


class DistillError(ValueError):
    """Training cannot start: what is wrong and what to do, in one line."""


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 1_000_000  # training tokens (steps = tokens / (batch * window length))
    batch: int = 16  # windows a step
    lr: float = 1e-4
    # a fake-quantized weight's peak learning rate in units of its grid step (the median of its scales), so
    # that every layer's codes move alike whatever its scales; 0: lr, as for every other parameter
    grid_lr: float = 0.0
    warmup: float = 0.05  # share of the steps
    min_lr: float = 0.1  # the cosine ends at this share of lr
    weight_decay: float = 0.0
    clip: float = 1.0
    temperature: float = 1.0
    kl: float = 1.0
    ce: float = 0.0
    hidden: float = 0.0
    held_out: int = 8  # training windows kept aside to measure the KL before and after (never trained on)
    device: str = "auto"  # "auto": the GPU when there is one
    autocast: bool = True  # bf16 autocast on a GPU
    checkpoint_every: int = 200
    seed: int = 0

    def steps(self, length: int) -> int:
        return max(1, self.tokens // (self.batch * length))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def matmul_flops(device: torch.device | str = "cpu", n: int = 1024) -> float:
    """Measured float32 matmul throughput of ``device`` (FLOP/s), for estimating how long training would take."""
    a = torch.randn(n, n, device=device)
    a @ a  # warm-up
    start, reps = time.perf_counter(), 4
    for _ in range(reps):
        a @ a
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def estimate_seconds(parameters: int, tokens: int, sampled_tokens: int = 0, flops: float | None = None) -> float:
    """Rough time to train on ``tokens`` (student forward and backward, teacher forward: ~8 FLOPs per parameter
    and token) and sample ``sampled_tokens`` (~2), at ``flops`` (this CPU's measured matmul rate by default), at
    0.6 of the peak matmul rate (measured: 50 steps of 2 x 128 tokens of SmolLM2 took 351 s, estimated 390 s)."""
    flops = flops or matmul_flops()
    return (8 * tokens + 2 * sampled_tokens) * parameters / (0.6 * flops)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over tokens ([..., vocab] logits)."""
    s = torch.log_softmax(student.float() / temperature, -1).flatten(0, -2)
    t = torch.log_softmax(teacher.float() / temperature, -1).flatten(0, -2)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def block_outputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Repeated block name -> the value that leaves it last (the residual stream after the block)."""
    parts, blocks = partition(gm)
    found: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        p = parts.get(node, 0)
        if not 1 <= p <= len(blocks):
            continue
        val = node.meta.get("val")
        leaves = any(u.op == "output" or parts.get(u, 0) > p for u in node.users)
        if leaves and isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() == 3:
            found[blocks[p - 1]] = node
    return found


def tapped(gm: fx.GraphModule, taps: list[fx.Node]) -> fx.GraphModule:
    """A module sharing ``gm``'s parameters that returns ``(gm's output, *the values of taps)``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output((out, *[env[t] for t in taps]))
    module = fx.GraphModule(gm, graph)
    module.meta = gm.meta
    return module


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    device: str
    held_out_before: float
    held_out_after: float
    losses: list[float]
    resumed_from: int = 0
    hidden_blocks: int = 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["losses"] = [round(x, 5) for x in self.losses[:: max(1, len(self.losses) // 50)]]
        out["tokens_per_second"] = round(self.tokens / self.seconds) if self.seconds else None
        return out


def train(student: Program, teacher: Program, windows: torch.Tensor, config: TrainConfig,
          params: list[nn.Parameter], masks: dict[nn.Parameter, torch.Tensor] | None = None,
          checkpoint: Path | None = None, progress: bool = False,
          rates: dict[nn.Parameter, float] | None = None) -> TrainResult:
    """Train ``params`` of ``student`` against ``teacher`` on ``windows`` [n, length]; both programs are moved to
    the training device and back. ``rates``: a peak learning rate for a parameter other than ``config.lr``.
    Returns what happened."""
    if not params:
        raise DistillError("nothing to train: every parameter is frozen (check train/freeze/freeze_roles)")
    if len(windows) <= config.held_out:
        raise DistillError(f"{len(windows)} training windows, and {config.held_out} are held out to measure: "
                           "ask for more windows under training")
    device = pick_device(config.device)
    steps = config.steps(windows.shape[1])
    train_ids, held = windows[: -config.held_out], windows[-config.held_out:]
    home = student.example_inputs[0].device
    hooks = []
    try:
        student.to(device)  # before tapping: the taps copy the graphs with their device arguments
        teacher.to(device)
        s_taps, t_taps = (block_outputs(p.gm) if config.hidden else {} for p in (student, teacher))
        names = [n for n in s_taps if n in t_taps]
        if config.hidden and not names:
            raise DistillError("hidden: the student and the teacher share no repeated block (module names such "
                               "as model.layers.3): set hidden: 0")
        s_gm = tapped(student.gm, [s_taps[n] for n in names])
        t_gm = tapped(teacher.gm, [t_taps[n] for n in names])
        projections = _projections([s_taps[n] for n in names], [t_taps[n] for n in names]).to(device)
        hooks = [p.register_hook(_row_mask(m.to(device))) for p, m in (masks or {}).items()]
        for p in params:
            p.requires_grad_(True)
        return _loop(student, s_gm, t_gm, train_ids, held, config, params + list(projections.parameters()),
                     projections, len(names), steps, device, checkpoint, progress, rates or {})
    finally:
        for h in hooks:
            h.remove()
        student.eval()
        student.to(home)
        teacher.to(home)


def _loop(student: Program, s_gm: fx.GraphModule, t_gm: fx.GraphModule, train_ids: torch.Tensor,
          held: torch.Tensor, config: TrainConfig, params: list[nn.Parameter], projections: nn.ModuleList,
          blocks: int, steps: int, device: torch.device, checkpoint: Path | None, progress: bool,
          rates: dict[nn.Parameter, float]) -> TrainResult:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast and device.type == "cuda")

    def losses(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        with torch.no_grad(), autocast:
            t_out = t_gm(ids)
        with autocast:
            s_out = s_gm(ids)
        s_logits = _first(s_out[0])
        loss = config.kl * kl_loss(s_logits, _first(t_out[0]), config.temperature)
        if config.ce:
            loss = loss + config.ce * next_token_loss(s_logits, ids)
        if blocks:
            hidden = [nn.functional.mse_loss(proj(s.float()), t.float()) / t.float().var().clamp_min(1e-6)
                      for proj, s, t in zip(projections, s_out[1:], t_out[1:], strict=True)]
            loss = loss + config.hidden * torch.stack(hidden).mean()
        return loss

    def held_out_kl() -> float:
        student.eval()
        total = 0.0
        with torch.no_grad():
            for chunk in held.split(config.batch):
                ids = chunk.to(device)
                with autocast:
                    total += kl_loss(_first(s_gm(ids)[0]), _first(t_gm(ids)[0]),
                                     config.temperature).item() * len(chunk)
        return total / len(held)

    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(rates.get(p, config.lr), []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lr} for lr, ps in groups.items()], lr=config.lr,
                                  weight_decay=config.weight_decay, fused=device.type == "cuda")
    warm = max(1, int(config.warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress_ = (step - warm) / max(1, steps - warm)
        return config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start_step, history = 0, []
    with torch.no_grad(), autocast:
        vocab = [_first(gm(held[:1].to(device))[0]).shape[-1] for gm in (t_gm, s_gm)]
    if vocab[0] != vocab[1]:
        raise DistillError(f"the teacher's vocabulary has {vocab[0]} entries and the student's {vocab[1]}: "
                           "distill from a teacher with the student's tokenizer")
    state = _load(checkpoint, config)
    before = state["held_out_before"] if state else held_out_kl()
    if state:
        for p, saved in zip(params, state["params"], strict=True):
            p.data.copy_(saved.to(p.device))
        if state["optimizer"] is not None:  # a finished run keeps its weights only
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        start_step, history = state["step"], state["losses"]
        log.info("distill: resumed from step %d of %d (%s)", start_step, steps, checkpoint)
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(config.seed))
    tokens_a_step = config.batch * train_ids.shape[1]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start_step, desc="distill", unit="step", disable=None, leave=False)
    student.train()
    began = time.perf_counter()
    for step in range(start_step, steps):
        first = (step * config.batch) % len(order)
        pick = order[first: first + config.batch]
        if len(pick) < config.batch:  # wrap around the epoch
            pick = torch.cat([pick, order[: config.batch - len(pick)]])
        loss = losses(train_ids[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip:
            torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        scheduler.step()
        history.append(loss.item())
        done = step + 1 - start_step
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}",
                            tok_s=f"{done * tokens_a_step / (time.perf_counter() - began):.0f}")
        if checkpoint is not None and (step + 1) % config.checkpoint_every == 0 and step + 1 < steps:
            _save(checkpoint, config, step + 1, params, optimizer, scheduler, history, before)
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    after = held_out_kl()
    if checkpoint is not None:
        _save(checkpoint, config, steps, params, None, None, history, before)
    return TrainResult(steps=steps, tokens=(steps - start_step) * tokens_a_step, seconds=seconds,
                       device=str(device), held_out_before=before, held_out_after=after, losses=history,
                       resumed_from=start_step, hidden_blocks=blocks)


def _row_mask(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda grad: grad * mask


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _projections(students: list[fx.Node], teachers: list[fx.Node]) -> nn.ModuleList:
    """Per matched block: identity where the widths agree, a learned linear map (identity start) where they
    differ."""
    out = nn.ModuleList()
    for s, t in zip(students, teachers, strict=True):
        ws, wt = s.meta["val"].shape[-1], t.meta["val"].shape[-1]
        if ws == wt:
            out.append(nn.Identity())
        else:
            proj = nn.Linear(ws, wt, bias=False)
            nn.init.eye_(proj.weight)
            out.append(proj)
    return out


def _fingerprint(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k not in ("checkpoint_every", "device")}


def _save(path: Path, config: TrainConfig, step: int, params: list[nn.Parameter], optimizer: Any,
          scheduler: Any, losses: list[float], before: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save({"config": _fingerprint(config), "step": step, "params": [p.detach().cpu() for p in params],
                "optimizer": optimizer and optimizer.state_dict(), "scheduler": scheduler and scheduler.state_dict(),
                "losses": losses,
                "held_out_before": before}, tmp)
    os.replace(tmp, path / "state.pt")  # a run killed while saving keeps the previous checkpoint


def _load(path: Path | None, config: TrainConfig) -> dict[str, Any] | None:
    if path is None or not (path / "state.pt").is_file():
        return None
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if state.get("config") != _fingerprint(config):
        log.info("distill: checkpoint %s is of another configuration: starting over", path)
        return None
    return state
