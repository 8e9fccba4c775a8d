"""`slimship run`: a recipe runs end to end, resumes without repeating finished steps, records failures."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest

from slimship.pipeline.runner import run_recipe
from tests.conftest import ROOT


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
    recipe = _recipe(
        tmp_path,
        """
        version: 1
        workload: digits
        passes:
          - pass: export
          - pass: quantize-dynamic
            config: {exclude_nodes: [no_such_node]}
          - pass: optimize
        """,
    )
    result = run_recipe(recipe, tmp_path / "run", bench_batch_sizes=(1,))
    assert [s["status"] for s in result["steps"]] == ["ran", "failed", "skipped"]
    assert "no_such_node" in result["steps"][1]["reason"]
    assert result["constraints"]["final"] == "export" and result["constraints"]["complete"] is False


@pytest.mark.slow
def test_mnist_prune_distill_quantize_killed_mid_run_resumes_without_repeating(tmp_path):
    """The example recipe's chain (prune → distil from the original → export → INT8), SIGKILLed while the
    distillation runs, then restarted: the finished prune step is reused (same files, untouched), the run ends."""
    import signal
    import subprocess
    import sys

    from tests.pipeline.bounded import ChildOutput, kill_child, wait_until

    recipe = (ROOT / "examples" / "recipes" / "mnist.yaml").read_text().replace("epochs: 4", "epochs: 3")
    p = tmp_path / "mnist.yaml"
    p.write_text(recipe)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "slimship.cli", "run", str(p), "-o", str(out), "-b", "8"]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True
    )
    assert proc.stderr is not None
    # kill it once the distillation has observably begun: the runner announced the step and the pass created
    # its step directory (candidate.json comes only after training); a child that hangs fails the wait
    ChildOutput(proc, proc.stderr).wait_for("distill: running distill", 300, "the distill step to start")
    wait_until(lambda: any((out / "steps").glob("01-distill-*")), 60, "the distill step directory", proc=proc)
    kill_child(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    done = {
        d.name: (d / "candidate.json").stat().st_mtime_ns
        for d in (out / "steps").iterdir()
        if (d / "candidate.json").exists()
    }
    assert [n.split("-")[1] for n in done] == ["prune"], done  # prune finished, distill did not

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "prune: reusing" in again.stderr and "prune: running" not in again.stderr
    for name, mtime in done.items():
        assert (out / "steps" / name / "candidate.json").stat().st_mtime_ns == mtime  # not rewritten
    results = json.loads((out / "results.json").read_text())
    assert [s["status"] for s in results["steps"]] == ["reused", "ran", "ran", "ran"]
    assert results["constraints"]["complete"] and (out / "report.html").exists()
    acc = {k: v["quality"]["accuracy"] for k, v in results["evaluations"].items()}
    # the least-squares refit already keeps the pruned net close; distillation recovers to within a point
    assert acc["distill"] >= max(acc["prune"], acc["original"] - 1.0), acc
    assert acc["quantize-static"] > acc["original"] - 1.5, acc
    assert "report:" in again.stdout
    from tests.browser import not_blank, render

    page = render((out / "report.html").as_uri(), tmp_path / "mnist-report.png", selectors=("svg",))
    assert page.console_errors == [] and page.page_errors == [] and page.counts["svg"] == 1
    assert "constraints" in page.text and "distill" in page.text and not_blank(page.screenshot) > 0.05


def test_min_speedup_is_judged_from_the_interleaved_timing(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        "workload: digits\npasses:\n  - pass: export\n  - pass: quantize-dynamic\n"
        "constraints:\n  min_speedup: {batch_size: 8, value: 1000}\n"
    )
    result = run_recipe(p, tmp_path / "run", bench_batch_sizes=(1,))
    check = result["constraints"]["checks"]["min_speedup"]
    timed = {r["batch_size"] for c in result["bench"]["candidates"] for r in c["results"]}
    assert timed == {1, 8}  # the constraint's batch size was timed too
    assert check["batch_size"] == 8 and 0 < check["measured"] < 1000 and not check["holds"]
    assert not result["constraints"]["holds"]
