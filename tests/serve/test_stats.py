"""Triton's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`) on a real server on 127.0.0.1:
exact counts after known requests, durations, versions kept apart, errors, auth, and tritonclient parsing it."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.serve.conftest import ServerProcess

TOKEN = "st4ts-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GROUPS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    cfg = {
        "models": [
            {"name": "digits", "path": models["digits_v1"], "version": "1"},
            {"name": "digits", "path": models["digits_v2"], "version": "2"},
            {"name": "batched", "path": models["digits_v1"], "batching": {"max_queue_delay_ms": 30}},
        ],
    }
    s = ServerProcess(tmp_path_factory.mktemp("stats"), cfg, env={"SLIMSHIP_TOKEN": TOKEN})
    yield s
    assert s.stop() in (0, -15)


def _infer(server, model: str, rows: int, version: str | None = None, shape=None) -> httpx.Response:
    x = np.random.default_rng(rows).random((rows, 1, 8, 8), dtype=np.float32)
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {
        "inputs": [
            {
                "name": "pixels",
                "shape": shape or list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    return httpx.post(f"http://{server.url}{path}", json=body, headers=AUTH, timeout=30)


def _stats(server, path: str = "/v2/models/stats") -> httpx.Response:
    return httpx.get(f"http://{server.url}{path}", headers=AUTH, timeout=10)


def test_counts_match_the_requests_sent(server):
    sizes = [1, 3, 3, 5]
    for n in sizes:  # one at a time: each request is a batch of its own
        assert _infer(server, "digits", n, "1").status_code == 200
    bad = _infer(server, "digits", 2, "1", shape=[2, 1, 4, 16])  # the model takes [-1, 1, 8, 8]
    assert bad.status_code == 400

    r = _stats(server, "/v2/models/digits/versions/1/stats")
    assert r.status_code == 200
    (st,) = r.json()["model_stats"]
    assert (st["name"], st["version"]) == ("digits", "1")
    assert st["inference_count"] == sum(sizes) and st["execution_count"] == len(sizes)
    inf = st["inference_stats"]
    assert inf["success"]["count"] == len(sizes) and inf["fail"]["count"] == 1
    for g in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inf[g]["count"] == len(sizes), g
    for g in ("success", "fail", "queue", "compute_infer", "compute_output"):
        assert inf[g]["ns"] > 0, g
    assert inf["cache_hit"] == {"count": 0, "ns": 0} and inf["cache_miss"] == {"count": 0, "ns": 0}
    # a request's whole time in the server covers its queueing and compute
    parts = sum(inf[g]["ns"] for g in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert inf["success"]["ns"] >= parts
    batches = {b["batch_size"]: b for b in st["batch_stats"]}
    assert {k: b["compute_infer"]["count"] for k, b in batches.items()} == {1: 1, 3: 2, 5: 1}
    assert all(b["compute_infer"]["ns"] > 0 for b in batches.values())
    assert sum(b["compute_infer"]["ns"] for b in batches.values()) == inf["compute_infer"]["ns"]
    import time

    assert 0 < time.time() * 1000 - st["last_inference"] < 60_000

    # the other version's figures are its own: nothing was sent to it
    (v2,) = _stats(server, "/v2/models/digits/versions/2/stats").json()["model_stats"]
    assert v2["version"] == "2" and v2["inference_count"] == 0 and v2["last_inference"] == 0
    assert all(v2["inference_stats"][g] == {"count": 0, "ns": 0} for g in GROUPS) and v2["batch_stats"] == []
    # every version of the model, and of every model
    by_model = _stats(server, "/v2/models/digits/stats").json()["model_stats"]
    assert [(s["name"], s["version"]) for s in by_model] == [("digits", "1"), ("digits", "2")]
    assert by_model[0] == st
    every = _stats(server).json()["model_stats"]
    assert [(s["name"], s["version"]) for s in every] == [("batched", "1"), ("digits", "1"), ("digits", "2")]


def test_dynamic_batches_add_up(server):
    """Concurrent requests batched together: executions are fewer than requests and every row is in one batch."""
    sizes = [1, 2, 3, 4] * 4
    with concurrent.futures.ThreadPoolExecutor(len(sizes)) as pool:
        codes = list(pool.map(lambda n: _infer(server, "batched", n).status_code, sizes))
    assert codes == [200] * len(sizes)
    (st,) = _stats(server, "/v2/models/batched/stats").json()["model_stats"]
    assert st["inference_count"] == sum(sizes)
    assert st["inference_stats"]["success"]["count"] == st["inference_stats"]["queue"]["count"] == len(sizes)
    runs = {b["batch_size"]: b["compute_infer"]["count"] for b in st["batch_stats"]}
    assert sum(runs.values()) == st["execution_count"] < len(sizes)  # some requests shared a run
    assert sum(size * count for size, count in runs.items()) == sum(sizes)


def test_errors_auth_and_server_metadata(server):
    r = _stats(server, "/v2/models/nosuch/stats")
    assert r.status_code == 404 and "nosuch" in r.json()["error"]
    r = _stats(server, "/v2/models/digits/versions/9/stats")
    assert r.status_code == 404 and "9" in r.json()["error"]
    r = httpx.get(f"http://{server.url}/v2/models/stats", timeout=10)  # no token
    assert r.status_code == 401 and "error" in r.json()
    assert "statistics" in httpx.get(f"http://{server.url}/v2", timeout=10).json()["extensions"]


def test_tritonclient_parses_the_statistics(server):
    assert _infer(server, "digits", 2, "2").status_code == 200
    c = triton.InferenceServerClient(server.url)
    try:
        _check_triton_client(c)
    finally:
        c.close()


def _check_triton_client(c) -> None:
    every = c.get_inference_statistics(headers=AUTH)
    assert {(s["name"], s["version"]) for s in every["model_stats"]} == {
        ("batched", "1"),
        ("digits", "1"),
        ("digits", "2"),
    }
    one = c.get_inference_statistics("digits", "2", headers=AUTH)["model_stats"][0]
    assert one["inference_count"] >= 2 and one["inference_stats"]["success"]["count"] >= 1
    with pytest.raises(triton.InferenceServerException, match="nosuch"):
        c.get_inference_statistics("nosuch", headers=AUTH)
