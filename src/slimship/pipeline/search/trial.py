"""One trial: build a recipe's steps with the chosen values, screen the result with cheap signals, evaluate and
time it against the original — :func:`run_trial`, a plain function of a picklable :class:`TrialContext`, so any
executor can ship it to a worker and every executor produces the same :class:`TrialRow`."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimship.pipeline.recipe import Recipe, effective_params, load_recipe, with_value
from slimship.pipeline.runner import (
    check_constraints,
    constraint_batch_sizes,
    evaluate_steps,
    execute_steps,
    reuse_candidate,
    say,
)
from slimship.pipeline.search.state import Screened, SearchHints, TrialRow

#: test seam: ``<trial number>:<marker file>`` makes the process running that trial exit once (as if killed)
#: after its steps are built; ``<trial number>:always`` every time (see :func:`exit_for_test`). The Ray
#: executor forwards it to its workers.
EXIT_SEAM = "SLIMSHIP_TUNE_EXIT_ONCE"


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, picklable: where the recipe and the search directory are, and how many threads
    its timing may use (None: the machine's physical cores)."""

    recipe_path: str
    out_dir: str
    evaluate_limit: int | None = None
    threads: int | None = None


@functools.lru_cache(maxsize=4)
def setup(recipe_path: str, out_dir: str) -> tuple[Recipe, Any, Any]:
    """The recipe, workload and original candidate, once per process (workers reuse them across trials)."""
    from slimship.candidate import original_candidate
    from slimship.workload import resolve_workload

    recipe = load_recipe(recipe_path)
    workload = resolve_workload(recipe.workload, data=recipe.data)
    out = Path(out_dir)
    original = reuse_candidate(out / "original") or original_candidate(workload, out / "original")
    return recipe, workload, original


def apply_params(recipe: Recipe, params: dict[str, Any]) -> list[Any]:
    """The recipe's steps with the searched ``<step>.<field>``, ``<step>.skip`` and ``<step>.pass`` values set
    (a field the chosen pass doesn't have is left out)."""
    labels = recipe.step_labels()
    steps = list(recipe.passes)
    params = effective_params(recipe, params)
    for key, value in sorted(params.items(), key=lambda kv: not kv[0].endswith((".pass", ".skip"))):
        label, _, fld = key.partition(".")
        i = labels.index(label)
        if fld == "skip":
            steps[i] = steps[i].model_copy(update={"skip": bool(value)})
        elif fld == "pass":
            steps[i] = steps[i].model_copy(update={"pass_name": str(value)})
        else:
            steps[i] = steps[i].model_copy(update={"config": with_value(steps[i].config, fld, value)})
    return steps


def screen(
    recipe: Recipe,
    workload: Any,
    cand_dir: str,
    orig_dir: Path,
    final: Any,
    log: Callable[[str], None],
    row: TrialRow,
    hints: SearchHints,
) -> Screened | None:
    """Cheap signals: exact size; for a latency search, the speed its MACs predict against the best feasible
    candidate; quality / fidelity on a small slice. Why, when the candidate is hopeless."""
    search, c = recipe.search, recipe.constraints
    assert search is not None
    if c.max_size_mb is not None and final.size_bytes / 1e6 > c.max_size_mb:
        return Screened("size", final.size_bytes / 1e6, c.max_size_mb)
    best = hints.best_feasible
    per_mac = None if row.signature is None else hints.speed_per_mac.get(row.signature)
    if search.screen is not None and per_mac is not None:
        predicted = (row.macs_ratio or 1.0) * per_mac * search.screen.macs_margin
        signal = f"speed-up its MACs predict (x{search.screen.macs_margin:g} margin)"
        if (
            c.min_speedup is not None
            and c.min_speedup.batch_size == search.batch_size
            and predicted < c.min_speedup.value
        ):
            return Screened(signal + " vs min_speedup", predicted, c.min_speedup.value)
        if search.objective == "latency" and best is not None and predicted < best:
            return Screened(signal + " vs the best feasible", predicted, best)
    if search.screen is None or (c.max_quality_drop is None and c.min_fidelity is None):
        return None
    n = search.screen.samples
    ev = evaluate_steps([{"label": "trial", "candidate": cand_dir}], orig_dir, workload, n, log)
    metric = workload.primary_metric
    if c.max_quality_drop is not None and metric:
        q0, q = ev["original"]["quality"].get(metric), ev["trial"]["quality"].get(metric)
        if q0 is not None and q is not None:
            drop = q0 - q if workload.higher_is_better else q - q0
            if drop > c.max_quality_drop + search.screen.quality_margin:
                return Screened(
                    f"{metric} on {n} samples", drop, c.max_quality_drop + search.screen.quality_margin
                )
    if c.min_fidelity is not None:
        name, value = next(iter(ev["trial"].get("fidelity", {}).items()), (None, None))
        if value is not None and value < c.min_fidelity - search.screen.fidelity_margin:
            return Screened(f"{name} on {n} samples", value, c.min_fidelity - search.screen.fidelity_margin)
    return None


def _macs(cand: Any) -> tuple[int | None, float]:
    """MACs after the newest structural step in the lineage (the passes record them) and the ratio to the original's."""
    recs = [
        c.info["complexity"]
        for c in cand.lineage()
        if isinstance(c.info.get("complexity"), dict)
        and c.info["complexity"].get("macs_after")
        and c.info["complexity"].get("macs_before")
    ]
    if not recs:
        return None, 1.0
    return int(recs[0]["macs_after"]), float(recs[-1]["macs_before"]) / max(1, int(recs[0]["macs_after"]))


def _signature(steps: list[dict[str, Any]]) -> str:
    """The runtime-side passes a candidate went through (export, optimize, quantize…): candidates that share
    them convert MACs into time at a similar rate."""
    from slimship.passes import PASSES

    return (
        ">".join(
            s["pass"]
            for s in steps
            if s["status"] in ("ran", "reused") and PASSES[s["pass"]].output_format != "torch"
        )
        or "torch"
    )


def record_deployment(row: TrialRow, cand: Any) -> None:
    """What the candidate runs on: its format, its runtime (the one its format runs on, which the timing uses),
    the arithmetic of its heavy ops, the deployment settings recorded with it (re-decided for this host's CPU
    class, see :func:`~slimship.runtime.settings.settings_for_candidate`) and that CPU class."""
    from slimship.machine import cpu_class
    from slimship.runtime import default_backend
    from slimship.runtime.settings import deployed_precision, settings_for_candidate

    settings = None if cand.format == "torch" else settings_for_candidate(cand.info, cand.artifact_path)[0]
    row.format, row.runtime = cand.format, default_backend(cand.format)
    row.precision = deployed_precision(cand.format, cand.artifact_path, settings)
    row.deployment = None if settings is None else settings.to_json()
    row.cpu_class = settings.cpu_class if settings is not None else cpu_class()


def run_trial(
    ctx: TrialContext,
    number: int,
    params: dict[str, Any],
    log: Callable[[str], None] = say,
    hints: SearchHints | None = None,
) -> TrialRow:
    """Build, screen, evaluate and time one candidate; the row every executor records for it. ``hints`` are what
    the search knows so far (:meth:`SearchState.hints`), for the cheap MACs signal."""
    from slimship.candidate import load_candidate
    from slimship.measure.bench import BenchTarget, bench
    from slimship.runtime import default_backend

    recipe, workload, original = setup(ctx.recipe_path, ctx.out_dir)
    assert recipe.search is not None
    out = Path(ctx.out_dir)
    t0 = time.perf_counter()
    log(f"trial {number}: {params}")
    done = execute_steps(apply_params(recipe, params), recipe.step_labels(), workload, original, out, log)
    exit_for_test(number)
    row = TrialRow(trial=number, params=params, steps=done)
    failed = [s for s in done if s["status"] == "failed"]
    finished = [s for s in done if s["status"] in ("ran", "reused")]
    if failed or not finished:
        row.status = "failed"
        row.reason = failed[0].get("reason") if failed else "no step ran"
        row.seconds = round(time.perf_counter() - t0, 1)
        return row
    last = finished[-1]
    final = load_candidate(last["candidate"])
    row.macs, row.macs_ratio = _macs(final)
    row.candidate, row.size_bytes, row.signature = last["candidate"], final.size_bytes, _signature(done)
    record_deployment(row, final)
    screened = screen(
        recipe, workload, last["candidate"], out / "original", final, log, row, hints or SearchHints()
    )
    if screened is not None:
        log(
            f"trial {number}: screened out — {screened.signal} {screened.measured:.4g} vs limit {screened.limit:.4g}"
        )
        row.status, row.screen, row.seconds = "screened", screened, round(time.perf_counter() - t0, 1)
        return row
    evaluations = evaluate_steps([last], out / "original", workload, ctx.evaluate_limit, log)
    backend = lambda c: default_backend(c.format)  # noqa: E731
    bs = recipe.search.batch_size
    log(f"trial {number}: timing against the original at batch {bs} (interleaved)")
    sizes = tuple(sorted({bs, *constraint_batch_sizes(recipe)}))
    timing = bench(
        [
            BenchTarget("original", original, backend(original)),
            BenchTarget(last["label"], final, backend(final)),
        ],
        workload,
        batch_sizes=sizes,
        memory=False,
        progress=False,
        baseline="original",
        threads=ctx.threads,
    )
    verdict = check_constraints(recipe, workload, evaluations, timing, last, original, done)

    def at_batch(original_row: bool) -> dict[str, Any]:
        cand = next(c for c in timing["candidates"] if (c["label"] == "original") == original_row)
        return next(r for r in cand["results"] if r["batch_size"] == bs)

    timed = next(c for c in timing["candidates"] if c["label"] != "original")["runtime"]
    row.runtime = str(timed.get("backend", row.runtime))
    row.deployment = timed.get("deployment", row.deployment)  # as the timing applied them (threads, spinning)
    res, base = at_batch(False), at_batch(True)
    metric = workload.primary_metric
    q = evaluations[last["label"]]["quality"].get(metric) if metric else None
    q0 = evaluations["original"]["quality"].get(metric) if metric else None
    row.status = "ok"
    row.speedup = res["speedup_vs_baseline_p50"]
    row.latency_ms_p50 = res["latency_ms"]["p50"]
    row.original_latency_ms_p50 = base["latency_ms"]["p50"]
    row.size_ratio = original.size_bytes / final.size_bytes
    row.quality = q
    row.quality_drop = None if q is None or q0 is None else (q0 - q if workload.higher_is_better else q - q0)
    row.fidelity = evaluations[last["label"]]["fidelity"]
    row.feasible = verdict["holds"]
    row.checks = verdict["checks"]
    row.seconds = round(time.perf_counter() - t0, 1)
    return row


def exit_for_test(number: int) -> None:
    """A seam for the worker-death tests: with ``SLIMSHIP_TUNE_EXIT_ONCE=<trial>:<marker file>`` the process
    running that trial exits abruptly once its steps are built (the first time; the marker remembers),
    ``<trial>:always`` every time."""
    seam = os.environ.get(EXIT_SEAM)
    if not seam:
        return
    trial, _, marker = seam.partition(":")
    if trial != str(number):
        return
    if marker != "always":
        if Path(marker).exists():
            return
        Path(marker).write_text("exited once")
    print(f"trial {number}: exiting abruptly ({EXIT_SEAM})", flush=True)
    os._exit(17)
