from __future__ import annotations

import re

import pytest
import yaml

from graphpress.passes import PASSES
from graphpress.recipes import RecipeError, load_recipe, named_recipes, recipe_from_dict


def test_every_named_recipe_loads() -> None:
    for name in named_recipes():
        recipe = load_recipe(name)
        assert recipe.passes and all(p.name in PASSES for p in recipe.passes)


def test_default_recipe_is_exact() -> None:
    recipe = load_recipe(None)
    assert recipe.name == "exact" and all(p.exact for p in recipe.passes)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"passes": "remove_noops"}, "list under 'passes'"),
        ({"passes": [{"pass": "remove_noops", "bogus": 1}]}, "has no option"),
        ({"passes": [{"nope": 1}]}, "'pass' key"),
        ({"passes": [], "extra": 1}, "unknown key"),
    ],
)
def test_bad_recipes_are_refused(data: object, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"passes": [{"pass": "rtn", "bits": "4"}]}, "option 'bits' must be an integer, not '4'"),
        ({"passes": [{"pass": "rtn", "symmetric": "yes"}]}, "option 'symmetric' must be true or false"),
        ({"passes": [{"pass": "rtn", "group_size": 1.5}]}, "must be an integer or null"),
        ({"passes": [{"pass": "rtn", "group_size": "1.5e0"}]}, "must be an integer or null"),
        ({"passes": [{"pass": "prune_mlp", "ratio": "5e"}]}, "option 'ratio' must be a number or null, not '5e'"),
        ({"passes": [{"pass": "rtn", "targets": [3]}]}, "must be a string, not 3"),
        ({"passes": [], "calibration": {"window": 4}}, "unknown key 'window' under 'calibration'"),
        ({"passes": [], "calibration": {"windows": "4"}}, "calibration 'windows' must be a positive integer"),
        ({"passes": [], "target": {"onnxruntime": {"accuracy": 4}}}, "target onnxruntime has no option 'accuracy'"),
        ({"passes": [], "target": {"onnxruntime": {"accuracy_level": 9}}}, "accuracy_level must be 0..4"),
        ({"passes": [], "target": {"tensorrt": {}}}, "unknown target 'tensorrt'"),
        ({"passes": [], "target": {"onnxruntime": "int8"}}, "must map to a mapping of its options"),
        ({"passes": [{"pass": "rtn", "kernel": "int8"}]}, "pass rtn has no option 'kernel'"),
        ({"passes": [], "name": ["x"]}, "'name' must be a string"),
        ({"passes": [{"pass": 7}]}, "unknown pass 7"),
        ({"passes": [], "extends": "w4-fast"}, "'extends' names 'w4-fast', which is not one of the named recipes"),
    ],
)
def test_recipe_types_are_validated_before_any_work(data: object, match: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(match)) as info:
        recipe_from_dict(data, source="mine.yaml")
    assert "mine.yaml" in str(info.value)


def test_a_recipe_extends_a_named_one() -> None:
    base = load_recipe("w4-decode")
    recipe = recipe_from_dict({"extends": "w4-decode", "passes": [{"pass": "quantize_kv_cache"}],
                               "calibration": {"windows": 8}, "target": {"onnxruntime": {"accuracy_level": 0}}})
    assert [p.name for p in recipe.passes] == [*(p.name for p in base.passes), "quantize_kv_cache"]
    assert recipe.calibration == {**base.calibration, "windows": 8}
    assert recipe.target == {"onnxruntime": {"kernel": "nbits", "accuracy_level": 0}}
    assert load_recipe("w4-decode-kv8").passes[:-1] == base.passes  # the named one is written so


def test_a_single_regex_string_is_one_pattern() -> None:
    recipe = recipe_from_dict({"passes": [{"pass": "rtn", "targets": "fc2", "ignore": "lm_head"}]})
    assert recipe.passes[0].targets == ("fc2",) and recipe.passes[0].ignore == ("lm_head",)
    assert PASSES["rtn"](targets="fc2").targets == ("fc2",)  # the Python API too


def test_numbers_in_exponent_form_are_numbers() -> None:
    """YAML 1.1 reads 3e-4 (no dot) as a string; an option that takes a number takes it as one."""
    data = yaml.safe_load("passes: [{pass: distill, lr: 3e-4, tokens: 6e6}]\ntraining: {windows: 64}")
    assert data["passes"][0]["lr"] == "3e-4"
    distill = recipe_from_dict(data).passes[0]
    assert distill.lr == 3e-4 and distill.tokens == 6_000_000 and isinstance(distill.tokens, int)
