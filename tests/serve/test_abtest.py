"""A/B outcomes: the statistics on simulated experiments with known rates, and the feedback endpoint on a real server."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.serve.conftest import ServerProcess

ADMIN = "adm1n-t0ken"
H = {"Authorization": f"Bearer {ADMIN}"}
X = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}


def _experiment(rng, rates: dict[str, float], n: int):
    from slimship.serve.abtest import FeedbackStore

    fb = FeedbackStore()
    for i in range(n):
        v = "1" if i % 2 == 0 else "2"
        fb.remember("m", f"r{i}", v)
        fb.record("m", f"r{i}", bool(rng.random() < rates[v]))
    return fb.summary("m", control="1")["outcome"]


def test_intervals_cover_the_true_rates_and_false_positives_stay_near_alpha():
    rng = np.random.default_rng(0)
    sims, covered, false_pos, detected = 200, 0, 0, 0
    for _ in range(sims):
        s = _experiment(rng, {"1": 0.1, "2": 0.1}, 1000)
        lo, hi = s["variants"]["1"]["ci95"]
        covered += lo <= 0.1 <= hi
        false_pos += s["comparisons"]["2 vs 1"]["verdict"] == "significant"
    for _ in range(50):
        s = _experiment(rng, {"1": 0.1, "2": 0.16}, 2000)
        detected += s["comparisons"]["2 vs 1"]["verdict"] == "significant"
    assert covered / sims >= 0.91, covered  # nominal 95%
    assert false_pos / sims <= 0.09, false_pos  # nominal 5%
    assert detected / 50 >= 0.8, detected  # power for a 6-point lift with 1,000 per arm is ~0.9


def test_small_samples_say_not_enough_data_and_numeric_outcomes_use_means():
    from slimship.serve.abtest import FeedbackStore

    fb = FeedbackStore()
    for i in range(20):
        fb.remember("m", f"r{i}", "1" if i % 2 else "2")
        fb.record("m", f"r{i}", i % 3 == 0)
    s = fb.summary("m", control="1")["outcome"]
    assert (
        s["comparisons"]["2 vs 1"]["verdict"] == "not enough data"
        and "30 needed" in s["comparisons"]["2 vs 1"]["why"]
    )
    rng = np.random.default_rng(1)
    for i in range(400):
        v = "1" if i % 2 else "2"
        fb.remember("m", f"t{i}", v)
        fb.record("m", f"t{i}", float(rng.normal(100 if v == "1" else 110, 20)), metric="basket")
    s = fb.summary("m", control="1")["basket"]
    assert s["kind"] == "mean" and s["comparisons"]["2 vs 1"]["test"] == "welch_t"
    assert s["comparisons"]["2 vs 1"]["verdict"] == "significant"
    lo, hi = s["variants"]["2"]["ci95"]
    assert 4.5 < hi - lo < 6.5  # 2 × 1.97 × 20 / √200 ≈ 5.6 (coverage itself is checked on rates above)
    assert abs((lo + hi) / 2 - 110) < 4


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    cfg = {
        "models": [
            {"name": "digits", "path": models["digits_v1"], "version": "1"},
            {"name": "digits", "path": models["digits_v2"], "version": "2"},
        ]
    }
    s = ServerProcess(tmp_path_factory.mktemp("ab"), cfg, env={"SLIMSHIP_ADMIN_TOKEN": ADMIN})
    httpx.put(
        f"http://{s.url}/v2/admin/models/digits/traffic",
        json={"weights": {"1": 50, "2": 50}, "sticky_header": "x-user"},
        headers=H,
    ).raise_for_status()
    yield s
    s.stop()


def test_feedback_endpoint_reports_rates_intervals_and_significance(server):
    from slimship.serve.abtest import wilson

    true = {"conversion": {"1": 0.10, "2": 0.20}, "retention": {"1": 0.30, "2": 0.30}}
    tally = {m: {"1": [0, 0], "2": [0, 0]} for m in true}  # successes, n as the clients saw them
    rng = np.random.default_rng(7)
    with httpx.Client(base_url=f"http://{server.url}") as c:
        for i in range(1200):
            # half the clients name their request in the protocol's id, half use the x-request-id the server answered
            body = {**X, "id": f"req-{i}"} if i % 2 else X
            r = c.post("/v2/models/digits/infer", json=body, headers={"x-user": f"user-{i}"})
            assert r.status_code == 200
            rid = f"req-{i}" if i % 2 else r.headers["x-request-id"]
            v = r.headers["x-model-version"]
            for metric, rates in true.items():
                # conversion: random at the variant's rate; retention: exactly every third-or-so user of either variant
                # (random equal rates would read "significant" in 5% of seeds — that rate is checked in the simulations above)
                outcome = bool(rng.random() < rates[v]) if metric == "conversion" else (i * 7919) % 10 < 3
                tally[metric][v][0] += outcome
                tally[metric][v][1] += 1
                fr = c.post(
                    "/v2/models/digits/feedback", json={"id": rid, "outcome": outcome, "metric": metric}
                )
                assert fr.status_code == 200 and fr.json()["version"] == v
        summary = c.get("/v2/models/digits/feedback").json()["metrics"]
    conv, ret = summary["conversion"], summary["retention"]
    for metric, s in (("conversion", conv), ("retention", ret)):
        assert sum(x["n"] for x in s["variants"].values()) == 1200
        for v, x in s["variants"].items():
            # the server's figures are exactly the clients' own tallies; whether 95% Wilson intervals cover the
            # true rates 95% of the time is checked over 200 simulated experiments above
            k, n = tally[metric][v]
            assert x["n"] == n and x["rate"] == pytest.approx(k / n)
            assert x["ci95"] == pytest.approx(list(wilson(k, n)))
            assert abs(x["rate"] - true[metric][v]) < 0.06
    assert (
        conv["comparisons"]["2 vs 1"]["verdict"] == "significant"
        and conv["comparisons"]["2 vs 1"]["p_value"] < 0.001
    )
    assert ret["comparisons"]["2 vs 1"]["verdict"] == "no significant difference"
    # the dashboard shows the same
    state = httpx.get(f"http://{server.url}/v2/dashboard/state").json()
    assert state["models"][0]["abtest"]["conversion"]["comparisons"]["2 vs 1"]["verdict"] == "significant"


def test_feedback_bad_input(server):
    base = f"http://{server.url}/v2/models/digits/feedback"
    r = httpx.post(base, json={"id": "never-sent", "outcome": True})
    assert r.status_code == 404 and "no answered request 'never-sent'" in r.json()["error"]
    ok = httpx.post(f"http://{server.url}/v2/models/digits/infer", json={**X, "id": "once"})
    assert ok.status_code == 200
    assert httpx.post(base, json={"id": "once", "outcome": 1}).status_code == 200
    r = httpx.post(base, json={"id": "once", "outcome": 0})
    assert r.status_code == 409 and "already has" in r.json()["error"]
    r = httpx.post(base, json={"id": "once", "outcome": "yes", "metric": "other"})
    assert r.status_code == 400
    r = httpx.post(base, json={"id": "once", "result": True})
    assert r.status_code == 400 and "invalid body" in r.json()["error"]
    r = httpx.post(f"http://{server.url}/v2/models/nope/feedback", json={"id": "once", "outcome": True})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    assert httpx.get(f"{base}?alpha=2").status_code == 400
