"""Everyday rough edges, each found by a user: every test here failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import FIXTURES
from tests.fixtures import foreign_onnx
from tests.test_cli import slimship

COUNTING_FACTORY = """
import pathlib
import numpy as np
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


def build():
    with open(pathlib.Path(__file__).with_suffix(".calls"), "a") as fh:
        fh.write("x")
    torch.manual_seed(0)
    net = Net().eval()
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    return {"model": net, "example_inputs": {"x": x}}
"""


def test_a_verb_says_which_built_in_workload_it_defaulted_to(tmp_path):
    model, _ = foreign_onnx.write(tmp_path)
    proc = slimship("prune", str(model), check=False)  # fails fast: prune takes PyTorch models
    assert "workload: mnist (the default of `slimship prune`" in proc.stderr
    explicit = slimship("prune", str(model), "-w", "digits", check=False)
    assert "the default of" not in explicit.stderr


def test_size_ratios_are_worded_both_ways():
    from slimship.report.summary import size_ratio_words

    assert size_ratio_words(4.0) == "4.00x smaller"
    assert size_ratio_words(0.82) == "1.22x larger"  # was "0.82x smaller"
    assert size_ratio_words(0.98, than="its parent") == "1.02x larger than its parent"
    assert size_ratio_words(1.001, than="its parent") == "the same size as its parent"


def test_factory_build_runs_once_per_process_and_again_when_the_file_changes(tmp_path):
    from slimship.workload import resolve_workload

    factory = tmp_path / "counting.py"
    factory.write_text(COUNTING_FACTORY)
    calls = tmp_path / "counting.calls"
    for _ in range(3):
        w = resolve_workload(f"{factory}:build")
    assert calls.read_text() == "x"
    assert w.build_model() is not w.build_model()  # each caller gets its own copy of the cached model
    factory.write_text(COUNTING_FACTORY + "\n# edited\n")
    resolve_workload(f"{factory}:build")
    assert calls.read_text() == "xx"


def test_recipe_paths_are_resolved_beside_the_recipe(tmp_path, monkeypatch):
    from slimship.pipeline.recipe import load_recipe
    from slimship.workload import resolve_workload

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(FIXTURES / "factories.py", project / "net_factory.py")
    model, data = foreign_onnx.write(project / "onnx")
    (project / "factory.yaml").write_text(
        textwrap.dedent("""\
            workload: net_factory.py:build
            passes:
              - pass: export
        """)
    )
    (project / "onnx.yaml").write_text(
        textwrap.dedent("""\
            workload: onnx/model.onnx
            data: onnx/inputs.npz
            passes:
              - pass: optimize
        """)
    )
    monkeypatch.chdir(
        tmp_path
    )  # not the recipe's directory: was "factory file net_factory.py does not exist"
    recipe = load_recipe("project/factory.yaml")
    assert recipe.workload == f"{(project / 'net_factory.py').resolve()}:build"
    assert resolve_workload(recipe.workload).inputs[0].name == "features"
    onnx_recipe = load_recipe(project / "onnx.yaml")
    assert onnx_recipe.workload == str(model.resolve()) and onnx_recipe.data == str(data.resolve())
    assert load_recipe(FIXTURES.parent.parent / "examples" / "recipes" / "mnist.yaml").workload == "mnist"


@pytest.fixture(scope="module")
def foreign_workload(tmp_path_factory):
    from slimship.workload import resolve_workload

    model, data = foreign_onnx.write(tmp_path_factory.mktemp("bench-foreign"))
    return model, resolve_workload(str(model), data=data)


def test_bench_of_a_plain_onnx_file_measures_memory_and_records_the_load(foreign_workload):
    from tests.test_cli import slimship as run

    model, _ = foreign_workload
    out = model.parent / "bench.json"
    proc = run(
        "bench", f"file={model}", "-w", str(model), "--data", str(model.parent / "inputs.npz"),
        "-b", "1", "--json-out", str(out),
    )  # fmt: skip
    assert "Traceback" not in proc.stdout + proc.stderr and "memory probe" not in proc.stdout
    result = json.loads(out.read_text())
    (entry,) = result["candidates"]
    assert (
        entry["memory"]["peak_rss_mb"] > 0
    )  # the probe child got the file and the batch, not a candidate dir
    row = entry["results"][0]
    assert {"loadavg_1m_before", "loadavg_1m_after", "other_processes_cores"} <= set(row["machine_load"])
    assert result["load"]["1"] == row["machine_load"] and isinstance(result["warnings"], list)


def test_a_failing_memory_probe_keeps_the_timings_and_shows_no_child_traceback(tmp_path):
    from slimship.candidate import original_candidate
    from slimship.measure.bench import BenchTarget, bench
    from slimship.workload import resolve_workload

    factory = tmp_path / "moved.py"
    factory.write_text(COUNTING_FACTORY)
    w = resolve_workload(f"{factory}:build")
    orig = original_candidate(w, tmp_path / "original")
    factory.unlink()  # the probe child (a fresh process) can no longer rebuild the PyTorch model
    result = bench(
        [BenchTarget("torch", orig, "torch")], w, batch_sizes=(1,), runs=30, progress=False, min_seconds=0.05
    )
    (entry,) = result["candidates"]
    assert entry["results"][0]["runs"] >= 30  # the timings survive
    assert "does not exist" in entry["memory"]["error"] and "Traceback" not in entry["memory"]["error"]
    assert any("memory probe" in warning and "timings are kept" in warning for warning in result["warnings"])


def test_bench_warns_when_other_processes_compete(foreign_workload, tmp_path):
    from slimship.candidate import original_candidate
    from slimship.measure.bench import BenchTarget, bench

    _, w = foreign_workload
    orig = original_candidate(w, tmp_path / "original")
    # a busy loop that is not our child (the shell exits, the loop is re-parented): a neighbour, not us
    spawn = subprocess.run(
        ["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    busy = int(spawn.stdout.strip())
    try:
        result = bench(
            [BenchTarget("a", orig, "onnxruntime")],
            w,
            batch_sizes=(1,),
            runs=30,
            threads=1,
            memory=False,
            progress=False,
            min_seconds=1.0,
        )
    finally:
        os.kill(busy, signal.SIGKILL)
    load = result["load"][1]
    assert load["other_processes_cores"] >= 0.5
    assert load["busiest_others"] and all(b["cores"] > 0 for b in load["busiest_others"])
    assert any("other processes used" in warning for warning in result["warnings"])
