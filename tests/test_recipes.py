from __future__ import annotations

import pytest

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
        ({"passes": [], "extra": 1}, "unknown keys"),
    ],
)
def test_bad_recipes_are_refused(data: object, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(data)
