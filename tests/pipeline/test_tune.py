"""`slimship tune`: a seeded multi-objective search over a recipe's search space, every trial timed and judged."""

from __future__ import annotations

import json
import textwrap

import pytest

from slimship.errors import ConfigError
from slimship.pipeline.tune import tune_recipe

RECIPE = """
version: 1
workload: digits
passes:
  - pass: prune
    config: {channel_ratio: 0.25, finetune: {epochs: 1}, verify_export: false}
  - pass: export
  - pass: quantize-dynamic
constraints:
  max_quality_drop: 40
search:
  trials: 3
  batch_size: 8
  params:
    prune.channel_ratio: {choices: [0.25, 0.5]}
    quantize-dynamic.per_channel: {choices: [true, false]}
"""


def test_tune_records_every_trial_a_pareto_front_and_the_best(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(RECIPE).lstrip())
    result = tune_recipe(p, tmp_path / "tune")
    assert len(result["trials"]) == 3
    ok = [t for t in result["trials"] if t["status"] == "ok"]
    assert ok and all(t["speedup"] > 0 and t["quality"] is not None for t in ok)
    assert any(t["pareto"] for t in ok)
    assert result["best"] is not None and result["best"]["feasible"]
    assert result["best"]["speedup"] == max(t["speedup"] for t in ok if t["feasible"])
    assert json.loads((tmp_path / "tune" / "tune.json").read_text())["schema"] == "slimship.tune/1"
    # trials with the same prune ratio share that step's candidate instead of pruning again
    prune_dirs = {t["steps"][0]["candidate"] for t in ok}
    assert len(prune_dirs) <= 2


def test_tune_needs_a_search_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("workload: digits\npasses:\n  - pass: export\n")
    with pytest.raises(ConfigError, match="no `search` section"):
        tune_recipe(p, tmp_path / "t")


def test_tune_command(tmp_path):
    from tests.test_cli import slimship

    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(RECIPE).lstrip())
    proc = slimship("tune", str(p), "-o", str(tmp_path / "t"), "--trials", "2")
    assert proc.stdout.count("trial ") >= 2 and "best within constraints" in proc.stdout and "tune.json" in proc.stdout
