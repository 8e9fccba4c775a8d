"""`slimship tune --executor ray`: the search on Ray Tune, against a real local Ray instance on 127.0.0.1.

One Ray instance serves the module (2 CPUs, 100 MB object store, no dashboard, a short temp dir under /tmp
because Ray's socket paths have a length limit); it is shut down at the end. The searches run on `digits`
with few trials, so the module takes about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

from slimship.errors import ExecutorError
from tests.pipeline.bounded import call_within

# read once when Ray is first imported: with node IP 127.0.0.1, no Ray port listens on another interface
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip(
    "ray", reason="the Ray executor tests need the ray extra (scripts/bootstrap.sh dev installs it)"
)

# The objective is file size, not latency, so that the comparison with the local executor is exact: size and
# quality come from deterministic builds (seeded training, same thread count), while a latency objective
# feeds timing noise into the screening hints, the patience counter and the Pareto front. With size, the
# same seed must give the same proposals, the same rows and the same front.
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
  objective: size
  params:
    prune.channel_ratio: {choices: [0.25, 0.5]}
    quantize-dynamic.per_channel: {choices: [true, false]}
"""


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance bound to the loopback interface; yields its GCS address."""
    temp = tempfile.mkdtemp(prefix="sr-", dir="/tmp")
    info = ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        _temp_dir=temp,
        log_to_driver=True,
    )
    try:
        yield info.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(RECIPE).lstrip())
    return p


def _essence(result):
    """What must match between executors: proposals, outcome, deterministic measurements, the front."""
    return [
        (
            t["trial"],
            t["params"],
            t["status"],
            t.get("reused_from"),
            t.get("size_bytes"),
            t.get("quality"),
            t.get("pareto"),
        )
        for t in sorted(result["trials"], key=lambda t: t["trial"])
    ]


@pytest.mark.slow
def test_ray_search_gives_the_local_search_with_the_same_seed(ray_address, recipe, tmp_path):
    from slimship.pipeline.search import executor_for, tune_recipe

    # two CPUs per trial: the trial's training and timing use as many threads as the local executor does
    on_ray = tune_recipe(
        recipe, tmp_path / "ray", executor=executor_for("ray", seed=0, address=ray_address, trial_cpus=2)
    )
    local = tune_recipe(recipe, tmp_path / "local", executor=executor_for("local", seed=0))
    assert on_ray["executor"] == "ray" and local["executor"] == "local"
    assert _essence(on_ray) == _essence(local)
    assert [t for t in on_ray["trials"] if t.get("pareto")] and on_ray["stopped"] == local["stopped"]
    assert set(on_ray["trials"][0]) == set(local["trials"][0])  # same row structure
    assert (on_ray["best"] or {}).get("trial") == (local["best"] or {}).get("trial")
    assert json.loads((tmp_path / "ray" / "tune.json").read_text())["schema"] == "slimship.tune/1"
    assert (tmp_path / "ray" / "report.html").exists()
    assert any((tmp_path / "ray" / "ray").iterdir())  # Ray Tune's experiment state went to the storage path


@pytest.mark.slow
def test_a_trial_whose_worker_dies_is_retried_or_recorded_failed_and_the_search_goes_on(
    ray_address, recipe, tmp_path, monkeypatch
):
    from slimship.pipeline.search import executor_for, tune_recipe

    out = tmp_path / "t"
    marker = tmp_path / "exited"
    # trial 1's worker exits abruptly once, after building its steps: Ray Tune restarts it and it completes
    monkeypatch.setenv("SLIMSHIP_TUNE_EXIT_ONCE", f"1:{marker}")
    result = tune_recipe(
        recipe, out, trials=2, executor=executor_for("ray", address=ray_address, max_failures=1)
    )
    assert marker.exists()  # the worker did die
    assert [t["status"] for t in result["trials"]] == ["ok", "ok"]
    # trial 0's worker dies every time and no restart is allowed: recorded as failed, trial 1 still runs
    monkeypatch.setenv("SLIMSHIP_TUNE_EXIT_ONCE", "0:always")
    result = tune_recipe(
        recipe, out, trials=2, executor=executor_for("ray", address=ray_address, max_failures=0)
    )
    rows = {t["trial"]: t for t in result["trials"]}
    assert rows[0]["status"] == "failed" and "Ray trial failed 1 time(s)" in rows[0]["reason"], rows[0]
    assert rows[1]["status"] == "ok" and result["evaluations"] == 2


def test_ray_binds_to_loopback_only(ray_address):
    import psutil

    me = psutil.Process()
    pids = {p.pid for p in me.children(recursive=True)}
    listening = [
        c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert listening, "no Ray process listens (is the fixture's instance running?)"
    assert {c.laddr.ip for c in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


def test_trial_resources_no_node_can_hold_are_refused_up_front(ray_address, recipe, tmp_path):
    from slimship.pipeline.search import executor_for, tune_recipe

    with pytest.raises(
        ExecutorError,
        match=r"each trial asks for 64 CPUs .* the largest node .* has 2 .* --trial-cpus 2 or less",
    ):
        call_within(
            60,
            "refusing a trial no node can hold (it must be refused up front, not left PENDING)",
            lambda: tune_recipe(
                recipe, tmp_path / "t", executor=executor_for("ray", address=ray_address, trial_cpus=64)
            ),
        )


def _cli(*args: str, prelude: str = "", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    code = f"{prelude}\nimport sys\nfrom slimship.cli import main\nsys.argv = ['slimship', *{list(args)!r}]\nmain()"
    env = {**os.environ, "COLUMNS": "200"}
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as err:  # the child was killed
        pytest.fail(
            f"slimship {' '.join(args)} did not finish within {timeout:g} s (killed it); stderr:\n{err.stderr}"
        )


def test_cli_connects_to_the_address_and_refuses_what_it_cannot_place(ray_address, recipe, tmp_path):
    proc = _cli(
        "tune",
        str(recipe),
        "-o",
        str(tmp_path / "t"),
        "--executor",
        "ray",
        "--address",
        ray_address,
        "--trial-cpus",
        "64",
    )
    assert proc.returncode == 2, proc.stderr
    assert f"connecting to the Ray cluster at {ray_address}" in proc.stderr
    assert "each trial asks for 64 CPUs" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unreachable_address_fails_fast_naming_it(recipe, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli(  # it must fail fast: ray.init alone would wait for minutes on a dead address
        "tune",
        str(recipe),
        "-o",
        str(tmp_path / "t"),
        "--executor",
        "ray",
        "--address",
        f"127.0.0.1:{port}",
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        f"can't reach the Ray cluster at 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_a_malformed_address_is_a_config_error():
    from slimship.errors import ConfigError
    from slimship.pipeline.search import executor_for

    with pytest.raises(
        ConfigError, match=r"--address 'http://head' is not a Ray address; expected host:port"
    ):
        executor_for("ray", address="http://head")


def test_without_ray_installed_the_message_names_the_extra(recipe, tmp_path):
    block = "import sys\nfor m in ('ray', 'ray.tune', 'ray.tune.search.optuna'):\n    sys.modules[m] = None  # import fails"
    proc = _cli("tune", str(recipe), "-o", str(tmp_path / "t"), "--executor", "ray", prelude=block)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'slimship[ray]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()  # refused before anything ran
