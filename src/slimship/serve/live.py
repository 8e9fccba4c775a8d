"""Live request figures per version for the dashboard: rate, errors and latency over the last minutes."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

_KEEP_S = 120.0


class LiveStats:
    def __init__(self) -> None:
        self._events: dict[tuple[str, str], deque[tuple[float, float, bool]]] = {}

    def add(self, model: str, version: str, latency_s: float, status: str) -> None:
        q = self._events.setdefault((model, version), deque(maxlen=200_000))
        q.append((time.time(), latency_s * 1000, status == "200"))

    def snapshot(
        self, model: str, version: str, now: float | None = None, points: int = 60
    ) -> dict[str, Any]:
        now = now or time.time()
        q = self._events.get((model, version))
        while q and q[0][0] < now - _KEEP_S:
            q.popleft()
        ev = list(q or ())
        last10 = [e for e in ev if e[0] >= now - 10]
        last30 = sorted(e[1] for e in ev if e[0] >= now - 30 and e[2])
        rate = [0] * points
        p99 = [0.0] * points
        per_sec: list[list[float]] = [[] for _ in range(points)]
        for t, ms, ok in ev:
            i = int(now - t)
            if 0 <= i < points:
                rate[points - 1 - i] += 1
                if ok:
                    per_sec[points - 1 - i].append(ms)
        for i, xs in enumerate(per_sec):
            if xs:
                xs.sort()
                p99[i] = round(xs[max(0, math.ceil(0.99 * len(xs)) - 1)], 2)
        pct = lambda q_: round(last30[max(0, math.ceil(q_ * len(last30)) - 1)], 2) if last30 else None  # noqa: E731
        return {
            "rate_rps": round(len(last10) / 10, 2),
            "errors_10s": sum(1 for e in last10 if not e[2]),
            "latency_p50_ms": pct(0.5),
            "latency_p99_ms": pct(0.99),
            "total_120s": len(ev),
            "series": {"rate": rate, "p99_ms": p99},
        }
