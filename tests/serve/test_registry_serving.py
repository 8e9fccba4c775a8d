"""Serving registry versions: by stage at start, loaded through the admin API, staged through it; a changed
artifact is refused with a clear error and the server keeps serving what it has."""

from __future__ import annotations

import httpx
import numpy as np

from tests.serve.conftest import ServerProcess

ADMIN = "adm1n-t0ken"
H = {"Authorization": f"Bearer {ADMIN}"}
X = {"inputs": [{"name": "pixels", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.25] * 128}]}


def test_serve_registry_versions_load_stage_and_refuse_tampered(tmp_path, digits_chain):
    from slimship.registry import Registry

    _, exp, opt = digits_chain
    reg = Registry(tmp_path / "reg")
    reg.register(exp.path, "digits", stage="production")
    reg.register(opt.path, "digits", parent=1)
    s = ServerProcess(
        tmp_path,
        {"registry": str(tmp_path / "reg"), "models": [{"name": "digits", "registry": "production"}]},
        env={"SLIMSHIP_ADMIN_TOKEN": ADMIN},
    )
    try:
        base = f"http://{s.url}"
        meta = httpx.get(f"{base}/v2/models/digits").json()
        assert meta["versions"] == ["1"]  # served under its registry number
        r = httpx.post(f"{base}/v2/models/digits/infer", json=X)
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        # load v2 from the registry, send it a tenth of the traffic, then promote it
        r = httpx.post(f"{base}/v2/admin/models/digits/load", json={"registry": "2"}, headers=H)
        assert r.status_code == 200 and r.json()["source"]["digest"] == reg.get("digits", 2).digest
        assert (
            httpx.put(
                f"{base}/v2/admin/models/digits/traffic", json={"weights": {"1": 90, "2": 10}}, headers=H
            ).status_code
            == 200
        )
        r = httpx.post(
            f"{base}/v2/admin/models/digits/versions/2/stage",
            json={"stage": "production", "reason": "canary ok"},
            headers=H,
        )
        assert r.json() == {"model": "digits", "version": 2, "stage": "production"}
        assert [v.stage for v in reg.versions("digits")] == ["archived", "production"]
        # a checkout changed on disk is refused: the load fails with the reason, serving goes on
        reg.register(opt.path, "digits")  # v3, same bytes as v2 → same checkout directory
        ckpt = reg.fetch("digits", 3)
        data = bytearray(ckpt.artifact_path.read_bytes())
        data[100] ^= 0xFF
        ckpt.artifact_path.write_bytes(bytes(data))
        r = httpx.post(f"{base}/v2/admin/models/digits/load", json={"registry": "3"}, headers=H)
        assert r.status_code == 400 and "does not match the registered sha256" in r.json()["error"]
        out = httpx.post(f"{base}/v2/models/digits/versions/2/infer", json=X).json()["outputs"][0]
        assert np.isfinite(out["data"]).all() and out["shape"] == [2, 10]
    finally:
        s.stop()


def test_a_server_whose_model_fails_its_hash_does_not_start(tmp_path, digits_chain):
    import subprocess
    import sys

    from slimship.registry import Registry

    _, exp, _ = digits_chain
    reg = Registry(tmp_path / "reg")
    reg.register(exp.path, "digits", stage="production")
    ckpt = reg.fetch("digits", 1)
    ckpt.artifact_path.write_bytes(ckpt.artifact_path.read_bytes()[:-1])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimship.cli",
            "serve",
            "-m",
            "digits=registry:production",
            "--registry",
            str(tmp_path / "reg"),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert (
        "does not match the registered sha256" in err
        and "refusing to serve it" in err
        and "Traceback" not in err
    )
