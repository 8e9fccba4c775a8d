"""A replicated ingress (`slimship serve --ray --ingress-replicas 2`): both replicas answer, and what they must agree
on lives in one place — A/B tallies equal the clients' own counts exactly, a good candidate is promoted and a broken
one rolled back exactly once each, as with one ingress. One Ray instance (one server) serves the whole module; the
shared state's own rules (one claim wins, late observations dropped) are checked without Ray first."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from slimship.serve.compare import Agreement
from slimship.serve.shared import IngressState
from tests.serve.conftest import Load, ServerProcess, perturbed_candidate, wait_for
from tests.serve.test_ray_serve import _replica_pids
from tests.serve.test_rollout import POLICY, _bodies

ADMIN = "adm1n-t0ken"
H = {"Authorization": f"Bearer {ADMIN}"}


def test_shared_state_decides_once_and_keeps_ids_across_replicas():
    st = IngressState(max_ids=100)
    epoch, seq = st.publish("m", {"id": 7, "state": "running", "stage": 0}, True)
    key = (7, epoch)
    st.window_add(key, "candidate", True, 3.0, True)  # replica A
    st.window_add(key, "candidate", False, None, True)  # replica B
    st.window_agreement(key, 0.5, "j")
    w = st.window(key)
    assert (w.candidate.requests, w.candidate.errors, w.fidelity) == (2, 1, [0.5])
    assert st.claim(key) and not st.claim(key)  # the first replica to judge decides; the other doesn't
    st.window_add(key, "candidate", True, 1.0, True)  # late: the window was judged
    assert st.window(key).candidate.requests == 2
    e2, s2 = st.publish("m", {"id": 7, "state": "running", "stage": 1}, True)  # advanced: a fresh window
    assert e2 > epoch and s2 > seq and st.window((7, e2)).candidate.requests == 0
    assert st.publish("m", {"id": 7, "state": "paused", "stage": 1}, False)[0] == e2  # same window
    # an id answered through one replica takes feedback through the other
    st.answered("m", "2", ["r1", "body-1"])
    assert st.record("m", "body-1", True, "conv") == ("ok", "2")
    assert st.record("m", "r1", True, "conv") == ("ok", "2")
    assert st.record("m", "r1", True, "conv")[:2] == ("error", 409)
    assert st.record("m", "never", True, "conv")[:2] == ("error", 404)
    assert st.tallies("m") == {"2": 1}
    st.shadow_add("m", "3", Agreement(0.9, "j").value, "j")
    st.shadow_add("m", "3", None)
    assert st.shadow_stats("m")["3"]["pairs"] == 1 and st.shadow_stats("m")["3"]["errors"] == 1
    # run-time loads: one replica at a time per version, a loaded version is loaded once, every replica applies it
    assert st.reserve_version("load", "m", "9") and not st.reserve_version("load", "m", "9")
    s1 = st.version_change("load", "m", "9", {"batching": None})
    st.release_version("m", "9")
    assert not st.reserve_version("load", "m", "9")  # loaded (through replica A) already
    assert st.version_changes(0) == [(s1, "load", "m", "9", {"batching": None})]
    assert st.reserve_version("unload", "m", "9")  # replica B unloads it
    s2 = st.version_change("unload", "m", "9", None)
    st.applied("A", s2)
    assert st.replicas_applied(s2) == 1 and st.version_changes(s1) == [(s2, "unload", "m", "9", None)]
    st.applied("B", s1)
    assert st.replicas_applied(s2) == 1 and st.replicas_applied(s1) == 2
    st.release_version("m", "9")
    assert st.reserve_version("load", "m", "9")  # free again after the unload


@pytest.fixture(scope="module")
def ingress2(digits, digits_chain, tmp_path_factory):
    from slimship.registry import Registry

    root = tmp_path_factory.mktemp("ingress2")
    _, exp, opt = digits_chain
    reg = Registry(root / "reg")
    reg.register(exp.path, "digits", stage="production")  # v1
    reg.register(opt.path, "digits", parent=1)  # v2: graph-optimised, same function
    reg.register(perturbed_candidate(exp, digits, root / "broken", scale=1.5).path, "digits", parent=1)  # v3
    reg.close()
    cfg = {
        "registry": str(root / "reg"),
        "ingress_replicas": 2,
        "models": [{"name": "digits", "registry": v, "replicas": {"num_cpus": 0.5}} for v in "123"],
    }
    s = ServerProcess(root, cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN}, args=("--ray",), ready_timeout=240)
    try:
        yield s, root / "reg"
    finally:
        s.stop()


@pytest.mark.ray
def test_ab_tallies_of_two_ingress_replicas_equal_the_clients_counts(ingress2, digits):
    s, _ = ingress2
    base = f"http://{s.url}"
    r = httpx.put(f"{base}/v2/admin/models/digits/traffic", json={"weights": {"1": 50, "2": 50}}, headers=H)
    assert r.status_code == 200, r.text
    before = httpx.get(f"{base}/v2/models/digits/feedback").json()["answered"]
    time.sleep(1.0)  # each replica adopts the shared policy at its next sync (every 0.25 s)
    bodies = _bodies(digits)
    got: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    replicas: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            for k in range(50):
                rid = f"ab-{i}-{k}"
                r = c.post("/v2/models/digits/infer", json={**bodies[(i + k) % len(bodies)], "id": rid})
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                version, outcome = r.json()["model_version"], k % 3 == 0
                # the outcome goes to whichever replica the proxy picks, not necessarily the one that answered
                f = c.post("/v2/models/digits/feedback", json={"id": rid, "outcome": outcome, "metric": "ab"})
                if f.status_code != 200 or f.json()["version"] != version:
                    failures.append(f.text)
                with lock:
                    got[version] += 1
                    converted[version] += outcome
                    replicas[r.headers["x-slimship-ingress"]] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    assert len(replicas) == 2, replicas  # both ingress replicas answered
    assert sum(got.values()) == 200 and min(got["1"], got["2"]) >= 40, got  # the 50/50 split held
    summary = httpx.get(f"{base}/v2/models/digits/feedback").json()
    answered = {v: n - before.get(v, 0) for v, n in summary["answered"].items()}
    assert {v: n for v, n in answered.items() if n} == dict(got)  # the server's tallies are the clients' own
    variants = summary["metrics"]["ab"]["variants"]
    assert {v: x["n"] for v, x in variants.items()} == dict(got)
    assert {v: round(x["rate"] * x["n"]) for v, x in variants.items()} == {v: converted[v] for v in got}


def _rollout(s: ServerProcess, digits, candidate: str) -> tuple[dict, Load]:
    base = f"http://{s.url}"
    r = httpx.post(
        f"{base}/v2/admin/models/digits/rollout",
        json={"candidate": candidate, "baseline": "1", "policy": POLICY},
        headers=H,
    )
    assert r.status_code == 200, r.text
    started = r.json()["rollout"]
    # whichever replica answers, a status read after the start shows this rollout, never the previous one
    first = httpx.get(f"{base}/v2/admin/models/digits/rollout", headers=H).json()
    assert first["rollout"] == started, first
    load = Load(s.url, _bodies(digits), clients=3)
    try:
        st = wait_for(
            lambda: (
                (x := httpx.get(f"{base}/v2/admin/models/digits/rollout", headers=H).json())["state"]
                != "running"
                and x["rollout"] == started
                and x
            ),
            120,
            every=0.5,
            what="the rollout to end",
        )
        time.sleep(1.0)  # every replica has adopted the decision by now (they sync every 0.25 s)
        n = len(load.statuses)
        wait_for(lambda: len(load.statuses) > n + 30, 60, what="requests after the decision")
    finally:
        load.stop()
    return st, load


@pytest.mark.ray
def test_two_ingress_replicas_promote_a_good_candidate_once(ingress2, digits):
    from slimship.registry import Registry

    s, reg_root = ingress2
    # shadow → canary → full → promoted: one decision per stage although both replicas judge every tick
    st, load = _rollout(s, digits, "2")
    assert st["state"] == "promoted", st
    assert set(load.statuses) == {200} and {"1", "2"} <= set(load.versions)
    kinds = [e["kind"] for e in st["history"]]
    assert kinds == ["rollout.started", "rollout.advanced", "rollout.advanced", "rollout.promoted"], kinds
    for e, stage in zip(st["history"][1:], POLICY["stages"], strict=True):
        d = e["detail"]  # the evidence counts both replicas' requests and compares
        assert d["stage_name"] == stage["name"] and d["candidate"]["requests"] >= stage["min_requests"]
        assert d["fidelity"]["pairs"] >= POLICY["min_pairs"] and d["fidelity"]["mean"] >= 0.99
    assert load.versions[-30:] == ["2"] * 30  # every replica routes to the winner
    reg = Registry(reg_root)
    try:
        to_prod = [
            e for e in reg.events("digits", 2) if e["kind"] == "stage" and e["detail"]["to"] == "production"
        ]
        assert len(to_prod) == 1 and to_prod[0]["detail"]["evidence"]["rollout"] == st["rollout"]
    finally:
        reg.close()


@pytest.mark.ray
def test_two_ingress_replicas_roll_a_broken_candidate_back_once(ingress2, digits):
    from slimship.registry import Registry

    s, reg_root = ingress2
    # rolled back at its first gate, once, and no client ever answered by it
    st, load = _rollout(s, digits, "3")
    assert st["state"] == "rolled_back" and st["stage"]["index"] == 0, st
    assert "fidelity" in st["reason"]
    assert [e["kind"] for e in st["history"]] == ["rollout.started", "rollout.rolled_back"]
    assert set(load.statuses) == {200} and "3" not in load.versions
    assert load.versions[-30:] == ["1"] * 30  # back on the baseline everywhere
    reg = Registry(reg_root)
    try:
        archived = [
            e for e in reg.events("digits", 3) if e["kind"] == "stage" and e["detail"]["to"] == "archived"
        ]
        assert len(archived) == 1 and reg.get("digits", 3).stage == "archived"
    finally:
        reg.close()


@pytest.mark.ray
def test_admin_load_and_unload_reach_every_ingress_replica(ingress2, digits):
    s, _ = ingress2
    base = f"http://{s.url}"
    body = _bodies(digits)[0]

    def answers(version: str, n: int = 24) -> tuple[set[int], set[str]]:
        """Statuses and the replicas that gave them, for ``n`` requests to a versioned route."""
        statuses, replicas = set(), set()
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(n):
                r = c.post(f"/v2/models/digits/versions/{version}/infer", json=body)
                statuses.add(r.status_code)
                replicas.add(r.headers.get("x-slimship-ingress"))
        return statuses, replicas

    load = {"registry": "2", "version": "9", "replicas": {"num_cpus": 0.25}}  # 3 × 0.5 CPUs are taken of 2
    r = httpx.post(f"{base}/v2/admin/models/digits/load", json=load, headers=H, timeout=120)
    assert r.status_code == 200, r.text  # deployed once, by the replica that got the request
    assert len(_replica_pids("slimship-digits-v9")) == 1
    time.sleep(1.0)  # the other replica attaches at its next sync (every 0.25 s)
    statuses, replicas = answers("9")
    assert statuses == {200} and len(replicas) == 2, (statuses, replicas)  # both replicas route to it
    again = httpx.post(f"{base}/v2/admin/models/digits/load", json=load, headers=H, timeout=120)
    assert again.status_code in (400, 409) and "already" in again.json()["error"], again.text
    r = httpx.post(f"{base}/v2/admin/models/digits/versions/9/unload", headers=H, timeout=120)
    assert r.status_code == 200, r.text  # answered once every replica has dropped it
    statuses, replicas = answers("9")
    assert statuses == {404} and len(replicas) == 2, (statuses, replicas)  # errors name their replica too
    wait_for(lambda: not _replica_pids("slimship-digits-v9"), 60, what="the v9 application to go")
    # the other versions still answer on both replicas
    statuses, replicas = answers("1")
    assert statuses == {200} and len(replicas) == 2
