"""report.html of a search and of a run, loaded in a real headless Chromium: it renders offline with no console
errors, shows the summary, the Pareto plot and every candidate; a screenshot is kept beside it."""

from __future__ import annotations

import textwrap

import pytest

from slimship.pipeline.runner import run_recipe
from slimship.pipeline.search import tune_recipe
from tests.browser import not_blank, render

TUNE = """
version: 1
workload: digits
passes:
  - pass: prune
    config: {{channel_ratio: 0.25, finetune: {{epochs: 1}}, verify_export: false}}
  - pass: export
  - pass: quantize-dynamic
constraints:
  max_quality_drop: {drop}
search:
  trials: 3
  batch_size: 8
  screen: null
  params:
    prune.channel_ratio: {{choices: [0.25, 0.5]}}
    quantize-dynamic.per_channel: {{choices: [true, false]}}
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-report")
    p = root / "r.yaml"
    p.write_text(textwrap.dedent(TUNE.format(drop=40)).lstrip())
    return tune_recipe(p, root / "out"), root / "out"


@pytest.mark.slow
def test_tune_report_renders_in_chromium(tuned, tmp_path):
    result, out = tuned
    page = render(
        (out / "report.html").as_uri(), tmp_path / "tune.png", selectors=("#summary", "svg", "table tr")
    )
    assert page.console_errors == [] and page.page_errors == []
    assert all(u.startswith(("file:", "data:")) for u in page.requests), page.requests  # nothing fetched
    assert "fastest within budget: trial" in page.text and "x faster than the original" in page.text
    assert page.counts["svg"] >= 1
    best = result["best"]
    assert f"trial {best['trial']}" in page.text
    # every trial is a row of the candidate table
    for t in result["trials"]:
        assert str(t["params"]["prune.channel_ratio"]) in page.text
    assert "Pareto front" in page.text and "Reproduce" in page.text and "slimship tune" in page.text
    assert not_blank(page.screenshot) > 0.05


def test_tune_report_says_when_nothing_meets_the_constraints(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        textwrap.dedent(TUNE.format(drop=0.0))
        .lstrip()
        .replace("max_quality_drop: 0.0", "max_quality_drop: 0.0\n  max_size_mb: 0.001")
    )
    result = tune_recipe(p, tmp_path / "out", trials=2)
    assert result["best"] is None
    assert all(r["status"] == "screened" and r["screen"]["signal"] == "size" for r in result["trials"])
    page = render((tmp_path / "out" / "report.html").as_uri(), tmp_path / "none.png")
    assert page.console_errors == [] and page.page_errors == []
    assert "No candidate met the constraints" in page.text


def test_run_report_renders_in_chromium(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        "workload: digits\npasses:\n  - pass: export\n  - pass: quantize-dynamic\n"
        "constraints: {max_quality_drop: 5}\n"
    )
    run_recipe(p, tmp_path / "run")
    page = render((tmp_path / "run" / "report.html").as_uri(), tmp_path / "run.png", selectors=("svg",))
    assert page.console_errors == [] and page.page_errors == []
    assert (
        "constraints hold" in page.text
        and "What each pass did" in page.text
        and "quantized nodes" in page.text
    )
    assert page.counts["svg"] == 1 and not_blank(page.screenshot) > 0.05
