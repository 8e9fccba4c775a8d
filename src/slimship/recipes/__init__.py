"""The built-in recipes: ``minilm-fast`` (the default of `slimship run`) and ``quickstart`` (the steps of
`slimship quickstart`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def builtin_recipes() -> dict[str, Path]:
    """Each packaged recipe by name (its file name without ``.yaml``)."""
    return {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in resources.files("slimship.recipes").iterdir()
        if p.name.endswith(".yaml")
    }
