"""Background compares: a request answered by one version is run on another, and the two answers are judged.

Shadow traffic and rollouts both compare this way. Agreement is judged by the served version's *workload*
fidelity function where the workload is known (its lineage in ``source["workload"]``, or the drift config's
``workload``) — the same function, and its first metric, that the recipe's ``min_fidelity`` reads offline — so
production and offline fidelity mean the same thing. Without a workload (a bare ONNX file) a heuristic judges: mean
row cosine over float outputs, top-1 agreement for an output named like logits. Every record says which judged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from slimship.serve.protocol import Overloaded

if TYPE_CHECKING:
    from slimship.serve.endpoint import ServedEndpoint
    from slimship.workload.base import Workload

log = logging.getLogger("slimship.serve")

Outputs = Mapping[str, np.ndarray]

HEURISTIC = "heuristic: row cosine (top-1 agreement for logits)"


def heuristic_agreement(reference: Outputs, outputs: Outputs) -> float:
    """Fidelity of ``outputs`` to ``reference`` without a workload: mean row cosine over float outputs; for a
    single-column-per-class output (logits) the top-1 agreement is what users see, so classifiers use that."""
    scores = []
    for name, x in reference.items():
        y = outputs.get(name)
        if y is None or y.shape != x.shape or x.dtype.kind != "f":
            continue
        x2, y2 = x.reshape(x.shape[0], -1).astype(np.float64), y.reshape(y.shape[0], -1).astype(np.float64)
        if 1 < x2.shape[1] <= 1000 and name.lower() in ("logits", "output", "scores", "probabilities"):
            scores.append(float((x2.argmax(1) == y2.argmax(1)).mean()))
            continue
        num = (x2 * y2).sum(1)
        den = np.linalg.norm(x2, axis=1) * np.linalg.norm(y2, axis=1)
        scores.append(float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0))))
    return float(np.mean(scores)) if scores else 0.0


@dataclass(frozen=True)
class Agreement:
    """One compared request: how far the other version's answer agrees with the reference's, and who judged."""

    value: float
    #: "workload <name>: <metric>" or the heuristic's name
    judge: str


class FidelityJudge:
    """Judges a pair of answers with a workload's fidelity function (its first metric), or the heuristic."""

    def __init__(self, workload: Workload | None = None, note: str = "") -> None:
        self.workload = workload
        self.note = note  # why there is no workload (for the log)

    def __call__(self, reference: Outputs, outputs: Outputs) -> Agreement:
        if self.workload is not None:
            try:
                scores = self.workload.fidelity(outputs, reference)
                metric, value = next(iter(scores.items()))
                if math.isfinite(value):
                    return Agreement(float(value), f"workload {self.workload.name}: {metric}")
            except (
                Exception
            ) as err:  # answers the workload can't read (other output names): the heuristic judges
                log.debug("workload %s can't judge a compare: %s", self.workload.name, err)
        return Agreement(heuristic_agreement(reference, outputs), HEURISTIC)


def workload_ref(ep: ServedEndpoint) -> Any:
    """The workload a served version belongs to: the drift config's, else its lineage's (None if unknown)."""
    cfg = ep.drift_config
    return (cfg.workload if cfg is not None else None) or ep.source.get("workload")


class Judges:
    """One judge per workload, resolved off the event loop once and shared by every compare."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[FidelityJudge]] = {}

    def prepare(self, ep: ServedEndpoint) -> None:
        """Start resolving ``ep``'s workload now, so the first compare doesn't wait for it."""
        ref = workload_ref(ep)
        if ref:
            self._task(ref)

    def _task(self, ref: Any) -> asyncio.Task[FidelityJudge]:
        key = json.dumps(ref, sort_keys=True, default=str)
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.get_running_loop().create_task(self._resolve(ref))
        return task

    async def _resolve(self, ref: Any) -> FidelityJudge:
        from slimship.workload import resolve_workload

        try:
            wl = await asyncio.get_running_loop().run_in_executor(None, resolve_workload, ref)
        except Exception as err:  # a compare is a measurement: it goes on with the heuristic
            log.warning(
                "workload %s can't be resolved to judge compares (%s); the heuristic judges", ref, err
            )
            return FidelityJudge(note=f"workload unavailable: {err}")
        return FidelityJudge(wl)

    async def judge(
        self, reference_ep: ServedEndpoint, other_ep: ServedEndpoint, reference: Outputs, outputs: Outputs
    ) -> Agreement:
        """Agreement of ``outputs`` with ``reference``, judged by the reference version's workload (else the
        other version's, else the heuristic)."""
        ref = workload_ref(reference_ep) or workload_ref(other_ep)
        judge = await self._task(ref) if ref else FidelityJudge(note="no workload known")
        return judge(reference, outputs)


@dataclass(frozen=True)
class Asked:
    """The background run of a request on the other version."""

    outcome: Literal["answered", "shed", "failed"]
    outputs: dict[str, np.ndarray] | None = None
    latency_ms: float | None = None
    error: str | None = None


async def ask(other: ServedEndpoint, inputs: dict[str, np.ndarray]) -> Asked:
    """Run ``inputs`` on ``other``; never raises (a compare never reaches a client). ``shed``: the other version
    is full (doubled load is not its fault)."""
    t0 = time.perf_counter()
    try:
        got = await other.infer(inputs)
    except Overloaded as err:
        return Asked("shed", error=str(err))
    except Exception as err:
        return Asked("failed", error=f"{type(err).__name__}: {err}")
    return Asked("answered", got, (time.perf_counter() - t0) * 1000)


@dataclass
class ShadowStats:
    """Agreement of one shadow version with the primary over the requests mirrored to it."""

    pairs: int = 0
    errors: int = 0
    fidelity_sum: float = 0.0
    fidelity_min: float = 1.0
    recent: list[float] = field(default_factory=list)
    #: judge → pairs it judged
    judged_by: dict[str, int] = field(default_factory=dict)

    def add(self, a: Agreement) -> None:
        self.pairs += 1
        self.fidelity_sum += a.value
        self.fidelity_min = min(self.fidelity_min, a.value)
        self.recent.append(a.value)
        del self.recent[:-1000]
        self.judged_by[a.judge] = self.judged_by.get(a.judge, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "errors": self.errors,
            "fidelity_mean": self.fidelity_sum / self.pairs if self.pairs else None,
            "fidelity_min": self.fidelity_min if self.pairs else None,
            "judged_by": dict(self.judged_by),
        }
