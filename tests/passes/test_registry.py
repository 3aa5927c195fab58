"""User passes: register_pass, a recipe's plugins, the CLI's --plugin."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from graphpress.cli import main
from graphpress.passes import PASSES, Pass, register_pass
from graphpress.recipes import RecipeError, recipe_from_dict

EXAMPLE = Path(__file__).parents[2] / "examples" / "custom_pass.py"


def test_register_pass_refuses_what_is_not_a_named_pass() -> None:
    class NotAPass:
        name = "x"

    with pytest.raises(TypeError, match="not a dataclass subclassing"):
        register_pass(NotAPass)  # type: ignore[arg-type]

    @dataclass(frozen=True)
    class Nameless(Pass):
        pass

    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        register_pass(Nameless)

    @dataclass(frozen=True)
    class Impostor(Pass):
        name: ClassVar[str] = "gptq"

    with pytest.raises(ValueError, match="'gptq' of Impostor is taken by GPTQ"):
        register_pass(Impostor)
    assert PASSES["gptq"].__name__ == "GPTQ"


def test_a_recipe_imports_its_plugins_relative_to_itself(tmp_path: Path) -> None:
    recipe = recipe_from_dict({"plugins": [str(EXAMPLE)], "passes": [{"pass": "scale_outputs", "factor": 2}]},
                              source=str(tmp_path / "r.yaml"))
    assert recipe.passes[0].name == "scale_outputs" and recipe.passes[0].factor == 2.0
    (tmp_path / "broken.py").write_text("raise ImportError('no such thing')\n")
    with pytest.raises(RecipeError, match=r"r.yaml: plugin broken.py failed to import: ImportError: no such thing"):
        recipe_from_dict({"plugins": ["broken.py"], "passes": []}, source=str(tmp_path / "r.yaml"))
    with pytest.raises(RecipeError, match="plugin missing.py does not exist"):
        recipe_from_dict({"plugins": ["missing.py"], "passes": []}, source=str(tmp_path / "r.yaml"))


@pytest.mark.parametrize("how", ["recipe", "flag"])
def test_a_user_pass_runs_from_a_yaml_recipe_in_the_cli(how: str, tmp_path: Path) -> None:
    name = f"scale_outputs_{how}"  # another file may not take a registered name: each run has its own
    (tmp_path / "plugin.py").write_text(EXAMPLE.read_text().replace('"scale_outputs"', f'"{name}"'))
    plugins = "plugins: [plugin.py]\n" if how == "recipe" else ""
    (tmp_path / "r.yaml").write_text(f"{plugins}passes:\n  - pass: {name}\n    factor: 0.5\n")
    (tmp_path / "net.py").write_text("import torch\n\ndef build():\n    torch.manual_seed(0)\n"
                                     "    return torch.nn.Linear(4, 2), (torch.randn(2, 4),)\n")
    argv = ["compress", f"{tmp_path / 'net.py'}:build", "--recipe", str(tmp_path / "r.yaml"),
            "--out", str(tmp_path / "out"), "--no-eval"]
    if how == "flag":
        argv += ["--plugin", str(tmp_path / "plugin.py")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == [name]
    assert report["passes"][0]["error"]["max_rel"] == pytest.approx(0.5, rel=1e-6)
