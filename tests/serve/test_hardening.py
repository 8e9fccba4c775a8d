"""The server under hostile input (issue 17): no 500 for bad input, no harm across requests, bounded memory and
time. Each reproduction of the outside test is a test here; a real server on 127.0.0.1 serves small graphs."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import socket
import struct
import threading
import time

import httpx
import numpy as np
import pytest

from tests.serve.conftest import ServerProcess
from tests.serve.hardening_models import (
    POSITIONS,
    VOCAB,
    bert_like,
    failing_model,
    ids_body,
    log_model,
)


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening-models")
    return {
        "bert": str(bert_like(root / "bert.onnx")),
        "hidden": str(bert_like(root / "hidden.onnx", hidden_vocab=True)),
        "log": str(log_model(root / "log.onnx")),
        "failing": str(failing_model(root / "failing.onnx")),
    }


BATCH = {"max_batch_size": 32, "max_queue_delay_ms": 100}


@pytest.fixture(scope="module")
def server(small_models, tmp_path_factory):
    cfg = {
        "models": [
            {"name": "bert", "path": small_models["bert"], "batching": BATCH},
            {"name": "hidden", "path": small_models["hidden"], "batching": BATCH},
            {"name": "log", "path": small_models["log"]},
            {"name": "failing", "path": small_models["failing"]},
        ],
        "limits": {"header_timeout_s": 1.0, "body_timeout_s": 1.5, "max_body_bytes": 64_000_000},
    }
    s = ServerProcess(tmp_path_factory.mktemp("hardening"), cfg)
    yield s
    assert s.stop() in (0, -15)


def _url(server, path: str) -> str:
    return f"http://{server.url}{path}"


def _post(server, model: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(_url(server, f"/v2/models/{model}/infer"), json=body, timeout=30, **kw)


def _concurrently(server, model: str, bodies: list[dict]) -> list[httpx.Response]:
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: _post(server, model, b), bodies))


def _valid_ids(i: int) -> list[list[int]]:
    return [[101, 7 + i, 102]]


# ---- 1. one bad request fails its batch-mates ----------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (
            [[101, VOCAB, 102]],
            f"token id {VOCAB} at input_ids[0,1] is outside the vocabulary of {VOCAB} (valid 0..999)",
        ),
        ([[101, -VOCAB - 1, 102]], f"token id {-VOCAB - 1} at input_ids[0,1] is outside the vocabulary"),
        ([[1] * (POSITIONS + 1)], f"sequence of {POSITIONS + 1} tokens; the model takes at most {POSITIONS}"),
    ],
    ids=["id-too-high", "id-too-low", "sequence-too-long"],
)
def test_one_bad_request_among_24_valid_gets_a_400_and_the_24_succeed(server, bad, needle):
    """The limits are read from the graph (the word-embedding Gather, the position table) and checked before the
    request is queued: it never reaches a batch."""
    bodies = [ids_body(_valid_ids(i)) for i in range(24)]
    bodies.insert(11, ids_body(bad))
    rs = _concurrently(server, "bert", bodies)
    assert rs[11].status_code == 400 and needle in rs[11].json()["error"], rs[11].text
    others = rs[:11] + rs[12:]
    assert [r.status_code for r in others] == [200] * 24


def test_a_batch_failing_anyway_is_rerun_one_by_one_over_http(server):
    """`hidden` computes its embedding table, so no vocabulary can be read: the bad id reaches a batch, ONNX
    Runtime fails it (INVALID_ARGUMENT), the batch is re-run request by request — only the culprit fails, with 400."""
    bodies = [ids_body(_valid_ids(i)) for i in range(24)]
    bodies.insert(5, ids_body([[101, VOCAB, 102]]))
    rs = _concurrently(server, "hidden", bodies)
    assert rs[5].status_code == 400 and "out of data bounds" in rs[5].json()["error"], rs[5].text
    assert [r.status_code for r in rs[:5] + rs[6:]] == [200] * 24


def _endpoint(path: str, **batching):
    from slimship.serve.config import BatchingConfig
    from slimship.serve.endpoint import Endpoint
    from slimship.serve.metrics import Metrics

    metrics = Metrics()
    return Endpoint("m", "1", path, BatchingConfig(**batching), metrics), metrics


def _feeds(ids: list[list[int]]) -> dict[str, np.ndarray]:
    a = np.array(ids, np.int64)
    return {"input_ids": a, "attention_mask": np.ones_like(a)}


def test_in_one_batch_only_the_culprit_fails_and_its_status_follows_the_fault(small_models):
    """In-process, so the 25 requests surely share one batch: an ORT INVALID_ARGUMENT on the culprit's own run is a
    400; any other failure on its own run stays that error (the client gets an opaque 500) — the others succeed."""
    from slimship.serve.protocol import ProtocolError

    async def run(ep, requests):
        await ep.start()
        try:
            return await asyncio.gather(*(ep.infer(r) for r in requests), return_exceptions=True)
        finally:
            await ep.stop()

    ep, _ = _endpoint(small_models["hidden"], max_batch_size=32, max_queue_delay_ms=300)
    real = ep.sessions[0]
    rows: list[int] = []

    class Spy:  # the real session, recording the rows of every run
        def run(self, names, feeds):
            rows.append(int(feeds["input_ids"].shape[0]))
            return real.run(names, feeds)

    ep.sessions = [Spy()]
    requests = [_feeds(_valid_ids(i)) for i in range(24)]
    requests.insert(3, _feeds([[101, VOCAB + 5, 102]]))
    out = asyncio.run(run(ep, requests))
    assert rows[1:] == [25] + [1] * 25  # after the warm-up: one batch of 25 failed, then each alone
    assert isinstance(out[3], ProtocolError) and out[3].status == 400
    assert f"idx={VOCAB + 5}" in str(out[3])
    want = np.array([[101, 7, 102]])
    assert all(isinstance(o, dict) and o["pooled"].shape == (1, 4) for o in out[:3] + out[4:])
    ref = asyncio.run(run(_endpoint(small_models["hidden"])[0], [_feeds(want.tolist())]))[0]
    np.testing.assert_allclose(out[0]["pooled"], ref["pooled"])

    # a failure that isn't the input's (a stand-in session raising a plain error on one request's values)
    ep, _ = _endpoint(small_models["hidden"], max_batch_size=32, max_queue_delay_ms=300)
    real = ep.sessions[0]

    class Flaky:
        def run(self, names, feeds):
            if (feeds["input_ids"] == 666).any():
                raise RuntimeError("the runtime fell over")
            return real.run(names, feeds)

    ep.sessions = [Flaky()]
    requests = [_feeds(_valid_ids(i)) for i in range(8)]
    requests.insert(2, _feeds([[101, 666, 102]]))
    out = asyncio.run(run(ep, requests))
    assert isinstance(out[2], RuntimeError) and not isinstance(out[2], ProtocolError)
    assert all(isinstance(o, dict) for o in out[:2] + out[3:])


def test_a_model_failing_at_run_time_is_an_opaque_500_and_the_server_goes_on(server):
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    r = _post(server, "failing", body, headers={"x-request-id": "boom-1"})
    assert r.status_code == 500 and r.json() == {"error": "internal server error (request id boom-1)"}
    log = server.log.read_text()
    assert "Traceback" in log and "boom-1" in log
    assert _post(server, "log", body).status_code == 200


def test_input_limits_are_read_from_the_graph_or_not_at_all(small_models, tmp_path):
    from slimship.serve.input_limits import read_input_limits

    lim = read_input_limits(small_models["bert"])
    assert lim.vocab == {"input_ids": VOCAB}
    assert lim.max_sequence == {"input_ids": POSITIONS, "attention_mask": POSITIONS}
    assert read_input_limits(small_models["hidden"]).as_dict() == {"vocab": {}, "max_sequence": {}}
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert read_input_limits(tmp_path / "junk.onnx").as_dict() == {"vocab": {}, "max_sequence": {}}


# ---- 2. request ids ------------------------------------------------------------------------------------


def test_request_ids_are_capped_and_the_feedback_map_is_bounded(server):
    body = ids_body(_valid_ids(0))
    r = _post(server, "bert", {**body, "id": "x" * 257})
    assert r.status_code == 400 and "`id` is 257 characters; at most 256" in r.json()["error"]
    r = _post(server, "bert", body, headers={"x-request-id": "y" * 2_000_000})
    assert r.status_code == 400 and "x-request-id is 2000000 characters; at most 256" in r.json()["error"]
    assert len(r.headers["x-request-id"]) == 32  # a fresh id, not the huge one echoed
    r = _post(server, "bert", {**body, "id": "z" * 256}, headers={"x-request-id": "w" * 256})
    assert r.status_code == 200 and r.json()["id"] == "z" * 256
    r = _post(server, "bert", {**body, "id": {"a": 1}})
    assert r.status_code == 400 and "`id` must be a string" in r.json()["error"]

    from slimship.serve.config import Limits
    from slimship.serve.server import Server

    assert Server(limits=Limits(max_remembered_ids=1000)).feedback.max_ids == 1000


# ---- 3./4. malformed input: 400 at once, nothing big allocated -----------------------------------------


def _binary(server, model: str, head: dict, tail: bytes = b"") -> httpx.Response:
    h = json.dumps(head).encode()
    return httpx.post(
        _url(server, f"/v2/models/{model}/infer"),
        content=h + tail,
        headers={"Inference-Header-Content-Length": str(len(h))},
        timeout=30,
    )


def _rss(server) -> int:
    import psutil

    return int(psutil.Process(server.proc.pid).memory_info().rss)


def test_a_tiny_request_claiming_a_huge_bytes_tensor_is_refused_at_once(server):
    head = {
        "inputs": [
            {
                "name": "pixels",
                "shape": [100000000],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 0},
            }
        ]
    }
    before = _rss(server)
    t0 = time.perf_counter()
    r = _binary(server, "log", head)
    took = time.perf_counter() - t0
    assert r.status_code == 400 and "need at least 400000000 bytes" in r.json()["error"], r.text
    assert took < 1.0 and _rss(server) - before < 20e6


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"inputs": ' + DEEP.encode() + b"}", "nested too deeply"),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [4294967296, 4294967296, 8, 8], "datatype": "FP32", "data": [1]}
                ]
            },
            "has a dimension above",
        ),
        ({"inputs": [{"name": "x", "shape": [1] * 65, "datatype": "FP32", "data": [1]}]}, "rank 65"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": {}, "data": [1]}]}, "unknown datatype {}"),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [3037000500, 3037000500], "datatype": "BYTES", "data": ["a"]}
                ]
            },
            "has a dimension above",
        ),
        (
            {"inputs": [{"name": "x", "shape": [300000, 300000], "datatype": "BYTES", "data": ["a"]}]},
            "more than a",
        ),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1e15]}]}, "must be strings"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [10**15]}]}, "must be strings"),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, None, 2, 3]}]},
            "null at position 1",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2], [3]]}]},
            "doesn't hold FP32",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                "parameters": {"binary_data_output": "false"},
            },
            "binary_data_output must be true or false",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                "outputs": [{"name": "y", "parameters": {"binary_data": 1}}],
            },
            "binary_data must be true or false",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [2**70, 1, 2, 3]}]},
            "doesn't hold INT64",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1e308, 1, 2, 3]}]},
            "doesn't hold FP32",
        ),
    ],
    ids=[
        "nested-5000-deep",
        "shape-overflow",
        "rank-65",
        "datatype-object",
        "bytes-huge-shape",
        "bytes-shape-beyond-body",
        "bytes-float",
        "bytes-int",
        "null-in-fp32",
        "ragged-data",
        "binary-flag-string",
        "output-flag-int",
        "int-overflow",
        "fp32-overflow",
    ],
)
def test_malformed_input_is_a_400_never_a_500(server, body, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(_url(server, "/v2/models/log/infer"), content=content, timeout=30)
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert len(r.text) < 2000  # the error never echoes the hostile body


def test_binary_shapes_are_bounded_by_the_bytes_sent(server):
    head = {
        "inputs": [
            {
                "name": "x",
                "shape": [2**31 - 1, 2**31 - 1],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 16},
            }
        ]
    }
    r = _binary(server, "log", head, b"\0" * 16)
    assert r.status_code == 400 and "needs" in r.json()["error"]
    head["inputs"][0]["shape"] = [1, 4]
    head["inputs"][0]["parameters"]["binary_data_size"] = True
    r = _binary(server, "log", head, b"\0" * 16)
    assert r.status_code == 400 and "binary_data_size must be a non-negative integer" in r.json()["error"]
    # a BYTES tensor whose elements claim more than is there
    head = {
        "inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]
    }
    r = _binary(server, "log", head, struct.pack("<I", 2**31) + b"abcd")
    assert r.status_code == 400


def test_non_finite_outputs_are_refused_as_json_and_given_as_binary(server):
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 0, -1, 2]}]}
    r = _post(server, "log", body)
    assert r.status_code == 400 and "holds NaN or infinity" in r.json()["error"]
    assert "binary_data_output" in r.json()["error"]
    r = _post(server, "log", {**body, "parameters": {"binary_data_output": True}})
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    y = np.frombuffer(r.content[n:], np.float32)
    assert y[0] == 0 and np.isneginf(y[1]) and np.isnan(y[2])
    ok = _post(server, "log", {**body, "inputs": [{**body["inputs"][0], "data": [1, 2, 3, 4]}]})
    assert ok.status_code == 200 and json.loads(ok.text)  # strict JSON


# ---- 5. parsing off the event loop ---------------------------------------------------------------------


def test_health_answers_while_a_large_body_parses(server):
    n = 1_500_000  # 24 MB of JSON: a second or more of json.loads, which holds the GIL
    data = b"[" + b"0.5," * (n * 4 - 1) + b"0.5]"
    body = b'{"inputs":[{"name":"x","shape":[%d,4],"datatype":"FP32","data":' % n + data + b"}]}"
    done = threading.Event()
    status: list[int] = []

    def big() -> None:
        status.append(httpx.post(_url(server, "/v2/models/log/infer"), content=body, timeout=60).status_code)
        done.set()

    t = threading.Thread(target=big)
    t.start()
    worst, polls = 0.0, 0
    with httpx.Client(timeout=30) as c:
        while not done.is_set():
            t0 = time.perf_counter()
            assert c.get(_url(server, "/v2/health/live")).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            polls += 1
            time.sleep(0.02)
    t.join()
    assert status == [400]  # 4M rows exceed max_batch_size: refused after parsing
    print(f"health during a {len(body) / 1e6:.0f} MB parse: {polls} polls, slowest {worst * 1000:.0f} ms")
    assert polls >= 5 and worst < 0.5, (polls, worst)


# ---- 6. the lower ones ---------------------------------------------------------------------------------


def test_get_on_an_infer_route_is_405_with_allow(server):
    r = httpx.get(_url(server, "/v2/models/log/infer"))
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "use POST" in r.json()["error"]
    assert httpx.get(_url(server, "/v3/nothing")).status_code == 404


def _metric_lines(server, needle: str) -> list[str]:
    return [ln for ln in httpx.get(_url(server, "/metrics")).text.splitlines() if needle in ln]


def _count(lines: list[str], status: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if f'status="{status}"' in ln)


def test_a_client_disconnecting_mid_upload_is_not_an_error(server):
    host, port = server.url.split(":")
    before = _metric_lines(server, "/v2/models/{model}/infer")
    log_before = len(server.log.read_text())
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v2/models/log/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"inputs":'
        )
        time.sleep(0.2)
    time.sleep(0.5)
    after = _metric_lines(server, "/v2/models/{model}/infer")
    assert _count(after, "500") == _count(before, "500")
    assert _count(after, "499") == _count(before, "499") + 1  # counted apart
    assert "unexpected error" not in server.log.read_text()[log_before:]


def _recv_all(s: socket.socket, deadline: float) -> bytes:
    s.settimeout(deadline)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def test_incomplete_headers_and_bodies_time_out(server):
    host, port = server.url.split(":")
    held = []
    t0 = time.monotonic()
    for _ in range(20):  # slowloris: connections that never finish their headers
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v2/models/log/infer HTTP/1.1\r\nHost: x\r\n")
        held.append(s)
    for s in held:
        assert _recv_all(s, 5) == b""  # closed by the server
        s.close()
    assert time.monotonic() - t0 < 4  # header_timeout_s is 1
    with socket.create_connection((host, int(port))) as s:  # a body that never arrives: 408
        s.sendall(b"POST /v2/models/log/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        answer = _recv_all(s, 5)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1.5 s" in answer
    assert b"connection: close" in answer.lower()  # closed at once, not after keep_alive_s (5 s)
    assert (
        _post(
            server, "log", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
        ).status_code
        == 200
    )


def test_a_non_loopback_bind_without_a_token_is_warned_about():
    from slimship.serve.run import bind_warning

    assert "no inference token" in bind_warning("0.0.0.0", None)
    assert "SLIMSHIP_TOKEN" in bind_warning("::", None)
    assert bind_warning("my-host.example", None) is not None
    assert bind_warning("0.0.0.0", "s3cret") is None
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert bind_warning(host, None) is None


def test_the_parser_process_returns_requests_and_refusals():
    """What the worker process sends back: the parsed request, or the ProtocolError with its status and message."""
    from slimship.serve.http import ParserPool
    from slimship.serve.protocol import ProtocolError

    pool = ParserPool()
    ok = json.dumps(
        {"id": "a", "inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["p", "q"]}]}
    )

    async def go():
        req = await pool.parse(ok.encode(), None, 256)
        with pytest.raises(ProtocolError, match="at most 8") as err:
            await pool.parse(ok.replace('"a"', '"123456789"').encode(), None, 8)
        return req, err.value

    try:
        req, err = asyncio.run(go())
    finally:
        pool.close()
    assert req.id == "a" and list(req.inputs["x"]) == [b"p", b"q"]
    assert err.status == 400


def _open_requests(server) -> float:
    (line,) = [ln for ln in _metric_lines(server, "slimship_http_requests_open ") if not ln.startswith("#")]
    return float(line.rsplit(" ", 1)[1])


def test_open_requests_are_counted_and_a_lost_connection_is_uncounted(server):
    """The count a lone tiny row's shortcut past the queue relies on (it is taken only when its request is the only
    one open): a request whose body is still arriving is open; its connection dropping closes it."""
    host, port = server.url.split(":")
    assert _open_requests(server) == 1  # the scrape itself
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v2/models/log/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.3)
        assert _open_requests(server) == 2
    time.sleep(0.5)
    assert _open_requests(server) == 1
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    assert [r.status_code for r in _concurrently(server, "log", [body] * 8)] == [200] * 8
    assert _open_requests(server) == 1  # every answered request closed again


def test_the_access_log_has_a_line_per_request_unless_switched_off(server, small_models, tmp_path):
    """--no-access-log used to log every request anyway: uvicorn's logging setup re-enabled the logger."""
    body = {"id": "access-1", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    mark = len(server.log.read_text())
    assert _post(server, "log", body).status_code == 200
    time.sleep(0.2)
    lines = [json.loads(ln) for ln in server.log.read_text()[mark:].splitlines() if '"method"' in ln]
    assert [(ln["path"], ln["status"]) for ln in lines] == [("/v2/models/log/infer", 200)]
    quiet = ServerProcess(
        tmp_path, {"models": [{"name": "log", "path": small_models["log"]}]}, args=("--no-access-log",)
    )
    try:
        assert all(_post(quiet, "log", body).status_code == 200 for _ in range(5))
        time.sleep(0.2)
        assert '"method"' not in quiet.log.read_text()
    finally:
        assert quiet.stop() in (0, -15)
