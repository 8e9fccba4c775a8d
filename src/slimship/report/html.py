"""Self-contained HTML reports of recipe runs and searches: no external scripts, styles or fonts (they open
offline), plots inlined as SVG (matplotlib, Agg backend). The JSON results stay the source of truth; a
report can be rebuilt from them at any time (`slimship report DIR`)."""

from __future__ import annotations

import html
import io
import json
import shlex
from pathlib import Path
from typing import Any

from slimship.measure.complexity import ComplexityRecord
from slimship.measure.verify import VerificationReport
from slimship.report.attempts import attempts_section, quality_source
from slimship.report.summary import size_ratio_words
from slimship.train import FinetuneReport

#: a candidate's format or runtime name as a reader knows it
RUNTIME_NAMES = {
    "torch": "PyTorch",
    "onnx": "ONNX Runtime",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO",
}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;max-width:1150px;color:#1d2330;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
h3{font-size:1rem;margin:1.2rem 0 .3rem}
.summary{font-size:1.1rem;background:#f3f6fb;border-left:4px solid #3b6fd8;padding:.7rem 1rem;margin:1rem 0}
.bad{border-left-color:#c0392b;background:#fbf1f0}table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e4e7ee;font-variant-numeric:tabular-nums;vertical-align:top}
th{background:#f7f8fb}.ok{color:#1e7d32}.fail{color:#c0392b;font-weight:600}code,pre{background:#f4f5f7;padding:.1rem .3rem;border-radius:3px}
pre{padding:.6rem;overflow-x:auto}.muted{color:#667}tr.best td{background:#eef7ee}tr.front td:first-child{font-weight:600}
.plot svg{max-width:100%;height:auto}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return _e(v)


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<link rel=icon href='data:,'><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return f"<div class=plot>{svg[svg.index('<svg') :]}</div>"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable, no embedded font paths
    return plt


def _size_plot(points: list[dict[str, Any]], metric: str) -> str:
    """Quality against file size for every step of a run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100)
    for p in points:
        ax.scatter(p["size_mb"], p["quality"], s=40, color="#3b6fd8" if p["label"] != "original" else "#333")
        ax.annotate(
            p["label"], (p["size_mb"], p["quality"]), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _svg(fig)


def _machine(m: dict[str, Any]) -> str:
    from slimship.report.summary import machine_line

    if not m:
        return "—"
    versions = m.get("versions") or m.get("packages") or {}
    extra = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else ""
    return f"<p>{_e(machine_line(m))}</p>" + (f"<p class=muted>{_e(extra)}</p>" if extra else "")


def _complexity(data: Any) -> ComplexityRecord | None:
    """A step's complexity record, or None when it has none (or an incomplete one)."""
    if not isinstance(data, dict):
        return None
    try:
        return ComplexityRecord.from_json(data)
    except (KeyError, TypeError, ValueError):
        return None


def _cand_info(path: str | None) -> dict[str, Any]:
    """candidate.json of a candidate directory, with its artifact's size; {} when it is gone."""
    from slimship.candidate import load_candidate
    from slimship.errors import SlimshipError

    if not path:
        return {}
    try:
        meta = json.loads((Path(path) / "candidate.json").read_text())
        meta["size_bytes"] = load_candidate(path).size_bytes
        return meta
    except (OSError, ValueError, SlimshipError):
        return {}


def _changed_config(pass_name: str, cfg: dict[str, Any]) -> str:
    """The config values that differ from the pass's defaults, as ``k=v`` text."""
    from slimship.passes import PASSES

    try:
        defaults = PASSES[pass_name].config_cls().to_json_dict()
    except Exception:  # a config without defaults for every field: show it all
        defaults = {}
    out = []
    for k, v in cfg.items():
        if k == "version" or defaults.get(k) == v:
            continue
        if isinstance(v, dict) and isinstance(defaults.get(k), dict):
            v = {kk: vv for kk, vv in v.items() if defaults[k].get(kk) != vv}
        out.append(f"{k}={json.dumps(v)}")
    return ", ".join(out) or "defaults"


def _pass_deltas(
    steps: list[dict[str, Any]], original_dir: str, evaluations: dict[str, Any] | None, metric: str
) -> str:
    """One row per step: what it changed relative to the step before (size, MACs, quality, fidelity)."""
    rows = []
    prev = _cand_info(original_dir)
    prev_q = (evaluations or {}).get("original", {}).get("quality", {}).get(metric)
    for s in steps:
        if s.get("status") not in ("ran", "reused"):
            rows.append(
                f"<tr><td>{_e(s['label'])}</td><td>{_e(s['pass'])}</td><td colspan=6 class=muted>{_e(s['status'])}"
                f"{': ' + _e(s['reason']) if s.get('reason') else ''}</td></tr>"
            )
            continue
        meta = _cand_info(s.get("candidate"))
        info = meta.get("info", {})
        size, psize = meta.get("size_bytes"), prev.get("size_bytes")
        size_cell = (
            "—"
            if not size
            else f"{size / 1e6:.3g} MB"
            + (f" ({size_ratio_words(psize / size)})" if psize and size != psize else "")
        )
        cx = _complexity(info.get("complexity"))
        macs = f"{cx.macs_ratio:.2f}x fewer" if cx is not None and cx.macs_ratio else "—"
        fid = (
            VerificationReport.from_json(info["fidelity_to_parent"]).outputs
            if isinstance(info.get("fidelity_to_parent"), dict)
            else {}
        )
        fid_cell = ", ".join(f"cos min {v.cosine_min:.4f}" for v in fid.values()) or "—"
        q = (evaluations or {}).get(s["label"], {}).get("quality", {}).get(metric)
        dq = "—" if q is None or prev_q is None else f"{q - prev_q:+.2f}"
        ft = FinetuneReport.from_json(info["finetune"]) if isinstance(info.get("finetune"), dict) else None
        train = f"{ft.steps} steps, {ft.stopped_by}" if ft is not None and ft.steps else "—"
        cfg_txt = _changed_config(s["pass"], meta.get("pass_config") or {})
        rows.append(
            f"<tr><td>{_e(s['label'])}</td><td>{_e(s['pass'])} <span class=muted>{_e(cfg_txt[:240])}</span></td>"
            f"<td>{size_cell}</td><td>{macs}</td><td>{_e(fid_cell)}</td><td>{dq}</td><td>{_e(train)}</td>"
            f"<td>{_num(s.get('seconds'))}</td></tr>"
        )
        prev = meta
        if q is not None:
            prev_q = q
    return (
        "<table><tr><th>step</th><th>pass and config</th><th>size (vs step before)</th><th>MACs</th>"
        f"<th>fidelity to its input</th><th>Δ {_e(metric or 'quality')} vs step before</th><th>training</th><th>seconds</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _quant_tables(steps: list[dict[str, Any]]) -> str:
    """Diagnosis of every quantization step: what was quantized, outliers before/after smoothing, calibration choice."""
    out = []
    for s in steps:
        if not str(s.get("pass", "")).startswith("quantize") or s.get("status") not in ("ran", "reused"):
            continue
        info = _cand_info(s.get("candidate")).get("info", {})
        facts = [
            ("quantized nodes", info.get("quantized_nodes")),
            ("kept in float", ", ".join(info.get("excluded_nodes") or []) or "none"),
            ("INT8 initializers", info.get("int8_initializers")),
            ("calibration", info.get("calibration_method")),
            (
                "calibration / held-out samples",
                f"{info['calibration_samples']} / {info.get('holdout_samples')}"
                if info.get("calibration_samples")
                else None,
            ),
            (
                "size vs its input",
                size_ratio_words(info["size_ratio_vs_parent"]) if info.get("size_ratio_vs_parent") else None,
            ),
        ]
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_num(v)}</td></tr>" for k, v in facts if v is not None)
        part = f"<h3>{_e(s['label'])} ({_e(s['pass'])})</h3><table>{rows}</table>"
        comp = info.get("calibration_comparison")
        if isinstance(comp, dict) and comp:
            keys = sorted({k for v in comp.values() if isinstance(v, dict) for k in v})
            part += (
                "<table><tr><th>calibration method</th>"
                + "".join(f"<th>{_e(k)}</th>" for k in keys)
                + "</tr>"
                + "".join(
                    f"<tr><td>{_e(m)}</td>"
                    + "".join(f"<td>{_num(v.get(k) if isinstance(v, dict) else None)}</td>" for k in keys)
                    + "</tr>"
                    for m, v in comp.items()
                )
                + "</table>"
            )
        smooth = info.get("smoothing") or []
        if smooth:
            part += (
                "<table><tr><th>smoothed MatMul group</th><th>activation outliers (max/median of channel |x|max)</th>"
                "<th>after smoothing</th></tr>"
                + "".join(
                    f"<tr><td>{_e(', '.join(g.get('nodes', [])))}</td><td>{_num(g.get('activation_absmax_max_over_median'))}</td>"
                    f"<td>{_num(g.get('smoothed_absmax_max_over_median'))}</td></tr>"
                    for g in smooth[:24]
                )
                + "</table>"
            )
        out.append(part)
    return "".join(out) or "<p class=muted>no quantization step</p>"


# ---- run report ------------------------------------------------------------------------------------


def render_run_report(result: dict[str, Any], run_dir: Path, recipe_path: str) -> str:
    from slimship.candidate import load_candidate

    wl = result["workload"]
    metric = wl.get("primary_metric") or ""
    evs = result["evaluations"]
    verdict = result["constraints"]
    base_q = evs.get("original", {}).get("quality", {}).get(metric)
    rows, points = [], []
    sizes: dict[str, float] = {}
    for s in [
        {"label": "original", "pass": "—", "status": "original", "candidate": str(run_dir / "original")}
    ] + result["steps"]:
        size = None
        if s.get("candidate") and Path(s["candidate"]).exists():
            size = load_candidate(s["candidate"]).size_bytes / 1e6
            sizes[s["label"]] = size
        ev = evs.get(s["label"], {})
        q = ev.get("quality", {}).get(metric)
        fid_name, fid = next(iter(ev.get("fidelity", {}).items()), (None, None))
        delta = None if q is None or base_q is None else q - base_q
        status = s["status"] + (f": {s['reason']}" if s.get("reason") else "")
        rows.append(
            f"<tr><td>{_e(s['label'])}</td><td>{_e(s['pass'])}</td><td>{_e(status)}</td><td>{_num(size, 3)}</td>"
            f"<td>{_num(q)}</td><td>{_num(delta, 3)}</td><td>{_num(fid, 5)} <span class=muted>{_e(fid_name or '')}</span></td>"
            f"<td class=muted>{_e(quality_source(ev))}</td><td>{_num(s.get('seconds'))}</td></tr>"
        )
        if q is not None and size is not None:
            points.append({"label": s["label"], "size_mb": size, "quality": q})
    timing_rows, speed = [], None
    if result.get("bench"):
        for c in result["bench"]["candidates"]:
            for r in c["results"]:
                rt = c["runtime"].get("backend", "") if isinstance(c["runtime"], dict) else c["runtime"]
                timing_rows.append(
                    f"<tr><td>{_e(c['label'])}</td><td>{_e(rt)}</td><td>{r['batch_size']}</td>"
                    f"<td>{r['latency_ms']['p50']:.3g}</td><td>{r['latency_ms']['p90']:.3g}</td>"
                    f"<td>{r.get('speedup_vs_baseline_p50', 1.0):.2f}x</td></tr>"
                )
                if c["label"] == verdict.get("final"):
                    speed = r.get("speedup_vs_baseline_p50")
    final = verdict.get("final")
    fq = evs.get(final or "", {}).get("quality", {}).get(metric)
    parts = [f"final candidate: <b>{_e(final)}</b>" if final else "no step finished"]
    if speed:
        parts.append(f"{speed:.2f}x faster than the original")
    if fq is not None and base_q is not None:
        parts.append(f"{fq - base_q:+.2f} points {_e(metric)}")
    if final in sizes and "original" in sizes:
        parts.append(size_ratio_words(sizes["original"] / sizes[final], 1))
    fb = result.get("fallback") or {}
    tried = fb.get("attempts_run", 1)
    if verdict.get("holds"):
        parts.append(
            "constraints hold"
            + (f" (attempt {fb['kept']} of {tried}: {fb['kept_label']})" if tried > 1 else "")
        )
    else:
        parts.append("constraints do not hold" + (f" in any of the {tried} attempts" if tried > 1 else ""))
    if not verdict.get("complete", True):
        parts.append("recipe incomplete: a step failed (see Steps)")
    checks = "".join(
        f"<tr><td>{_e(n)}</td><td>{_num(c['limit'])}</td><td>{_num(c['measured'])}</td>"
        f"<td class={'ok' if c['holds'] else 'fail'}>{'holds' if c['holds'] else 'fails'}</td></tr>"
        for n, c in verdict.get("checks", {}).items()
    )
    cmd = f"slimship run {shlex.quote(recipe_path)} -o {shlex.quote(str(run_dir))}"
    plot = _size_plot(points, metric) if points and metric else "<p class=muted>no quality metric to plot</p>"
    body = f"""<h1>slimship run — {_e(wl["name"])}</h1><p class=muted>{_e(wl.get("description", ""))}</p>
<div class="summary{"" if verdict.get("holds") else " bad"}" id=summary>{" · ".join(parts)}</div>
{attempts_section(result)}
<h2>Steps{" of the kept attempt" if tried > 1 else ""}</h2><table><tr><th>step</th><th>pass</th><th>status</th><th>MB</th><th>{_e(metric or "quality")}</th><th>Δ vs original</th><th>fidelity</th><th>quality from</th><th>seconds</th></tr>{"".join(rows)}</table>
<h2>Constraints</h2><table><tr><th>constraint</th><th>limit</th><th>measured</th><th></th></tr>{checks or "<tr><td colspan=4>none</td></tr>"}</table>
<h2>Quality against size</h2>{plot}
<h2>What each pass did</h2>{_pass_deltas(result["steps"], str(run_dir / "original"), evs, metric)}
<h2>Quantization</h2>{_quant_tables(result["steps"])}
<h2>Latency (interleaved)</h2><table><tr><th>candidate</th><th>runtime</th><th>batch</th><th>p50 ms</th><th>p90 ms</th><th>speed-up</th></tr>{"".join(timing_rows)}</table>
<h2>Machine</h2>{_machine(result.get("machine") or {})}
<h2>Reproduce</h2><pre>{_e(cmd)}</pre>"""
    return _page(f"slimship run: {wl['name']}", body)


# ---- search report ---------------------------------------------------------------------------------


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())


def _pareto_plot(result: dict[str, Any], metric: str) -> str:
    """Quality against speed-up (marker area ∝ file size) and against size; feasible filled, Pareto front joined."""
    plt = _pyplot()
    rows = [r for r in result["trials"] if r.get("status") == "ok" and r.get("reused_from") is None]
    orig = result["original"]
    q0 = orig["quality"].get(metric)
    drop = (result["recipe"].get("constraints") or {}).get("max_quality_drop")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    size_max = max([r["size_bytes"] for r in rows] + [orig["size_bytes"]])
    for ax, xkey, xlabel in (
        (ax1, "speedup", f"speed-up vs original (p50, batch {result['batch_size']})"),
        (ax2, "size_mb", "file size (MB)"),
    ):
        for r in rows:
            x = r["speedup"] if xkey == "speedup" else r["size_bytes"] / 1e6
            area = 30 + 220 * r["size_bytes"] / size_max if xkey == "speedup" else 45
            ax.scatter(
                x,
                r["quality"],
                s=area,
                color="#3b6fd8" if r["feasible"] else "white",
                edgecolors="#3b6fd8" if r["feasible"] else "#c0392b",
                linewidths=1.4,
                zorder=3,
            )
            ax.annotate(
                str(r["trial"]), (x, r["quality"]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        if q0 is not None:
            x0 = 1.0 if xkey == "speedup" else orig["size_bytes"] / 1e6
            ax.scatter(x0, q0, s=70, marker="D", color="#333", zorder=4, label="original")
            if drop is not None:
                ax.axhline(
                    q0 - drop,
                    color="#c0392b",
                    linestyle="--",
                    linewidth=1,
                    label=f"quality budget (−{drop:g})",
                )
        speed_min = (result["recipe"].get("constraints") or {}).get("min_speedup")
        if xkey == "speedup" and speed_min and speed_min.get("batch_size") == result["batch_size"]:
            ax.axvline(
                speed_min["value"],
                color="#c0392b",
                linestyle=":",
                linewidth=1,
                label=f"min speed-up ({speed_min['value']:g}x)",
            )
        front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["speedup"])
        if xkey == "speedup" and len(front) > 1:
            ax.plot(
                [r["speedup"] for r in front],
                [r["quality"] for r in front],
                color="#3b6fd8",
                alpha=0.5,
                zorder=2,
                label="Pareto front",
            )
        if xkey == "size_mb":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    ax1.scatter([], [], s=60, color="#3b6fd8", label="meets constraints")
    ax1.scatter([], [], s=60, color="white", edgecolors="#c0392b", label="violates a constraint")
    ax1.legend(fontsize=8, loc="lower left")
    ax1.set_title("quality vs speed (marker area ∝ file size)", fontsize=10)
    ax2.set_title("quality vs size", fontsize=10)
    fig.tight_layout()
    return _svg(fig)


def _budget(limits: dict[str, Any]) -> str:
    """Constraints in words: 'quality drop ≤ 1 point, ≥ 3x faster at batch 32'."""
    words = {
        "max_quality_drop": lambda v: f"quality drop ≤ {v:g} point{'s' if v != 1 else ''}",
        "min_fidelity": lambda v: f"fidelity ≥ {v:g}",
        "max_latency_ms": lambda v: f"p50 ≤ {v['value']:g} ms at batch {v['batch_size']}",
        "min_speedup": lambda v: f"≥ {v['value']:g}x faster at batch {v['batch_size']}",
        "max_size_mb": lambda v: f"≤ {v:g} MB",
    }
    out = [words[k](v) if k in words else f"{k} {json.dumps(v)}" for k, v in limits.items() if v is not None]
    return ", ".join(out) or "no constraints"


def _space_values(p: dict[str, Any]) -> str:
    if p.get("choices") is not None:
        return json.dumps(p["choices"])
    return (
        f"{p.get('low')} … {p.get('high')}"
        + (f" step {p['step']}" if p.get("step") else "")
        + (" (log)" if p.get("log") else "")
    )


def render_tune_report(result: dict[str, Any]) -> str:
    wl = result["workload"]
    metric = wl.get("primary_metric") or ""
    objective = result["objective"]
    what = "fastest" if objective == "latency" else "smallest"
    orig = result["original"]
    q0 = orig["quality"].get(metric)
    trials = result["trials"]
    ok = [r for r in trials if r.get("status") == "ok" and r.get("reused_from") is None]
    best = result.get("best")
    limits = result["recipe"].get("constraints") or {}
    budget = _budget(limits)
    runtime = RUNTIME_NAMES.get(orig.get("format") or "", "ONNX Runtime")
    cpu = (result.get("machine") or {}).get("cpu_class") or "this CPU"

    def describe(r: dict[str, Any]) -> str:
        on = (
            f"{r['precision']} on {RUNTIME_NAMES.get(r['runtime'], r['runtime'])}, {r.get('cpu_class') or cpu}: "
            if r.get("runtime") and r.get("precision")
            else ""
        )
        bits = [
            f"{on}{r['speedup']:.2f}x faster than the original on {runtime} (p50, batch {result['batch_size']})",
            size_ratio_words(r["size_ratio"], 1),
        ]
        if r.get("quality_drop") is not None:
            bits.insert(1, f"{-r['quality_drop']:+.2f} points {metric}")
        return " · ".join(bits)

    if best:
        summary = f"{what} within budget: <b>trial {best['trial']}</b> ({_e(_params_text(best['params']))}) — {_e(describe(best))}"
        klass = ""
    else:
        closest = result.get("closest_if_none_feasible") or []
        summary = (
            f"<b>No candidate met the constraints</b> ({_e(budget)}) in {result['evaluations']} evaluations. "
            + (
                f"Closest: trial {closest[0]['trial']} — {_e(describe(closest[0]))}; fails "
                + _e(", ".join(n for n, c in closest[0]["checks"].items() if not c["holds"]))
                if closest
                else "No candidate was evaluated."
            )
        )
        klass = " bad"
    fresh = [r for r in trials if r.get("reused_from") is None]
    repeats = [r for r in trials if r.get("reused_from") is not None]
    head = [
        f"{result['evaluations']} candidates evaluated",
        f"{len(ok)} fully",
        f"{sum(1 for r in fresh if r.get('status') == 'screened')} screened out by cheap signals",
        f"{sum(1 for r in fresh if r.get('status') == 'failed')} failed",
        f"{len(repeats)} repeated proposals reused",
        f"{result['seconds']:.0f} s",
        f"executor: {result.get('executor', 'local')}",
    ]
    rows = []
    for r in fresh:
        cls = "best" if best and r["trial"] == best["trial"] else ("front" if r.get("pareto") else "")
        ran_on = (
            f"<td>{_e(r.get('runtime') or '')}</td><td>{_e(r.get('precision') or '')}</td>"
            if r.get("candidate")
            else "<td></td><td></td>"
        )
        if r.get("status") == "ok":
            fid = next(iter((r.get("fidelity") or {}).values()), None)
            failing = [n for n, c in r["checks"].items() if not c["holds"]]
            verdict = (
                "<span class=ok>yes</span>"
                if r["feasible"]
                else f"<span class=fail>no</span> <span class=muted>{_e(', '.join(failing))}</span>"
            )
            same = (
                f" <span class=muted>({r['speedup_same_run']:.2f}x)</span>"
                if r.get("speedup_same_run") is not None
                else ""
            )
            cells = (
                f"<td>{r['speedup']:.2f}x{same}</td><td>{r['latency_ms_p50']:.3g} <span class=muted>/ {_num(r.get('original_latency_ms_p50'), 3)}</span></td>"
                f"<td>{r['size_bytes'] / 1e6:.3g}</td>"
                f"<td>{_num(r['quality'])}</td><td>{_num(-r['quality_drop'] if r['quality_drop'] is not None else None, 3)}</td>"
                f"<td>{_num(fid, 4)}</td><td>{verdict}</td><td>{'★' if r.get('pareto') else ''}</td>"
            )
        elif r.get("status") == "screened":
            sc = r["screen"]
            cells = f"<td colspan=8 class=muted>screened out: {_e(sc['signal'])} {_num(sc['measured'])} vs limit {_num(sc['limit'])}</td>"
        else:
            cells = f"<td colspan=8 class=fail>failed: {_e(r.get('reason', ''))}</td>"
        if r.get("reused_from") is not None:
            cells = f"<td colspan=8 class=muted>the sampler proposed trial {r['reused_from']}'s values again; reused, not re-evaluated</td>"
        rows.append(
            f"<tr class='{cls}'><td>{r['trial']}</td><td>{_e(_params_text(r['params']))}</td>{ran_on}{cells}<td>{_num(r.get('seconds'))}</td></tr>"
        )
    focus = best or next(iter(result.get("closest_if_none_feasible") or []), None)
    detail = ""
    if focus:
        title = f"trial {focus['trial']} ({'best' if best else 'closest'})"
        detail = (
            f"<h2>What each pass did — {_e(title)}</h2>"
            + _pass_deltas(focus["steps"], orig["candidate"], None, metric)
            + f"<h2>Quantization — {_e(title)}</h2>"
            + _quant_tables(focus["steps"])
        )
        checks = "".join(
            f"<tr><td>{_e(n)}</td><td>{_num(c['limit'])}</td><td>{_num(c['measured'])}</td>"
            f"<td class={'ok' if c['holds'] else 'fail'}>{'holds' if c['holds'] else 'fails'}</td></tr>"
            for n, c in focus["checks"].items()
        )
        detail = (
            f"<h2>Constraints — {_e(title)}</h2><table><tr><th>constraint</th><th>limit</th><th>measured</th><th></th></tr>"
            f"{checks or '<tr><td colspan=4>none</td></tr>'}</table>"
        ) + detail
    space = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(_space_values(v))}</td></tr>"
        for k, v in result["recipe"]["search"]["params"].items()
    )
    plot = (
        _pareto_plot(result, metric)
        if ok and metric and q0 is not None
        else "<p class=muted>nothing evaluated to plot</p>"
    )
    cmd = f"slimship tune {shlex.quote(result.get('recipe_path', 'recipe.yaml'))} -o {shlex.quote(str(Path(orig['candidate']).parent))}"
    body = f"""<h1>slimship tune — {_e(wl["name"])}</h1><p class=muted>{_e(wl.get("description", ""))}</p>
<div class="summary{klass}" id=summary>{summary}</div>
<p class=muted>{_e(" · ".join(head))}. Stopped: {_e(result.get("stopped") or "still running")}. Original: {_num(q0)} {_e(metric)},
{orig["size_bytes"] / 1e6:.3g} MB, on {runtime}. Constraints: {_e(budget)}. Objective: {_e(what)}. CPU class: {_e(cpu)}
(every candidate timed on its own runtime with its recorded deployment settings).</p>
<h2>Pareto front</h2>{plot}
<h2>Candidates</h2><table><tr><th>trial</th><th>values</th><th>runtime</th><th>precision</th><th>speed-up</th><th>p50 ms <span class=muted>/ original's, same run</span></th><th>MB</th><th>{_e(metric)}</th><th>Δ</th>
<th>fidelity</th><th>meets constraints</th><th>Pareto</th><th>seconds</th></tr>{"".join(rows)}</table>
{"<p class=muted>Repeated proposals (reused, not re-evaluated): " + _e(", ".join(f"{r['trial']}→{r['reused_from']}" for r in repeats)) + "</p>" if repeats else ""}
<p class=muted>★ on the Pareto front of quality against {"speed" if objective == "latency" else "size"} (all evaluated candidates); the highlighted row is the answer.
Speed-up: the median of the original's p50 over all trials{" (" + _num(result.get("original_latency_ms_p50_pooled"), 4) + " ms)" if result.get("original_latency_ms_p50_pooled") else ""}
over the candidate's p50; in brackets the ratio within the trial's own interleaved run.</p>
{detail}
<h2>Search space</h2><table><tr><th>parameter</th><th>values</th></tr>{space}</table>
<h2>Machine</h2>{_machine(result.get("machine") or {})}
<h2>Reproduce</h2><pre>{_e(cmd)}</pre>"""
    return _page(f"slimship tune: {wl['name']}", body)


def write_report(out_dir: str | Path, result: dict[str, Any], recipe_path: str | None = None) -> Path:
    """Render ``report.html`` for a run's or a search's result into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    if str(result.get("schema", "")).startswith("slimship.tune"):
        text = render_tune_report(result)
    else:
        text = render_run_report(result, out, recipe_path or str(out / "recipe.yaml"))
    report = out / "report.html"
    tmp = report.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(report)
    return report


def rebuild_report(out_dir: str | Path) -> Path:
    """Re-render the report of a finished run (results.json) or search (tune.json)."""
    from slimship.errors import ConfigError

    out = Path(out_dir)
    for name in ("tune.json", "results.json"):
        if (out / name).exists():
            return write_report(out, json.loads((out / name).read_text()))
    raise ConfigError(f"{out} holds neither results.json (slimship run) nor tune.json (slimship tune)")
