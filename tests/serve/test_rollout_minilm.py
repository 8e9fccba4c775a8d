"""The rollout acceptance on the real sentence encoder: fp32 MiniLM in production, an INT8 candidate promoted through
shadow → canary → 100% under load built from BBC News text, a badly quantized candidate rolled back at its first gate
with zero client errors and the evidence in the registry — and drift: news stays under the threshold, source code
goes over it."""

from __future__ import annotations

import inspect
import json

import httpx
import pytest

from tests.serve.conftest import Load, ServerProcess, wait_for

pytestmark = pytest.mark.slow

ADMIN = "adm1n-t0ken"
H = {"Authorization": f"Bearer {ADMIN}"}
POLICY = {
    "stages": [
        {"name": "shadow", "traffic": 0, "compare": 100, "min_requests": 60},
        {"name": "canary-25", "traffic": 25, "compare": 50, "min_requests": 30},
        {"name": "canary-50", "traffic": 50, "compare": 50, "min_requests": 30},
        {"name": "full", "traffic": 100, "compare": 50, "min_requests": 30},
    ],
    "gates": {"min_fidelity": 0.98, "max_error_rate": 0.0, "max_latency_p99_ratio": 2.0},
    "min_pairs": 30,
}


def _bodies(minilm, texts: list[str]) -> list[dict]:
    out = []
    for t in texts:
        b = minilm._tokenize([t])
        out.append(
            {
                "inputs": [
                    {"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()}
                    for k, v in b.items()
                ]
            }
        )
    return out


def _status(url: str) -> dict:
    return httpx.get(f"http://{url}/v2/admin/models/minilm/rollout", headers=H).json()


def _version_drift(url: str, version: str) -> dict:
    st = httpx.get(f"http://{url}/v2/dashboard/state").json()["models"][0]
    return next(v for v in st["versions"] if v["version"] == version)["drift"]


def test_minilm_int8_promoted_broken_candidate_rolled_back_and_drift(
    tmp_path, minilm, minilm_chain, minilm_int8
):
    from slimship.passes import run_pass
    from slimship.registry import Registry

    _, _, fp32 = minilm_chain
    good = minilm_int8  # quantize-dynamic's defaults: per-channel weight scales
    assert good.pass_config["per_channel"] is True
    # badly quantized: one scale per weight tensor, and the FFN-output activations' outliers are left as they are
    bad = run_pass(  # ORT quantize_dynamic defaults: per-tensor weights and activation scales
        "quantize-dynamic",
        fp32,
        minilm,
        {"per_channel": False, "activation_scales": "per-tensor"},
        tmp_path / "int8-per-tensor",
    )
    reg = Registry(tmp_path / "reg")
    reg.register(fp32.path, "minilm", stage="production")  # v1
    reg.register(good.path, "minilm", parent=1)  # v2
    reg.register(bad.path, "minilm", parent=1)  # v3
    drift = {"window": 300, "min_rows": 300}
    cfg = {
        "registry": str(tmp_path / "reg"),
        "models": [{"name": "minilm", "registry": v, "drift": drift} for v in ("1", "2", "3")],
    }
    s = ServerProcess(tmp_path, cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN})
    reference = set(minilm.eval_texts(limit=256))  # what the drift reference is built from (512 samples)
    rest = [
        t for t in minilm.eval_texts() if t not in reference
    ]  # headlines of the other articles, then their bodies
    half = len(rest) // 2
    news = [
        t for pair in zip(rest[:200], rest[half : half + 200], strict=True) for t in pair
    ]  # headline, body, …
    wait_for(
        lambda: all(
            v["drift"]["status"] == "ready"
            for v in httpx.get(f"http://{s.url}/v2/dashboard/state").json()["models"][0]["versions"]
        ),
        300,
        every=1,
        what="the drift references",
    )
    load = Load(s.url, _bodies(minilm, news), clients=2, path="/v2/models/minilm/infer")
    try:
        # 1. the faithful INT8 candidate goes all the way
        r = httpx.post(
            f"http://{s.url}/v2/admin/models/minilm/rollout",
            json={"candidate": "2", "policy": POLICY},
            headers=H,
        )
        assert r.status_code == 200, r.text
        st = wait_for(
            lambda: (x := _status(s.url))["state"] not in ("running", "paused") and x,
            600,
            every=1,
            what="promotion",
        )
        assert st["state"] == "promoted", json.dumps(st, indent=1)[:3000]
        kinds = [e["kind"] for e in st["history"]]
        assert kinds == ["rollout.started"] + ["rollout.advanced"] * 3 + ["rollout.promoted"], kinds
        fid = [e["detail"]["fidelity"]["mean"] for e in st["history"][1:]]
        st_promoted = st
        assert min(fid) >= 0.98, fid
        assert reg.get("minilm", 2).stage == "production" and reg.get("minilm", 1).stage == "archived"
        n_promoted = len(load.statuses)
        # 2. the badly quantized candidate, against the new production version: rolled back at the first gate
        r = httpx.post(
            f"http://{s.url}/v2/admin/models/minilm/rollout",
            json={"candidate": "3", "policy": POLICY},
            headers=H,
        )
        assert r.status_code == 200, r.text
        assert r.json()["baseline"]["version"] == 2  # the registry's production version, found by the server
        st = wait_for(
            lambda: (x := _status(s.url))["state"] not in ("running", "paused") and x,
            600,
            every=1,
            what="a decision",
        )
        wait_for(lambda: len(load.statuses) > n_promoted + 300, 300, what="news traffic for the drift window")
        load.stop()
        assert st["state"] == "rolled_back" and st["stage"]["name"] == "shadow", json.dumps(st, indent=1)[
            :3000
        ]
        ev = st["history"][-1]["detail"]
        assert ev["gates"]["min_fidelity"]["ok"] is False and ev["fidelity"]["mean"] < 0.98
        assert set(load.statuses) == {200}, "clients see zero errors"
        assert "3" not in load.versions
        assert reg.get("minilm", 3).stage == "archived" and reg.get("minilm", 2).stage == "production"
        rolled = [e for e in reg.events("minilm", 3, prefix="rollout.") if e["kind"] == "rollout.rolled_back"]
        assert rolled and rolled[0]["detail"]["fidelity"]["pairs"] >= 30
        # 3. drift of the production version: BBC news is in distribution; Python source code is not
        d = wait_for(
            lambda: (x := _version_drift(s.url, "2"))["score"] is not None and x, 30, what="a drift score"
        )
        assert not d["alert"] and d["score"] < 0.25, d["features"]
        news_drift = d
        code = [
            line.strip()
            for line in inspect.getsource(json.decoder).splitlines() + inspect.getsource(inspect).splitlines()
            if len(line.strip()) > 20
        ][:300]
        with httpx.Client(base_url=f"http://{s.url}") as c:
            for body in _bodies(minilm, code):
                assert c.post("/v2/models/minilm/infer", json=body).status_code == 200
        d = wait_for(lambda: (x := _version_drift(s.url, "2"))["alert"] and x, 15, what="the drift alert")
        assert d["score"] >= 0.25, d
        (tmp_path / "figures.json").write_text(
            json.dumps(
                {"promoted": st_promoted, "rolled_back": ev, "drift_news": news_drift, "drift_code": d},
                indent=1,
            )
        )
    finally:
        load.stop()
        s.stop()
        reg.close()
