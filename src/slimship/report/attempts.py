"""The "Attempts" section of a run report: every attempt of a recipe with fallbacks, its figures, which
constraints held, and which attempt was kept and why (results.json ``attempts`` and ``fallback``)."""

from __future__ import annotations

import html
import json
from typing import Any

__all__ = ["attempts_section", "quality_source"]


def _e(v: Any) -> str:
    return html.escape(str(v))


def _f(v: Any, digits: int = 4) -> str:
    return "—" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else _e(v))


def quality_source(ev: dict[str, Any]) -> str:
    """How a step's quality was obtained: "evaluated", "cached …" or "parent (verified equal: …)"."""
    if ev.get("quality_from"):
        return str(ev["quality_from"])
    on = ev.get("measured_on")
    via = (
        f" on {on['candidate_name']} (verified equal: max |Δ| {on['verified_equal_max_abs_error']:.1g})"
        if isinstance(on, dict)
        else ""
    )
    if ev.get("cached_from"):
        return f"evaluated{via} (cached from an earlier run)"
    return f"evaluated{via}" if ev else "—"


def _row(a: dict[str, Any], batch_sizes: list[str]) -> str:
    checks = a.get("constraints", {}).get("checks", {})
    held = " ".join(
        f"<span class={'ok' if c['holds'] else 'fail'}>{_e(n)} {'✓' if c['holds'] else '✗'}</span>"
        for n, c in checks.items()
    )
    # the constraint's metric (the workload's first) and the next one
    fid = ", ".join(f"{_e(k)} {_f(v, 5)}" for k, v in list((a.get("fidelity") or {}).items())[:2]) or "—"
    what = (
        "the recipe as written"
        if a.get("replaced_step") is None
        else f"step {a['replaced_step']} → {a['pass']} {json.dumps(a.get('config') or {})}"
    )
    lat = "".join(
        f"<td>{_f((a.get('latency_ms_p50') or {}).get(b), 3)}"
        + (f" <span class=muted>({a['speedup'][b]:.2f}x)</span>" if (a.get("speedup") or {}).get(b) else "")
        + "</td>"
        for b in batch_sizes
    )
    size = "—" if not a.get("size_bytes") else f"{a['size_bytes'] / 1e6:.3g}"
    verdict = "<span class=ok>holds</span>" if a["holds"] else "<span class=fail>fails</span>"
    return (
        f"<tr class='{'best' if a.get('kept') else ''}'><td>{a['attempt']}</td><td>{_e(a['label'])}"
        f"{' <b>(kept)</b>' if a.get('kept') else ''}</td><td>{_e(what[:240])}</td><td>{_f(a.get('quality'))}</td>"
        f"<td>{_f(a.get('quality_drop'), 3)}</td><td>{fid}</td><td>{size}</td>{lat}<td>{verdict} {held}</td>"
        f"<td>{_f(a.get('seconds'))}</td></tr>"
    )


def attempts_section(result: dict[str, Any]) -> str:
    """``<h2>Attempts</h2>`` and its table, or "" for a recipe without fallbacks."""
    fb = result.get("fallback") or {}
    attempts = result.get("attempts") or []
    if fb.get("attempts_declared", 1) <= 1 or not attempts:
        return ""
    metric = (result.get("workload") or {}).get("primary_metric") or "quality"
    batch_sizes = sorted({b for a in attempts for b in (a.get("latency_ms_p50") or {})}, key=int)
    head = "".join(f"<th>p50 ms, batch {_e(b)}</th>" for b in batch_sizes)
    untried = fb["attempts_declared"] - fb["attempts_run"]
    note = (
        f" {untried} fallback{'s' if untried != 1 else ''} not tried (fallback_policy: {_e(fb['policy'])}: "
        "stop at the first attempt that holds)."
        if untried and fb.get("policy") == "first"
        else ""
    )
    return (
        f"<h2>Attempts</h2><p id=attempts-verdict>Kept <b>attempt {fb['kept']} ({_e(fb['kept_label'])})</b>: "
        f"{_e(fb['reason'])}.{note}</p>"
        f"<table id=attempts><tr><th>#</th><th>attempt</th><th>what changed</th><th>{_e(metric)}</th><th>drop</th>"
        f"<th>fidelity</th><th>MB</th>{head}<th>constraints</th><th>seconds</th></tr>"
        + "".join(_row(a, batch_sizes) for a in attempts)
        + "</table><p class=muted>Latency: one interleaved run of the original and every attempt's final candidate "
        "(speed-up over the original in brackets).</p>"
    )
