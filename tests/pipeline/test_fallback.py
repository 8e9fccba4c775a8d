"""Step fallbacks in `slimship run`: a recipe whose first attempt misses its budget ends with its constraints
holding via a fallback; every attempt is in results.json and in the report's Attempts table (checked in Chromium);
no attempt holding is said plainly and exits 3; bad fallback entries are errors naming file:line. And lossless
steps (export, optimize) reuse their parent's quality instead of a full evaluation; the original's evaluation is
measured on the last of them (ONNX Runtime, faster than PyTorch eager) and cached across runs under a key of what it
depends on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import slimship.measure.evaluate as evaluate_module
from slimship.errors import ConfigError
from slimship.pipeline.recipe import load_recipe
from slimship.pipeline.runner import run_recipe

# Attempt 1 quantizes only the Gemm (47 KB: over the 40 KB budget); fallback 1 quantizes the convolutions too
# (36 KB), fallback 2 is calibrated static INT8 (27 KB). Fidelity holds for all three.
RECIPE = """
version: 1
workload: digits
passes:
  - pass: export
  - pass: optimize
    config: {level: basic}
  - pass: quantize-dynamic
    config: {op_types: [Gemm]}
    fallbacks:
      - {label: all-ops, pass: quantize-dynamic, config: {}}
      - label: static
        pass: quantize-static
        config: {calibration: minmax}
constraints:
  min_fidelity: 0.99
  max_size_mb: 0.04
"""


def _recipe(tmp_path, body, name="r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body).lstrip())
    return p


@pytest.fixture
def counted_evaluations(monkeypatch):
    """Every call of the full evaluation, by candidate name."""
    calls: list[str] = []
    real = evaluate_module.evaluate

    def counting(candidate, *args, **kwargs):
        calls.append(candidate.name)
        return real(candidate, *args, **kwargs)

    real_via = evaluate_module.evaluate_original_via

    def counting_via(original, *args, **kwargs):  # the original measured on its verified-equal export
        calls.append(original.name)
        return real_via(original, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", counting)
    monkeypatch.setattr(evaluate_module, "evaluate_original_via", counting_via)
    return calls


def test_a_fallback_holds_where_the_recipe_as_written_misses(tmp_path, counted_evaluations):
    out = tmp_path / "run"
    result = run_recipe(_recipe(tmp_path, RECIPE), out, bench_batch_sizes=(8,))
    attempts = result["attempts"]
    assert [a["label"] for a in attempts] == ["as-written", "all-ops"]  # "first": static is never tried
    first, second = attempts
    assert not first["holds"] and not first["constraints"]["checks"]["max_size_mb"]["holds"]
    assert first["constraints"]["checks"]["min_fidelity"]["holds"]
    assert second["holds"] and second["kept"] and not first["kept"]
    assert second["replaced_step"] == "quantize-dynamic" and second["pass"] == "quantize-dynamic"
    for a in attempts:  # every attempt's figures
        assert a["quality"] is not None and a["quality_drop"] is not None and a["fidelity"]
        assert a["size_bytes"] > 0 and a["latency_ms_p50"]["8"] > 0 and a["speedup"]["8"] > 0
    assert first["size_bytes"] > 40_000 > second["size_bytes"]
    assert result["constraints"]["holds"] and result["constraints"]["attempt"] == 2
    fb = result["fallback"]
    assert fb["kept"] == 2 and fb["attempts_run"] == 2 and fb["attempts_declared"] == 3 and fb["any_holds"]
    assert "only attempt" in fb["reason"]
    # the kept attempt is what the rest of results.json describes; its timing row carries its final step's label
    assert result["steps"] == second["steps"] and result["constraints"]["final"] == "quantize-dynamic"
    labels = [c["label"] for c in result["bench"]["candidates"]]
    assert labels == ["original", "attempt 1: as-written", "quantize-dynamic"]
    # attempt 2 reused the steps it shares with attempt 1 (same pass, config, parent)
    assert [s["status"] for s in second["steps"]] == ["reused", "reused", "ran"]
    assert json.loads((out / "results.json").read_text())["attempts"][1]["kept"] is True

    # lossless steps cost no full evaluation: export and optimize reuse their parent's quality
    evs = result["evaluations"]
    assert evs["export"]["quality_from"].startswith("parent (verified equal: max |Δ|")
    assert evs["optimize"]["quality_from"].startswith("parent (verified equal: max |Δ|")
    assert (
        evs["export"]["quality"] == evs["original"]["quality"]
        and "quality_from" not in evs["quantize-dynamic"]
    )
    assert sorted(counted_evaluations) == ["int8-dynamic", "int8-dynamic", "original"]

    from tests.browser import not_blank, render

    page = render((out / "report.html").as_uri(), tmp_path / "attempts.png", selectors=("#attempts tr",))
    assert page.console_errors == [] and page.page_errors == []
    assert all(u.startswith(("file:", "data:")) for u in page.requests), page.requests
    assert "Attempts" in page.text and page.counts["#attempts tr"] == 3  # header + 2 attempts
    assert "Kept attempt 2 (all-ops)" in page.text and "the only attempt of 2 that holds" in page.text
    assert "constraints hold (attempt 2 of 2: all-ops)" in page.text and "do not hold" not in page.text
    assert "1 fallback not tried" in page.text and "as-written" in page.text
    assert "parent (verified equal" in page.text  # the Steps table says where export's quality came from
    assert not_blank(page.screenshot) > 0.05

    # a second run resumes: every step of both attempts reused, nothing evaluated again
    counted_evaluations.clear()
    again = run_recipe(out / "recipe.yaml", out, bench_batch_sizes=(8,))
    assert counted_evaluations == []
    assert [s["status"] for a in again["attempts"] for s in a["steps"]] == ["reused"] * 6
    assert again["fallback"]["kept"] == 2


def test_fastest_policy_tries_every_attempt_and_keeps_the_fastest_that_holds(tmp_path):
    body = RECIPE + "fallback_policy: fastest\n"
    result = run_recipe(_recipe(tmp_path, body), tmp_path / "run", bench_batch_sizes=(8,))
    attempts = result["attempts"]
    assert [a["label"] for a in attempts] == ["as-written", "all-ops", "static"]
    holding = [a for a in attempts if a["holds"]]
    assert [a["label"] for a in holding] == ["all-ops", "static"]
    kept = next(a for a in attempts if a["kept"])
    assert kept["latency_ms_p50"]["8"] == min(a["latency_ms_p50"]["8"] for a in holding)
    assert "fastest of the 2 attempts that hold" in result["fallback"]["reason"]
    assert result["constraints"]["holds"]


def test_no_attempt_holds_is_said_plainly_and_exits_3(tmp_path):
    body = RECIPE.replace("max_size_mb: 0.04", "max_size_mb: 0.001")
    recipe = _recipe(tmp_path, body)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "slimship.cli", "run", str(recipe), "-o", str(out), "-b", "8"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 3, proc.stderr
    assert "constraints do not hold" in proc.stdout and "exit code 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads((out / "results.json").read_text())
    assert len(result["attempts"]) == 3 and not any(a["holds"] for a in result["attempts"])
    assert not result["constraints"]["holds"] and not result["fallback"]["any_holds"]
    assert "no attempt of 3 holds" in result["fallback"]["reason"]
    text = (out / "report.html").read_text()
    assert "constraints do not hold in any of the 3 attempts" in text and "id=attempts" in text
    assert "Exit codes" in subprocess.run(
        [sys.executable, "-m", "slimship.cli", "run", "--help"], capture_output=True, text=True, timeout=60
    ).stdout.replace("\n", " ")


@pytest.mark.parametrize(
    ("fallback", "expected"),
    [
        (
            "{pass: quantize-dynamc}",
            r"r\.yaml:6: passes\[1\]\.fallbacks\[0\]\.pass: unknown pass 'quantize-dynamc'",
        ),
        (
            "{pass: quantize-dynamic, config: {smooth: most}}",
            r"r\.yaml:6: passes\[1\]\.fallbacks\[0\]\.config",
        ),
        (
            "{pass: export}",
            r"r\.yaml:6: passes\[1\]\.fallbacks\[0\]\.pass: 'export' takes torch and gives onnx",
        ),
        (
            "{pass: quantize-dynamic, cfg: {}}",
            r"r\.yaml:6: passes\[1\]\.fallbacks\[0\]\.cfg.*allowed keys: \['pass', 'config', 'label'\]",
        ),
        ("{pass: quantize-dynamic, label: export}", r"fallback labels must be unique"),
    ],
)
def test_bad_fallback_entries_are_errors_naming_file_and_line(tmp_path, fallback, expected):
    p = _recipe(
        tmp_path,
        f"""
        workload: digits
        passes:
          - pass: export
          - pass: quantize-dynamic
            fallbacks:
              - {fallback}
        """,
    )
    with pytest.raises(ConfigError, match=expected):
        load_recipe(p)


def test_a_fallback_that_breaks_the_chain_names_its_own_line(tmp_path):
    p = _recipe(tmp_path, RECIPE.replace("config: {level: basic}", "config: {level: extended}"))
    with pytest.raises(
        ConfigError,
        match=r"r\.yaml:12: passes\[2\]\.fallbacks\[1\] \(static\).*quantize-static right after optimize",
    ):
        load_recipe(p)


def test_the_originals_evaluation_is_cached_by_what_it_depends_on(monkeypatch):
    from slimship.candidate import original_candidate
    from slimship.workload import resolve_workload

    w = resolve_workload("digits")
    import tempfile
    from pathlib import Path

    orig = original_candidate(w, Path(tempfile.mkdtemp()) / "original")
    path = evaluate_module.original_evaluation_path(orig, w, "torch", 97)
    path.unlink(missing_ok=True)
    first = evaluate_module.evaluate(orig, w, limit=97, progress=False)
    assert "cached_from" not in first and path.exists()
    hit = evaluate_module.evaluate(orig, w, limit=97, progress=False)
    assert hit["cached_from"] == str(path) and hit["quality"] == first["quality"]
    # a different limit, or a different version of a package that computes the numbers: measured again
    other = evaluate_module.original_evaluation_path(orig, w, "torch", 98)
    assert other != path
    import slimship.machine

    real = slimship.machine.package_versions
    monkeypatch.setattr(slimship.machine, "package_versions", lambda: {**real(), "torch": "0.0-other"})
    changed = evaluate_module.original_evaluation_path(orig, w, "torch", 97)
    assert changed != path
    changed.unlink(missing_ok=True)
    miss = evaluate_module.evaluate(orig, w, limit=97, progress=False)
    assert "cached_from" not in miss and changed.exists()
    for p in (path, changed):
        p.unlink(missing_ok=True)


def test_the_original_is_evaluated_on_its_verified_equal_export_and_its_figures_hold(tmp_path, monkeypatch):
    """Cold cache: the original's figures come from the optimized ONNX (verified equal to it), recorded as such;
    they equal PyTorch's own evaluation; the INT8 step's fidelity says what it was measured against; a second run
    finds the original's evaluation in the cross-run cache."""
    monkeypatch.setenv("SLIMSHIP_CACHE_DIR", str(tmp_path / "cache"))
    body = "version: 1\nworkload: digits\npasses:\n  - pass: export\n  - pass: optimize\n  - pass: quantize-dynamic\n"
    result = run_recipe(_recipe(tmp_path, body), tmp_path / "run", evaluate_limit=300, bench_batch_sizes=(1,))
    evs = result["evaluations"]
    on = evs["original"]["measured_on"]
    assert on["candidate_name"] == "optimized" and 0 <= on["verified_equal_max_abs_error"] < 1e-4
    assert evs["original"]["runtime"]["backend"] == "onnxruntime"
    assert evs["quantize-dynamic"]["reference_outputs_from"]["candidate_name"] == "optimized"
    from slimship.candidate import load_candidate
    from slimship.report.attempts import quality_source
    from slimship.workload import resolve_workload

    assert quality_source(evs["original"]).startswith("evaluated on optimized (verified equal: max |Δ|")
    # PyTorch's own evaluation of the original gives the same figures (a fresh cache: nothing reused)
    monkeypatch.setenv("SLIMSHIP_CACHE_DIR", str(tmp_path / "cache2"))
    orig, workload = load_candidate(tmp_path / "run" / "original"), resolve_workload("digits")
    direct = evaluate_module.evaluate(orig, workload, limit=300, progress=False)
    assert direct["runtime"]["backend"] == "torch"
    assert direct["quality"] == pytest.approx(evs["original"]["quality"], abs=1e-9)
    # the cross-run cache now answers for the original (the next run evaluates it no more)
    monkeypatch.setenv("SLIMSHIP_CACHE_DIR", str(tmp_path / "cache"))
    cached = evaluate_module.cached_original_evaluation(orig, workload, 300)
    assert cached is not None and cached["measured_on"]["candidate_name"] == "optimized"
