"""Traffic between versions (A/B, sticky, shadow), hot swaps under load, overload, timeouts, graceful shutdown
and the inference token — each against a real server process on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from slimship.serve.compare import HEURISTIC
from tests.serve.conftest import ServerProcess

ADMIN = "adm1n-t0ken"
H = {"Authorization": f"Bearer {ADMIN}"}
X = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
SLOW = {"inputs": [{"name": "x", "shape": [1, 2048], "datatype": "FP32", "data": [0.1] * 2048}]}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    cfg = {
        "models": [
            {"name": "digits", "path": models["digits_v1"], "version": "1"},
            {"name": "digits", "path": models["digits_v2"], "version": "2"},
        ]
    }
    s = ServerProcess(tmp_path_factory.mktemp("traffic"), cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN})
    yield s
    s.stop()


def _traffic(server, model, body):
    r = httpx.put(f"http://{server.url}/v2/admin/models/{model}/traffic", json=body, headers=H)
    assert r.status_code == 200, r.text
    return r.json()


def test_ab_split_follows_the_weights(server):
    _traffic(server, "digits", {"weights": {"1": 70, "2": 30}})
    seen = {"1": 0, "2": 0}
    with httpx.Client(base_url=f"http://{server.url}") as c:
        for _ in range(2000):
            r = c.post("/v2/models/digits/infer", json=X)
            assert r.status_code == 200
            seen[r.headers["x-model-version"]] += 1
    share = seen["1"] / 2000 * 100
    assert abs(share - 70) <= 3, seen


def test_sticky_key_never_changes_variant(server):
    _traffic(server, "digits", {"weights": {"1": 50, "2": 50}, "sticky_header": "x-user"})
    per_user: dict[str, set[str]] = {}
    with httpx.Client(base_url=f"http://{server.url}") as c:
        for _ in range(10):
            for u in range(60):
                r = c.post("/v2/models/digits/infer", json=X, headers={"x-user": f"user-{u}"})
                per_user.setdefault(f"user-{u}", set()).add(r.headers["x-model-version"])
    assert all(len(v) == 1 for v in per_user.values())
    counts = [sum(1 for v in per_user.values() if v == {ver}) for ver in ("1", "2")]
    assert min(counts) >= 15, counts  # users land on both variants


def test_traffic_naming_an_unloaded_version_is_refused(server):
    r = httpx.put(
        f"http://{server.url}/v2/admin/models/digits/traffic", json={"weights": {"7": 1}}, headers=H
    )
    assert r.status_code == 400 and "aren't loaded" in r.json()["error"]
    r = httpx.put(
        f"http://{server.url}/v2/admin/models/digits/traffic",
        json={"weights": {"1": 1}, "bogus": 1},
        headers=H,
    )
    assert r.status_code == 400 and "invalid body" in r.json()["error"]


def test_shadow_mirrors_traffic_and_records_fidelity(server):
    _traffic(server, "digits", {"weights": {"1": 1}, "shadow": {"version": "2", "fraction": 1.0}})
    with httpx.Client(base_url=f"http://{server.url}") as c:
        versions = {c.post("/v2/models/digits/infer", json=X).headers["x-model-version"] for _ in range(60)}
    assert versions == {"1"}  # clients are answered by the primary only
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = (
            httpx.get(f"http://{server.url}/v2/admin/models", headers=H)
            .json()["models"]["digits"]["shadow"]
            .get("2", {})
        )
        if st.get("pairs", 0) >= 60:
            break
        time.sleep(0.05)
    assert st["pairs"] >= 60 and st["errors"] == 0
    assert st["judged_by"] == {HEURISTIC: st["pairs"]}  # bare ONNX files: no workload to judge with
    assert st["fidelity_mean"] == pytest.approx(1.0) and st["fidelity_min"] == pytest.approx(
        1.0
    )  # v2 is the same model
    metrics = httpx.get(f"http://{server.url}/metrics").text
    assert 'slimship_shadow_fidelity_count{model="digits",primary="1",shadow="2"}' in metrics
    _traffic(server, "digits", {"weights": {}})


def test_hot_swap_twenty_times_under_load_fails_no_request(server, models):
    _traffic(server, "digits", {"weights": {}})
    stop = threading.Event()
    results: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=f"http://{server.url}", timeout=30) as c:
            while not stop.is_set():
                results.append(c.post("/v2/models/digits/infer", json=X).status_code)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        with httpx.Client(base_url=f"http://{server.url}", headers=H, timeout=60) as admin:
            current = ["1", "2"]
            for i in range(20):
                new = str(10 + i)
                r = admin.post(
                    "/v2/admin/models/digits/load",
                    json={"path": models["digits_v1" if i % 2 else "digits_v2"], "version": new},
                )
                assert r.status_code == 200, r.text
                assert (
                    admin.put("/v2/admin/models/digits/traffic", json={"weights": {new: 1}}).status_code
                    == 200
                )
                for old in current:
                    assert admin.post(f"/v2/admin/models/digits/versions/{old}/unload").status_code == 200
                current = [new]
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert len(results) > 200 and set(results) == {200}, {s: results.count(s) for s in set(results)}
    meta = httpx.get(f"http://{server.url}/v2/models/digits").json()
    assert meta["versions"] == ["29"]


@pytest.fixture(scope="module")
def slow_server(models, tmp_path_factory):
    cfg = {
        "models": [
            {
                "name": "slow",
                "path": models["slow"],
                "batching": {"max_batch_size": 1, "max_queue": 4, "timeout_s": 20},
            },
            {
                "name": "slow",
                "path": models["slow"],
                "version": "2",
                "batching": {"max_batch_size": 1, "timeout_s": 0.001},
            },
        ]
    }
    s = ServerProcess(tmp_path_factory.mktemp("slow"), cfg, env={"SLIMSHIP_TOKEN": "infer-token"})
    yield s
    s.stop()


def _slow_post(server, version="1", token="infer-token"):
    t0 = time.perf_counter()
    r = httpx.post(
        f"http://{server.url}/v2/models/slow/versions/{version}/infer",
        json=SLOW,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    return r, time.perf_counter() - t0


def test_overload_gets_fast_503s_never_500_and_every_accepted_request_is_answered(slow_server):
    with cf.ThreadPoolExecutor(40) as pool:
        out = list(pool.map(lambda _: _slow_post(slow_server), range(40)))
    codes = [r.status_code for r, _ in out]
    assert set(codes) <= {200, 503} and codes.count(503) >= 10 and codes.count(200) >= 4, codes
    rejected = [(r, t) for r, t in out if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "1" and "overloaded" in r.json()["error"] for r, _ in rejected)
    accepted_max = max(t for r, t in out if r.status_code == 200)
    assert np.median([t for _, t in rejected]) < accepted_max  # refused at once, not after waiting
    for r, _ in out:
        if r.status_code == 200:
            assert r.json()["outputs"][0]["shape"] == [1, 1]
    assert _slow_post(slow_server)[0].status_code == 200  # and it keeps serving


def test_a_request_beyond_its_timeout_gets_504(slow_server):
    r, _ = _slow_post(slow_server, version="2")
    assert r.status_code == 504 and "did not answer within" in r.json()["error"]


def test_inference_token(slow_server):
    assert _slow_post(slow_server, token="wrong")[0].status_code == 401
    r = httpx.post(f"http://{slow_server.url}/v2/models/slow/infer", json=SLOW)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"http://{slow_server.url}/v2/health/ready").status_code == 200  # health needs no token


def test_graceful_shutdown_answers_in_flight_requests(models, tmp_path):
    cfg = {
        "models": [
            {"name": "slow", "path": models["slow"], "batching": {"max_batch_size": 1, "max_queue": 64}}
        ]
    }
    s = ServerProcess(tmp_path, cfg)
    with cf.ThreadPoolExecutor(12) as pool:
        futs = [
            pool.submit(lambda: httpx.post(f"http://{s.url}/v2/models/slow/infer", json=SLOW, timeout=60))
            for _ in range(12)
        ]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # every request received: answered + queued + the one running = 12
            text = httpx.get(f"http://{s.url}/metrics").text
            if _metric(text, "slimship_requests_total") + _metric(text, "slimship_queue_depth{") + 1 >= 12:
                break
            time.sleep(0.005)
        assert time.monotonic() < deadline
        rc = s.stop(signal.SIGTERM)
        codes = [f.result().status_code for f in futs]
    assert codes == [200] * 12, codes
    assert rc in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{s.url}/v2/health/live", timeout=2)


def _metric(text: str, prefix: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))
