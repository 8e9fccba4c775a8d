"""`slimship run recipe.yaml`: run a recipe's passes in order into a run directory that can be resumed.

    <run>/recipe.yaml          the recipe as given
    <run>/machine.json         CPU, ISA flags, library versions
    <run>/original/            the workload's model
    <run>/steps/NN-<label>-<key>/   one candidate per step; key = hash(pass, config, parent candidate)
    <run>/results.json         steps (ran / reused / failed / skipped, with reasons), evaluations, timing, constraints

A step whose directory already holds a verified candidate for the same key is reused, so an interrupted
run picks up where it stopped and nothing finished is repeated; a half-written step directory is
discarded and redone. A step that fails is recorded with its reason and the steps after it are skipped;
a broken recipe stops before anything runs (it is validated first).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from slimship._util import sha256_text, stable_json, write_json_atomic
from slimship.errors import ConfigError, SlimshipError
from slimship.pipeline.recipe import Recipe, Step, load_recipe

SCHEMA = "slimship.run/1"


def say(msg: str) -> None:
    """The default progress log of runs and searches: one ``· msg`` line on stderr."""
    print(f"· {msg}", file=sys.stderr)


def reuse_candidate(step_dir: Path, **expected: Any) -> Any:
    """The verified candidate in ``step_dir``, or None when there is none, it doesn't verify, or one of the
    ``expected`` attributes differs (e.g. ``parent_id=…, pass_name=…, pass_config=…`` or ``workload=…``, for a
    directory whose name doesn't already say what it holds)."""
    from slimship.candidate import load_candidate

    if not (step_dir / "candidate.json").exists():
        return None
    try:
        cand = load_candidate(step_dir)
        if any(getattr(cand, k) != v for k, v in expected.items()):
            return None
        cand.verify_artifact()
    except SlimshipError:
        return None
    return cand


def run_recipe(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    evaluate_limit: int | None = None,
    bench_batch_sizes: tuple[int, ...] | None = None,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Run (or resume) a recipe into ``out_dir``; returns what results.json holds."""
    from slimship.candidate import load_candidate, original_candidate
    from slimship.machine import machine_info
    from slimship.passes import PASSES
    from slimship.workload import resolve_workload

    recipe: Recipe = load_recipe(recipe_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe_path, out / "recipe.yaml")
    from slimship.machine import physical_cores

    machine = machine_info(physical_cores())
    write_json_atomic(out / "machine.json", machine)
    workload = resolve_workload(recipe.workload, data=recipe.data)
    orig_dir = out / "original"
    original = reuse_candidate(orig_dir) or original_candidate(workload, orig_dir)
    first = PASSES[recipe.passes[0].pass_name]
    if first.input_format != original.format:
        raise ConfigError(
            f"{recipe_path}: the first pass {first.name!r} takes a {first.input_format} model, but {workload.name}'s "
            f"model is {original.format}"
        )
    steps = execute_steps(list(recipe.passes), recipe.step_labels(), workload, original, out, log)
    evaluations = evaluate_steps(steps, orig_dir, workload, evaluate_limit, log)
    final = next((s for s in reversed(steps) if s["status"] in ("ran", "reused")), None)
    timing = None
    sizes = sorted({*(bench_batch_sizes or (1,)), *constraint_batch_sizes(recipe)})
    if final is not None:
        from slimship.measure.bench import BenchTarget, bench

        log("timing the original and the final candidate (interleaved)")
        final_c = load_candidate(final["candidate"])
        targets = [
            BenchTarget("original", original, "torch" if original.format == "torch" else "onnxruntime"),
            BenchTarget(final["label"], final_c, "torch" if final_c.format == "torch" else "onnxruntime"),
        ]
        timing = bench(
            targets, workload, batch_sizes=tuple(sizes), memory=False, progress=False, baseline="original"
        )
    result = {
        "schema": SCHEMA,
        "machine": machine,
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "workload": workload.describe(),
        "steps": steps,
        "evaluations": evaluations,
        "bench": timing,
        "constraints": check_constraints(recipe, workload, evaluations, timing, final, original, steps),
    }
    write_json_atomic(out / "results.json", result)
    from slimship.report.html import write_report

    write_report(out, result, str(recipe_path))
    return result


def constraint_batch_sizes(recipe: Recipe) -> list[int]:
    """Batch sizes the constraints are judged at (they must be timed)."""
    c = recipe.constraints
    return [lim.batch_size for lim in (c.max_latency_ms, c.min_speedup) if lim is not None]


def check_constraints(
    recipe: Recipe,
    workload: Any,
    evaluations: dict[str, Any],
    timing: dict[str, Any] | None,
    final: dict[str, Any] | None,
    original: Any,
    steps: list[dict[str, Any]],
) -> dict[str, Any]:
    """Each constraint with the final candidate's measured value and whether it holds."""
    from slimship.candidate import load_candidate

    c = recipe.constraints
    checks: dict[str, Any] = {}
    if final is None:
        return {"final": None, "holds": False, "checks": {}, "note": "no step finished"}
    ev, ref = evaluations.get(final["label"], {}), evaluations.get("original", {})
    if c.max_quality_drop is not None and workload.primary_metric:
        m = workload.primary_metric
        base = ref.get("quality", {}).get(m)
        got = ev.get("quality", {}).get(m)
        drop = (
            None if base is None or got is None else (base - got if workload.higher_is_better else got - base)
        )
        checks["max_quality_drop"] = {
            "limit": c.max_quality_drop,
            "measured": drop,
            "metric": m,
            "holds": drop is not None and drop <= c.max_quality_drop,
        }
    if c.min_fidelity is not None:
        name, value = next(iter(ev.get("fidelity", {}).items()), (None, None))
        checks["min_fidelity"] = {
            "limit": c.min_fidelity,
            "measured": value,
            "metric": name,
            "holds": value is not None and value >= c.min_fidelity,
        }
    if c.max_latency_ms is not None and timing is not None:
        row = next(cd for cd in timing["candidates"] if cd["label"] == final["label"])
        p50 = next(
            (
                r["latency_ms"]["p50"]
                for r in row["results"]
                if r["batch_size"] == c.max_latency_ms.batch_size
            ),
            None,
        )
        checks["max_latency_ms"] = {
            "limit": c.max_latency_ms.value,
            "batch_size": c.max_latency_ms.batch_size,
            "measured": p50,
            "holds": p50 is not None and p50 <= c.max_latency_ms.value,
        }
    if c.min_speedup is not None and timing is not None:
        row = next(cd for cd in timing["candidates"] if cd["label"] == final["label"])
        sp = next(
            (
                r.get("speedup_vs_baseline_p50")
                for r in row["results"]
                if r["batch_size"] == c.min_speedup.batch_size
            ),
            None,
        )
        checks["min_speedup"] = {
            "limit": c.min_speedup.value,
            "batch_size": c.min_speedup.batch_size,
            "measured": sp,
            "holds": sp is not None and sp >= c.min_speedup.value,
        }
    if c.max_size_mb is not None:
        size = load_candidate(final["candidate"]).size_bytes / 1e6
        checks["max_size_mb"] = {"limit": c.max_size_mb, "measured": size, "holds": size <= c.max_size_mb}
    return {
        "final": final["label"],
        "holds": all(v["holds"] for v in checks.values()),
        "checks": checks,
        "complete": all(s.get("status") in ("ran", "reused", "omitted") for s in steps),
        "original_bytes": original.size_bytes,
    }


@contextlib.contextmanager
def _step_lock(step_dir: Path) -> Iterator[None]:
    """An exclusive lock on one step directory (``flock`` on ``steps/.locks/<step>``; released when the holder exits
    or dies), so trials of a search running side by side never build the same step at once or delete each other's."""
    import fcntl

    locks = step_dir.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / step_dir.name, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def execute_steps(
    passes: list[Step],
    labels: list[str],
    workload: Any,
    original: Any,
    out: Path,
    log: Callable[[str], None] = say,
    *,
    layout: Literal["keyed", "flat"] = "keyed",
    raise_errors: bool = False,
) -> list[dict[str, Any]]:
    """Run ``passes`` in order from ``original``; each step's candidate is cached under a key of (pass, config,
    parent). ``layout``: ``keyed`` puts each step in ``out/steps/NN-<label>-<key>``; ``flat`` in ``out/<label>``
    (reused only when the candidate there has the same pass, config and parent). ``raise_errors``: a failing
    pass raises instead of being recorded."""
    from tqdm import tqdm

    from slimship.candidate import Candidate
    from slimship.passes import PASSES

    steps: list[dict[str, Any]] = []
    parent: Candidate | None = original
    overall = tqdm(
        total=len(passes), desc="recipe", unit="step", disable=None, leave=False
    )  # off when not a terminal
    for i, (step, label) in enumerate(zip(passes, labels, strict=True)):
        overall.set_postfix_str(label)
        overall.update(0 if i == 0 else 1)
        cls = PASSES[step.pass_name]
        cfg = cls.config_cls.parse(step.config)
        if step.skip:
            steps.append(
                {"label": label, "pass": step.pass_name, "status": "omitted", "reason": "skip: true"}
            )
            continue
        if parent is None:
            steps.append(
                {
                    "label": label,
                    "pass": step.pass_name,
                    "status": "skipped",
                    "reason": "an earlier step failed",
                }
            )
            continue
        key = sha256_text(step.pass_name, stable_json(cfg.to_json_dict()), parent.id)[:10]
        if layout == "flat":
            step_dir = out / label
            same: dict[str, Any] = {
                "pass_name": step.pass_name,
                "pass_config": cfg.to_json_dict(),
                "parent_id": parent.id,
            }
        else:
            step_dir, same = out / "steps" / f"{i:02d}-{label}-{key}", {}
        with _step_lock(
            step_dir
        ):  # a search's trials side by side: one builds a shared step, the others reuse it
            done = reuse_candidate(step_dir, **same)
            t0 = time.perf_counter()
            if done is not None:
                log(f"{label}: reusing {step_dir.name} (same pass, config and parent)")
                steps.append(
                    {
                        "label": label,
                        "pass": step.pass_name,
                        "status": "reused",
                        "candidate": str(step_dir),
                        "id": done.id,
                    }
                )
                parent = done
                continue
            if step_dir.exists():
                shutil.rmtree(step_dir)  # half-written by an interrupted run
            log(f"{label}: running {step.pass_name}")
            try:
                cand = cls()(parent, workload, cfg, step_dir)
            except SlimshipError as err:
                if raise_errors:
                    raise
                log(f"{label}: failed — {err}")
                steps.append(
                    {
                        "label": label,
                        "pass": step.pass_name,
                        "status": "failed",
                        "reason": f"{type(err).__name__}: {err}",
                    }
                )
                shutil.rmtree(step_dir, ignore_errors=True)
                parent = None
                continue
        steps.append(
            {
                "label": label,
                "pass": step.pass_name,
                "status": "ran",
                "candidate": str(step_dir),
                "id": cand.id,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        parent = cand
    overall.update(1)
    overall.close()
    return steps


def evaluate_steps(
    steps: list[dict[str, Any]],
    orig_dir: Path,
    workload: Any,
    evaluate_limit: int | None,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Quality and fidelity of the original and of every finished step (cached beside each candidate)."""
    import json

    from slimship.candidate import load_candidate
    from slimship.measure.evaluate import evaluate

    evaluations: dict[str, Any] = {}
    for s in [{"label": "original", "candidate": str(orig_dir)}] + [s for s in steps if "candidate" in s]:
        cache = (
            Path(s["candidate"]) / f"evaluation{'' if evaluate_limit is None else f'-{evaluate_limit}'}.json"
        )
        if cache.exists():
            evaluations[s["label"]] = json.loads(cache.read_text())
            continue
        log(f"evaluating {s['label']}")
        ev = evaluate(load_candidate(s["candidate"]), workload, limit=evaluate_limit, progress=False)
        write_json_atomic(cache, ev)
        evaluations[s["label"]] = ev
    return evaluations
