"""The anchor of the serving benchmark: a plain FastAPI + ONNX Runtime server, the way most teams first write
one — Open Inference Protocol JSON, one session.run per request (FastAPI runs sync handlers in its thread
pool), no batching.   python plain_fastapi.py MODEL.onnx PORT [SESSION_CONFIG_JSON]

SESSION_CONFIG_JSON (optional): ONNX Runtime session config entries to add, e.g.
'{"session.x64quantprecision": "1", "session.intra_op.allow_spinning": "0"}' — the same settings another server runs
the model with, so a comparison can separate the server's design from the session's settings."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

DT = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32}
options = ort.SessionOptions()
for key, value in (json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}).items():
    options.add_session_config_entry(key, value)
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.get("/v2/health/ready")
def ready() -> dict:
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
def infer(name: str, body: dict) -> JSONResponse:
    feeds = {
        i["name"]: np.asarray(i["data"], dtype=DT[i["datatype"]]).reshape(i["shape"]) for i in body["inputs"]
    }
    outs = session.run(None, feeds)
    return JSONResponse(
        {
            "model_name": name,
            "outputs": [
                {"name": o.name, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
                for o, a in zip(session.get_outputs(), outs, strict=False)
            ],
        }
    )


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
