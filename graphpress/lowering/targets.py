"""Lowering targets by name, each a function of its options that returns its rule table.

    target_rules("onnxruntime", {"kernel": "int8"})  ->  onnxruntime_rules(kernel="int8")

A recipe holds options per target (``target: {onnxruntime: {kernel: int8}}``); the CLI picks the target
(``--target``) and overrides options (``--target-option kernel=nbits``). Passes never read these options:
the program is the same whatever runs it. ``register_target`` adds a user's target (from a plugin module).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.lowering.qdq_rules import qdq_rules
from graphpress.lowering.rules import RuleTable, TargetError

DEFAULT_TARGET = "onnxruntime"
TARGETS: dict[str, Callable[..., RuleTable]] = {"onnxruntime": onnxruntime_rules, "onnx-qdq": qdq_rules}


def register_target(name: str, rules: Callable[..., RuleTable]) -> Callable[..., RuleTable]:
    """Make ``rules`` (keyword options -> RuleTable) the target ``name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_target: {name!r} is not a valid target name")
    TARGETS[name] = rules
    return rules


def target_options(name: str) -> list[str]:
    return list(inspect.signature(check_target(name)).parameters)


def check_target(name: str) -> Callable[..., RuleTable]:
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r} (known: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]


def target_rules(name: str = DEFAULT_TARGET, options: Mapping[str, Any] | None = None) -> RuleTable:
    """The rule table of target ``name`` with ``options``; an unknown target, option or value raises
    TargetError naming it and what is allowed."""
    factory = check_target(name)
    allowed = target_options(name)
    for key in options or {}:
        if key not in allowed:
            known = f"options: {', '.join(allowed)}" if allowed else "it takes none"
            raise TargetError(f"target {name} has no option {key!r} ({known})")
    try:
        return factory(**(options or {}))
    except TargetError:
        raise
    except (TypeError, ValueError) as e:
        raise TargetError(f"target {name}: {e}") from e


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line, the value read as YAML (``int8``, ``0``, ``false``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise TargetError(f"target option {text!r} must look like key=value (for example kernel=int8)")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise TargetError(f"target option {text!r}: cannot read the value: {str(e).splitlines()[0]}") from e
