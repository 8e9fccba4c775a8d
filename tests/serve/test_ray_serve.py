"""`slimship serve --ray` beyond the protocol suite (which test_protocol.py runs against it too): it listens on
127.0.0.1 only; a replica killed under load costs at most its in-flight requests (retried or 503, never a hang) and
the deployment recovers; rollouts
and admin loads work the same; bad input — an unreachable address, Ray missing, replicas the cluster can't place —
is a clear error. Each server starts its own Ray instance on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serve.conftest import ServerProcess, wait_for
from tests.serve.test_rollout import POLICY, _bodies

pytestmark = pytest.mark.ray

ADMIN = "adm1n-t0ken"
H = {"Authorization": f"Bearer {ADMIN}"}


def _replica_pids(app: str) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if f"ServeReplica:{app}:" in line}


@pytest.mark.slow
def test_killing_a_replica_under_load_loses_at_most_its_requests_and_recovers(tmp_path, digits, digits_chain):
    _, exp, _ = digits_chain
    cfg = {
        "models": [
            {
                "name": "digits",
                "path": str(exp.artifact_path),
                "version": "1",
                "replicas": {"num_replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": 16},
            }
        ]
    }
    s = ServerProcess(tmp_path, cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN}, args=("--ray",), ready_timeout=240)
    bodies = _bodies(digits)
    results: list[tuple[int | str, float]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=f"http://{s.url}", timeout=30) as c:
            k = i
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/v2/models/digits/infer", json=bodies[k % len(bodies)])
                    results.append((r.status_code, time.monotonic() - t0))
                except httpx.HTTPError as err:  # a hang would end here, after 30 s
                    results.append((type(err).__name__, time.monotonic() - t0))
                k += 4

    try:
        pids = wait_for(
            lambda: len(p := _replica_pids("slimship-digits-v1")) == 2 and p, 60, what="two replicas"
        )
        # every port of the deployment — Serve's HTTP proxy, replicas, GCS, raylet — is on the loopback interface
        import psutil

        tree = {s.proc.pid} | {c.pid for c in psutil.Process(s.proc.pid).children(recursive=True)}
        assert pids <= tree
        listening = [
            c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in tree
        ]
        assert any(c.laddr.port == s.port for c in listening)
        assert {c.laddr.ip for c in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) > 200, 60, what="load")
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = len(results)
        wait_for(lambda: len(results) > killed_at + 300, 120, what="requests after the kill")
        # Serve replaces the replica; requests keep succeeding on the survivor meanwhile
        new = wait_for(
            lambda: len(p := _replica_pids("slimship-digits-v1")) == 2 and victim not in p and p,
            120,
            what="a replacement replica",
        )
        n_recovered = len(results)
        wait_for(lambda: len(results) > n_recovered + 100, 60, what="requests after recovery")
        stop.set()
        for t in threads:
            t.join(timeout=60)
        statuses = [r for r, _ in results]
        assert set(statuses) <= {200, 503}, {x for x in statuses if x not in (200, 503)}
        assert statuses.count(503) <= 16, statuses.count(
            503
        )  # at most the killed replica's in-flight requests
        assert max(t for _, t in results) < 30  # nobody hung
        assert all(r == 200 for r, _ in results[n_recovered:])
        assert len(new - pids) == 1
    finally:
        stop.set()
        s.stop()


@pytest.mark.slow
def test_rollout_and_admin_load_on_ray(tmp_path, digits, digits_chain):
    from slimship.registry import Registry

    _, exp, opt = digits_chain
    reg = Registry(tmp_path / "reg")
    reg.register(exp.path, "digits", stage="production")
    reg.register(opt.path, "digits", parent=1)
    reg.register(opt.path, "digits", parent=1)
    reg.close()
    small = {"replicas": {"num_cpus": 0.5}}
    cfg = {
        "registry": str(tmp_path / "reg"),
        "models": [{"name": "digits", "registry": v, **small} for v in "12"],
    }
    s = ServerProcess(tmp_path, cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN}, args=("--ray",), ready_timeout=240)
    base = f"http://{s.url}"
    stop = threading.Event()
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            k = 0
            while not stop.is_set():
                statuses.append(c.post("/v2/models/digits/infer", json=_bodies(digits)[k % 64]).status_code)
                k += 1

    try:
        r = httpx.post(
            f"{base}/v2/admin/models/digits/rollout", json={"candidate": "2", "policy": POLICY}, headers=H
        )
        assert r.status_code == 200, r.text
        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        st = wait_for(
            lambda: (
                (x := httpx.get(f"{base}/v2/admin/models/digits/rollout", headers=H).json())["state"]
                != "running"
                and x
            ),
            180,
            every=0.5,
            what="the rollout to end",
        )
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert st["state"] == "promoted", st
        assert set(statuses) == {200}
        metrics = httpx.get(f"{base}/metrics").text
        assert (
            'slimship_batch_size_count{model="digits",version="2"}' in metrics
        )  # shipped back from the replicas
        # a version loaded at run time becomes its own Serve application, and goes away on unload
        r = httpx.post(
            f"{base}/v2/admin/models/digits/load",
            json={"registry": "3", "replicas": {"num_replicas": 9}},
            headers=H,
        )
        assert (
            r.status_code == 400 and "9 replicas" in r.json()["error"]
        )  # refused before anything is deployed
        # v1 and v2 hold 1 of the local instance's 2 CPUs: a version needing more than the free one is refused
        r = httpx.post(
            f"{base}/v2/admin/models/digits/load",
            json={"registry": "3", "replicas": {"num_cpus": 1.5}},
            headers=H,
            timeout=60,
        )
        assert (
            r.status_code == 409 and "only 1 of this local Ray instance's 2 are free" in r.json()["error"]
        ), r.text
        # one that isn't up in time is removed, and the load says so (a replica that never starts can't hang it)
        t0 = time.monotonic()
        r = httpx.post(
            f"{base}/v2/admin/models/digits/load",
            json={"registry": "3", "replicas": {"num_cpus": 0.5, "start_timeout_s": 0.05}},
            headers=H,
            timeout=120,
        )
        assert r.status_code == 503 and "was not up within 0.05 s" in r.json()["error"], r.text
        assert time.monotonic() - t0 < 60
        assert "digits" in httpx.get(f"{base}/v2/models/digits").text  # the served versions are untouched
        wait_for(lambda: not _replica_pids("slimship-digits-v3"), 60, what="the timed-out v3 to go")
        r = httpx.post(
            f"{base}/v2/admin/models/digits/load",
            json={"registry": "3", "replicas": {"num_cpus": 0.5}},
            headers=H,
            timeout=180,  # a new replica process imports ONNX Runtime: seconds on busy cores
        )
        assert r.status_code == 200, r.text
        assert _replica_pids("slimship-digits-v3")
        r = httpx.post(f"{base}/v2/models/digits/versions/3/infer", json=_bodies(digits, 1)[0])
        assert r.status_code == 200 and r.headers["x-model-version"] == "3"
        assert httpx.post(f"{base}/v2/admin/models/digits/versions/3/unload", headers=H).status_code == 200
        wait_for(lambda: not _replica_pids("slimship-digits-v3"), 60, what="the v3 application to go")
    finally:
        stop.set()
        s.stop()


def _serve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimship.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_ray_bad_input_is_a_clear_error(digits_chain):
    _, exp, _ = digits_chain
    model = f"digits={exp.artifact_path}"
    out = _serve("--ray", "--address", "127.0.0.1:9", "-m", model, "--port", "0", timeout=60)
    err = " ".join(out.stderr.split())
    assert (
        out.returncode == 2 and "can't reach the Ray cluster at 127.0.0.1:9" in err and "Traceback" not in err
    ), err
    # Ray not installed: the message names the extra
    code = (
        "import sys; sys.modules['ray'] = None; sys.argv = ['slimship', 'serve', '--ray', '-m', %r, '--port', '0']; "
        "from slimship.cli import main; main()" % model
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    err = " ".join(out.stderr.split())
    assert out.returncode == 2 and "pip install 'slimship[ray]'" in err, err
    # more replicas than the local instance's 2 CPUs can place: refused up front, nothing left running
    out = _serve("--ray", "--replicas", "5", "-m", model, "--port", "0")
    err = " ".join(out.stderr.split())
    assert out.returncode == 2 and "5 replicas × 1 CPUs = 5 CPUs" in err and "has 2" in err, err
    # --address without --ray
    out = _serve("--address", "auto", "-m", model, "--port", "0", timeout=60)
    assert out.returncode == 2 and "only apply with --ray" in " ".join(out.stderr.split())


def test_queue_depth_under_load_shows_in_admin_state_and_dashboard(tmp_path, models):
    """Requests waiting for a version on Ray (sent by the ingress, not yet answered by a replica) are its queue:
    under load the admin state and the dashboard show them, and they go back to 0 once the load stops."""
    cfg = {
        "models": [
            {
                "name": "slow",
                "path": models["slow"],
                "batching": {"max_batch_size": 1},
                "replicas": {"num_cpus": 1, "max_ongoing_requests": 2},
            }
        ]
    }
    s = ServerProcess(tmp_path, cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN}, args=("--ray",), ready_timeout=240)
    base = f"http://{s.url}"
    body = {"inputs": [{"name": "x", "shape": [1, 2048], "datatype": "FP32", "data": [0.5] * 2048}]}
    stop = threading.Event()
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            while not stop.is_set():
                statuses.append(c.post("/v2/models/slow/infer", json=body).status_code)

    def queue() -> tuple[int, int]:
        admin = httpx.get(f"{base}/v2/admin/models", headers=H).json()["models"]["slow"]["versions"]["1"]
        dash = httpx.get(f"{base}/v2/dashboard/state").json()["models"][0]["versions"][0]
        return admin["queue"], dash["queue"]

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(statuses) >= 5, 120, what="the load to start")
        seen = wait_for(lambda: min(q := queue()) >= 2 and q, 60, every=0.1, what="a queue under load")
        assert max(seen) <= 8  # never more than the clients sending
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert set(statuses) == {200}
        wait_for(lambda: queue() == (0, 0), 30, what="the queue to drain")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)  # before the server goes, so no client meets a closed connection
        s.stop()
