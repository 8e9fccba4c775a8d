"""`slimship run`: a recipe runs end to end, resumes without repeating finished steps, records failures."""

from __future__ import annotations

import json
import shutil
import textwrap

from slimship.pipeline.runner import run_recipe


def _recipe(tmp_path, body):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(body).lstrip())
    return p


DIGITS = """
version: 1
workload: digits
passes:
  - pass: prune
    config: {channel_ratio: 0.25, finetune: {epochs: 1}, verify_export: false}
  - pass: export
  - pass: quantize-dynamic
constraints:
  max_quality_drop: 30
  min_fidelity: 0.5
  max_size_mb: 1
"""


def test_recipe_runs_and_resumes_without_repeating(tmp_path):
    recipe = _recipe(tmp_path, DIGITS)
    out = tmp_path / "run"
    first = run_recipe(recipe, out, bench_batch_sizes=(8,))
    assert [s["status"] for s in first["steps"]] == ["ran", "ran", "ran"]
    assert set(first["evaluations"]) == {"original", "prune", "export", "quantize-dynamic"}
    assert first["constraints"]["final"] == "quantize-dynamic" and first["constraints"]["holds"]
    assert set(first["constraints"]["checks"]) == {"max_quality_drop", "min_fidelity", "max_size_mb"}
    assert json.loads((out / "results.json").read_text())["schema"] == "slimship.run/1"
    assert (out / "recipe.yaml").read_text() == recipe.read_text() and (out / "machine.json").exists()
    report = (out / "report.html").read_text()
    assert "final candidate: <b>quantize-dynamic</b>" in report and "constraints hold" in report
    assert "<svg" in report and "max_size_mb" in report and "slimship run" in report
    import re

    assert not re.search(r"(src|href)=[\"']?(https?:)?//", report)  # self-contained: nothing fetched

    # interrupted after the second step: the last step's directory is gone (or half-written)
    last = next(p for p in (out / "steps").iterdir() if "quantize-dynamic" in p.name)
    shutil.rmtree(last)
    last.mkdir()
    (last / "model.onnx").write_bytes(b"half-written")
    again = run_recipe(recipe, out, bench_batch_sizes=(8,))
    assert [s["status"] for s in again["steps"]] == ["reused", "reused", "ran"]
    assert again["steps"][0]["id"] == first["steps"][0]["id"]

    # a changed config reruns that step and everything after it, and only those
    changed = _recipe(tmp_path, DIGITS.replace("channel_ratio: 0.25", "channel_ratio: 0.5"))
    third = run_recipe(changed, out, bench_batch_sizes=(8,))
    assert [s["status"] for s in third["steps"]] == ["ran", "ran", "ran"]


def test_a_failing_step_is_recorded_and_the_rest_skipped(tmp_path):
    recipe = _recipe(tmp_path, """
        version: 1
        workload: digits
        passes:
          - pass: export
          - pass: quantize-dynamic
            config: {exclude_nodes: [no_such_node]}
          - pass: optimize
        """)
    result = run_recipe(recipe, tmp_path / "run", bench_batch_sizes=(1,))
    assert [s["status"] for s in result["steps"]] == ["ran", "failed", "skipped"]
    assert "no_such_node" in result["steps"][1]["reason"]
    assert result["constraints"]["final"] == "export" and result["constraints"]["complete"] is False
