"""Verification at load on a real server: a candidate's probe runs on this host before it is served; a changed
artifact or a shortfall from the recorded fidelity is refused with the reason, and the server keeps serving the
others. `slimship verify` gives the same answer from the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.serve.conftest import ServerProcess

ADMIN = "v3rify-adm1n"
H = {"Authorization": f"Bearer {ADMIN}"}
X = {"inputs": [{"name": "pixels", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.25] * 128}]}


@pytest.fixture(scope="module")
def variants(digits, digits_chain, tmp_path_factory):
    from slimship.passes import run_pass

    root = tmp_path_factory.mktemp("verify")
    good = run_pass("quantize-dynamic", digits_chain[2], digits, {}, root / "good")
    assert good.info["probe"]["outputs"]["logits"]["cosine_mean"] > 0.9
    tampered = root / "tampered"
    shutil.copytree(good.path, tampered)
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(
        str(tampered / good.artifact)
    )  # weights changed after the candidate was recorded, still loadable
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
    onnx.save(m, str(tampered / good.artifact))
    # "falls short on this host": the bytes its candidate.json records (sha re-recorded) answer worse than the
    # fidelity its probe recorded on an AMX host — what a host whose int8 kernels saturate would see
    from slimship._util import sha256_file

    short = root / "short"
    shutil.copytree(tampered, short)
    meta = json.loads((short / "candidate.json").read_text())
    meta["artifact_sha256"] = sha256_file(short / good.artifact)
    meta["info"]["probe"]["cpu_class"] = "amx"
    (short / "candidate.json").write_text(json.dumps(meta))
    return good.path, tampered, short


def test_refused_at_load_with_the_reason_and_the_others_keep_serving(variants, tmp_path):
    good, tampered, short = variants
    s = ServerProcess(
        tmp_path, {"models": [{"name": "digits", "path": str(good)}]}, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN}
    )
    try:
        base = f"http://{s.url}"
        meta = httpx.get(f"{base}/v2/models/digits").json()
        assert meta["parameters"]["verification"]["status"] == "passed"
        r = httpx.post(
            f"{base}/v2/admin/models/digits/load", json={"path": str(tampered), "version": "2"}, headers=H
        )
        assert r.status_code == 400 and "changed or corrupted" in r.json()["error"]
        r = httpx.post(
            f"{base}/v2/admin/models/digits/load", json={"path": str(short), "version": "3"}, headers=H
        )
        err = r.json()["error"]
        assert (
            r.status_code == 400
            and "refusing digits v3" in err
            and "recorded on amx" in err
            and "batching.verify: warn" in err
        )
        assert httpx.post(f"{base}/v2/models/digits/infer", json=X).status_code == 200
        # by policy the shortfall is served, and says so
        body = {"path": str(short), "version": "4", "batching": {"verify": "warn"}}
        assert httpx.post(f"{base}/v2/admin/models/digits/load", json=body, headers=H).status_code == 200
        state = httpx.get(f"{base}/v2/admin/models", headers=H).json()["models"]["digits"]["versions"]
        assert set(state) == {"1", "4"} and state["4"]["verification"]["status"] == "failed"
        assert state["1"]["verification"]["host_cpu_class"] == state["4"]["verification"]["host_cpu_class"]
        metrics = httpx.get(f"{base}/metrics").text
        assert 'slimship_probe_verified{model="digits",version="1"} 1.0' in metrics
        assert 'slimship_probe_verified{model="digits",version="4"} 0.0' in metrics
        assert httpx.post(f"{base}/v2/models/digits/versions/4/infer", json=X).status_code == 200
    finally:
        s.stop()


def test_registry_records_the_cpu_classes_a_version_was_verified_on(variants, tmp_path):
    from slimship.machine import cpu_class
    from slimship.registry import Registry

    good, _, _ = variants
    reg = Registry(tmp_path / "reg")
    reg.register(good, "digits", stage="production")
    s = ServerProcess(
        tmp_path,
        {"registry": str(tmp_path / "reg"), "models": [{"name": "digits", "registry": "production"}]},
    )
    try:
        assert httpx.post(f"http://{s.url}/v2/models/digits/infer", json=X).status_code == 200
    finally:
        s.stop()
    assert reg.verified_on("digits", 1) == [cpu_class()]
    kinds = [e["kind"] for e in reg.events("digits", 1)]
    assert kinds.count("verified") == 2  # where it was made, and the serving host


def test_the_verify_command_exit_codes(variants):
    good, tampered, short = variants

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "slimship.cli", "verify", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )

    ok = run(good)
    assert ok.returncode == 0 and "holds" in ok.stdout and "settings" in ok.stdout, ok.stdout + ok.stderr
    bad = run(short, "--json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["recorded_cpu_class"] == "amx"
    broken = run(tampered)
    assert broken.returncode == 2 and "changed or corrupted" in broken.stderr
