"""`slimship tune`: a seeded multi-objective search over a recipe's search space, every trial timed and judged."""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest

from slimship.errors import ConfigError
from slimship.pipeline.search import tune_recipe

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
    assert (
        proc.stdout.count("trial ") >= 2
        and "best within constraints" in proc.stdout
        and "tune.json" in proc.stdout
    )


def test_hopeless_candidates_are_screened_before_the_full_evaluation(tmp_path):
    """A 90% channel cut without recovery loses far more than the budget on a small slice: it is screened out,
    never fully evaluated or timed; the 25% cut passes the screen and is evaluated."""
    p = tmp_path / "r.yaml"
    p.write_text(
        textwrap.dedent("""
        workload: digits
        passes:
          - pass: prune
            config: {channel_ratio: 0.25, finetune: null, verify_export: false}
          - pass: export
        constraints: {max_quality_drop: 1.0}
        search:
          trials: 4
          batch_size: 8
          screen: {samples: 64, quality_margin: 5.0}
          params:
            prune.channel_ratio: {choices: [0.1, 0.9]}
    """).lstrip()
    )
    result = tune_recipe(p, tmp_path / "t")
    rows = {r["params"]["prune.channel_ratio"]: r for r in result["trials"] if r.get("reused_from") is None}
    assert set(rows) == {0.1, 0.9}
    cut = rows[0.9]
    assert cut["status"] == "screened" and cut["screen"]["measured"] > 6.0 and "speedup" not in cut
    assert rows[0.1]["status"] == "ok" and rows[0.1]["speedup"] > 0
    # the screened candidate has only the slice evaluation beside it
    assert (pathlib.Path(cut["candidate"]) / "evaluation-64.json").exists()
    assert not (pathlib.Path(cut["candidate"]) / "evaluation.json").exists()
    # two combinations in the space: the search stops once both are tried, repeats cost nothing
    assert result["evaluations"] == 2 and "every one of the 2 combinations" in result["stopped"]


def test_a_step_can_be_searched_in_or_out(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        textwrap.dedent("""
        workload: digits
        passes:
          - pass: prune
            config: {channel_ratio: 0.5, finetune: {epochs: 1}, verify_export: false}
          - pass: export
        search:
          trials: 2
          batch_size: 8
          params:
            prune.skip: {choices: [true, false]}
    """).lstrip()
    )
    result = tune_recipe(p, tmp_path / "t")
    by = {r["params"]["prune.skip"]: r for r in result["trials"]}
    assert by[True]["steps"][0]["status"] == "omitted" and by[False]["steps"][0]["status"] == "ran"
    # without pruning the export is the original model: about as fast; pruned half the channels: faster and smaller
    assert by[False]["size_bytes"] < 0.5 * by[True]["size_bytes"]


@pytest.mark.parametrize(
    ("passes", "params", "needles"),
    [
        (
            "  - pass: export\n  - pass: quantize-dynamic\n",
            "    export.skip: {choices: [true, false]}\n",
            [
                "r.yaml:7: search.params.export.skip: with export.skip = true the steps don't connect",
                "'quantize-dynamic' takes an onnx model but the step before gives torch",
            ],
        ),
        (
            "  - pass: export\n  - {name: runtime, pass: convert-openvino}\n  - pass: quantize-nncf\n",
            "    runtime.skip: {choices: [true, false]}\n",
            [
                "r.yaml:8: search.params.runtime.skip: with runtime.skip = true",
                "'quantize-nncf' takes an openvino model but the step before gives onnx",
                "Every step after a searched choice must take each format the choices give",
            ],
        ),
        (
            "  - pass: export\n  - {name: int8, pass: quantize-static}\n  - {name: runtime, pass: convert-openvino}\n",
            "    int8.pass: {choices: [quantize-static, quantize-nncf]}\n    runtime.skip: {choices: [true, false]}\n",
            ["r.yaml:8: search.params.int8.pass: with int8.pass = quantize-nncf", "takes an openvino model"],
        ),
    ],
    ids=[
        "export-skipped-before-an-onnx-pass",
        "conversion-skipped-before-an-ir-pass",
        "ir-pass-among-onnx-ones",
    ],
)
def test_choices_whose_formats_cannot_compose_are_refused(tmp_path, passes, params, needles):
    """A searched choice may change the format only if every later step takes each format; a combination that
    breaks the chain is named, at the line of the searched key that introduced it."""
    from slimship.pipeline.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(f"workload: mnist\npasses:\n{passes}search:\n  params:\n{params}")
    with pytest.raises(ConfigError) as err:
        load_recipe(p)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


@pytest.mark.slow  # 44 s of CPU on the shared 2 cores (≈ 30 s idle): three trials built, evaluated and timed
def test_the_runtime_is_a_search_dimension(tmp_path):
    """Quantizer × runtime on mnist: a conversion to OpenVINO searched in or out as the last step. Each trial is
    timed on its own runtime with its recorded deployment settings, and records runtime, format, precision and the
    CPU class; the best is the fastest of the trials that hold the constraints."""
    from slimship.machine import cpu_class

    p = tmp_path / "r.yaml"
    p.write_text(
        textwrap.dedent("""
        workload: mnist
        passes:
          - pass: export
          - name: int8
            pass: quantize-static
            config: {calibration_samples: 64}
          - name: runtime
            pass: convert-openvino
            config: {verify: {min_cosine: 0.999, atol: 1.0, rtol: 0.1, min_top1_agreement: 0.97}, verify_samples: 16}
        constraints: {max_quality_drop: 3.0}
        search:
          trials: 3
          batch_size: 8
          screen: null
          params:
            int8.skip: {choices: [true, false]}
            runtime.skip: {choices: [true, false]}
    """).lstrip()
    )
    result = tune_recipe(p, tmp_path / "t", evaluate_limit=256)
    fresh = [r for r in result["trials"] if r.get("reused_from") is None]
    assert len(fresh) == 3 and all(r["status"] == "ok" for r in fresh), fresh
    # three distinct combinations of two binary choices cover both runtimes
    assert {r["runtime"] for r in fresh} == {"onnxruntime", "openvino"}
    for r in fresh:
        on_openvino = not r["params"]["runtime.skip"]
        assert r["format"] == ("openvino" if on_openvino else "onnx")
        assert r["precision"] == ("fp32" if r["params"]["int8.skip"] else "int8")
        assert r["cpu_class"] == cpu_class() == r["deployment"]["cpu_class"]
        # timed with the settings its candidate records (threads/spinning as the interleaved timing sets them)
        assert r["deployment"]["runtime"] == r["runtime"]
        recorded = json.loads((pathlib.Path(r["candidate"]) / "candidate.json").read_text())["info"][
            "deployment"
        ]
        assert recorded["runtime"] == r["runtime"]
        if on_openvino:
            assert r["deployment"]["openvino_config"] == recorded["openvino_config"]
            assert r["deployment"]["openvino_config"]["INFERENCE_PRECISION_HINT"] == "f32"
        else:
            assert r["deployment"]["session_config"] == recorded["session_config"]
    feasible = [r for r in fresh if r["feasible"]]
    assert feasible and result["best"]["trial"] == min(feasible, key=lambda r: r["latency_ms_p50"])["trial"]
    html = (tmp_path / "t" / "report.html").read_text()
    assert (
        "<td>openvino</td>" in html and "<td>onnxruntime</td>" in html and f"CPU class: {cpu_class()}" in html
    )


def test_search_state_stops_on_patience_budget_and_exhaustion():
    from slimship.pipeline.recipe import Recipe
    from slimship.pipeline.search.state import SearchState, TrialRow, pareto_front

    def recipe(patience, choices):
        return Recipe.model_validate(
            {
                "workload": "digits",
                "passes": [{"pass": "export"}],
                "search": {"patience": patience, "params": {"export.opset": {"choices": choices}}},
            }
        )

    def ok(n, speed, q, feasible=True, opset=17):
        return TrialRow(
            trial=n, params={"export.opset": opset}, status="ok", speedup=speed, quality=q, feasible=feasible
        )

    state = SearchState(recipe(2, [16, 17, 18, 19, 20]))
    state.record(ok(0, 1.5, 90, feasible=False, opset=16))
    assert state.stop_reason(25, None) is None  # nothing feasible yet: patience doesn't count
    state.record(ok(1, 1.2, 95, opset=17))
    state.record(ok(2, 1.1, 96, opset=18))
    assert state.stop_reason(25, None) is None and state.since_best == 1
    state.record(
        ok(2, 1.1, 96, opset=18).repeat(3, {"export.opset": 18})
    )  # a repeat: no evaluation, no patience spent
    assert state.evaluations == 3 and state.since_best == 1
    assert state.stop_reason(3, None).startswith("trial budget")
    state.record(ok(4, 1.0, 97, opset=19))
    assert state.since_best == 2 and state.stop_reason(25, None).startswith("early stop")
    # a faster feasible candidate resets the count
    state.record(ok(5, 1.3, 94.5, opset=20))
    assert state.best_value == 1.3 and state.since_best == 0
    assert "every one of the 5 combinations" in state.stop_reason(25, None)
    # Pareto: 0 (fastest), 5, 1, 2, 4 (each more accurate at lower speed) are all non-dominated; 3 is a repeat
    assert pareto_front([r for r in state.rows if r.reused_from is None], "latency") == {0, 1, 2, 4, 5}
    assert pareto_front([ok(0, 1.0, 90), ok(1, 2.0, 95)], "latency") == {1}


def test_unknown_executor_is_a_clear_error():
    from slimship.pipeline.search import executor_for

    with pytest.raises(ConfigError, match="unknown executor 'dask'.*executors: \\['local', 'ray'\\]"):
        executor_for("dask")
    with pytest.raises(ConfigError, match="trial_cpus only apply to --executor ray"):
        executor_for("local", seed=0, trial_cpus=2.0)


def test_report_command_rebuilds_and_refuses_a_directory_without_results(tmp_path):
    from tests.test_cli import slimship

    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(RECIPE).lstrip())
    tune_recipe(p, tmp_path / "t", trials=1)
    (tmp_path / "t" / "report.html").unlink()
    proc = slimship("report", str(tmp_path / "t"))
    assert "report:" in proc.stdout and "slimship tune" in (tmp_path / "t" / "report.html").read_text()
    bad = slimship("report", str(tmp_path), check=False)
    assert bad.returncode == 2 and "neither results.json" in bad.stderr


def test_builtin_default_recipe_is_packaged_and_valid(tmp_path):
    from slimship.cli.recipes import _recipe_path
    from slimship.pipeline.recipe import load_recipe

    default = _recipe_path(None)
    r = load_recipe(default)
    assert r.workload == "minilm" and [s.pass_name for s in r.passes] == [
        "export",
        "optimize",
        "quantize-dynamic",
    ]
    assert r.constraints.max_quality_drop == 1.0
    with pytest.raises(
        ConfigError, match=r"no recipe file nope.yaml; built-in recipes: \['minilm-fast', 'quickstart'\]"
    ):
        _recipe_path(pathlib.Path("nope.yaml"))


def test_quantization_mode_is_searched_as_alternative_passes(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        textwrap.dedent("""
        workload: digits
        passes:
          - pass: export
          - name: int8
            pass: quantize-static
        search:
          trials: 6
          batch_size: 8
          params:
            int8.pass: {choices: [quantize-static, quantize-dynamic]}
            int8.calibration: {choices: [minmax, entropy]}
    """).lstrip()
    )
    result = tune_recipe(p, tmp_path / "t")
    fresh = [r for r in result["trials"] if r.get("reused_from") is None]
    built = {
        json.loads((pathlib.Path(r["candidate"]) / "candidate.json").read_text())["pass_name"] for r in fresh
    }
    assert built == {"quantize-static", "quantize-dynamic"}
    # 3 distinct candidates (dynamic ignores the calibration), so the search ends after 3 evaluations
    assert result["evaluations"] == 3 and "every one of the 3 combinations" in result["stopped"]


def test_macs_signal_screens_a_candidate_that_cannot_beat_the_best(tmp_path):
    """The MACs prediction: a candidate whose MAC reduction, at the best speed-per-MAC seen for its runtime steps
    (with the margin), stays below the best feasible speed-up is not evaluated."""
    from dataclasses import replace
    from types import SimpleNamespace

    from slimship.pipeline.recipe import Recipe
    from slimship.pipeline.search.state import SearchHints, TrialRow
    from slimship.pipeline.search.trial import screen

    recipe = Recipe.model_validate(
        {
            "workload": "digits",
            "passes": [{"pass": "export"}],
            "search": {"params": {"export.opset": {"choices": [17, 18]}}},
        }
    )
    final = SimpleNamespace(size_bytes=1000)
    row = TrialRow(trial=0, params={}, signature="export>quantize-dynamic", macs_ratio=1.5)
    hints = SearchHints(best_feasible=3.0, speed_per_mac={"export>quantize-dynamic": 1.4})
    out = screen(recipe, None, "", tmp_path, final, print, row, hints)
    assert (
        out is not None
        and out.signal.startswith("speed-up its MACs predict")
        and out.measured == pytest.approx(1.5 * 1.4 * 1.25)
    )
    # a bigger MAC cut could win: not screened by MACs (the slice check then needs a workload; none configured here)
    recipe_nc = recipe.model_copy(update={"constraints": recipe.constraints})
    assert screen(recipe_nc, None, "", tmp_path, final, print, replace(row, macs_ratio=2.0), hints) is None
    # a different runtime signature has no evidence yet: not screened
    assert screen(recipe, None, "", tmp_path, final, print, replace(row, signature="export"), hints) is None


def test_macs_signal_screens_what_cannot_reach_min_speedup(tmp_path):
    from types import SimpleNamespace

    from slimship.pipeline.recipe import Recipe
    from slimship.pipeline.search.state import SearchHints, TrialRow
    from slimship.pipeline.search.trial import screen

    recipe = Recipe.model_validate(
        {
            "workload": "digits",
            "passes": [{"pass": "export"}],
            "constraints": {"min_speedup": {"batch_size": 32, "value": 3.0}},
            "search": {"batch_size": 32, "params": {"export.opset": {"choices": [17, 18]}}},
        }
    )
    row = TrialRow(trial=0, params={}, signature="export", macs_ratio=1.2)
    out = screen(
        recipe,
        None,
        "",
        tmp_path,
        SimpleNamespace(size_bytes=1),
        print,
        row,
        SearchHints(best_feasible=None, speed_per_mac={"export": 1.8}),
    )
    assert (
        out is not None
        and out.signal.endswith("vs min_speedup")
        and out.measured == pytest.approx(1.2 * 1.8 * 1.25)
        and out.limit == 3.0
    )


def test_speed_is_judged_against_the_pooled_original():
    from slimship.pipeline.recipe import Recipe
    from slimship.pipeline.search.state import TrialRow, pool_baseline

    recipe = Recipe.model_validate(
        {
            "workload": "digits",
            "passes": [{"pass": "export"}],
            "constraints": {"min_speedup": {"batch_size": 32, "value": 3.0}},
            "search": {"batch_size": 32, "params": {"export.opset": {"choices": [17, 18]}}},
        }
    )

    def row(n, cand, orig):
        return TrialRow(
            trial=n,
            params={},
            status="ok",
            latency_ms_p50=cand,
            original_latency_ms_p50=orig,
            speedup=orig / cand,
            feasible=orig / cand >= 3,
            checks={"min_speedup": {"limit": 3.0, "measured": orig / cand, "holds": orig / cand >= 3}},
        )

    rows = [
        row(0, 150, 528),
        row(1, 150, 440),
        row(2, 200, 430),
    ]  # the same candidate twice: 3.52x and 2.93x in-run
    assert pool_baseline(rows, recipe) == 440
    assert [round(r.speedup, 2) for r in rows] == [2.93, 2.93, 2.2]
    assert [r.speedup_same_run for r in rows] == [528 / 150, 440 / 150, 430 / 200]
    assert (
        not any(r.feasible for r in rows)
        and rows[0].checks["min_speedup"]["baseline"] == "pooled original p50"
    )
    assert pool_baseline(rows, recipe) == 440 and rows[0].speedup_same_run == 528 / 150  # idempotent


def test_trial_rows_are_typed_records_stored_as_the_same_json():
    """A row as tune.json stored it before rows were typed reads back as a TrialRow and writes the same keys."""
    from slimship.pipeline.search.state import Screened, TrialRow

    ok = {
        "trial": 2,
        "params": {"prune.channel_ratio": 0.25},
        "steps": [{"label": "prune", "pass": "prune", "status": "ran", "candidate": "/c", "id": "x"}],
        "candidate": "/c",
        "size_bytes": 1000,
        "macs": None,
        "macs_ratio": 1.0,
        "signature": "export",
        "status": "ok",
        "speedup": 2.5,
        "latency_ms_p50": 1.0,
        "original_latency_ms_p50": 2.5,
        "size_ratio": 4.0,
        "quality": 95.0,
        "quality_drop": 0.5,
        "fidelity": {"top1_agreement": 0.99},
        "feasible": True,
        "checks": {"max_quality_drop": {"limit": 1.0, "measured": 0.5, "holds": True}},
        "seconds": 3.2,
        "speedup_same_run": 2.4,
        "pareto": True,
    }
    row = TrialRow.from_json(ok)
    assert row.speedup == 2.5 and row.feasible and row.checks["max_quality_drop"]["holds"]
    assert row.to_json() == ok and list(row.to_json()) == list(ok)
    screened = {
        "trial": 3,
        "params": {},
        "steps": [],
        "candidate": "/d",
        "size_bytes": 10,
        "macs": 5,
        "macs_ratio": 2.0,
        "signature": "torch",
        "status": "screened",
        "screen": {"signal": "size", "measured": 3.0, "limit": 1.0},
        "seconds": 0.5,
    }
    row = TrialRow.from_json(screened)
    assert row.screen == Screened("size", 3.0, 1.0) and row.to_json() == screened
    failed = {"trial": 4, "params": {}, "steps": [], "status": "failed", "reason": "boom", "seconds": None}
    assert TrialRow.from_json(failed).to_json() == failed
    repeat = TrialRow.from_json(ok).repeat(7, {"prune.channel_ratio": 0.25})
    assert repeat.to_json() == {**ok, "trial": 7, "reused_from": 2}
    assert TrialRow.from_json({**failed, "some_future_key": 1}).reason == "boom"  # unknown keys are ignored
    # what the candidate runs on, recorded since the search chooses the runtime, round-trips too
    runs_on = {
        **ok,
        "format": "openvino",
        "runtime": "openvino",
        "precision": "int8",
        "deployment": {"runtime": "openvino", "cpu_class": "avx2"},
        "cpu_class": "avx2",
    }
    assert TrialRow.from_json(runs_on).to_json() == runs_on
