"""Drives a gRPC server with tritonclient.grpc, in a process of its own: tritonclient's generated protobufs and
kserve's (imported by other serve tests) register the same `inference` symbols and can't share a process
(kserve#3099). Usage: python -m tests.serve.grpc_triton_driver HOST:PORT TOKEN X.npy  → one JSON object on stdout;
python -m tests.serve.grpc_triton_driver --stats HOST:PORT TOKEN MODEL VERSION → the statistics calls' answers."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException


def _code(fn: Any) -> str:
    try:
        fn()
    except InferenceServerException as err:
        return str(err.status()).removeprefix("StatusCode.")
    return "OK"


def main(url: str, token: str, x_path: str) -> dict[str, Any]:
    x = np.load(x_path)
    c = tg.InferenceServerClient(url)
    auth = {"authorization": f"Bearer {token}"}
    meta = c.get_server_metadata(as_json=True)
    model = c.get_model_metadata("digits", as_json=True)
    out: dict[str, Any] = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "server": {"name": meta["name"], "extensions": meta.get("extensions", [])},
        "model_ready": [c.is_model_ready("digits"), c.is_model_ready("digits", "1")],
        "metadata": model,
        "metadata_v1": c.get_model_metadata("digits", "1", as_json=True),
    }

    def infer(
        name: str = "digits", arr: np.ndarray = x, dt: str = "FP32", headers: Any = auth, **kw: Any
    ) -> Any:
        inp = tg.InferInput("pixels", list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        return c.infer(name, [inp], headers=headers, **kw)

    r = infer(request_id="g-1", model_version="1", outputs=[tg.InferRequestedOutput("logits")])
    resp = r.get_response(as_json=True)
    out["infer"] = {
        "logits": r.as_numpy("logits").tolist(),
        "id": resp.get("id"),
        "version": resp["model_version"],
        "datatype": resp["outputs"][0]["datatype"],
    }
    out["routed_version"] = infer().get_response(as_json=True)["model_version"]
    out["codes"] = {
        "no_token": _code(lambda: infer(headers=None)),
        "bad_token": _code(lambda: infer(headers={"authorization": "Bearer nope"})),
        "unknown_model": _code(lambda: infer("nosuch")),
        "unknown_version": _code(lambda: infer(model_version="9")),
        "wrong_shape": _code(lambda: infer(arr=np.zeros((2, 3), np.float32))),
        "wrong_datatype": _code(lambda: infer(arr=x.astype(np.float64), dt="FP64")),
        "oversize": _code(lambda: infer(arr=np.zeros((300, 1, 8, 8), np.float32))),  # > max_body_bytes
        "too_many_rows": _code(lambda: infer(arr=np.zeros((40, 1, 8, 8), np.float32))),  # > max_batch_size
        "unknown_model_ready": _code(lambda: c.is_model_ready("nosuch")),
        "unknown_output": _code(lambda: infer(outputs=[tg.InferRequestedOutput("nope")])),
    }
    return out


def stats(url: str, token: str, model: str, version: str) -> dict[str, Any]:
    """get_inference_statistics as tritonclient.grpc parses it: every model, one version, and the error codes."""
    c = tg.InferenceServerClient(url)
    auth = {"authorization": f"Bearer {token}"}
    return {
        "every": c.get_inference_statistics(headers=auth, as_json=True),
        "one": c.get_inference_statistics(model, version, headers=auth, as_json=True),
        "codes": {
            "no_token": _code(lambda: c.get_inference_statistics()),
            "unknown_model": _code(lambda: c.get_inference_statistics("nosuch", headers=auth)),
            "unknown_version": _code(lambda: c.get_inference_statistics(model, "99", headers=auth)),
        },
    }


if __name__ == "__main__":
    if sys.argv[1] == "--stats":
        print(json.dumps(stats(*sys.argv[2:6])))
    else:
        print(json.dumps(main(*sys.argv[1:4])))
