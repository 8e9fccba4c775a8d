"""A rollout stage's gates (error rate, p99 latency and its ratio to the baseline, fidelity) judged on the stage's
measurement window: roll back on a breach, advance when every gate is judged and holds, else wait. What each gate
means is described with the policy in :mod:`slimship.serve.rollout`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimship.serve.compare import Agreement
from slimship.serve.config import Gates, RolloutPolicy, Stage

#: a p99 from fewer samples is the maximum: latency gates wait for this many
LATENCY_MIN_SAMPLES = 100


# ---- measurement windows --------------------------------------------------------------------------


@dataclass
class Side:
    requests: int = 0
    errors: int = 0
    shed: int = 0
    #: requests this version answered (what clients experienced)
    latencies_ms: list[float] = field(default_factory=list)
    #: compare runs in the background: they queue behind and compete with the answering version, so they are kept
    #: apart and never judged
    compare_latencies_ms: list[float] = field(default_factory=list)

    def add(self, ok: bool, ms: float | None, live: bool = True) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
        elif ms is not None:
            (self.latencies_ms if live else self.compare_latencies_ms).append(ms)

    def p99(self) -> float | None:
        return _nearest_rank(self.latencies_ms, 0.99)

    def summary(self) -> dict[str, Any]:
        lat, cmp_ = self.latencies_ms, self.compare_latencies_ms
        return {
            "requests": self.requests,
            "answered": len(lat),
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 5) if self.requests else None,
            "shed": self.shed,
            "latency_p50_ms": _r(_nearest_rank(lat, 0.5)),
            "latency_p99_ms": _r(self.p99()),
            "latency_max_ms": _r(max(lat) if lat else None),
            "compare_latency_p50_ms": _r(_nearest_rank(cmp_, 0.5)),
            "compare_latency_p99_ms": _r(_nearest_rank(cmp_, 0.99)),
        }


def _nearest_rank(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


@dataclass
class Window:
    started: float = field(default_factory=time.time)
    candidate: Side = field(default_factory=Side)
    baseline: Side = field(default_factory=Side)
    fidelity: list[float] = field(default_factory=list)
    #: judge → compared requests it judged
    judged_by: dict[str, int] = field(default_factory=dict)

    def add_agreement(self, a: Agreement) -> None:
        self.fidelity.append(a.value)
        self.judged_by[a.judge] = self.judged_by.get(a.judge, 0) + 1

    def fidelity_summary(self) -> dict[str, Any]:
        f = self.fidelity
        return {
            "pairs": len(f),
            "mean": _r(float(np.mean(f)), 5) if f else None,
            "min": _r(min(f), 5) if f else None,
            "p05": _r(float(np.quantile(f, 0.05)), 5) if f else None,
            "judged_by": dict(self.judged_by),
        }


@dataclass
class Judgement:
    decision: str  # wait, advance, rollback
    gates: dict[str, dict[str, Any]]
    reason: str


Gated = tuple[dict[str, dict[str, Any]], list[str]]  # the gates' figures, and the breaches found


def _gate_error_rate(g: Gates, st: Stage, c: Side, gated: Gated) -> None:
    if g.max_error_rate is None:
        return
    out, breaches = gated
    n_final = max(c.requests, st.min_requests)
    allowed = g.max_error_rate * n_final
    breached = c.errors > allowed
    out["max_error_rate"] = {
        "limit": g.max_error_rate,
        "value": _r(c.errors / c.requests, 5) if c.requests else None,
        "errors": c.errors,
        "requests": c.requests,
        "judged": breached or c.requests >= st.min_requests,
        "ok": not breached,
    }
    if breached:
        breaches.append(
            f"error rate {c.errors}/{c.requests} exceeds {g.max_error_rate:g} (at most "
            f"{math.floor(allowed)} errors in {n_final} requests)"
        )


def _not_applied(limit: float, note: str) -> dict[str, Any]:
    return {"limit": limit, "value": None, "applies": False, "judged": True, "ok": True, "note": note}


def _gate_latency(g: Gates, st: Stage, c: Side, gated: Gated) -> None:
    out, breaches = gated
    if (
        st.traffic == 0
    ):  # nobody is answered by the candidate: latency can't be judged as clients would see it
        for name, limit in (
            ("max_latency_p99_ms", g.max_latency_p99_ms),
            ("max_latency_p99_ratio", g.max_latency_p99_ratio),
        ):
            if limit is not None:
                out[name] = _not_applied(
                    limit, "judged on requests the candidate answers; a shadow stage has none"
                )
        return
    if g.max_latency_p99_ms is None:
        return
    nl = max(len(c.latencies_ms), LATENCY_MIN_SAMPLES)
    slow = sum(1 for x in c.latencies_ms if x > g.max_latency_p99_ms)
    tolerated = nl - math.ceil(0.99 * nl)
    breached = slow > tolerated
    out["max_latency_p99_ms"] = {
        "limit": g.max_latency_p99_ms,
        "value": _r(c.p99()),
        "slower": slow,
        "judged": breached or len(c.latencies_ms) >= LATENCY_MIN_SAMPLES,
        "ok": not breached,
    }
    if breached:
        breaches.append(f"{slow} requests slower than {g.max_latency_p99_ms:g} ms (p99 {_r(c.p99(), 1)} ms)")


def _gate_latency_ratio(g: Gates, st: Stage, c: Side, b: Side, gated: Gated) -> None:
    out, breaches = gated
    if g.max_latency_p99_ratio is None or st.traffic == 0:
        return
    if st.traffic == 100:
        out["max_latency_p99_ratio"] = _not_applied(
            g.max_latency_p99_ratio, "the baseline answers nobody at 100%: nothing to compare with"
        )
        return
    n_lat = LATENCY_MIN_SAMPLES
    cp, bp = c.p99(), b.p99()
    judged = len(c.latencies_ms) >= n_lat and len(b.latencies_ms) >= n_lat and bool(bp)
    ratio = cp / bp if cp is not None and bp else None
    breached = judged and ratio is not None and ratio > g.max_latency_p99_ratio
    out["max_latency_p99_ratio"] = {
        "limit": g.max_latency_p99_ratio,
        "value": _r(ratio),
        "candidate_p99_ms": _r(cp),
        "baseline_p99_ms": _r(bp),
        "judged": judged,
        "ok": not breached,
    }
    if breached:
        breaches.append(
            f"p99 {cp:.1f} ms is {ratio:.2f}x the baseline's {bp:.1f} ms (limit {g.max_latency_p99_ratio:g}x)"
        )


def _gate_fidelity(g: Gates, policy: RolloutPolicy, w: Window, gated: Gated) -> None:
    if g.min_fidelity is None:
        return
    out, breaches = gated
    pairs = len(w.fidelity)
    mean = float(np.mean(w.fidelity)) if pairs else None
    judged = pairs >= policy.min_pairs
    breached = judged and mean is not None and mean < g.min_fidelity
    out["min_fidelity"] = {
        "limit": g.min_fidelity,
        "value": _r(mean, 5),
        "pairs": pairs,
        "judged": judged,
        "ok": not breached,
    }
    if breached:
        breaches.append(f"fidelity {mean:.4f} < {g.min_fidelity:g} over {pairs} compared requests")


def judge(policy: RolloutPolicy, stage_index: int, w: Window, now: float | None = None) -> Judgement:
    """The gates of one stage on its window: roll back on a breach, advance when everything is judged and holds."""
    st = policy.stages[stage_index]
    g = policy.gates.merged(st.gates)
    c = w.candidate
    out: dict[str, dict[str, Any]] = {}
    breaches: list[str] = []
    _gate_error_rate(g, st, c, (out, breaches))
    _gate_latency(g, st, c, (out, breaches))
    _gate_latency_ratio(g, st, c, w.baseline, (out, breaches))
    _gate_fidelity(g, policy, w, (out, breaches))
    label = st.label(stage_index)
    if breaches:
        return Judgement("rollback", out, f"{label}: " + "; ".join(breaches))
    elapsed = (now or time.time()) - w.started
    if c.requests < st.min_requests:
        return Judgement("wait", out, f"{label}: {c.requests}/{st.min_requests} candidate requests")
    if elapsed < st.min_seconds:
        return Judgement("wait", out, f"{label}: {elapsed:.0f}/{st.min_seconds:g} s")
    pending = [k for k, v in out.items() if not v["judged"]]
    if pending:
        return Judgement("wait", out, f"{label}: waiting for data to judge {', '.join(pending)}")
    return Judgement("advance", out, f"{label}: every gate holds over {c.requests} candidate requests")
