"""The Open Inference Protocol server, driven over loopback by tritonclient (binary and JSON) and plain HTTP:
every endpoint, bad input answered with the right status and an {"error"} body, limits, auth."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.serve.conftest import ServerProcess

ADMIN = "adm1n-t0ken"


@pytest.fixture(
    scope="module", params=["local", "openvino", "executorch", pytest.param("ray", marks=pytest.mark.ray)]
)
def server(models, tmp_path_factory, request):
    """The same suite against the single-process server, against it with digits v1 an OpenVINO IR candidate or an
    ExecuTorch program (each served through the runtime contract), and against the Ray Serve deployment
    (`serve --ray`)."""
    ray = request.param == "ray"
    small = {"replicas": {"num_cpus": 0.5}} if ray else {}  # three versions on a 2-CPU local Ray instance
    converted = {"openvino": "digits_openvino", "executorch": "digits_executorch"}.get(request.param)
    v1 = str(request.getfixturevalue(converted).path) if converted else models["digits_v1"]
    cfg = {
        "models": [
            {"name": "digits", "path": v1, "version": "1", **small},
            {"name": "digits", "path": models["digits_v2"], "version": "2", **small},
            {
                "name": "seq",
                "path": models["seq"],
                **small,
                "batching": {"max_batch_size": 16, "max_queue_delay_ms": 20, "instances": 2},
            },
        ],
        "limits": {"max_body_bytes": 200_000},
    }
    s = ServerProcess(
        tmp_path_factory.mktemp("srv"),
        cfg,
        env={"SLIMSHIP_ADMIN_TOKEN": ADMIN},
        args=("--ray",) if ray else (),
        # Ray starts a cluster; an ExecuTorch program is first rehearsed in a probe subprocess (torch + executorch)
        ready_timeout=240 if ray or request.param == "executorch" else 90,
    )
    s.runtime = request.param
    yield s
    assert s.stop() in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown


def _x(n=3, seed=0):
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_every_endpoint(server, binary, models):
    c = triton.InferenceServerClient(server.url)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "slimship" and "binary_tensor_data" in meta["extensions"]
    assert c.is_model_ready("digits") and c.is_model_ready("digits", "1") and c.is_model_ready("digits", "2")
    m = c.get_model_metadata("digits")
    assert m["versions"] == ["1", "2"] and m["inputs"] == [
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    ]
    assert c.get_model_metadata("digits", "1")["versions"] == ["1"]
    x = _x()
    inp = triton.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    r = c.infer("digits", [inp], outputs=[out], request_id="req-42", model_version="1")
    logits = r.as_numpy("logits")
    assert r.get_response()["id"] == "req-42" and r.get_response()["model_version"] == "1"
    # the same numbers the model gives offline
    import onnxruntime as ort

    sess = ort.InferenceSession(models["digits_v1"])
    np.testing.assert_allclose(logits, sess.run(None, {"pixels": x})[0], rtol=1e-5, atol=1e-5)
    # versionless: routed to a loaded version, which the response names
    r = c.infer("digits", [inp], outputs=[out])
    assert r.get_response()["model_version"] in ("1", "2")


def test_each_version_names_the_runtime_serving_it(server):
    ov = server.runtime == "openvino"
    runtime = server.runtime if server.runtime in ("openvino", "executorch") else "onnxruntime"
    m = httpx.get(f"http://{server.url}/v2/models/digits/versions/1").json()
    assert m["platform"] == (runtime if runtime != "onnxruntime" else "onnxruntime_onnx")
    settings = m["parameters"]["runtime_settings"]
    assert settings["runtime"] == runtime
    if ov:  # explicit precision
        assert settings["openvino_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    if runtime != "onnxruntime":  # the probe ran through the candidate's own runtime at load
        assert m["parameters"]["verification"]["status"] == "passed"
    assert (
        httpx.get(f"http://{server.url}/v2/models/digits/versions/2").json()["platform"] == "onnxruntime_onnx"
    )


def test_json_without_content_type_and_output_filtering(server):
    body = {
        "id": "j1",
        "inputs": [
            {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": _x(1).reshape(-1).tolist()}
        ],
        "outputs": [{"name": "logits"}],
    }
    r = httpx.post(
        f"http://{server.url}/v2/models/digits/versions/2/infer", content=json.dumps(body)
    )  # no Content-Type
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "j1" and out["model_name"] == "digits" and out["outputs"][0]["shape"] == [1, 10]
    assert r.headers["x-request-id"]
    # a multi-output model returns only what was asked for
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    body = {
        "inputs": [
            {"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": ids.reshape(-1).tolist()},
            {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1]},
        ],
        "outputs": [{"name": "pooled"}],
    }
    r = httpx.post(f"http://{server.url}/v2/models/seq/infer", json=body)
    assert [o["name"] for o in r.json()["outputs"]] == ["pooled"]
    r = httpx.post(f"http://{server.url}/v2/models/seq/infer", json={**body, "outputs": [{"name": "nope"}]})
    assert r.status_code == 400 and "unknown output(s) ['nope']" in r.json()["error"]


def _post(server, path, **kw):
    return httpx.post(f"http://{server.url}{path}", **kw)


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "needle"),
    [
        ("/v2/models/digits/infer", {"content": b"{not json"}, 400, "not valid JSON"),
        (
            "/v2/models/digits/infer",
            {
                "json": {
                    "inputs": [
                        {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP64", "data": [0.0] * 64}
                    ]
                }
            },
            400,
            "is FP64 but digits v",
        ),
        (
            "/v2/models/digits/infer",
            {
                "json": {
                    "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]
                }
            },
            400,
            "takes rank 4",
        ),
        (
            "/v2/models/digits/infer",
            {
                "json": {
                    "inputs": [
                        {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
                    ]
                }
            },
            400,
            "unknown input(s) ['image']",
        ),
        (
            "/v2/models/digits/infer",
            {
                "json": {
                    "inputs": [
                        {
                            "name": "pixels",
                            "shape": [1, 1, 8, 8],
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": 256},
                        }
                    ]
                },
                "headers": {"Inference-Header-Content-Length": "9999"},
            },
            400,
            "Inference-Header-Content-Length",
        ),
        (
            "/v2/models/nope/infer",
            {"json": {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}},
            404,
            "unknown model 'nope'",
        ),
        (
            "/v2/models/digits/versions/9/infer",
            {
                "json": {
                    "inputs": [
                        {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
                    ]
                }
            },
            404,
            "has no version '9'",
        ),
        ("/v2/models/digits/infer", {"content": b"x" * 300_000}, 413, "at most 200000"),
        ("/v2/models/digits/infer", {"json": {"inputs": []}}, 400, "non-empty `inputs`"),
    ],
    ids=[
        "malformed-json",
        "wrong-datatype",
        "wrong-shape",
        "unknown-input",
        "bad-header-length",
        "unknown-model",
        "unknown-version",
        "oversize-body",
        "no-inputs",
    ],
)
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, path, kwargs, status, needle):
    r = _post(server, path, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    ok = _post(
        server,
        "/v2/models/digits/infer",
        json={"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]},
    )
    assert ok.status_code == 200


def test_truncated_binary_payload(server):
    x = _x(2)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [2, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    body = head + x.tobytes()[:-17]
    r = _post(
        server,
        "/v2/models/digits/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    with pytest.raises(InferenceServerException, match="400"):
        c = triton.InferenceServerClient(server.url)
        inp = triton.InferInput("pixels", [2, 1, 8, 9], "FP32")
        inp.set_data_from_numpy(np.zeros((2, 1, 8, 9), np.float32))
        c.infer("digits", [inp])


def test_unknown_routes_and_model_metadata_404(server):
    r = httpx.get(f"http://{server.url}/v2/models/nope")
    assert r.status_code == 404 and "unknown model 'nope'; models: ['digits', 'seq']" in r.json()["error"]
    r = httpx.get(f"http://{server.url}/v3/whatever")
    assert r.status_code == 404 and "no route" in r.json()["error"]


def test_variable_length_sequences_are_padded_batched_and_cut_back(server):
    """Concurrent requests of different lengths share a batch (padded); each gets exactly its own answer."""
    c = triton.InferenceServerClient(server.url, concurrency=8)
    rng = np.random.default_rng(1)
    lens = [3, 7, 5, 9, 2, 8, 4, 6]
    reqs = []
    for n in lens:
        ids = rng.integers(1, 100, size=(1, n), dtype=np.int64)
        a = triton.InferInput("input_ids", [1, n], "INT64")
        a.set_data_from_numpy(ids)
        m = triton.InferInput("attention_mask", [1, n], "INT64")
        m.set_data_from_numpy(np.ones((1, n), np.int64))
        reqs.append((ids, [a, m]))
    before = httpx.get(f"http://{server.url}/metrics").text
    # tritonclient's own concurrency (greenlets in this thread): one client shared by OS threads is not safe (gevent
    # "Cannot switch to a different thread", seen in a suite run)
    pending = [c.async_infer("seq", r[1]) for r in reqs]
    results = [p.get_result() for p in pending]
    emb = np.arange(400, dtype=np.float32).reshape(100, 4) / 100.0
    for (ids, _), res in zip(reqs, results, strict=True):
        np.testing.assert_allclose(res.as_numpy("pooled"), emb[ids].mean(1), rtol=1e-5)
        assert res.as_numpy("tokens").shape == (1, ids.shape[1], 4)  # cut back to its own length
    after = httpx.get(f"http://{server.url}/metrics").text
    assert _batches(after) > _batches(before)
    assert _rows(after) - _rows(before) == len(lens)


def _metric(text, name, labels=""):
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _batches(text):
    return _metric(text, "slimship_batch_size_count", 'model="seq"')


def _rows(text):
    return _metric(text, "slimship_batch_size_sum", 'model="seq"')


def test_admin_api_needs_the_token(server):
    url = f"http://{server.url}/v2/admin/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and set(r.json()["models"]) == {"digits", "seq"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_rest_client_protocol_v2(server, models, binary):
    import asyncio

    import onnxruntime as ort
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    x = _x(4, seed=3)

    async def go():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        base = f"http://{server.url}"
        try:
            assert await client.is_server_live(base) and await client.is_server_ready(base)
            assert await client.is_model_ready(base, "digits")
            inp = InferInput(name="pixels", shape=list(x.shape), datatype="FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            req = InferRequest(
                model_name="digits", infer_inputs=[inp], request_id="kserve-1", model_version="1"
            )
            res = await client.infer(base, req, model_name="digits")
            return res
        finally:
            await client.close()

    res = asyncio.run(go())
    assert res.id == "kserve-1" and res.model_name == "digits"
    want = ort.InferenceSession(models["digits_v1"]).run(None, {"pixels": x})[0]
    np.testing.assert_allclose(
        res.outputs[0].as_numpy(), want, rtol=1e-4, atol=1e-4
    )  # v1 and v2 compute the same


def test_a_token_id_beyond_the_embedding_is_a_400_naming_it_and_the_server_goes_on(server):
    """input_ids beyond the embedding table would make ONNX Runtime fail inside the model (and fail every request
    batched with it): the vocabulary is read from the graph and the request refused before it is queued. (The
    opaque 500 of a model failing at run time is tested in test_hardening.py with a model that fails on its own.)"""
    body = {
        "inputs": [
            {"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [5, 1000]},
            {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]},
        ]
    }
    r = httpx.post(f"http://{server.url}/v2/models/seq/infer", json=body, headers={"x-request-id": "boom-1"})
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "token id 1000 at input_ids[0,1] is outside the vocabulary of 100 (valid 0..99)"
    }
    body["inputs"][0]["data"] = [5, 6]
    assert httpx.post(f"http://{server.url}/v2/models/seq/infer", json=body).status_code == 200
