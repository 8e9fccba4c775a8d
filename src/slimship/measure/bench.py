"""Latency, throughput, memory and size of several candidates, timed interleaved.

Candidates are timed round-robin (A B C, B C A, C A B, …) within each batch size, so machine noise
hits all of them alike; ratios to a named baseline are reported beside absolute times. Each timed
call is one ``predict`` on a fixed batch of real inputs, after warm-up, with the garbage collector
paused. Peak memory is measured per candidate in a fresh process (see :mod:`slimship.measure.memory`).
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship.errors import ConfigError

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload

SCHEMA = "slimship.bench/1"


@dataclass(frozen=True)
class BenchTarget:
    """One thing to time: a candidate on a runtime, under a label shown in tables."""

    label: str
    candidate: Candidate
    backend: str


def latency_stats(seconds: list[float], batch_size: int) -> dict[str, Any]:
    ms = np.asarray(seconds) * 1000.0
    mean = float(ms.mean())
    return {
        "runs": len(ms),
        "latency_ms": {
            "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
            "mean": mean,
            "std": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            "min": float(ms.min()),
            "max": float(ms.max()),
        },
        "throughput_items_per_s": batch_size / (mean / 1000.0),
        "throughput_items_per_s_at_p50": batch_size / (float(np.percentile(ms, 50)) / 1000.0),
    }


def load_snapshot() -> dict[str, Any]:
    """CPU seconds used so far by every other process (this one and its children left out), with a clock."""
    import os

    import psutil

    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    used: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
        times = proc.info.get("cpu_times")
        if proc.info["pid"] in mine or times is None:
            continue
        used[proc.info["pid"]] = (proc.info.get("name") or "?", float(times.user + times.system))
    return {"time": time.perf_counter(), "loadavg": os.getloadavg(), "used": used}


def load_during(before: dict[str, Any]) -> dict[str, Any]:
    """What else ran while a timing was taken: the load average before / after and the cores other processes
    used (from their CPU-time deltas), with the busiest of them."""
    after = load_snapshot()
    wall = max(after["time"] - before["time"], 1e-6)
    busy = []
    for pid, (name, cpu_s) in after["used"].items():
        prev = before["used"].get(pid)
        delta = (
            cpu_s - (prev[1] if prev else 0.0) if prev else 0.0
        )  # new processes: unknown start, not counted
        if delta > 0:
            busy.append((delta / wall, name, pid))
    busy.sort(reverse=True)
    return {
        "loadavg_1m_before": round(before["loadavg"][0], 2),
        "loadavg_1m_after": round(after["loadavg"][0], 2),
        "other_processes_cores": round(sum(b[0] for b in busy), 2),
        "busiest_others": [{"name": n, "pid": p, "cores": round(c, 2)} for c, n, p in busy[:3]],
        "seconds": round(wall, 2),
    }


#: the fewest timed rounds a time budget (``bench(max_seconds=...)``) may leave: a median of 10 is stable to a few %
MIN_BUDGET_RUNS = 10

#: other processes using more than this share of the benchmark's cores make its timings unreliable
COMPETING_SHARE = 0.25


def load_warnings(load: dict[int, dict[str, Any]], threads: int) -> list[str]:
    """A warning per batch size whose timing other processes competed with."""
    out = []
    for bs, rec in load.items():
        if rec["other_processes_cores"] > COMPETING_SHARE * threads:
            names = ", ".join(f"{b['name']} ({b['cores']:.2f})" for b in rec["busiest_others"])
            out.append(
                f"batch {bs}: other processes used {rec['other_processes_cores']:.2f} cores while it was timed on "
                f"{threads} thread(s) (load average {rec['loadavg_1m_after']:.2f}; busiest: {names}): "
                "these timings are not from a quiet machine; compare ratios from one interleaved run, or re-run when idle"
            )
    return out


def _memory(
    targets: list[BenchTarget],
    results: list[dict[str, Any]],
    threads: int,
    feed: dict[str, np.ndarray],
    seq: int | None,
    progress: bool,
) -> list[str]:
    """Peak memory of each target in a fresh process, into its result entry; ONNX Runtime probes get the batch in
    an .npz, so they don't rebuild the workload (a factory's build()). Two probes run at a time (after the timing:
    a probe's peak is its own process's, whatever runs beside it; MiniLM's two took 7 s one after the other). A probe
    that fails is recorded with its reason (the timings stay); returns a warning per failure."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from tqdm.auto import tqdm

    from slimship.errors import InferenceError
    from slimship.measure.memory import measure_in_child

    batch = next(iter(feed.values())).shape[0]
    with tempfile.TemporaryDirectory(prefix="slimship-memory-") as tmp:
        inputs = Path(tmp) / "batch.npz"
        np.savez(inputs, **feed)  # type: ignore[arg-type]

        def probe(t: BenchTarget) -> dict[str, Any]:
            plain = not (t.candidate.path / "candidate.json").exists()
            try:
                return measure_in_child(
                    str(t.candidate.path),
                    t.backend,
                    threads,
                    batch,
                    seq,
                    artifact=str(t.candidate.artifact_path) if plain else None,
                    workload_ref=dict(t.candidate.workload) if plain else None,
                    inputs_npz=str(inputs),
                )
            except InferenceError as err:
                return {"error": str(err)}

        with (
            ThreadPoolExecutor(max_workers=2) as pool,
            tqdm(total=len(targets), desc="memory", disable=None if progress else True, leave=False) as bar,
        ):
            futures = [pool.submit(probe, t) for t in targets]
            for fut, entry in zip(futures, results, strict=True):
                entry["memory"] = fut.result()
                bar.update(1)
    return [
        f"{t.label}: {entry['memory']['error']}; its timings are kept"
        for t, entry in zip(targets, results, strict=True)
        if "error" in entry["memory"]
    ]


def _energy(
    runtimes: dict[str, Any],
    workload: Workload,
    batch: int,
    seq: int | None,
    seconds: float | None,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Joules per inference from RAPL over ≥ 60 s per candidate at the largest batch, where the host exposes it."""
    from slimship.measure.energy import POWERCAP, measure_energy, rapl_zones

    if not rapl_zones():
        reading = measure_energy(lambda: 0, root=POWERCAP).to_json()  # says why it can't be measured here
        return {k: reading for k in runtimes}
    if seconds is None:
        note = {
            "available": True,
            "reason": "not requested (bench --energy-seconds 60 measures it on this host)",
        }
        return {k: note for k in runtimes}
    feed = workload.example_inputs(batch, seq_len=seq)
    out = {}
    for label, rt in runtimes.items():
        if progress:
            print(f"energy: {label} for {seconds:g} s", file=sys.stderr)

        def work(rt: Any = rt) -> int:
            rt.predict(feed)
            return batch

        out[label] = measure_energy(work, seconds).to_json()
    return out


def _warm_up(rt: Any, batch: dict[str, np.ndarray], warmup: int, min_seconds: float, bar: Any) -> float:
    """Up to ``warmup`` untimed calls, stopping after two once they took ``min_seconds``; their median seconds."""
    warm: list[float] = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        rt.predict(batch)
        warm.append(time.perf_counter() - t0)
        bar.update()
        if len(warm) >= 2 and sum(warm) >= min_seconds:
            bar.update(warmup - len(warm))
            break
    return float(np.median(warm))


def _round_count(runs: int, slowest: float, min_seconds: float, max_seconds: float | None) -> int:
    """Timed rounds for one batch size: ``runs``, more for fast models so each is timed ≥ ``min_seconds``, and for
    slow ones at most what ``max_seconds`` buys (never under :data:`MIN_BUDGET_RUNS`)."""
    n_runs = min(max(runs, int(np.ceil(min_seconds / max(slowest, 1e-6)))), 5000)
    if max_seconds is not None:
        n_runs = min(n_runs, max(MIN_BUDGET_RUNS, int(np.ceil(max_seconds / max(slowest, 1e-6)))))
    return n_runs


def bench(
    targets: list[BenchTarget],
    workload: Workload,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    seq_len: int | None = 128,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    baseline: str | None = None,
    memory: bool = True,
    progress: bool = True,
    min_seconds: float = 1.0,
    energy_seconds: float | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Time ``targets`` interleaved at each batch size (see the module docstring) and return the bench record.

    Warm-up: up to ``warmup`` calls per target, stopping after two once they took ``min_seconds`` (a 1-s call is
    warm after two). Timed calls: ``runs`` rounds, more for fast models so each target is timed ≥ ``min_seconds``.
    ``max_seconds`` (a time budget, e.g. a run's timing of slow batches): the rounds may stop once the slowest
    target has been timed that long, but never before :data:`MIN_BUDGET_RUNS` rounds; rows say how many ran and
    whether the budget cut them (their p90/p99 are then rough)."""
    from tqdm.auto import tqdm

    from slimship.machine import default_threads, machine_info
    from slimship.runtime import create_runtime

    if not targets:
        raise ConfigError("bench needs at least one candidate")
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"bench labels must be unique, got {labels}; name them LABEL=PATH")
    if runs < 30:
        raise ConfigError(f"runs must be at least 30 for stable percentiles, got {runs}")
    if max_seconds is not None and max_seconds <= 0:
        raise ConfigError(f"max_seconds must be positive (a time budget per batch size), got {max_seconds}")
    if warmup < 1:
        raise ConfigError(f"warmup must be at least 1, got {warmup}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    baseline = baseline or labels[0]
    if baseline not in labels:
        raise ConfigError(f"baseline {baseline!r} is not one of the labels {labels}")
    threads = threads or default_threads()
    is_text = any("sequence" in s.shape for s in workload.inputs)
    seq = seq_len if is_text else None

    # ORT's spinning pool would steal the cores from the next candidate in the interleaving (measured:
    # PyTorch p50 doubled beside a spinning ORT session on 2 cores), so ORT threads block when idle.
    runtimes = {
        t.label: create_runtime(t.candidate, workload, t.backend, threads, spin=False) for t in targets
    }
    timings: dict[str, dict[int, list[float]]] = {t.label: {} for t in targets}
    # process CPU time per call (all threads): survives noisy neighbours better than wall time and prices a deployment
    cpu: dict[str, dict[int, list[float]]] = {t.label: {} for t in targets}
    load: dict[int, dict[str, Any]] = {}
    budget_cut: dict[int, bool] = {}
    total = len(batch_sizes) * len(targets) * (runs + warmup)
    with tqdm(total=total, desc="bench", unit="call", disable=None if progress else True, leave=False) as bar:
        for bs in batch_sizes:
            batch = workload.example_inputs(bs, seq_len=seq)
            slowest = 0.0
            for label, rt in runtimes.items():
                slowest = max(slowest, _warm_up(rt, batch, warmup, min_seconds, bar))
                timings[label][bs] = []
                cpu[label][bs] = []
            n_runs = _round_count(runs, slowest, min_seconds, max_seconds)
            budget_cut[bs] = n_runs < runs
            bar.total += (n_runs - runs) * len(targets)
            bar.refresh()
            gc.collect()
            before = load_snapshot()
            gc.disable()
            try:
                for r in range(n_runs):
                    order = labels[r % len(labels) :] + labels[: r % len(labels)]
                    for label in order:
                        c0 = time.process_time()
                        t0 = time.perf_counter()
                        runtimes[label].predict(batch)
                        timings[label][bs].append(time.perf_counter() - t0)
                        cpu[label][bs].append(time.process_time() - c0)
                        bar.update()
            finally:
                gc.enable()
                load[bs] = load_during(before)
    energy = _energy(runtimes, workload, max(batch_sizes), seq, energy_seconds, progress)
    for rt in runtimes.values():
        rt.close()

    results: list[dict[str, Any]] = []
    for t in targets:
        rows = []
        for bs in batch_sizes:
            row = {
                "batch_size": bs,
                "seq_len": seq,
                **latency_stats(timings[t.label][bs], bs),
                "machine_load": load[bs],
            }
            row["runs_cut_by_time_budget"] = budget_cut[bs]
            calls = cpu[t.label][bs]
            row["cpu_ms_per_inference"] = round(1e3 * float(np.sum(calls)) / (len(calls) * bs), 4)
            row["cpu_ms_per_call_p50"] = round(1e3 * float(np.median(calls)), 4)
            base = latency_stats(timings[baseline][bs], bs)["latency_ms"]
            mine = row["latency_ms"]
            row["speedup_vs_baseline_p50"] = base["p50"] / mine["p50"]
            row["speedup_vs_baseline_mean"] = base["mean"] / mine["mean"]
            rows.append(row)
        entry: dict[str, Any] = {
            "label": t.label,
            "candidate_id": t.candidate.id,
            "candidate_path": str(t.candidate.path),
            "format": t.candidate.format,
            "runtime": runtimes[t.label].describe(),
            "file_size_bytes": t.candidate.size_bytes,
            "file_size_mb": round(t.candidate.size_bytes / 1e6, 2),
            "results": rows,
            "energy": energy[t.label],
        }
        results.append(entry)
    warnings = load_warnings(load, threads)
    if memory:
        feed = workload.example_inputs(max(batch_sizes), seq_len=seq)
        warnings += _memory(targets, results, threads, feed, seq, progress)
    base_size = next(e for e in results if e["label"] == baseline)["file_size_bytes"]
    for entry in results:
        entry["size_ratio_vs_baseline"] = entry["file_size_bytes"] / base_size
    return {
        "schema": SCHEMA,
        "workload": workload.ref,
        "baseline": baseline,
        "settings": {
            "batch_sizes": list(batch_sizes),
            "seq_len": seq,
            "runs": runs,
            "min_seconds": min_seconds,
            "max_seconds": max_seconds,
            "runs_note": f"at least `runs` timed calls per candidate and batch size, more for fast models so each is timed ≥ min_seconds; with max_seconds, slow batches stop once the slowest candidate was timed that long (never under {MIN_BUDGET_RUNS} runs; such rows have runs_cut_by_time_budget: true); the count per row is in results[].runs",
            "warmup_note": "up to `warmup` calls per candidate and batch size, stopping after two once they took min_seconds",
            "warmup": warmup,
            "threads": threads,
            "interleaved": True,
            "order": "round-robin, rotated every run",
            "inputs": "real evaluation data (example_inputs), fixed per batch size",
            "gc": "paused while timing",
            "onnxruntime_thread_spinning": False,
            "cpu_time": "cpu_ms_per_inference = process CPU time (all threads, user+system) over the timed calls / rows",
        },
        "machine": machine_info(threads),
        "load": load,
        "warnings": warnings,
        "candidates": results,
    }
