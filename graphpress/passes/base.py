"""The pass contract: every pass is a frozen config with ``__call__(gm, ctx) -> PassResult``.

A pass says whether it is exact (outputs unchanged up to rounding) or lossy; the runner checks exact passes
numerically in verify mode. Passes that act on chosen layers take ``targets`` / ``ignore``: regexes over
module qualified names (``model.layers.0.self_attn.q_proj``); ``re.search`` semantics; and ``roles`` /
``ignore_roles``: what a layer is in any architecture (graphpress.roles: ``block``, ``head``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from graphpress.program import Program


class PassError(RuntimeError):
    """A pass refused its input; the message names the pass, the node or module, and what to do."""


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    # what changed: counts ("folded": 3), bytes, and "skipped": {node or module: reason}
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may read besides the graph: the program's facts and calibration batches."""

    program: Program
    # batches of positional inputs (same order as program.input_names), for passes that run the model
    calibration: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    # the program before the first pass, for passes that learn from it (``needs_teacher``: distillation)
    teacher: Program | None = None
    # training text, token ids [windows, length], for passes that train (``needs_training``)
    training: torch.Tensor | None = None
    # whether passes may show progress bars
    progress: bool = False


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = "pass"
    exact: ClassVar[bool] = True
    # changes the model's architecture (widths, depth): compress then writes a Hugging Face copy (hf/)
    structural: ClassVar[bool] = False
    # reads PassContext.teacher (the runner then keeps a copy of the program before the first pass)
    needs_teacher: ClassVar[bool] = False
    # reads PassContext.training (compress then builds the recipe's training text)
    needs_training: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Selection:
    """Module-name selection shared by passes that act on chosen layers."""

    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    # a layer must have one of ``roles`` (when given) and none of ``ignore_roles``; a selection by role that
    # finds no such layer (an encoder has no head) selects nothing rather than failing
    roles: tuple[str, ...] = ()
    ignore_roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_selection(self, regexes=("targets", "ignore"), roles=("roles", "ignore_roles"))

    def selects(self, module_name: str, roles: frozenset[str] | None = None) -> bool:
        """Whether the layer ``module_name`` with ``roles`` is selected (roles None: only the regexes count)."""
        if roles is not None and (self.roles and not roles & set(self.roles) or roles & set(self.ignore_roles)):
            return False
        return any(re.search(p, module_name) for p in self.targets) and not any(
            re.search(p, module_name) for p in self.ignore
        )


def check_selection(config: object, regexes: tuple[str, ...], roles: tuple[str, ...], who: str = "") -> None:
    """Validate a frozen config's selection fields in place: a single string becomes a one-item tuple (not its
    characters); every regex compiles; every role is known. ``who`` prefixes the messages."""
    from graphpress.roles import ROLES

    for key in (*regexes, *roles):
        if isinstance(getattr(config, key), str):
            object.__setattr__(config, key, (getattr(config, key),))
    for role in (r for key in roles for r in getattr(config, key)):
        if role not in ROLES:
            raise ValueError(f"{who}unknown role {role!r} (roles: {', '.join(ROLES)})")
    for pattern in (r for key in regexes for r in getattr(config, key)):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{who}invalid module-name regex {pattern!r}: {e}") from e


def check_amount(name: str, ratio: float | None, key: str, count: object, unit: str, ratio_meaning: str) -> None:
    """A pruning pass takes exactly one of ``ratio`` (in (0, 1)) or ``key`` (a positive count of ``unit``)."""
    if (ratio is None) == (count is None):
        raise ValueError(f"{name}: give one of ratio ({ratio_meaning}) or {key} ({unit})")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"{name}: {key} must be a positive number of {unit}, not {count!r}")
    if ratio is not None and not 0 < ratio < 1:
        raise ValueError(f"{name}: ratio must be in (0, 1), not {ratio}")
