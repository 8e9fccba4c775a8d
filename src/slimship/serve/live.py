"""Live request figures per version for the dashboard: rate, errors and latency over the last minutes.

Kept as one bucket per second (count, errors, the answered requests' latencies as float32), pruned to the last
``_KEEP_S`` seconds on every request — not only when the dashboard asks — so memory is bounded by that window's
traffic at 4 bytes a request (one Python tuple per request, pruned only on a dashboard poll, grew RSS by ~1.4 MB per
10,000 requests on a server nobody watched)."""

from __future__ import annotations

import math
import time
from array import array
from collections import deque
from typing import Any

_KEEP_S = 120.0


class _Second:
    __slots__ = ("errors", "n", "ok_ms", "t")

    def __init__(self, t: int) -> None:
        self.t, self.n, self.errors = t, 0, 0
        self.ok_ms = array("f")


class LiveStats:
    def __init__(self) -> None:
        self._seconds: dict[tuple[str, str], deque[_Second]] = {}

    def add(self, model: str, version: str, latency_s: float, status: str) -> None:
        now = time.time()
        q = self._seconds.setdefault((model, version), deque())
        sec = int(now)
        if not q or q[-1].t != sec:
            q.append(_Second(sec))
            _prune(q, now)
        b = q[-1]
        b.n += 1
        if status == "200":
            b.ok_ms.append(latency_s * 1000)
        else:
            b.errors += 1

    def snapshot(
        self, model: str, version: str, now: float | None = None, points: int = 60
    ) -> dict[str, Any]:
        now = now or time.time()
        q = self._seconds.get((model, version))
        if q:
            _prune(q, now)
        buckets = list(q or ())
        last10 = [b for b in buckets if b.t >= now - 10]
        last30 = sorted(ms for b in buckets if b.t >= now - 30 for ms in b.ok_ms)
        rate = [0] * points
        p99 = [0.0] * points
        for b in buckets:
            i = int(now - b.t)
            if 0 <= i < points:
                rate[points - 1 - i] += b.n
                if b.ok_ms:
                    xs = sorted(b.ok_ms)
                    p99[points - 1 - i] = round(xs[max(0, math.ceil(0.99 * len(xs)) - 1)], 2)
        pct = lambda q_: round(last30[max(0, math.ceil(q_ * len(last30)) - 1)], 2) if last30 else None  # noqa: E731
        return {
            "rate_rps": round(sum(b.n for b in last10) / 10, 2),
            "errors_10s": sum(b.errors for b in last10),
            "latency_p50_ms": pct(0.5),
            "latency_p99_ms": pct(0.99),
            "total_120s": sum(b.n for b in buckets),
            "series": {"rate": rate, "p99_ms": p99},
        }


def _prune(q: deque[_Second], now: float) -> None:
    while q and q[0].t < now - _KEEP_S:
        q.popleft()
