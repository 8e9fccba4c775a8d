"""`slimship quickstart` is the built-in ``quickstart`` recipe run through the runner's steps: the same
candidates, evaluations and side-by-side timing as before, reused on a second run by the runner's rule."""

from __future__ import annotations

import json

from slimship.pipeline.quickstart import quickstart
from slimship.pipeline.recipe import load_recipe
from slimship.recipes import builtin_recipes


def test_quickstart_is_a_builtin_recipe():
    r = load_recipe(builtin_recipes()["quickstart"])
    assert [(s.name, s.pass_name) for s in r.passes] == [("exported", "export"), ("optimized", "optimize")]
    assert set(builtin_recipes()) == {"minilm-fast", "quickstart"}


def test_quickstart_runs_the_recipe_steps_and_reuses_them(tmp_path):
    out = tmp_path / "qs"
    logs: list[str] = []
    kw = {"batch_sizes": (1,), "runs": 30, "warmup": 1, "memory": False, "log": logs.append}
    first = quickstart("digits", out, **kw)
    assert first["schema"] == "slimship.quickstart/1"
    assert [c["name"] for c in first["candidates"]] == ["original", "exported", "optimized"]
    assert [c["path"] for c in first["candidates"]] == [
        str(out / n) for n in ("original", "exported", "optimized")
    ]
    assert list(first["evaluations"]) == ["pytorch-fp32", "ort-fp32", "ort-fp32-optimized"]
    assert first["bench"]["baseline"] == "pytorch-fp32" and (out / "summary.md").exists()
    assert json.loads((out / "results.json").read_text())["headline"] == first["headline"]
    assert any("exported: running export" in m for m in logs)
    ids = [c["id"] for c in first["candidates"]]
    logs.clear()
    again = quickstart("digits", out, **kw)
    assert [c["id"] for c in again["candidates"]] == ids
    assert any("reusing exported" in m for m in logs) and any("reusing optimized" in m for m in logs)
    assert not any("running" in m for m in logs), logs
