"""A self-contained HTML report of a recipe run: no external scripts, styles or fonts (it opens offline),
plots inlined as SVG (matplotlib, Agg backend). The JSON results stay the source of truth."""

from __future__ import annotations

import html
import io
import shlex
from pathlib import Path
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
.summary{font-size:1.1rem;background:#f3f6fb;border-left:4px solid #3b6fd8;padding:.7rem 1rem;margin:1rem 0}
.bad{border-left-color:#c0392b;background:#fbf1f0}table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e4e7ee;font-variant-numeric:tabular-nums}
th{background:#f7f8fb}.ok{color:#1e7d32}.fail{color:#c0392b;font-weight:600}code,pre{background:#f4f5f7;padding:.1rem .3rem;border-radius:3px}
pre{padding:.6rem;overflow-x:auto}.muted{color:#667}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return _e(v)


def _plot(points: list[dict[str, Any]], metric: str) -> str:
    """Quality against file size for every candidate, as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100)
    for p in points:
        ax.scatter(p["size_mb"], p["quality"], s=40, color="#3b6fd8" if p["label"] != "original" else "#333")
        ax.annotate(p["label"], (p["size_mb"], p["quality"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def render_run_report(result: dict[str, Any], run_dir: Path, recipe_path: str) -> str:
    from slimship.candidate import load_candidate
    from slimship.report.summary import machine_line

    wl = result["workload"]
    metric = wl.get("primary_metric") or ""
    evs = result["evaluations"]
    verdict = result["constraints"]
    base_q = evs.get("original", {}).get("quality", {}).get(metric)
    rows, points = [], []
    sizes: dict[str, float] = {}
    for s in [{"label": "original", "pass": "—", "status": "original", "candidate": str(run_dir / "original")}] + result["steps"]:
        size = None
        if s.get("candidate") and Path(s["candidate"]).exists():
            size = load_candidate(s["candidate"]).size_bytes / 1e6
            sizes[s["label"]] = size
        ev = evs.get(s["label"], {})
        q = ev.get("quality", {}).get(metric)
        fid_name, fid = next(iter(ev.get("fidelity", {}).items()), (None, None))
        delta = None if q is None or base_q is None else q - base_q
        status = s["status"] + (f": {s['reason']}" if s.get("reason") else "")
        rows.append(f"<tr><td>{_e(s['label'])}</td><td>{_e(s['pass'])}</td><td>{_e(status)}</td><td>{_num(size, 3)}</td>"
                    f"<td>{_num(q)}</td><td>{_num(delta, 3)}</td><td>{_num(fid, 5)} <span class=muted>{_e(fid_name or '')}</span></td>"
                    f"<td>{_num(s.get('seconds'))}</td></tr>")
        if q is not None and size is not None:
            points.append({"label": s["label"], "size_mb": size, "quality": q})
    timing_rows, speed = [], None
    if result.get("bench"):
        for c in result["bench"]["candidates"]:
            for r in c["results"]:
                timing_rows.append(f"<tr><td>{_e(c['label'])}</td><td>{_e(c['runtime'].get('backend', '') if isinstance(c['runtime'], dict) else c['runtime'])}</td><td>{r['batch_size']}</td>"
                                   f"<td>{r['latency_ms']['p50']:.3g}</td><td>{r['latency_ms']['p90']:.3g}</td>"
                                   f"<td>{r.get('speedup_vs_baseline_p50', 1.0):.2f}x</td></tr>")
                if c["label"] == verdict.get("final"):
                    speed = r.get("speedup_vs_baseline_p50")
    final = verdict.get("final")
    fq = evs.get(final or "", {}).get("quality", {}).get(metric)
    parts = [f"final candidate: <b>{_e(final)}</b>" if final else "no step finished"]
    if speed:
        parts.append(f"{speed:.2f}x faster than the original")
    if fq is not None and base_q is not None:
        parts.append(f"{fq - base_q:+.2f} points {metric}")
    if final in sizes and "original" in sizes:
        parts.append(f"{sizes['original'] / sizes[final]:.1f}x smaller")
    parts.append("constraints hold" if verdict.get("holds") else "constraints do NOT hold")
    if not verdict.get("complete", True):
        parts.append("recipe incomplete: a step failed (see Steps)")
    checks = "".join(
        f"<tr><td>{_e(n)}</td><td>{_num(c['limit'])}</td><td>{_num(c['measured'])}</td>"
        f"<td class={'ok' if c['holds'] else 'fail'}>{'holds' if c['holds'] else 'fails'}</td></tr>"
        for n, c in verdict.get("checks", {}).items()
    )
    m = result.get("machine") or {}
    cmd = f"slimship run {shlex.quote(recipe_path)} -o {shlex.quote(str(run_dir))}"
    plot = _plot(points, metric) if points and metric else "<p class=muted>no quality metric to plot</p>"
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>slimship run: {_e(wl['name'])}</title>
<style>{_CSS}</style></head><body>
<h1>slimship run — {_e(wl['name'])}</h1><p class=muted>{_e(wl.get('description', ''))}</p>
<div class="summary{'' if verdict.get('holds') else ' bad'}">{' · '.join(parts)}</div>
<h2>Steps</h2><table><tr><th>step</th><th>pass</th><th>status</th><th>MB</th><th>{_e(metric or 'quality')}</th><th>Δ vs original</th><th>fidelity</th><th>seconds</th></tr>{''.join(rows)}</table>
<h2>Constraints</h2><table><tr><th>constraint</th><th>limit</th><th>measured</th><th></th></tr>{checks or '<tr><td colspan=4>none</td></tr>'}</table>
<h2>Quality against size</h2>{plot}
<h2>Latency (interleaved)</h2><table><tr><th>candidate</th><th>runtime</th><th>batch</th><th>p50 ms</th><th>p90 ms</th><th>speed-up</th></tr>{''.join(timing_rows)}</table>
<h2>Machine</h2><p>{_e(machine_line(m)) if m else '—'}</p>
<h2>Reproduce</h2><pre>{_e(cmd)}</pre>
</body></html>"""
