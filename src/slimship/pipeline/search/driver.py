"""`slimship tune recipe.yaml`: run (or resume) a search with an executor and write what it found — tune.json
(rewritten after every trial) and report.html."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimship._util import write_json_atomic
from slimship.errors import ConfigError
from slimship.pipeline.recipe import Recipe, load_recipe
from slimship.pipeline.runner import evaluate_steps, say
from slimship.pipeline.search.executor import Executor
from slimship.pipeline.search.state import (
    SearchState,
    TrialRow,
    constraint_values,
    objectives,
    pareto_front,
    pool_baseline,
)
from slimship.pipeline.search.trial import TrialContext, setup

SCHEMA = "slimship.tune/1"


def _summary(rows: list[TrialRow], recipe: Recipe) -> tuple[float | None, TrialRow | None, list[TrialRow]]:
    """Judge speeds against the pooled original, mark the Pareto front; the pooled p50, the best feasible row and
    (when none is feasible) the three closest."""
    assert recipe.search is not None
    objective = recipe.search.objective
    pooled = pool_baseline(rows, recipe)
    front = pareto_front([r for r in rows if r.reused_from is None], objective)
    for r in rows:
        if r.status == "ok":
            r.pareto = r.trial in front and r.reused_from is None
    ok = [r for r in rows if r.status == "ok" and r.reused_from is None]
    feasible = [r for r in ok if r.feasible]
    best = max(feasible, key=lambda r: (objectives(r, objective) or (0.0, 0.0))[0]) if feasible else None
    closest = (
        []
        if feasible
        else sorted(
            ok,
            key=lambda r: (
                sum(0 if c["holds"] else 1 for c in r.checks.values()),
                sum(constraint_values(r, recipe).values()),
            ),
        )[:3]
    )
    return pooled, best, closest


def tune_recipe(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    trials: int | None = None,
    evaluate_limit: int | None = None,
    executor: Executor | None = None,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Run (or resume — built steps and evaluations are reused) a search; returns what tune.json holds."""
    from slimship.machine import default_threads, machine_info
    from slimship.pipeline.search.local import LocalExecutor

    recipe = load_recipe(recipe_path)
    if recipe.search is None:
        raise ConfigError(
            f"{recipe_path} has no `search` section; `slimship tune` needs one (or use `slimship run`)"
        )
    search = recipe.search
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe_path, out / "recipe.yaml")
    ctx = TrialContext(str(Path(recipe_path).resolve()), str(out.resolve()), evaluate_limit)
    _, workload, original = setup(ctx.recipe_path, ctx.out_dir)
    executor = executor or LocalExecutor()
    machine = machine_info(default_threads())
    state = SearchState(recipe)
    limit = trials or search.trials
    t_start = time.perf_counter()
    deadline = time.monotonic() + search.timeout_seconds if search.timeout_seconds else None
    base_eval = evaluate_steps([], out / "original", workload, evaluate_limit, log)["original"]

    def result(stopped: str | None) -> dict[str, Any]:
        pooled, best, closest = _summary(state.rows, recipe)
        return {
            "schema": SCHEMA,
            "machine": machine,
            "recipe": recipe.model_dump(mode="json", by_alias=True),
            "recipe_path": str(recipe_path),
            "workload": workload.describe(),
            "executor": executor.name,
            "objective": search.objective,
            "batch_size": search.batch_size,
            "original": {
                "size_bytes": original.size_bytes,
                "quality": base_eval["quality"],
                "format": original.format,
                "candidate": str(out / "original"),
            },
            "trials": [r.to_json() for r in state.rows],
            "evaluations": state.evaluations,
            "best": None if best is None else best.to_json(),
            "closest_if_none_feasible": [r.to_json() for r in closest],
            "original_latency_ms_p50_pooled": pooled,
            "stopped": stopped,
            "seconds": round(time.perf_counter() - t_start, 1),
        }

    from tqdm import tqdm

    bar = tqdm(total=limit, desc="search", unit="candidate", disable=None)  # off when not a terminal

    def on_row(row: TrialRow) -> None:
        bar.n = state.evaluations
        bar.set_postfix_str(f"best {state.best_value:.2f}x" if state.best_value else "no feasible yet")
        bar.refresh()
        write_json_atomic(out / "tune.json", result(None))

    try:
        stopped = executor.search(ctx, state, limit, deadline, on_row, log)
    finally:
        bar.close()
    log(f"search stopped: {stopped}")
    final = result(stopped)
    write_json_atomic(out / "tune.json", final)
    from slimship.report.html import write_report

    write_report(out, final)
    return final
