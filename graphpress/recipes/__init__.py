"""Recipes: pipelines as data. A recipe is a YAML mapping:

    name: w4-gptq
    description: ...
    passes:                       # run in order; each entry is a pass name plus its options
      - pass: remove_noops
      - pass: gptq
        bits: 4
        group_size: 128
        targets: ['model\\.layers\\.']
    plugins: [my_passes.py]       # optional; modules that register their own passes (register_pass)
    calibration: {windows: 64, length: 512, batch: 8, generated: 32}   # optional; for passes that run the model
    training: {windows: 4096, length: 512, generated: 3072}   # optional; text for passes that train (distill)
    target: {onnxruntime: {kernel: int8}}     # optional; options per lowering target (graphpress.lowering.targets)

A recipe may extend a named one (``extends: w4-decode``): its passes run after that recipe's, and its
calibration and target options update that recipe's.

Named recipes are the YAML files beside this module; ``load_recipe`` also takes a path to a YAML file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from graphpress.errors import one_line
from graphpress.passes import PASSES, Pass

RECIPE_DIR = Path(__file__).parent
DEFAULT_RECIPE = "exact"


class RecipeError(ValueError):
    """A recipe that cannot be read or names an unknown pass or option."""


@dataclass
class Recipe:
    name: str
    passes: list[Pass]
    description: str = ""
    calibration: dict[str, int] = field(default_factory=dict)
    # lowering target name -> its options
    target: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: dict[str, int] = field(default_factory=dict)

    def needs_calibration(self) -> bool:
        return any(getattr(p, "needs_calibration", False) for p in self.passes)

    def needs_training(self) -> bool:
        return any(getattr(p, "needs_training", False) for p in self.passes)

    def structural(self) -> bool:
        """Whether a pass changes the model's architecture (compress then writes hf/)."""
        return any(p.structural for p in self.passes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "passes": [{"pass": p.name, **_options(p)} for p in self.passes],
            "calibration": self.calibration,
            "training": self.training,
            "target": self.target,
        }


def named_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | None) -> Recipe:
    """A named recipe (see ``named_recipes``) or a YAML file."""
    name_or_path = name_or_path or DEFAULT_RECIPE
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(
                f"recipe {name_or_path!r} not found: not one of {', '.join(named_recipes())} "
                "and no such YAML file"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot read recipe {path}: {str(e).splitlines()[0]}") from e
    return recipe_from_dict(data, source=str(path))


TOP_LEVEL = {"name": str, "description": str, "extends": str, "plugins": list, "passes": list,
             "calibration": dict, "target": dict, "training": dict}
# calibration: windows (causal LMs) or sentences (encoders), window length in tokens, windows per forward, how
# many of the built-in windows the model samples itself (graphpress.calibration_text; default half)
DEFAULT_WINDOWS = 64
CALIBRATION = ("windows", "length", "batch", "sentences", "generated")
# training (graphpress.training_text): windows of text, their length, how many of them the model writes itself
TRAINING = ("windows", "length", "generated")


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    """Validate the whole recipe (keys and types, passes, calibration, lowering) before any work starts."""
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise RecipeError(f"recipe {source} must be a mapping with a list under 'passes'")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise RecipeError(f"recipe {source} has unknown key {unknown[0]!r} (allowed: {', '.join(TOP_LEVEL)})")
    for key, kind in TOP_LEVEL.items():
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise RecipeError(f"recipe {source}: {key!r} must be a {_KIND_NAMES[kind]}, not {data[key]!r}")
    for plugin in data.get("plugins") or []:
        try:
            load_plugin(plugin, Path(source).parent)
        except PluginError as e:
            raise RecipeError(f"recipe {source}: {e}") from e
    base = _base(data.get("extends"), source)
    passes = [*base.passes, *(_build_pass(entry, i, source) for i, entry in enumerate(data["passes"]))]
    calibration = {**base.calibration, **(data.get("calibration") or {})}
    for key, value in calibration.items():
        if key not in CALIBRATION:
            raise RecipeError(f"recipe {source}: unknown key {key!r} under 'calibration' "
                              f"(allowed: {', '.join(CALIBRATION)})")
        least = 0 if key == "generated" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            what = "a whole number" if least == 0 else "a positive integer"
            raise RecipeError(f"recipe {source}: calibration {key!r} must be {what}, not {value!r}")
    if calibration.get("generated", 0) > calibration.get("windows", DEFAULT_WINDOWS):
        raise RecipeError(f"recipe {source}: calibration 'generated' ({calibration['generated']}) cannot exceed "
                          f"'windows' ({calibration.get('windows', 64)})")
    training = {**base.training, **(data.get("training") or {})}
    for key, value in training.items():
        if key not in TRAINING:
            raise RecipeError(f"recipe {source}: unknown key {key!r} under 'training' (allowed: {', '.join(TRAINING)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "generated" else 1):
            raise RecipeError(f"recipe {source}: training {key!r} must be a whole number, not {value!r}")
    if training.get("generated", 0) > training.get("windows", 0):
        raise RecipeError(f"recipe {source}: training 'generated' ({training['generated']}) cannot exceed "
                          f"'windows' ({training.get('windows', 0)})")
    if any(getattr(p, "needs_training", False) for p in passes) and "windows" not in training:
        raise RecipeError(f"recipe {source}: a pass trains ({next(p.name for p in passes if p.needs_training)}), "
                          "so the recipe needs a 'training' section with windows (and length, generated)")
    target = {**base.target}
    for name, options in (data.get("target") or {}).items():
        target[name] = {**target.get(name, {}), **options} if isinstance(options, dict) else options
    _check_target(target, source)
    return Recipe(
        name=str(data.get("name", Path(source).stem)),
        passes=passes,
        description=str(data.get("description", "")),
        calibration=calibration,
        target=target,
        training=training,
    )


_KIND_NAMES = {str: "string", list: "list", dict: "mapping"}


def _base(name: str | None, source: str) -> Recipe:
    """The named recipe that ``extends`` names (an empty one without it)."""
    if name is None:
        return Recipe(name="", passes=[])
    if name not in named_recipes():
        raise RecipeError(f"recipe {source}: 'extends' names {name!r}, which is not one of the named recipes "
                          f"({', '.join(named_recipes())})")
    return load_recipe(name)


class PluginError(ValueError):
    """A plugin module that cannot be imported."""


def import_file(path: Path, name: str) -> ModuleType:
    """Import the Python file ``path`` as module ``name`` (in ``sys.modules``, so its dataclasses resolve),
    with its folder on ``sys.path`` while it runs so that it can import its neighbours."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    folder = str(Path(path).resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def load_plugin(ref: Any, base: Path | None = None) -> ModuleType:
    """Import a plugin: a ``.py`` file (relative to ``base``, the recipe's folder) or a module name on the path.
    The module registers its passes with ``graphpress.passes.register_pass`` when imported."""
    if not isinstance(ref, str) or not ref:
        raise PluginError(f"plugin {ref!r} must be a .py file or a module name")
    if ref.endswith(".py"):
        path = Path(ref)
        if not path.is_absolute() and base is not None and (base / path).is_file():
            path = base / path  # beside the recipe first
        if not path.is_file():
            raise PluginError(f"plugin {ref} does not exist")
        try:
            return import_file(path, f"graphpress_plugin_{path.stem}")
        except Exception as e:
            raise PluginError(f"plugin {ref} failed to import: {type(e).__name__}: {one_line(e, 200)}") from e
    try:
        return importlib.import_module(ref)
    except Exception as e:
        raise PluginError(f"plugin {ref} failed to import: {type(e).__name__}: {one_line(e, 200)}") from e


def _check_target(section: dict[str, Any], source: str) -> None:
    """``target:`` maps target names to mappings of their options; each must build its rule table."""
    from graphpress.lowering.rules import TargetError
    from graphpress.lowering.targets import target_rules

    for name, options in section.items():
        if not isinstance(options, dict):
            raise RecipeError(f"recipe {source}: target {name!r} must map to a mapping of its options, "
                              f"not {options!r} (for example target: {{onnxruntime: {{kernel: int8}}}})")
        try:
            target_rules(name, options)
        except TargetError as e:
            raise RecipeError(f"recipe {source}: {e}") from e


def _build_pass(entry: Any, index: int, source: str) -> Pass:
    if not isinstance(entry, dict) or "pass" not in entry:
        raise RecipeError(f"recipe {source}: entry {index} must be a mapping with a 'pass' key, got {entry!r}")
    name = entry["pass"]
    if not isinstance(name, str) or name not in PASSES:
        raise RecipeError(f"recipe {source}: unknown pass {name!r} (known: {', '.join(sorted(PASSES))})")
    cls = PASSES[name]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    options = {}
    for key, value in entry.items():
        if key == "pass":
            continue
        if key not in fields:
            raise RecipeError(f"recipe {source}: pass {name} has no option {key!r} (options: {', '.join(fields)})")
        try:
            options[key] = coerce_option(value, hints[key])
        except TypeError as e:
            raise RecipeError(f"recipe {source}: pass {name}: option {key!r} {e}") from e
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"recipe {source}: pass {name}: {e}") from e


EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def coerce_option(value: Any, hint: Any) -> Any:
    """``value`` as a pass option of type ``hint``: YAML lists become tuples, a single string where a
    tuple of strings is expected becomes a one-element tuple (``targets: fc2``), an int where a float is
    expected a float, a number in exponent form (``3e-4``, which YAML reads as a string) where a float or an
    integer is expected; anything else that does not fit raises TypeError naming what is allowed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float) and isinstance(value, str) and EXPONENT.fullmatch(value.strip()):
        number = float(value)
        value = int(number) if hint is int and number.is_integer() else number
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return coerce_option(value, option)
            except TypeError:
                continue
        raise TypeError(f"must be {_hint_name(hint)}, not {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is tuple:
        items = (value,) if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return tuple(coerce_option(v, args[0]) for v in items)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (bool, str):
        if isinstance(value, hint):
            return value
    else:
        return value
    raise TypeError(f"must be {_hint_name(hint)}, not {value!r}")


def _hint_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_hint_name(args[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, str(hint))


def _options(p: Pass) -> dict[str, Any]:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
