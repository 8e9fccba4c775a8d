"""Shared fixtures. Everything runs on real models and data that ship inside packages.

Trained references and reference outputs are cached in .cache/test (gitignored) so a second run
of the suite reuses them; a clean clone trains mnist/digits once (~20 s) and caches minilm outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
os.environ.setdefault("SLIMSHIP_CACHE_DIR", str(ROOT / ".cache" / "test"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    # Tests run `_WORKERS` at once: each gets its share of the cores. Two 2-thread ONNX Runtime / PyTorch pools on
    # 2 cores mostly wait for each other (and spin), so the suite gained only 1.1x from 2 workers without this.
    # Inherited by every subprocess (CLI runs, servers, Ray workers); a test that sets threads itself still wins.
    import psutil

    _share = str(max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 1) // _WORKERS))
    os.environ.setdefault("SLIMSHIP_THREADS", _share)
    os.environ.setdefault("OMP_NUM_THREADS", _share)


@pytest.fixture(scope="session")
def digits():
    from slimship.workload import resolve_workload

    return resolve_workload("digits")


def _chain(workload, root):
    """original → exported → optimized."""
    from slimship.candidate import original_candidate
    from slimship.passes import export, optimize_graph

    orig = original_candidate(workload, root / "original")
    exp = export(orig, workload, out_dir=root / "exported")
    opt = optimize_graph(exp, workload, out_dir=root / "optimized")
    return orig, exp, opt


@pytest.fixture(scope="session")
def digits_chain(digits, tmp_path_factory):
    return _chain(digits, tmp_path_factory.mktemp("digits-chain"))


@pytest.fixture(scope="session")
def mnist():
    from slimship.workload import resolve_workload

    return resolve_workload("mnist")


@pytest.fixture(scope="session")
def mnist_exported(mnist, tmp_path_factory, worker_id):
    """(original, exported) mnist, built once per run: test_export checks the export on every test image,
    test_quantize and test_executorch start from it."""
    from slimship.candidate import original_candidate
    from slimship.passes import export

    def build(root):
        orig = original_candidate(mnist, root / "original")
        return orig, export(orig, mnist, out_dir=root / "exported")

    return _once_per_run(tmp_path_factory, worker_id, "mnist-exported", build, ("original", "exported"))


@pytest.fixture(scope="session")
def minilm():
    from slimship.workload import resolve_workload

    return resolve_workload("minilm")


def _once_per_run(tmp_path_factory, worker_id, name, build, names):
    """``build(root)`` once per test run, not once per xdist worker: the first worker to need it builds it from this
    checkout's code under a lock in the run's shared temp directory; another worker loads the candidate directories
    ``root / n`` for ``n`` in ``names`` (nothing may write into them). Without xdist: built as usual."""
    if worker_id == "master":
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    from slimship.candidate import load_candidate

    root = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{root}.lock"):
        done = root / "built"
        if not done.exists():
            built = build(root)
            done.touch()
            return built
    return tuple(load_candidate(root / n) for n in names)


@pytest.fixture(scope="session")
def minilm_original(minilm, tmp_path_factory, worker_id):
    """The original MiniLM candidate (~10 s idle), built once per run: minilm_chain, test_prune, test_compress."""
    from slimship.candidate import original_candidate

    (orig,) = _once_per_run(
        tmp_path_factory,
        worker_id,
        "minilm-original",
        lambda root: (original_candidate(minilm, root / "original"),),
        ("original",),
    )
    return orig


@pytest.fixture(scope="session")
def minilm_chain(minilm, minilm_original, tmp_path_factory, worker_id):
    """original → exported → optimized MiniLM (~50 s idle after the original), built once per run."""
    from slimship.passes import export, optimize_graph

    def build(root):
        exp = export(minilm_original, minilm, out_dir=root / "exported")
        return exp, optimize_graph(exp, minilm, out_dir=root / "optimized")

    exp, opt = _once_per_run(tmp_path_factory, worker_id, "minilm-chain", build, ("exported", "optimized"))
    return minilm_original, exp, opt


@pytest.fixture(scope="session")
def minilm_int8(minilm, minilm_chain, tmp_path_factory, worker_id):
    """The optimized MiniLM through quantize-dynamic with its default config (per-channel INT8), built once per run:
    test_quantize checks its size and fidelity, the rollout test promotes it."""
    from slimship.passes import run_pass

    (int8,) = _once_per_run(
        tmp_path_factory,
        worker_id,
        "minilm-int8",
        lambda root: (run_pass("quantize-dynamic", minilm_chain[2], minilm, {}, root / "int8"),),
        ("int8",),
    )
    return int8


# Ray runs its workers at nice 15 by default: with `-n 2` the other pytest worker would starve every Ray trial and
# replica (measured: tests/pipeline/test_tune_ray.py took 445 s beside it). Ray tests get their fair share instead;
# inherited by every Ray instance and `serve --ray` process the tests start
os.environ.setdefault("RAY_worker_niceness", "0")

#: files that start a local Ray instance (or a `serve --ray` process): under pytest-xdist they form one group that
#: runs on one worker, one test after another — two Ray instances on 2 cores starve each other
RAY_FILES = frozenset({"test_ray_serve.py", "test_tune_ray.py", "test_ray_ingress.py", "test_protocol.py"})


def _xdist_scope(nodeid: str) -> str:
    """The unit a worker runs whole under ``-n 2``: a test file, and every Ray file together."""
    path = nodeid.split("::", 1)[0]
    return "ray" if Path(path).name in RAY_FILES else path


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`-n 2`): a file's tests stay on one worker (its module-scoped servers and models are built
    once), and every Ray file shares one unit. Not ``--dist loadgroup``: xdist 3.8 marks a group by appending it to
    ``item._nodeid``, which pytest 9 no longer reads, so its groups silently fall apart (measured: two Ray tests ran
    at once on the two workers)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileAndRayScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_scope(nodeid)

    return FileAndRayScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The Ray unit is the longest (several minutes on one worker): collected first, so a worker starts it at once
    and the other takes the rest beside it instead of one worker running it alone at the end."""
    ray = [i for i in items if _xdist_scope(i.nodeid) == "ray"]
    ids = {id(i) for i in ray}
    items[:] = ray + [i for i in items if id(i) not in ids]


#: a test that takes longer than this without the `slow` marker is listed at the end of the run, so the marker stays
#: honest (`-m "not slow"` is the quick local loop)
SLOW_S = 30.0


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    unmarked = []
    for rep in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        if rep.when == "call" and rep.duration > SLOW_S and "slow" not in rep.keywords:
            unmarked.append(f"{rep.duration:.0f}s {rep.nodeid}")
    durations: dict[str, float] = {}
    for key in ("passed", "failed", ""):  # "" holds the setup and teardown reports of passing tests
        for rep in terminalreporter.stats.get(key, []):
            if not hasattr(rep, "duration"):
                continue
            durations[rep.nodeid] = durations.get(rep.nodeid, 0.0) + rep.duration  # setup + call + teardown
    if (
        len(durations) > 50
    ):  # a full run: where the suite's time goes, so the next speed-up starts from figures
        top = sorted(durations.items(), key=lambda kv: -kv[1])[:15]
        terminalreporter.write_line(
            f"slowest 15 of {len(durations)} tests (setup + call + teardown; {sum(durations.values()):.0f} s in all):"
        )
        for nodeid, seconds in top:
            terminalreporter.write_line(f"  {seconds:6.1f}s {nodeid}")
    if unmarked:
        terminalreporter.write_line(
            f"tests over {SLOW_S:g} s without @pytest.mark.slow (mark them or speed them up):"
        )
        for line in sorted(unmarked, reverse=True):
            terminalreporter.write_line(f"  {line}")
