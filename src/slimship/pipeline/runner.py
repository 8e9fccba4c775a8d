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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from slimship._util import sha256_text, stable_json, write_json_atomic
from slimship.errors import ConfigError, SlimshipError
from slimship.pipeline.recipe import Recipe, Step, load_recipe

SCHEMA = "slimship.run/1"


_STARTED = time.monotonic()


def say(msg: str) -> None:
    """The default progress log of runs and searches: one ``· m:ss msg`` line on stderr (time since start)."""
    m, s = divmod(int(time.monotonic() - _STARTED), 60)
    print(f"· {m}:{s:02d} {msg}", file=sys.stderr)


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


#: a run's default timing budget per candidate and batch size (see :func:`run_recipe`): MiniLM at batch 32 gets
#: 10 rounds (≈ 17 s for the original and the INT8 model on 2 AVX2 cores) instead of 30 (≈ 51 s); batch 1 keeps 30+
TIMING_BUDGET_S = 8.0


def run_recipe(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    evaluate_limit: int | None = None,
    bench_batch_sizes: tuple[int, ...] | None = None,
    timing_budget_s: float | None = TIMING_BUDGET_S,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Run (or resume) a recipe into ``out_dir``; returns what results.json holds.

    ``timing_budget_s``: seconds of timed calls per candidate and batch size after which the timing of slow
    batches may stop (``bench(max_seconds=...)``, never under 10 rounds; None: full runs). Batch sizes a latency
    constraint is judged at always get full runs (their p90/p99 must be stable).

    With step fallbacks, attempt 1 is the recipe as written and each fallback one more attempt (see
    :meth:`Recipe.attempts`); attempts run until one holds (``fallback_policy: first``) or all of them
    (``fastest``). ``steps``, ``evaluations``, ``bench`` and ``constraints`` describe the kept attempt; ``attempts``
    lists every attempt tried with its figures and ``fallback`` says which was kept and why."""
    from slimship.candidate import original_candidate
    from slimship.machine import default_threads, machine_info
    from slimship.passes import PASSES
    from slimship.workload import resolve_workload

    recipe: Recipe = load_recipe(recipe_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if Path(recipe_path).resolve() != (out / "recipe.yaml").resolve():  # re-running a run's own copy
        shutil.copyfile(recipe_path, out / "recipe.yaml")
    machine = machine_info(default_threads())
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
    sizes = tuple(sorted({*(bench_batch_sizes or (1,)), *constraint_batch_sizes(recipe)}))
    # the evaluation inputs get ready (tokenized) beside the first passes, whose export is mostly one Python thread
    threading.Thread(target=_prepare_evaluation, args=(workload, evaluate_limit), daemon=True).start()
    ctx = _RunContext(recipe, workload, original, out, evaluate_limit, sizes, log, timing_budget_s)
    plan = recipe.attempts()
    records: list[dict[str, Any]] = []
    for attempt in plan:
        if records and recipe.fallback_policy == "first" and records[-1]["holds"]:
            break
        if records:
            log(
                f"attempt {attempt.number}/{len(plan)} ({attempt.label}): "
                f"{'constraints do not hold so far' if not any(r['holds'] for r in records) else 'fallback_policy: fastest'}"
                f" — replacing step {attempt.replaced_step} with {attempt.alternative.pass_name if attempt.alternative else '?'}"
            )
        records.append(_run_attempt(ctx, attempt))
    timing = _time_attempts(ctx, records)
    kept, reason = _choose_attempt(recipe, records, timing)
    for r in records:
        _attempt_figures(r, workload, timing, len(records))
        r["kept"] = r is kept
    bench_result = _kept_bench(timing, kept, records)
    result = {
        "schema": SCHEMA,
        "machine": machine,
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "workload": workload.describe(),
        "steps": kept["steps"],
        "evaluations": kept["evaluations"],
        "bench": bench_result,
        "constraints": {**kept["constraints"], "attempt": kept["attempt"]},
        "attempts": [{k: v for k, v in r.items() if k not in ("evaluations", "final_step")} for r in records],
        "fallback": {
            "policy": recipe.fallback_policy,
            "attempts_declared": len(plan),
            "attempts_run": len(records),
            "kept": kept["attempt"],
            "kept_label": kept["label"],
            "reason": reason,
            "any_holds": any(r["holds"] for r in records),
        },
    }
    write_json_atomic(out / "results.json", result)
    from slimship.report.html import write_report

    write_report(out, result, str(recipe_path))
    return result


def _prepare_evaluation(workload: Any, limit: int | None) -> None:
    try:
        workload.prepare_evaluation(limit)
    except Exception:  # the evaluation raises it again, in the run's own thread, with its message
        return


class _RunContext:
    """What every attempt of one run shares."""

    def __init__(
        self,
        recipe: Recipe,
        workload: Any,
        original: Any,
        out: Path,
        evaluate_limit: int | None,
        sizes: tuple[int, ...],
        log: Callable[[str], None],
        timing_budget_s: float | None = None,
    ) -> None:
        self.recipe, self.workload, self.original, self.out = recipe, workload, original, out
        self.evaluate_limit, self.sizes, self.log = evaluate_limit, sizes, log
        # a latency constraint's percentiles need full runs; the speed-ups of a run without one only need medians
        self.timing_budget_s = None if constraint_batch_sizes(recipe) else timing_budget_s


def _bench_pair(ctx: _RunContext, targets: list[tuple[str, Any]]) -> dict[str, Any]:
    """The original and ``targets`` (label, candidate) timed interleaved at the run's batch sizes."""
    from slimship.measure.bench import BenchTarget, bench
    from slimship.runtime import default_backend

    def backend(c: Any) -> str:
        return default_backend(c.format)

    items = [BenchTarget("original", ctx.original, backend(ctx.original))]
    items += [BenchTarget(label, c, backend(c)) for label, c in targets]
    return bench(
        items,
        ctx.workload,
        batch_sizes=ctx.sizes,
        memory=False,
        progress=False,
        baseline="original",
        max_seconds=ctx.timing_budget_s,
    )


def _run_attempt(ctx: _RunContext, attempt: Any) -> dict[str, Any]:
    """Steps, evaluations and constraints of one attempt (timed alone with the original only when a latency
    or speed-up constraint needs it)."""
    from slimship.candidate import load_candidate

    t0 = time.perf_counter()
    steps = execute_steps(
        list(attempt.passes), ctx.recipe.step_labels(), ctx.workload, ctx.original, ctx.out, ctx.log
    )
    evaluations = evaluate_steps(steps, ctx.out / "original", ctx.workload, ctx.evaluate_limit, ctx.log)
    final = next((s for s in reversed(steps) if s["status"] in ("ran", "reused")), None)
    timing = None
    if final is not None and constraint_batch_sizes(ctx.recipe):
        ctx.log(f"timing the original and {final['label']} (interleaved)")
        timing = _bench_pair(ctx, [(final["label"], load_candidate(final["candidate"]))])
    verdict = check_constraints(ctx.recipe, ctx.workload, evaluations, timing, final, ctx.original, steps)
    alt = attempt.alternative
    record = {
        "attempt": attempt.number,
        "label": attempt.label,
        "replaced_step": attempt.replaced_step,
        "pass": alt.pass_name if alt else None,
        "config": dict(alt.config) if alt else None,
        "steps": steps,
        "evaluations": evaluations,
        "final": final["label"] if final else None,
        "final_step": final,
        "candidate": final["candidate"] if final else None,
        "constraints": verdict,
        # an attempt whose step failed doesn't hold, even if the last finished step meets the limits
        "holds": bool(verdict["holds"]) and bool(verdict.get("complete", True)),
        "own_bench": timing,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    failing = [n for n, c in verdict.get("checks", {}).items() if not c["holds"]]
    ctx.log(
        f"attempt {attempt.number} ({attempt.label}): constraints "
        + ("hold" if record["holds"] else f"do not hold ({', '.join(failing) or verdict.get('note', '')})")
    )
    return record


def _bench_label(r: dict[str, Any]) -> str:
    return f"attempt {r['attempt']}: {r['label']}"


def _time_attempts(ctx: _RunContext, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One interleaved benchmark of the original and every attempt's final candidate (one attempt: the same
    timing as a run without fallbacks, labelled by its final step)."""
    from slimship.candidate import load_candidate

    done = [r for r in records if r["final_step"] is not None]
    if not done:
        return None
    if len(records) == 1:
        r = done[0]
        if r["own_bench"] is not None:
            return dict(r["own_bench"])
        ctx.log("timing the original and the final candidate (interleaved)")
        return _bench_pair(ctx, [(r["final"], load_candidate(r["candidate"]))])
    ctx.log(f"timing the original and {len(done)} attempts' final candidates (interleaved)")
    return _bench_pair(ctx, [(_bench_label(r), load_candidate(r["candidate"])) for r in done])


def _timing_row(timing: dict[str, Any] | None, r: dict[str, Any], n_records: int) -> dict[str, Any] | None:
    if timing is None or r["final"] is None:
        return None
    label = r["final"] if n_records == 1 else _bench_label(r)
    return next((c for c in timing["candidates"] if c["label"] == label), None)


def _decision_batch(recipe: Recipe, sizes: tuple[int, ...]) -> int:
    """The batch size "fastest" is judged at: the latency or speed-up constraint's, else the largest timed."""
    own = constraint_batch_sizes(recipe)
    return own[0] if own else max(sizes)


def _choose_attempt(
    recipe: Recipe, records: list[dict[str, Any]], timing: dict[str, Any] | None
) -> tuple[dict[str, Any], str]:
    """The attempt to keep and why: the fastest that holds (only one holds under ``first``); when none holds, the
    one with the fewest failing constraints (the earliest on a tie)."""
    holding = [r for r in records if r["holds"]]
    n = len(records)
    if not holding:

        def failing(r: dict[str, Any]) -> int:
            checks = r["constraints"].get("checks", {})
            return sum(1 for c in checks.values() if not c["holds"]) if checks else 10**6

        kept = min(records, key=lambda r: (failing(r), r["attempt"]))
        return kept, (
            f"no attempt of {n} holds its constraints; kept attempt {kept['attempt']} ({kept['label']}), "
            "the one with the fewest failing constraints"
        )
    if len(holding) == 1:
        kept = holding[0]
        if n == 1:
            return kept, "the recipe as written holds its constraints; no fallback needed"
        return kept, f"the only attempt of {n} that holds its constraints"
    timed = {x["batch_size"] for c in (timing or {}).get("candidates", []) for x in c["results"]}
    bs = _decision_batch(recipe, tuple(sorted(timed)) or (1,))

    def p50(r: dict[str, Any]) -> float:
        row = _timing_row(timing, r, n)
        res = next((x for x in (row or {}).get("results", []) if x["batch_size"] == bs), None)
        return res["latency_ms"]["p50"] if res else float("inf")

    kept = min(holding, key=lambda r: (p50(r), r["attempt"]))
    return kept, (
        f"the fastest of the {len(holding)} attempts that hold (p50 at batch {bs}, timed interleaved): "
        f"{p50(kept):.3g} ms"
    )


def _attempt_figures(r: dict[str, Any], workload: Any, timing: dict[str, Any] | None, n: int) -> None:
    """Flat figures of one attempt for results.json and the report: quality, drop, fidelity, size, latency."""
    from slimship.candidate import load_candidate

    metric = workload.primary_metric
    ev = r["evaluations"].get(r["final"] or "", {})
    ref = r["evaluations"].get("original", {})
    q, base = ev.get("quality", {}).get(metric), ref.get("quality", {}).get(metric)
    r["metric"] = metric
    r["quality"] = q
    r["quality_drop"] = (
        None if q is None or base is None else (base - q if workload.higher_is_better else q - base)
    )
    r["fidelity"] = dict(ev.get("fidelity", {}))
    r["quality_from"] = ev.get("quality_from", "evaluated")
    r["size_bytes"] = load_candidate(r["candidate"]).size_bytes if r["candidate"] else None
    row = _timing_row(timing, r, n) or {}
    results = row.get("results", [])
    r["latency_ms_p50"] = {str(x["batch_size"]): x["latency_ms"]["p50"] for x in results}
    r["speedup"] = {str(x["batch_size"]): x.get("speedup_vs_baseline_p50") for x in results}
    r.pop("own_bench", None)


def _kept_bench(
    timing: dict[str, Any] | None, kept: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The run's ``bench``: the joint timing, with the kept attempt's row under its final step's label."""
    if timing is None or len(records) == 1:
        return timing
    rows = []
    for c in timing["candidates"]:
        if c["label"] == _bench_label(kept):
            c = {**c, "label": kept["final"]}
        rows.append(c)
    return {**timing, "candidates": rows}


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


def verified_equal_to_parent(info: dict[str, Any]) -> float | None:
    """The max |Δ| of a candidate whose recorded verification against its parent (``info["verification"]``: export,
    optimize) passed *and* holds at the default float tolerances (cosine ≥ 0.9999, |Δ| ≤ 1e-4 + 1e-3·max|parent|,
    arg-max agreement 1) — a step that equal needs no evaluation of its own; None otherwise (lossy steps, looser
    thresholds, no record)."""
    from slimship.measure.verify import VerificationReport, VerifyThresholds

    data = info.get("verification")
    if not isinstance(data, dict):
        return None
    report = VerificationReport.from_json(data)
    tol = VerifyThresholds()
    if not report.passed or not report.outputs:
        return None
    for out in report.outputs.values():
        if (
            out.judged_cosine_min < tol.min_cosine
            or out.max_abs_error > tol.atol + tol.rtol * out.max_abs_reference
        ):
            return None
        if out.top1_agreement is not None and out.top1_agreement < tol.min_top1_agreement:
            return None
    return report.max_abs_error


def evaluate_steps(
    steps: list[dict[str, Any]],
    orig_dir: Path,
    workload: Any,
    evaluate_limit: int | None,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Quality and fidelity of the original and of every finished step (cached beside each candidate). A step
    verified equal to its parent within float tolerance (see :func:`verified_equal_to_parent`) reuses its parent's
    figures instead of a full evaluation, and says so in ``quality_from``; the original itself is measured on the
    last of an unbroken chain of such steps when that runs faster (:func:`_equal_stand_in`, ``measured_on``)."""
    import json

    from slimship.candidate import load_candidate
    from slimship.measure.evaluate import cached_original_evaluation, evaluate, evaluate_original_via

    evaluations: dict[str, Any] = {}
    by_id: dict[str, dict[str, Any]] = {}
    for s in [{"label": "original", "candidate": str(orig_dir)}] + [s for s in steps if "candidate" in s]:
        cache = (
            Path(s["candidate"]) / f"evaluation{'' if evaluate_limit is None else f'-{evaluate_limit}'}.json"
        )
        cand = load_candidate(s["candidate"])
        stand_in = None
        if (
            not cache.exists()
            and cand.pass_name is None
            and cached_original_evaluation(cand, workload, evaluate_limit) is None
        ):
            stand_in = _equal_stand_in(cand, steps)
        if cache.exists():
            ev = json.loads(cache.read_text())
        elif stand_in is not None:
            proxy, delta = stand_in
            log(f"evaluating {s['label']} on {proxy.name} (verified equal to it: max |Δ| {delta:.1g})")
            ev = evaluate_original_via(cand, proxy, workload, delta, limit=evaluate_limit, progress=False)
            if ev.get("cached_from"):
                log(f"{s['label']}: evaluation cached from an earlier run ({ev['cached_from']})")
            write_json_atomic(cache, ev)
        else:
            ev = _reused_evaluation(cand, by_id)
            if ev is None:
                log(f"evaluating {s['label']}")
                ev = evaluate(cand, workload, limit=evaluate_limit, progress=False)
                if ev.get("cached_from"):
                    log(f"{s['label']}: evaluation cached from an earlier run ({ev['cached_from']})")
            else:
                log(f"{s['label']}: {ev['quality_from']} — no evaluation of its own")
            write_json_atomic(cache, ev)
        evaluations[s["label"]] = ev
        by_id[cand.id] = ev
    return evaluations


def _equal_stand_in(original: Any, steps: list[dict[str, Any]]) -> tuple[Any, float] | None:
    """The last ONNX candidate of the unbroken chain of steps from ``original`` that are each verified equal to
    their parent (export → optimize), with the chain's summed max |Δ| — evaluating it gives the original's figures
    on ONNX Runtime instead of PyTorch eager. None when the original is already ONNX or the first step isn't
    verified equal."""
    from slimship.candidate import load_candidate

    if original.format != "torch":
        return None
    found: tuple[Any, float] | None = None
    parent_id, total = original.id, 0.0
    for s in steps:
        if s.get("status") not in ("ran", "reused") or "candidate" not in s:
            break
        cand = load_candidate(s["candidate"])
        delta = verified_equal_to_parent(cand.info)
        if cand.parent_id != parent_id or delta is None:
            break
        total += delta
        if cand.format == "onnx":
            found = (cand, total)
        parent_id = cand.id
    return found


def _reused_evaluation(cand: Any, by_id: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The parent's evaluation, carried over to a candidate verified equal to it; None when it must be measured."""
    parent = by_id.get(cand.parent_id or "")
    if parent is None:
        return None
    delta = verified_equal_to_parent(cand.info)
    if delta is None:
        return None
    return {
        **{k: v for k, v in parent.items() if k not in ("cached_from", "cache_key")},
        "candidate": cand.id,
        "candidate_name": cand.name,
        "seconds": 0.0,
        "quality_from": f"parent (verified equal: max |Δ| {delta:.1g})",
        "quality_from_candidate": cand.parent_id,
    }
