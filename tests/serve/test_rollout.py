"""Staged rollouts on a real server process with a real registry: promotion of a faithful candidate, rollback of a
broken one at its first gate with zero client errors, state surviving a restart, and every bad input refused."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import yaml

from tests.serve.conftest import Load, ServerProcess, perturbed_candidate, wait_for

ADMIN = "adm1n-t0ken"
H = {"Authorization": f"Bearer {ADMIN}"}


def _bodies(digits, n: int = 64) -> list[dict]:
    out = []
    for _, batch in digits.eval_batches(limit=n, batch_size=1):
        x = batch["pixels"].astype(np.float32)
        out.append(
            {
                "inputs": [
                    {"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
                ]
            }
        )
    return out


@pytest.fixture(scope="module")
def registry_root(digits, digits_chain, tmp_path_factory):
    from slimship.registry import Registry

    root = tmp_path_factory.mktemp("rollout-reg")
    _, exp, opt = digits_chain
    reg = Registry(root / "reg")
    reg.register(exp.path, "digits", stage="production")  # v1
    reg.register(opt.path, "digits", parent=1)  # v2: graph-optimised, same function
    broken = perturbed_candidate(exp, digits, root / "broken", scale=1.5)
    reg.register(broken.path, "digits", parent=1)  # v3: weights perturbed
    reg.close()
    return root / "reg"


def _server(tmp_path, registry_root, versions=("1", "2", "3")) -> ServerProcess:
    cfg = {"registry": str(registry_root), "models": [{"name": "digits", "registry": v} for v in versions]}
    return ServerProcess(tmp_path, cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN})


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimship.cli", "rollout", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SLIMSHIP_ADMIN_TOKEN": ADMIN},
    )


def _status(s: ServerProcess) -> dict:
    r = httpx.get(f"http://{s.url}/v2/admin/models/digits/rollout", headers=H)
    assert r.status_code == 200, r.text
    return r.json()


POLICY = {
    "stages": [
        {"name": "shadow", "traffic": 0, "compare": 100, "min_requests": 40},
        {"name": "canary-20", "traffic": 20, "compare": 50, "min_requests": 20},
        {"name": "full", "traffic": 100, "compare": 50, "min_requests": 20},
    ],
    "gates": {"min_fidelity": 0.99, "max_error_rate": 0.01, "max_latency_p99_ms": 2000},
    "min_pairs": 20,
}


def test_faithful_candidate_goes_shadow_canary_full_and_is_promoted(tmp_path, digits, registry_root):
    from slimship.registry import Registry

    s = _server(tmp_path, registry_root, ("1", "2"))
    load = None
    try:
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(POLICY))
        cli = _cli("start", "digits", "--candidate", "2", "--policy", str(policy), "--url", f"http://{s.url}")
        assert cli.returncode == 0, cli.stderr
        assert "rollout #" in cli.stdout and "[shadow]" in cli.stdout
        load = Load(s.url, _bodies(digits))
        st = wait_for(
            lambda: (x := _status(s))["state"] in ("promoted", "rolled_back") and x,
            120,
            what="the rollout to end",
        )
        load.stop()
        assert st["state"] == "promoted", st
        assert load.statuses and set(load.statuses) == {200}
        assert {"1", "2"} <= set(load.versions)  # clients met both during the canary stages
        kinds = [e["kind"] for e in st["history"]]
        assert kinds == ["rollout.started", "rollout.advanced", "rollout.advanced", "rollout.promoted"], kinds
        for e, stage in zip(st["history"][1:], POLICY["stages"], strict=True):
            d = e["detail"]
            assert d["stage_name"] == stage["name"] and d["candidate"]["requests"] >= stage["min_requests"]
            assert d["fidelity"]["pairs"] >= 20 and d["fidelity"]["mean"] >= 0.99
            # judged by the workload's own fidelity function, as offline
            assert d["fidelity"]["judged_by"] == {"workload digits: top1_agreement": d["fidelity"]["pairs"]}
            assert all(g["ok"] and g["judged"] for g in d["gates"].values()), d["gates"]
            assert d["window"]["from"] < d["window"]["to"]
        # the registry moved the stages, with the evidence
        reg = Registry(registry_root)
        assert reg.get("digits", 2).stage == "production" and reg.get("digits", 1).stage == "archived"
        promo = [
            e for e in reg.events("digits", 2) if e["kind"] == "stage" and e["detail"]["to"] == "production"
        ][-1]
        assert promo["detail"]["evidence"]["rollout"] == st["rollout"]
        # and every request now goes to v2
        vs = {
            httpx.post(f"http://{s.url}/v2/models/digits/infer", json=_bodies(digits, 1)[0]).headers[
                "x-model-version"
            ]
            for _ in range(20)
        }
        assert vs == {"2"}
        metrics = httpx.get(f"http://{s.url}/metrics").text
        assert 'slimship_rollout_decisions_total{decision="advance",model="digits"} 3.0' in metrics
        # put production back for the other tests of this module
        reg.set_stage("digits", 1, "production", reason="test reset")
        reg.close()
    finally:
        if load:
            load.stop()
        s.stop()


def test_broken_candidate_is_rolled_back_at_the_first_gate_and_no_client_sees_it(
    tmp_path, digits, registry_root
):
    from slimship.registry import Registry

    s = _server(tmp_path, registry_root, ("1", "3"))
    load = Load(s.url, _bodies(digits))
    try:
        r = httpx.post(
            f"http://{s.url}/v2/admin/models/digits/rollout",
            json={"candidate": "3", "policy": POLICY},
            headers=H,
        )
        assert r.status_code == 200, r.text
        st = wait_for(lambda: (x := _status(s))["state"] != "running" and x, 120, what="a decision")
        n_at_decision = len(load.statuses)
        wait_for(lambda: len(load.statuses) > n_at_decision + 30, 60, what="more requests after the rollback")
        load.stop()
        assert st["state"] == "rolled_back" and st["stage"]["index"] == 0, st
        assert "fidelity" in st["reason"] and "shadow" in st["reason"]
        assert set(load.statuses) == {200}, "clients must see zero errors"
        assert "3" not in load.versions, "in the shadow stage nobody is answered by the candidate"
        last = st["history"][-1]
        assert last["kind"] == "rollout.rolled_back"
        ev = last["detail"]
        assert ev["gates"]["min_fidelity"]["ok"] is False and ev["fidelity"]["pairs"] >= POLICY["min_pairs"]
        assert ev["fidelity"]["mean"] < 0.99 and ev["candidate"]["requests"] >= 1
        reg = Registry(registry_root)
        v3 = reg.get("digits", 3)
        assert v3.stage == "archived" and reg.get("digits", 1).stage == "production"
        stage_ev = [e for e in reg.events("digits", 3) if e["kind"] == "stage"][-1]["detail"]
        assert (
            stage_ev["reason"].startswith("rolled back") and stage_ev["evidence"]["fidelity"]["mean"] < 0.99
        )
        reg.set_stage("digits", 3, "none", reason="test reset")
        reg.close()
    finally:
        load.stop()
        s.stop()


def test_a_rollout_survives_a_server_restart_and_can_be_aborted(tmp_path, digits, registry_root):
    policy = {
        "stages": [
            {"name": "shadow", "traffic": 0, "min_requests": 20},
            {"name": "half", "traffic": 50, "min_requests": 1_000_000},
        ],
        "gates": {"min_fidelity": 0.99},
        "min_pairs": 10,
        "promote": False,
    }
    s = _server(tmp_path, registry_root, ("1", "2"))
    load = Load(s.url, _bodies(digits))
    try:
        r = httpx.post(
            f"http://{s.url}/v2/admin/models/digits/rollout",
            json={"candidate": "2", "policy": policy},
            headers=H,
        )
        assert r.status_code == 200, r.text
        rid = r.json()["rollout"]
        wait_for(lambda: _status(s)["stage"]["index"] == 1, 60, what="the second stage")
    finally:
        load.stop()
        assert s.stop() in (0, -15)
    s = _server(tmp_path, registry_root, ("1", "2"))  # a new process: the state comes from the registry
    try:
        st = _status(s)
        assert st["rollout"] == rid and st["state"] == "running" and st["stage"]["name"] == "half"
        assert st["history"][-1]["kind"] == "rollout.restored"
        seen = {
            httpx.post(f"http://{s.url}/v2/models/digits/infer", json=_bodies(digits, 1)[0]).headers[
                "x-model-version"
            ]
            for _ in range(60)
        }
        assert seen == {"1", "2"}  # the 50% split is back in force
        # pause → resume → abort through the CLI
        for action, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
            out = _cli(action, "digits", "--reason", f"test {action}", "--url", f"http://{s.url}", "--json")
            assert out.returncode == 0, out.stderr
            assert yaml.safe_load(out.stdout)["state"] == state
        seen = {
            httpx.post(f"http://{s.url}/v2/models/digits/infer", json=_bodies(digits, 1)[0]).headers[
                "x-model-version"
            ]
            for _ in range(30)
        }
        assert seen == {"1"}
        kinds = [e["kind"] for e in _status(s)["history"]]
        assert kinds[-3:] == ["rollout.paused", "rollout.resumed", "rollout.aborted"]
        out = _cli("status", "digits", "--url", f"http://{s.url}")
        assert (
            out.returncode == 0
            and f"rollout #{rid} aborted" in out.stdout
            and "rollout.restored" in out.stdout
        ), out.stdout
    finally:
        s.stop()


def test_bad_rollout_requests_get_clear_errors(tmp_path, digits, digits_chain, registry_root):
    s = _server(tmp_path, registry_root, ("1", "2"))
    base = f"http://{s.url}/v2/admin/models/digits"
    try:

        def start(body):
            return httpx.post(f"{base}/rollout", json=body, headers=H)

        r = start(
            {"candidate": "2", "policy": {"stages": [{"traffic": 100, "min_requests": 5, "min_requets": 1}]}}
        )
        assert (
            r.status_code == 400
            and "min_requets" in r.json()["error"]
            and "invalid rollout policy" in r.json()["error"]
        )
        r = start(
            {
                "candidate": "2",
                "policy": {"stages": [{"traffic": 100, "min_requests": 5}], "gates": {"min_fidelity": 1.5}},
            }
        )
        assert r.status_code == 400 and "min_fidelity" in r.json()["error"]
        r = start(
            {
                "candidate": "2",
                "policy": {
                    "stages": [
                        {"traffic": 10, "compare": 0, "min_requests": 5},
                        {"traffic": 100, "min_requests": 5},
                    ],
                    "gates": {"min_fidelity": 0.9},
                },
            }
        )
        assert r.status_code == 400 and "can never be judged" in r.json()["error"]
        r = start(
            {
                "candidate": "2",
                "policy": {
                    "stages": [{"traffic": 50, "min_requests": 5}, {"traffic": 20, "min_requests": 5}]
                },
            }
        )
        assert r.status_code == 400 and "only moves traffic towards the candidate" in r.json()["error"]
        r = start({"candidate": "7"})
        assert (
            r.status_code == 404
            and "no loaded version '7'" in r.json()["error"]
            and "load it first" in r.json()["error"]
        )
        assert httpx.post(f"{base}/rollout", json={"candidate": "2"}).status_code == 401  # no token
        # the CLI checks the policy file before calling the server
        bad = tmp_path / "bad.yaml"
        bad.write_text("stages: [{traffic: 100, min_requests: 5}]\ngates: {max_error_rate: 2}\n")
        out = _cli("start", "digits", "--candidate", "2", "--policy", str(bad), "--url", f"http://{s.url}")
        assert out.returncode == 2 and "max_error_rate" in out.stdout + out.stderr
        # while one runs: no second rollout, no manual traffic, no unloading its versions
        slow = {"stages": [{"traffic": 0, "min_requests": 1_000_000}, {"traffic": 100, "min_requests": 1}]}
        assert start({"candidate": "2", "policy": slow}).status_code == 200
        r = start({"candidate": "2", "policy": slow})
        assert r.status_code == 409 and "already has a running rollout" in r.json()["error"]
        r = httpx.put(f"{base}/traffic", json={"weights": {"2": 1}}, headers=H)
        assert r.status_code == 409 and "controls digits's traffic" in r.json()["error"]
        r = httpx.post(f"{base}/versions/2/unload", headers=H)
        assert r.status_code == 409 and "abort the rollout" in r.json()["error"]
        r = httpx.post(f"{base}/rollout/jump", headers=H)
        assert r.status_code == 404 and "pause, resume or abort" in r.json()["error"]
        assert httpx.post(f"{base}/rollout/resume", headers=H).status_code == 409  # it isn't paused
        assert httpx.post(f"{base}/rollout/abort", headers=H).json()["state"] == "aborted"
        # the server is still healthy
        assert (
            httpx.post(f"http://{s.url}/v2/models/digits/infer", json=_bodies(digits, 1)[0]).status_code
            == 200
        )
    finally:
        s.stop()
    # a server without a registry can't run rollouts: it says why
    _, _, opt = digits_chain
    s = ServerProcess(
        tmp_path,
        {
            "models": [
                {"name": "digits", "path": str(opt.artifact_path), "version": "1"},
                {"name": "digits", "path": str(opt.artifact_path), "version": "2"},
            ]
        },
        env={"SLIMSHIP_ADMIN_TOKEN": ADMIN},
    )
    try:
        r = httpx.post(f"http://{s.url}/v2/admin/models/digits/rollout", json={"candidate": "2"}, headers=H)
        assert r.status_code == 400 and "--registry" in r.json()["error"]
    finally:
        s.stop()


def test_policy_validation_and_gate_judgement_units():
    from slimship.errors import ConfigError
    from slimship.serve.config import DEFAULT_POLICY, parse_policy
    from slimship.serve.gates import Window, judge

    assert parse_policy(None).stages[0].traffic == 0
    assert parse_policy(DEFAULT_POLICY).stages[-1].traffic == 100
    with pytest.raises(ConfigError, match="promotion needs a last stage at traffic 100"):
        parse_policy({"stages": [{"traffic": 50, "min_requests": 1}]})
    with pytest.raises(ConfigError, match="would never see a request"):
        parse_policy(
            {"stages": [{"traffic": 0, "compare": 0, "min_requests": 1}, {"traffic": 100, "min_requests": 1}]}
        )
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_policy("stages: [")
    p = parse_policy(
        {
            "stages": [{"traffic": 10, "min_requests": 100}, {"traffic": 100, "min_requests": 100}],
            "gates": {"max_error_rate": 0.02, "max_latency_p99_ms": 50, "min_fidelity": 0.98},
            "min_pairs": 10,
        }
    )
    w = Window()
    for _ in range(10):
        w.candidate.add(True, 5.0)
        w.fidelity.append(0.999)
    assert judge(p, 0, w).decision == "wait"  # 10/100 requests
    w.candidate.add(False, None)
    w.candidate.add(False, None)
    assert judge(p, 0, w).decision == "wait"  # 2 errors: still within 2% of 100
    w.candidate.add(False, None)
    j = judge(p, 0, w)
    assert (
        j.decision == "rollback" and "error rate" in j.reason
    )  # 3 > 2 allowed: certain, no need to wait for 100
    w = Window()
    for i in range(100):
        w.candidate.add(True, 60.0 if i < 2 else 5.0)  # 2 slow of 100: nearest-rank p99 is 60 > 50
        w.fidelity.append(0.999)
    j = judge(p, 0, w)
    assert j.decision == "rollback" and "slower than 50" in j.reason
    w.candidate.latencies_ms[0] = 5.0  # 1 slow of 100 is what a p99 tolerates
    assert judge(p, 0, w).decision == "advance"
    w.fidelity[:] = [0.9] * 10
    assert judge(p, 0, w).decision == "rollback"
    # compare runs (background, queued behind the answering version) are never judged for latency, and a shadow
    # stage has no answered requests: its latency gates don't apply
    w = Window()
    for _ in range(100):
        w.candidate.add(True, 500.0, live=False)
        w.fidelity.append(0.999)
    shadow = parse_policy(
        {
            "stages": [{"traffic": 0, "min_requests": 100}, {"traffic": 100, "min_requests": 1}],
            "gates": {"max_latency_p99_ms": 50, "max_latency_p99_ratio": 1.5},
            "min_pairs": 10,
        }
    )
    j = judge(shadow, 0, w)
    assert j.decision == "advance" and j.gates["max_latency_p99_ms"]["applies"] is False
    assert judge(p, 0, w).decision == "wait"  # at 10% it waits for 100 answered requests
    # a soak time holds a stage that has its requests
    soak = parse_policy(
        {
            "stages": [
                {"traffic": 0, "min_requests": 10, "min_seconds": 60},
                {"traffic": 100, "min_requests": 1},
            ]
        }
    )
    w = Window()
    for _ in range(10):
        w.candidate.add(True, 5.0)
    assert judge(soak, 0, w, now=w.started + 30).decision == "wait"
    assert judge(soak, 0, w, now=w.started + 61).decision == "advance"


def test_the_example_policy_and_serving_config_are_valid():
    from pathlib import Path

    from slimship.serve.config import load_serve_config, parse_policy

    root = Path(__file__).resolve().parents[2] / "examples" / "rollout"
    p = parse_policy((root / "policy.yaml").read_text(), "policy.yaml")
    assert [s.traffic for s in p.stages] == [0, 5, 25, 50, 100] and p.gates.min_fidelity == 0.98
    cfg = load_serve_config(root / "serve.yaml", {})
    assert [m.registry for m in cfg.models] == ["production", "latest"]


def _two_version_registry(root, digits_chain):
    from slimship.registry import Registry

    _, exp, opt = digits_chain
    reg = Registry(root)
    reg.register(exp.path, "digits", stage="production")  # v1
    reg.register(opt.path, "digits", parent=1)  # v2
    reg.close()
    return root


def test_a_rollout_another_server_started_is_a_typed_conflict_and_409(tmp_path, digits_chain):
    from slimship.errors import RegistryError, RolloutConflictError
    from slimship.registry import Registry

    root = _two_version_registry(tmp_path / "reg", digits_chain)
    reg = Registry(root)
    first = reg.start_rollout("digits", 2, 1, {"stages": []}, served_as="digits")
    with pytest.raises(RolloutConflictError) as err:
        reg.start_rollout("digits", 2, 1, {"stages": []}, served_as="digits")
    assert isinstance(err.value, RegistryError) and "abort it first" in str(err.value)
    assert err.value.rollout_id == first["id"] and err.value.state == "running"
    reg.update_rollout(first["id"], "rollout.aborted", {}, state="aborted", reason="test")
    reg.close()
    # two servers on one registry: the second learns of the first's rollout from the registry only
    servers = [_server(tmp_path, root, ("1", "2")) for _ in range(2)]
    slow = {"stages": [{"traffic": 0, "min_requests": 1_000_000}, {"traffic": 100, "min_requests": 1}]}
    try:
        a, b = (f"http://{s.url}/v2/admin/models/digits/rollout" for s in servers)
        assert httpx.post(a, json={"candidate": "2", "policy": slow}, headers=H).status_code == 200
        r = httpx.post(b, json={"candidate": "2", "policy": slow}, headers=H)
        assert r.status_code == 409 and "already has a running rollout" in r.json()["error"], r.text
        assert httpx.post(f"{a}/abort", headers=H).json()["state"] == "aborted"
    finally:
        for s in servers:
            s.stop()


def test_rollout_errors_list_versions_in_numeric_order(tmp_path, digits_chain):
    root = _two_version_registry(tmp_path / "reg", digits_chain)
    cfg = {
        "registry": str(root),
        "models": [
            {"name": "digits", "registry": "1", "version": "2"},
            {"name": "digits", "registry": "2", "version": "10"},
        ],
    }
    s = ServerProcess(tmp_path, cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN})
    try:
        r = httpx.post(f"http://{s.url}/v2/admin/models/digits/rollout", json={"candidate": "7"}, headers=H)
        assert r.status_code == 404 and "(loaded: ['2', '10'])" in r.json()["error"], r.text
    finally:
        s.stop()
