"""What a search has seen: the typed trial row (:class:`TrialRow`, stored in tune.json), the two objectives and
the constraint distances the sampler learns from, the pooled baseline, the Pareto front, and
:class:`SearchState` — the rows so far and when to stop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from slimship.pipeline.recipe import Recipe, effective_params

TrialStatus = Literal["ok", "screened", "failed"]


@dataclass(frozen=True)
class Screened:
    """Why a candidate was stopped before its full evaluation: the cheap signal, its value and the limit."""

    signal: str
    measured: float
    limit: float


@dataclass
class TrialRow:
    """One trial of a search, as every executor records it and as tune.json stores it (:meth:`to_json`).

    ``status`` says which fields are set: every row has ``trial``, ``params``, ``steps`` and ``seconds``; a row
    whose steps built a candidate has ``candidate`` … ``signature``; ``failed`` adds ``reason``, ``screened``
    adds ``screen``, ``ok`` adds the measurements. A repeated proposal carries the earlier row's results and
    ``reused_from`` (its trial number)."""

    trial: int
    params: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    status: TrialStatus = "failed"
    reason: str | None = None
    seconds: float | None = None
    # the candidate the steps built
    candidate: str | None = None
    size_bytes: int | None = None
    macs: int | None = None
    macs_ratio: float | None = None
    signature: str | None = None
    #: what the candidate runs on and how: its format, the runtime it is timed and deployed on, the arithmetic of
    #: its heavy ops (fp32 / int8 / …), the deployment settings (as applied by the timing, once timed) and the
    #: CPU class they were decided for
    format: str | None = None
    runtime: str | None = None
    precision: str | None = None
    deployment: dict[str, Any] | None = None
    cpu_class: str | None = None
    # screened
    screen: Screened | None = None
    # evaluated and timed (status "ok")
    speedup: float | None = None
    latency_ms_p50: float | None = None
    original_latency_ms_p50: float | None = None
    size_ratio: float | None = None
    quality: float | None = None
    quality_drop: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    feasible: bool = False
    checks: dict[str, Any] = field(default_factory=dict)
    #: the trial's own interleaved ratio once ``speedup`` is judged against the pooled original
    speedup_same_run: float | None = None
    pareto: bool | None = None
    reused_from: int | None = None

    _BUILT = ("candidate", "size_bytes", "macs", "macs_ratio", "signature")
    #: written when known (rows of tune.json files from before they were recorded have none)
    _RUNS_ON = ("format", "runtime", "precision", "deployment", "cpu_class")
    _MEASURED = (
        "speedup",
        "latency_ms_p50",
        "original_latency_ms_p50",
        "size_ratio",
        "quality",
        "quality_drop",
        "fidelity",
        "feasible",
        "checks",
    )

    def to_json(self) -> dict[str, Any]:
        """The row as tune.json holds it: only the fields its status sets (the keys tune.json always had)."""
        out: dict[str, Any] = {"trial": self.trial, "params": self.params, "steps": self.steps}
        if self.candidate is not None:
            out.update({k: getattr(self, k) for k in self._BUILT})
            out.update({k: getattr(self, k) for k in self._RUNS_ON if getattr(self, k) is not None})
        out["status"] = self.status
        if self.status == "failed":
            out["reason"] = self.reason
        elif self.status == "screened":
            out["screen"] = None if self.screen is None else dataclasses.asdict(self.screen)
        else:
            out.update({k: getattr(self, k) for k in self._MEASURED})
        out["seconds"] = self.seconds
        for k in ("speedup_same_run", "pareto", "reused_from"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRow:
        """A row from tune.json (any slimship.tune/1 file); unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        if isinstance(kw.get("screen"), dict):
            kw["screen"] = Screened(**kw["screen"])
        for k in ("fidelity", "checks"):
            if kw.get(k) is None:
                kw.pop(k, None)
        kw["feasible"] = bool(kw.get("feasible", False))
        return cls(**kw)

    def repeat(self, number: int, params: dict[str, Any]) -> TrialRow:
        """The row of proposal ``number`` that builds the same candidate as this trial: its results, no new
        evaluation."""
        return dataclasses.replace(self, trial=number, params=params, reused_from=self.trial)


@dataclass(frozen=True)
class SearchHints:
    """What the search knows so far, for the cheap signals of the next trial: the best feasible objective value,
    and per runtime signature the best speed-up per unit of MAC reduction seen."""

    best_feasible: float | None = None
    speed_per_mac: dict[str, float] = field(default_factory=dict)


def candidate_key(params: dict[str, Any]) -> str:
    """A proposal's identity as a string: proposals with the same effective parameters build the same candidate."""
    return json.dumps(params, sort_keys=True, default=str)


def objectives(row: TrialRow, objective: str) -> tuple[float, float] | None:
    """(speed or size ratio, quality) — both maximised — for an evaluated row."""
    if row.status != "ok":
        return None
    speed = row.speedup if objective == "latency" else row.size_ratio
    return float(speed or 0.0), float(row.quality if row.quality is not None else 0.0)


def constraint_values(row: TrialRow, recipe: Recipe) -> dict[str, float]:
    """One value per constraint, ≤ 0 when it holds (Optuna's convention): how far each is from holding."""
    names = [
        n
        for n in ("max_quality_drop", "min_fidelity", "max_latency_ms", "min_speedup", "max_size_mb")
        if getattr(recipe.constraints, n) is not None
    ] or ["completes"]
    if row.status == "ok":
        checks = row.checks
        return {
            n: 0.0
            if checks.get(n, {"holds": True})["holds"]
            else 1.0 + abs(float(checks[n]["measured"] or 0) - float(checks[n]["limit"]))
            for n in names
        }
    return dict.fromkeys(names, 1e3)  # failed or screened: far outside the feasible region


def pool_baseline(rows: list[TrialRow], recipe: Recipe) -> float | None:
    """Judge every trial's speed against the median of the original's p50 over all trials.

    Each trial times the original interleaved with its candidate, but a PyTorch original's p50 moves ±10% from
    one trial to the next on this machine (OpenMP scheduling), while ONNX Runtime candidates barely move; one
    trial's ratio inherits that noise. The pooled median is the steadier yardstick: ``speedup`` becomes
    pooled / candidate p50 (the trial's own ratio stays as ``speedup_same_run``) and a ``min_speedup`` at the
    search's batch size is judged again with it."""
    fresh = [r for r in rows if r.status == "ok" and r.reused_from is None and r.original_latency_ms_p50]
    if not fresh:
        return None
    pooled = float(statistics.median(float(r.original_latency_ms_p50 or 0) for r in fresh))
    c = recipe.constraints
    assert recipe.search is not None
    for r in rows:
        if r.status != "ok" or not r.latency_ms_p50:
            continue
        if r.speedup_same_run is None:
            r.speedup_same_run = r.speedup
        r.speedup = pooled / float(r.latency_ms_p50)
        chk = r.checks.get("min_speedup")
        if (
            chk is not None
            and c.min_speedup is not None
            and c.min_speedup.batch_size == recipe.search.batch_size
        ):
            chk.update(
                measured=r.speedup,
                holds=r.speedup >= c.min_speedup.value,
                baseline="pooled original p50",
            )
            r.feasible = all(v["holds"] for v in r.checks.values())
    return pooled


def pareto_front(rows: Iterable[TrialRow], objective: str) -> set[int]:
    """Trial numbers not dominated in (speed-or-size, quality) among the evaluated rows."""
    pts: dict[int, tuple[float, float]] = {}
    for r in rows:
        values = objectives(r, objective)
        if values is not None:
            pts[r.trial] = values
    front = set()
    for t, (s, q) in pts.items():
        if not any((s2 >= s and q2 >= q) and (s2 > s or q2 > q) for t2, (s2, q2) in pts.items() if t2 != t):
            front.add(t)
    return front


def space_size(recipe: Recipe) -> int | None:
    """How many distinct candidates the space can build, when it is all choices or stepped ranges (else None).
    Proposals that differ only in a skipped step's fields, or in a field the chosen pass lacks, count once."""
    assert recipe.search is not None
    values: list[list[Any]] = []
    for p in recipe.search.params.values():
        if p.choices is not None:
            values.append(list(p.choices))
        elif p.step is not None:
            n = math.floor((float(p.high or 0) - float(p.low or 0)) / p.step + 1e-9) + 1
            values.append([float(p.low or 0) + k * p.step for k in range(n)])
        else:
            return None
    total = math.prod(len(v) for v in values)
    if total > 20000:
        return total
    keys = list(recipe.search.params)
    return len(
        {
            candidate_key(effective_params(recipe, dict(zip(keys, combo, strict=True))))
            for combo in itertools.product(*values)
        }
    )


@dataclass
class SearchState:
    """What the search has seen so far; executors consult ``stop_reason`` after every trial."""

    recipe: Recipe
    rows: list[TrialRow] = field(default_factory=list)
    best_value: float | None = None
    since_best: int = 0

    def record(self, row: TrialRow) -> None:
        self.rows.append(row)
        if row.reused_from is not None:
            return
        values = objectives(row, self.objective)
        if values is not None and row.feasible and (self.best_value is None or values[0] > self.best_value):
            self.best_value, self.since_best = values[0], 0
            return
        if self.best_value is not None:
            self.since_best += 1

    def hints(self) -> SearchHints:
        """For cheap signals in the next trial (see :class:`SearchHints`)."""
        per_mac: dict[str, float] = {}
        for r in self.rows:
            if r.status == "ok" and r.reused_from is None and r.macs_ratio and r.signature is not None:
                v = float(r.speedup or 0.0) / float(r.macs_ratio)
                per_mac[r.signature] = max(per_mac.get(r.signature, 0.0), v)
        return SearchHints(best_feasible=self.best_value, speed_per_mac=per_mac)

    @property
    def objective(self) -> str:
        assert self.recipe.search is not None
        return self.recipe.search.objective

    @property
    def evaluations(self) -> int:
        return sum(1 for r in self.rows if r.reused_from is None)

    def stop_reason(self, limit: int, deadline: float | None) -> str | None:
        search = self.recipe.search
        assert search is not None
        if self.evaluations >= limit:
            return f"trial budget reached ({limit} candidates)"
        if deadline is not None and time.monotonic() >= deadline:
            return f"time budget reached ({search.timeout_seconds:g} s)"
        size = space_size(self.recipe)
        if (
            size is not None
            and len({candidate_key(effective_params(self.recipe, r.params)) for r in self.rows}) >= size
        ):
            return f"every one of the {size} combinations in the space was tried"
        if search.patience is not None and self.best_value is not None and self.since_best >= search.patience:
            return (
                f"early stop: a feasible candidate exists and {self.since_best} candidates in a row did not beat it "
                f"(patience {search.patience})"
            )
        return None
