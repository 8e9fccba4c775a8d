"""The dashboard's live figures: right numbers, and memory bounded by the window whether or not anyone looks."""

from __future__ import annotations

import pytest

from slimship.serve import live
from slimship.serve.live import LiveStats


def test_live_figures_and_bounded_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(live.time, "time", lambda: now[0])
    s = LiveStats()
    for i in range(100):  # 100 requests in one second: 1 error, latencies 1..99 ms
        s.add("m", "1", (i or 100) / 1000, "500" if i == 0 else "200")
    snap = s.snapshot("m", "1")
    assert snap["rate_rps"] == 10.0 and snap["errors_10s"] == 1 and snap["total_120s"] == 100
    assert snap["latency_p50_ms"] == 50.0 and snap["latency_p99_ms"] == 99.0
    assert snap["series"]["rate"][-1] == 100 and snap["series"]["p99_ms"][-1] == 99.0
    # ten minutes of traffic, one request a second, never a snapshot: only the last 120 s are kept
    for _ in range(600):
        now[0] += 1
        s.add("m", "1", 0.002, "200")
    assert len(s._seconds[("m", "1")]) <= 122
    snap = s.snapshot("m", "1")
    assert snap["total_120s"] <= 121 and snap["errors_10s"] == 0 and snap["latency_p99_ms"] == 2.0
