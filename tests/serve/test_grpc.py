"""The Open Inference Protocol over gRPC (`serve --grpc-port`), on a real server process on 127.0.0.1: driven by
tritonclient.grpc (in a subprocess: its protobufs clash with kserve's, which other serve tests import) and by raw
gRPC calls built from slimship's own message classes (a private descriptor pool, so they coexist with both)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from slimship.serve.grpc import SERVICE, messages
from tests.serve.conftest import ServerProcess, free_port

TOKEN = "grpc-t0ken"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    cfg = {
        "grpc_port": free_port(),
        "models": [
            {
                "name": "digits",
                "path": models["digits_v1"],
                "version": "1",
                "batching": {"max_batch_size": 32},
            },
            {"name": "digits", "path": models["digits_v2"], "version": "2"},
            {"name": "seq", "path": models["seq"]},
            {"name": "slow", "path": models["slow"], "batching": {"max_queue": 1, "max_batch_size": 1}},
        ],
        "limits": {"max_body_bytes": 60_000},
    }
    s = ServerProcess(tmp_path_factory.mktemp("grpc"), cfg, env={"SLIMSHIP_TOKEN": TOKEN})
    s.grpc_url = f"127.0.0.1:{cfg['grpc_port']}"
    yield s
    assert s.stop() in (0, -15)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_url) as ch:
        yield ch


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def call(channel, method: str, request, metadata=AUTH):
    """A raw unary call; returns (status code name, response or None)."""
    m = messages()
    resp_type = getattr(m, f"{method}Response")
    fn = channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
        response_deserializer=resp_type.FromString,
    )
    try:
        return "OK", fn(request, metadata=metadata, timeout=30)
    except grpc.RpcError as err:
        return err.code().name, None


def _x(n=3, seed=0):
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def _infer_request(x, model="digits", version="1", raw=True):
    m = messages()
    req = m.ModelInferRequest(model_name=model, model_version=version)
    t = req.inputs.add()
    t.name, t.datatype = "pixels", "FP32"
    t.shape.extend(x.shape)
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def test_tritonclient_grpc_every_call(server, models, tmp_path):
    """tritonclient.grpc, unchanged: health, metadata, infer equal to HTTP and to offline ONNX Runtime, codes."""
    import onnxruntime as ort

    x = _x()
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.serve.grpc_triton_driver",
            server.grpc_url,
            TOKEN,
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["live"] and out["ready"] and out["model_ready"] == [True, True]
    assert out["server"]["name"] == "slimship"
    assert out["metadata"]["versions"] == ["1", "2"] and out["metadata"]["platform"] == "onnxruntime_onnx"
    assert out["metadata"]["inputs"] == [
        {"name": "pixels", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
    ]
    assert out["metadata_v1"]["versions"] == ["1"]
    got = np.array(out["infer"]["logits"], dtype=np.float32)
    assert (
        out["infer"]["id"] == "g-1" and out["infer"]["version"] == "1" and out["infer"]["datatype"] == "FP32"
    )
    offline = ort.InferenceSession(models["digits_v1"]).run(None, {"pixels": x})[0]
    np.testing.assert_allclose(got, offline, rtol=1e-5, atol=1e-5)
    body = {
        "inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    r = httpx.post(
        f"http://{server.url}/v2/models/digits/versions/1/infer",
        json=body,
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(
        got, np.array(r.json()["outputs"][0]["data"], np.float32).reshape(got.shape)
    )
    assert out["routed_version"] in ("1", "2")
    assert out["codes"] == {
        "no_token": "UNAUTHENTICATED",
        "bad_token": "UNAUTHENTICATED",
        "unknown_model": "NOT_FOUND",
        "unknown_version": "NOT_FOUND",
        "wrong_shape": "INVALID_ARGUMENT",
        "wrong_datatype": "INVALID_ARGUMENT",
        "oversize": "RESOURCE_EXHAUSTED",
        "too_many_rows": "INVALID_ARGUMENT",
        "unknown_model_ready": "NOT_FOUND",
        "unknown_output": "INVALID_ARGUMENT",
    }
    # the same metrics as HTTP: per-model requests, and gRPC calls by method and code
    text = httpx.get(f"http://{server.url}/metrics").text
    assert 'slimship_grpc_requests_total{code="OK",method="ModelInfer"}' in text
    assert 'slimship_grpc_requests_total{code="UNAUTHENTICATED",method="ModelInfer"}' in text


def test_raw_and_typed_contents_agree(server, channel):
    x = _x(2, seed=1)
    code, raw = call(channel, "ModelInfer", _infer_request(x, raw=True))
    assert code == "OK"
    code, typed = call(channel, "ModelInfer", _infer_request(x, raw=False))
    assert code == "OK"
    assert raw.raw_output_contents == typed.raw_output_contents and list(raw.outputs[0].shape) == [2, 10]
    # a sequence model with INT64 inputs in int64_contents; a token id beyond the vocabulary is refused, not batched
    m = messages()

    def seq(ids):
        req = m.ModelInferRequest(model_name="seq")
        for name, vals in (("input_ids", ids), ("attention_mask", [1] * len(ids))):
            t = req.inputs.add()
            t.name, t.datatype = name, "INT64"
            t.shape.extend([1, len(vals)])
            t.contents.int64_contents.extend(vals)
        req.outputs.add().name = "pooled"
        return req

    code, resp = call(channel, "ModelInfer", seq([5, 6, 7]))
    assert code == "OK" and [o.name for o in resp.outputs] == ["pooled"]
    pooled = np.frombuffer(resp.raw_output_contents[0], "<f4")
    np.testing.assert_allclose(
        pooled, np.arange(400, dtype=np.float32).reshape(100, 4)[5:8].mean(0) / 100, rtol=1e-6
    )
    assert call(channel, "ModelInfer", seq([5, 100, 7]))[0] == "INVALID_ARGUMENT"


def test_bad_calls_are_client_errors(server, channel):
    m = messages()
    assert call(channel, "ModelInfer", b"\xff\xff\xff")[0] == "INVALID_ARGUMENT"  # not protobuf
    assert call(channel, "ModelInfer", _infer_request(_x(1)), metadata=())[0] == "UNAUTHENTICATED"
    assert call(channel, "ModelMetadata", m.ModelMetadataRequest(name="nosuch"))[0] == "NOT_FOUND"
    code, ready = call(channel, "ServerReady", m.ServerReadyRequest())
    assert code == "OK" and ready.ready
    long_id = _infer_request(_x(1))
    long_id.id = "i" * 300
    assert call(channel, "ModelInfer", long_id)[0] == "INVALID_ARGUMENT"
    assert call(channel, "ModelInfer", _infer_request(_x(1)), (*AUTH, ("x-request-id", "r" * 300)))[0] == (
        "INVALID_ARGUMENT"
    )


def test_overload_is_unavailable_with_retry_after(server, channel):
    """A full queue is UNAVAILABLE (HTTP's 503) with retry-after, never INTERNAL; the rest are answered."""
    m = messages()
    req = m.ModelInferRequest(model_name="slow")
    t = req.inputs.add()
    t.name, t.datatype = "x", "FP32"
    t.shape.extend([1, 2048])
    req.raw_input_contents.append(np.ones((1, 2048), "<f4").tobytes())
    fn = channel.unary_unary(
        f"/{SERVICE}/ModelInfer",
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=m.ModelInferResponse.FromString,
    )
    futures = [fn.future(req, metadata=AUTH, timeout=60) for _ in range(12)]
    codes, retry = [], []
    for f in futures:
        try:
            f.result()
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)
            retry += [v for k, v in err.trailing_metadata() or () if k == "retry-after"]
    assert set(codes) == {"OK", "UNAVAILABLE"}, codes
    assert len(retry) == codes.count("UNAVAILABLE") and set(retry) == {"1"}


def _mutate(rng, base):
    """One malformed (or odd) ModelInferRequest derived from a valid one."""
    m = messages()
    req = m.ModelInferRequest()
    req.CopyFrom(base)
    t = req.inputs[0]
    kind = int(rng.integers(12))
    if kind == 0:
        del t.shape[:]
        t.shape.extend(int(d) for d in rng.integers(-(2**62), 2**62, size=int(rng.integers(0, 70))))
    elif kind == 1:
        t.datatype = str(
            rng.choice(["FP16", "INT8", "BYTES", "BOOL", "UINT64", "fp32", "", "FP32\x00", "TF32"])
        )
    elif kind == 2:
        req.raw_input_contents[0] = bytes(
            rng.integers(0, 256, size=int(rng.integers(0, 2000)), dtype=np.uint8)
        )
    elif kind == 3:
        req.raw_input_contents.append(b"\x00" * int(rng.integers(0, 64)))
    elif kind == 4:
        del req.raw_input_contents[:]
        t.contents.int64_contents.extend(
            int(v) for v in rng.integers(-(2**62), 2**62, size=int(rng.integers(0, 300)))
        )
    elif kind == 5:
        del req.raw_input_contents[:]
        t.contents.fp32_contents.extend(rng.standard_normal(int(rng.integers(0, 400))).tolist())
    elif kind == 6:
        t.name = str(rng.choice(["", "pixel", "input_ids", "pixels\x00", "é" * 50]))
    elif kind == 7:
        req.inputs.add().CopyFrom(t)
    elif kind == 8:
        req.model_name = str(rng.choice(["", "seq", "nosuch", "digits/1", "x" * 300, "é" * 20_000]))
    elif kind == 9:
        req.model_version = str(rng.choice(["0", "3", "-1", "latest", "x" * 1000]))
    elif kind == 10:
        req.outputs.add().name = str(rng.choice(["logits", "", "nope"]))
        req.parameters["binary_data_output"].string_param = "false"
    else:
        t.contents.bytes_contents.extend([b"a", b"bc"])
    data = req.SerializeToString()
    if rng.random() < 0.15:  # a damaged wire message
        cut = int(rng.integers(0, len(data)))
        data = data[:cut] + bytes(rng.integers(0, 256, size=int(rng.integers(0, 8)), dtype=np.uint8))
    return data


def test_seeded_fuzz_no_internal(server, channel):
    """300 malformed calls: never INTERNAL/UNKNOWN, and a valid call succeeds after every 100."""
    rng = np.random.default_rng(17)
    base = _infer_request(_x(1))
    codes: dict[str, int] = {}
    for i in range(300):
        code, _ = call(channel, "ModelInfer", _mutate(rng, base))
        codes[code] = codes.get(code, 0) + 1
        if (i + 1) % 100 == 0:
            assert call(channel, "ModelInfer", base)[0] == "OK"
    print(codes)
    assert "INTERNAL" not in codes and "UNKNOWN" not in codes, codes
    assert codes.get("INVALID_ARGUMENT", 0) > 100, codes


def test_descriptor_is_current():
    """The committed descriptor is what the .proto compiles to (regenerate: python scripts/gen_grpc_descriptor.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_grpc_descriptor
    finally:
        sys.path.pop(0)
    from slimship.serve.oip_descriptor import FILE_DESCRIPTOR

    assert gen_grpc_descriptor.compiled() == FILE_DESCRIPTOR
