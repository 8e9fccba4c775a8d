"""A crash inside OpenVINO's compile on a long-lived server: caught in the probe subprocess, the load is refused with
the reason, and the server goes on serving what it serves."""

from __future__ import annotations

import httpx

from tests.serve.conftest import ServerProcess

ADMIN = "0v-adm1n"
H = {"Authorization": f"Bearer {ADMIN}"}
X = {"inputs": [{"name": "pixels", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.25] * 128}]}


def test_a_compile_crash_refuses_the_load_and_the_server_keeps_serving(
    digits_chain, digits_openvino, tmp_path
):
    s = ServerProcess(
        tmp_path,
        {"models": [{"name": "digits", "path": str(digits_chain[1].path)}]},
        env={
            "SLIMSHIP_ADMIN_TOKEN": ADMIN,
            "SLIMSHIP_OPENVINO_PROBE_CRASH": "1",
        },  # the probe child dies: SIGFPE
    )
    try:
        base = f"http://{s.url}"
        r = httpx.post(
            f"{base}/v2/admin/models/digits/load",
            json={"path": str(digits_openvino.path), "version": "2"},
            headers=H,
            timeout=120,
        )
        assert r.status_code >= 400 and "crashed with SIGFPE in a probe subprocess" in r.json()["error"], (
            r.text
        )
        assert httpx.post(f"{base}/v2/models/digits/infer", json=X).status_code == 200
        state = httpx.get(f"{base}/v2/admin/models", headers=H).json()["models"]["digits"]["versions"]
        assert set(state) == {"1"}
        assert s.proc.poll() is None
    finally:
        s.stop()
