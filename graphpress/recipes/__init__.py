"""Recipes: pipelines as data. A recipe is a YAML mapping:

    name: w4-gptq
    description: ...
    passes:                       # run in order; each entry is a pass name plus its options
      - pass: remove_noops
      - pass: gptq
        bits: 4
        group_size: 128
        targets: ['model\\.layers\\.']
    calibration: {windows: 64, length: 512, batch: 8}   # optional; for passes that run the model
    lowering: {accuracy_level: 4}             # optional; options of the onnxruntime rule table

Named recipes are the YAML files beside this module; ``load_recipe`` also takes a path to a YAML file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    lowering: dict[str, Any] = field(default_factory=dict)

    def needs_calibration(self) -> bool:
        return any(getattr(p, "needs_calibration", False) for p in self.passes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "passes": [{"pass": p.name, **_options(p)} for p in self.passes],
            "calibration": self.calibration,
            "lowering": self.lowering,
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


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise RecipeError(f"recipe {source} must be a mapping with a list under 'passes'")
    unknown = set(data) - {"name", "description", "passes", "calibration", "lowering"}
    if unknown:
        raise RecipeError(f"recipe {source} has unknown keys {sorted(unknown)}")
    passes = [_build_pass(entry, i, source) for i, entry in enumerate(data["passes"])]
    return Recipe(
        name=str(data.get("name", Path(source).stem)),
        passes=passes,
        description=str(data.get("description", "")),
        calibration=dict(data.get("calibration") or {}),
        lowering=dict(data.get("lowering") or {}),
    )


def _build_pass(entry: Any, index: int, source: str) -> Pass:
    if not isinstance(entry, dict) or "pass" not in entry:
        raise RecipeError(f"recipe {source}: entry {index} must be a mapping with a 'pass' key, got {entry!r}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items() if k != "pass"}
    name = entry["pass"]
    if name not in PASSES:
        raise RecipeError(f"recipe {source}: unknown pass {name!r} (known: {', '.join(sorted(PASSES))})")
    cls = PASSES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = set(options) - fields
    if bad:
        raise RecipeError(f"recipe {source}: pass {name} has no option {sorted(bad)} (options: {sorted(fields)})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"recipe {source}: pass {name}: {e}") from e


def _options(p: Pass) -> dict[str, Any]:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
