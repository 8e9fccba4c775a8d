"""Triton's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`) on a real server on 127.0.0.1:
exact counts after known requests, durations, versions kept apart, errors, auth, and tritonclient parsing it."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from slimship.serve.grpc import SERVICE, messages
from tests.serve.conftest import ServerProcess, free_port

TOKEN = "st4ts-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    cfg = {
        "grpc_port": free_port(),
        "models": [
            {"name": "digits", "path": models["digits_v1"], "version": "1"},
            {"name": "digits", "path": models["digits_v2"], "version": "2"},
            {"name": "batched", "path": models["digits_v1"], "batching": {"max_queue_delay_ms": 30}},
        ],
    }
    s = ServerProcess(tmp_path_factory.mktemp("stats"), cfg, env={"SLIMSHIP_TOKEN": TOKEN})
    s.grpc_url = f"127.0.0.1:{cfg['grpc_port']}"
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


def _grpc(server, method: str, request, metadata=(("authorization", f"Bearer {TOKEN}"),)):
    """A raw unary call with slimship's own message classes; returns (status code name, response or None)."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        fn = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=lambda r: r.SerializeToString(),
            response_deserializer=getattr(messages(), f"{method}Response").FromString,
        )
        try:
            return "OK", fn(request, metadata=metadata, timeout=30)
        except grpc.RpcError as err:
            return err.code().name, None


def test_grpc_statistics_are_the_http_ones(server):
    """ModelStatistics over gRPC: the same figures as HTTP (requests over gRPC are counted too), Triton's field
    numbers (tritonclient.grpc parses them, in a process of its own), and the error codes."""
    from google.protobuf import json_format

    m = messages()
    req = m.ModelInferRequest(model_name="digits", model_version="2")
    t = req.inputs.add()
    t.name, t.datatype = "pixels", "FP32"
    t.shape.extend([4, 1, 8, 8])
    req.raw_input_contents.append(np.zeros((4, 1, 8, 8), "<f4").tobytes())
    before = _stats(server, "/v2/models/digits/versions/2/stats").json()["model_stats"][0]
    assert _grpc(server, "ModelInfer", req)[0] == "OK"
    code, resp = _grpc(server, "ModelStatistics", m.ModelStatisticsRequest(name="digits", version="2"))
    assert code == "OK"
    (st,) = resp.model_stats
    assert st.inference_count == before["inference_count"] + 4
    assert st.inference_stats.success.count == before["inference_stats"]["success"]["count"] + 1
    http = _stats(server, "/v2/models/digits/versions/2/stats").json()["model_stats"][0]
    as_json = json_format.MessageToDict(
        st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    assert int(as_json["inference_count"]) == http["inference_count"]
    assert int(as_json["inference_stats"]["success"]["ns"]) == http["inference_stats"]["success"]["ns"]
    assert {int(b["batch_size"]) for b in as_json["batch_stats"]} == {
        b["batch_size"] for b in http["batch_stats"]
    }

    assert _grpc(server, "ModelStatistics", m.ModelStatisticsRequest(), metadata=())[0] == "UNAUTHENTICATED"
    assert _grpc(server, "ModelStatistics", m.ModelStatisticsRequest(name="nosuch"))[0] == "NOT_FOUND"
    assert _grpc(server, "ModelStatistics", m.ModelStatisticsRequest(version="1"))[0] == "INVALID_ARGUMENT"

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.serve.grpc_triton_driver",
            "--stats",
            server.grpc_url,
            TOKEN,
            "digits",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    got = json.loads(out.stdout)
    names = {(s["name"], s["version"]) for s in got["every"]["model_stats"]}
    assert names == {("batched", "1"), ("digits", "1"), ("digits", "2")}
    (one,) = got["one"]["model_stats"]
    assert int(one["inference_count"]) >= http["inference_count"]
    assert int(one["inference_stats"]["compute_infer"]["count"]) >= 1
    assert got["codes"] == {
        "no_token": "UNAUTHENTICATED",
        "unknown_model": "NOT_FOUND",
        "unknown_version": "NOT_FOUND",
    }


def test_a_batch_rerun_one_by_one_counts_its_runs_and_its_culprit(tmp_path):
    """In-process, so the 25 requests surely share one batch: the failed batch of 25 is no execution; the reruns
    are (24 of one row, the culprit's fails), and the culprit is the one `fail` of the version."""
    import asyncio
    import time

    from slimship.serve.config import BatchingConfig
    from slimship.serve.endpoint import Endpoint
    from slimship.serve.server import Server
    from tests.serve.hardening_models import VOCAB, bert_like

    def feeds(ids):
        a = np.array(ids, np.int64)
        return {"input_ids": a, "attention_mask": np.ones_like(a)}

    async def go():
        server = Server()
        ep = Endpoint(
            "hidden",
            "1",
            bert_like(tmp_path / "hidden.onnx", hidden_vocab=True),  # no vocabulary to check ids against
            BatchingConfig(max_batch_size=32, max_queue_delay_ms=300),
            server.metrics,
        )
        await server.add(ep)
        requests = [feeds([[101, 7 + i, 102]]) for i in range(24)]
        requests.insert(3, feeds([[101, VOCAB + 5, 102]]))
        try:
            out = await asyncio.gather(
                *(server.run_inference("hidden", ep, False, r, dict, time.perf_counter()) for r in requests),
                return_exceptions=True,
            )
        finally:
            await server.stop()
        return out, server.statistics("hidden", "1")

    out, (st,) = asyncio.run(go())
    assert [isinstance(o, dict) for o in out] == [True] * 3 + [False] + [True] * 21
    inf = st["inference_stats"]
    assert (inf["success"]["count"], inf["fail"]["count"]) == (24, 1) and inf["fail"]["ns"] > 0
    assert st["inference_count"] == 24 and st["execution_count"] == 24
    assert inf["queue"]["count"] == inf["compute_infer"]["count"] == 24
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in st["batch_stats"]] == [(1, 24)]
