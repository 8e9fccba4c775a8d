"""Drift against a reference built from the workload's evaluation data, on a real server: in-distribution traffic
stays under the alert threshold, shifted traffic goes over it and raises the alert (metric and log line)."""

from __future__ import annotations

import json

import httpx
import numpy as np

from tests.serve.conftest import ServerProcess, wait_for


def _send(url: str, x: np.ndarray, rows: int = 8) -> None:
    with httpx.Client(base_url=f"http://{url}") as c:
        for i in range(0, len(x), rows):
            b = x[i : i + rows].astype(np.float32)
            r = c.post(
                "/v2/models/digits/infer",
                json={
                    "inputs": [
                        {
                            "name": "pixels",
                            "shape": list(b.shape),
                            "datatype": "FP32",
                            "data": b.ravel().tolist(),
                        }
                    ]
                },
            )
            assert r.status_code == 200, r.text


def _drift(url: str) -> dict:
    st = httpx.get(f"http://{url}/v2/dashboard/state").json()
    return st["models"][0]["versions"][0]["drift"]


def test_drift_stays_low_in_distribution_and_alerts_on_shifted_inputs(tmp_path, digits, digits_chain):
    _, _, opt = digits_chain
    cfg = {
        "models": [
            {
                "name": "digits",
                "path": str(opt.path),
                "version": "1",  # a candidate dir: its workload is known
                "drift": {"window": 200, "min_rows": 120, "samples": 160},
            }
        ]
    }
    s = ServerProcess(tmp_path, cfg)
    try:
        wait_for(lambda: _drift(s.url)["status"] == "ready", 60, what="the drift reference")
        # the reference is the version on the first 160 test digits; live traffic: the other 200, which it never saw
        # (not training digits: the model is more confident on those, and the monitor rightly sees the difference)
        test = np.concatenate([b["pixels"] for _, b in digits.eval_batches(batch_size=64)])
        assert len(test) == 360
        _send(s.url, test[160:])
        d = wait_for(lambda: (x := _drift(s.url))["score"] is not None and x, 10, what="a drift score")
        assert d["rows"] == 200 and not d["alert"], d
        assert d["score"] < 0.25, d
        feats = d["features"]
        assert {
            "input.pixels.mean",
            "input.pixels.std",
            "input.pixels.pc1",
            "output.logits.top1",
            "output.logits.confidence",
        } <= set(feats)
        # the same digits, inverted (background and strokes swapped): what a broken upstream pre-processing sends
        lo, hi = float(test.min()), float(test.max())
        _send(s.url, (hi + lo) - test[160:])
        d = wait_for(lambda: (x := _drift(s.url))["alert"] and x, 10, what="the drift alert")
        assert d["score"] >= 0.25 and d["worst_feature"].startswith(("input.", "output.")), d
        metrics = httpx.get(f"http://{s.url}/metrics").text
        assert 'slimship_drift_alert{model="digits",version="1"} 1.0' in metrics
        assert 'slimship_drift_alerts_total{model="digits",version="1"} 1.0' in metrics
        assert 'slimship_drift_psi{feature="input.pixels.mean",model="digits",version="1"}' in metrics
    finally:
        s.stop()
    alerts = [json.loads(line) for line in s.log.read_text().splitlines() if '"drift.alert"' in line]
    assert alerts and alerts[0]["model"] == "digits" and alerts[0]["score"] >= 0.25


def test_bare_onnx_files_have_no_drift_monitor_unless_given_a_workload(tmp_path, digits_chain):
    _, _, opt = digits_chain
    cfg = {
        "models": [
            {"name": "digits", "path": str(opt.artifact_path), "version": "1"},
            {
                "name": "digits",
                "path": str(opt.artifact_path),
                "version": "2",
                "drift": {"workload": "digits"},
            },
        ]
    }
    s = ServerProcess(tmp_path, cfg)
    try:
        st = httpx.get(f"http://{s.url}/v2/dashboard/state").json()["models"][0]["versions"]
        assert st[0]["drift"] is None and st[1]["drift"]["status"] in ("building", "ready")
    finally:
        s.stop()
