"""Markdown summaries of evaluation and benchmark results (the JSON stays the source of truth)."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}f}" if abs(v) >= 0.001 or v == 0 else f"{v:.2e}"
    return "—" if v is None else str(v)


def fmt_ms(ms: float) -> str:
    """Milliseconds with 3 significant digits, so 0.05 and 0.048 stay apart."""
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def size_ratio_words(ratio: float, digits: int = 2, than: str = "") -> str:
    """A size ratio (parent bytes / child bytes) in words that stay true both ways: ``2.00x smaller``,
    ``1.02x larger`` (never "0.98x smaller"), ``the same size`` when it rounds to 1; ``than="its parent"``
    appends "than its parent" (or "as its parent")."""
    if not ratio or ratio != ratio or ratio <= 0:
        return "size unknown"
    shown = round(ratio if ratio >= 1 else 1 / ratio, digits)
    if shown == 1:
        return "the same size" + (f" as {than}" if than else "")
    return f"{shown:.{digits}f}x {'smaller' if ratio > 1 else 'larger'}" + (f" than {than}" if than else "")


def fmt_bytes(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{n} B"


def bench_table(bench: dict[str, Any]) -> str:
    rows = [
        "| candidate | runtime | batch | runs | p50 ms | p90 ms | p99 ms | mean ms | items/s | speed-up vs "
        + bench["baseline"]
        + " (p50) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in bench["candidates"]:
        for r in c["results"]:
            lat = r["latency_ms"]
            rows.append(
                f"| {c['label']} | {c['runtime']['backend']} | {r['batch_size']} | {r['runs']} | {fmt_ms(lat['p50'])} | {fmt_ms(lat['p90'])} | "
                f"{fmt_ms(lat['p99'])} | {fmt_ms(lat['mean'])} | {r['throughput_items_per_s']:.1f} | {r['speedup_vs_baseline_p50']:.2f}x |"
            )
    return "\n".join(rows)


def size_memory_table(bench: dict[str, Any]) -> str:
    rows = [
        "| candidate | file size | size vs baseline | peak RSS MB | model peak MB (over process baseline) |",
        "|---|---|---|---|---|",
    ]
    for c in bench["candidates"]:
        mem = c.get("memory") or {}
        rows.append(
            f"| {c['label']} | {fmt_bytes(c['file_size_bytes'])} | {c['size_ratio_vs_baseline']:.2f}x | "
            f"{mem.get('peak_rss_mb', '—')} | {mem.get('model_peak_mb', '—')} |"
        )
    return "\n".join(rows)


def eval_table(evals: dict[str, dict[str, Any]]) -> str:
    q_keys: list[str] = []
    f_keys: list[str] = []
    for e in evals.values():
        q_keys += [k for k in e["quality"] if k not in q_keys]
        f_keys += [k for k in e["fidelity"] if k not in f_keys]
    head = "| candidate | runtime | samples | " + " | ".join(q_keys + f_keys) + " |"
    rows = [head, "|" + "---|" * (3 + len(q_keys) + len(f_keys))]
    for label, e in evals.items():
        vals = [_fmt(e["quality"].get(k), 2) for k in q_keys] + [
            _fmt(e["fidelity"].get(k), 6) for k in f_keys
        ]
        rows.append(f"| {label} | {e['runtime']['backend']} | {e['samples']} | " + " | ".join(vals) + " |")
    return "\n".join(rows)


def machine_line(machine: dict[str, Any]) -> str:
    isa = ", ".join(k for k, v in machine["isa"].items() if v) or "none of the tracked flags"
    pk = machine["packages"]
    return (
        f"{machine['cpu_model']}, {machine['physical_cores']} physical cores, {machine['memory_gib']} GiB; "
        f"ISA: {isa}; int8: {machine['int8_kernels']}; torch {pk.get('torch')}, onnxruntime {pk.get('onnxruntime')}, "
        f"onnx {pk.get('onnx')}; runtime threads {machine['threads']['runtime_threads']}"
    )


def load_lines(bench: dict[str, Any]) -> list[str]:
    """What else the machine ran while each batch size was timed, and the warnings that follow (bench records it)."""
    load = bench.get("load") or {}
    if not load:
        return []
    per = "; ".join(
        f"batch {bs}: other processes {rec['other_processes_cores']:.2f} cores, load average {rec['loadavg_1m_after']:.2f}"
        for bs, rec in load.items()
    )
    lines = [f"Machine load while timing: {per}.", ""]
    lines += [f"**Warning:** {w}" for w in bench.get("warnings", [])]
    return lines + ([""] if bench.get("warnings") else [])


def render_summary(results: dict[str, Any]) -> str:
    bench = results["bench"]
    parts = [f"# slimship quickstart — {results['workload']['name']}", ""]
    if results.get("headline"):
        parts += [results["headline"], ""]
    parts += ["## Quality and fidelity", "", eval_table(results["evaluations"]), ""]
    parts += [
        "## Latency and throughput (interleaved; ≥ "
        + f"{bench['settings']['runs']} timed runs and ≥ {bench['settings'].get('min_seconds', 0)} s per candidate after {bench['settings']['warmup']} warm-up"
        + (f", seq {bench['settings']['seq_len']}" if bench["settings"]["seq_len"] else "")
        + ")",
        "",
        bench_table(bench),
        "",
        "## Size and memory",
        "",
        size_memory_table(bench),
        "",
        "## Candidates",
        "",
    ]
    for c in results["candidates"]:
        line = f"- **{c['name']}** `{c['id']}` ({c['format']}) ← {c.get('parent_id') or 'workload'}"
        if c.get("pass_name"):
            line += f" via `{c['pass_name']}`"
        for note in c.get("notes", []):
            line += f"; {note}"
        parts.append(line)
    parts += [
        "",
        "## Machine",
        "",
        machine_line(bench["machine"]),
        "",
        *load_lines(bench),
        f"Reproduce: `{results['command']}`",
        "",
    ]
    return "\n".join(parts)
