"""Numerical verification of a new artifact against its parent on real inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slimship.runtime.base import Runtime
from slimship.workload.base import Batch, Workload, rowwise_cosine


class VerifyThresholds(BaseModel):
    """When is a new artifact "the same model"? All must hold on every verification batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_cosine: float = Field(
        default=0.9999, description="per-sample cosine between parent and child outputs, minimum over samples"
    )
    atol: float = Field(default=1e-4, description="|child - parent| ≤ atol + rtol · max|parent|, per output")
    rtol: float = Field(
        default=1e-3,
        description="relative tolerance, as a fraction of max|parent| per output (see atol), e.g. 1e-3",
    )
    min_top1_agreement: float = Field(
        default=1.0,
        description="share of samples whose arg-max agrees, for 2-D outputs with several columns (classifiers)",
    )
    near_zero_atol: float = Field(
        default=1e-4,
        ge=0.0,
        description="a sample whose every element is within this of the parent's meets min_cosine whatever its "
        "cosine: on outputs near zero (a mask of an empty image) per-sample cosine compares rounding noise with "
        "rounding noise; 0 = judge every sample by its cosine",
    )
    min_sqnr_db: float | None = Field(
        default=None,
        description="signal-to-noise ratio of each output over all samples, in dB (well-conditioned where "
        "per-sample cosine is not); unset = the figure min_cosine implies, 10·log10(1 / (2·(1 − min_cosine))), "
        "e.g. 37 dB for 0.9999",
    )

    def sqnr_floor_db(self) -> float:
        """The SQNR every output must reach (−inf when min_cosine is 0 and no floor is set)."""
        if self.min_sqnr_db is not None:
            return self.min_sqnr_db
        if self.min_cosine <= 0.0:
            return float("-inf")
        return float(10.0 * np.log10(1.0 / (2.0 * max(1.0 - self.min_cosine, 1e-12))))


#: thresholds that never fail: for lossy passes that record fidelity instead of enforcing it
RECORD_ONLY = VerifyThresholds(
    min_cosine=0.0, atol=float("inf"), rtol=0.0, min_top1_agreement=0.0, near_zero_atol=0.0
)


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10·log10(signal / noise); +inf for an exact match."""
    if noise_power <= 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(signal_power, 1e-300) / noise_power))


@dataclass(frozen=True)
class OutputAgreement:
    """How closely one output of the new artifact matches its parent's, over all verification samples."""

    max_abs_error: float
    max_abs_reference: float
    cosine_min: float
    cosine_mean: float
    #: share of samples whose arg-max agrees (2-D outputs with several columns only)
    top1_agreement: float | None = None
    #: output SQNR over all samples, dB (None in records written before it was measured)
    sqnr_db: float | None = None
    #: samples whose every element is within ``near_zero_atol`` of the parent: their cosine is not judged (near zero
    #: it compares rounding noise; elsewhere it is ~1 anyway)
    cosine_excused_samples: int = 0
    #: min per-sample cosine over the other samples (None: every sample was near zero or not recorded)
    cosine_min_judged: float | None = None

    @property
    def judged_cosine_min(self) -> float:
        """The per-sample cosine minimum a threshold is checked against: near-zero samples left out."""
        if self.cosine_min_judged is not None:
            return self.cosine_min_judged
        return 1.0 if self.cosine_excused_samples else self.cosine_min

    def to_json(self) -> dict[str, float | bool]:
        out: dict[str, float | bool] = {
            "max_abs_error": self.max_abs_error,
            "max_abs_reference": self.max_abs_reference,
            "cosine_min": self.cosine_min,
            "cosine_mean": self.cosine_mean,
        }
        if self.top1_agreement is not None:
            out["top1_agreement"] = self.top1_agreement
        if self.sqnr_db is not None and np.isfinite(self.sqnr_db):
            out["sqnr_db"] = self.sqnr_db
        elif self.sqnr_db is not None:  # an exact match: +inf is not JSON (PostgreSQL's json type refuses it)
            out["sqnr_exact"] = True
        if self.cosine_excused_samples:
            out["cosine_excused_samples"] = self.cosine_excused_samples
        if self.cosine_min_judged is not None:
            out["cosine_min_judged"] = self.cosine_min_judged
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutputAgreement:
        top1 = data.get("top1_agreement")
        sqnr = float("inf") if data.get("sqnr_exact") else data.get("sqnr_db")
        cosine_min = float(data.get("cosine_min", 1.0))
        judged = data.get("cosine_min_judged")
        return cls(
            max_abs_error=float(data.get("max_abs_error", 0.0)),
            max_abs_reference=float(data.get("max_abs_reference", 0.0)),
            cosine_min=cosine_min,
            cosine_mean=float(data.get("cosine_mean", data.get("cosine_min", 1.0))),
            top1_agreement=None if top1 is None else float(top1),
            sqnr_db=None if sqnr is None else float(sqnr),
            cosine_excused_samples=int(data.get("cosine_excused_samples", 0)),
            cosine_min_judged=float(judged) if judged is not None else None,
        )


@dataclass(frozen=True)
class VerificationReport:
    """The result of :func:`compare_outputs`, stored in candidate.json as ``verification`` (export, optimize),
    ``export_verification`` and ``fidelity_to_parent`` (quantization passes, QAT)."""

    samples: int
    thresholds: dict[str, float]
    outputs: dict[str, OutputAgreement]
    passed: bool
    failures: list[str] = field(default_factory=list)

    @property
    def cosine_min(self) -> float | None:
        """The smallest per-sample cosine over all outputs (None without outputs)."""
        return min((o.cosine_min for o in self.outputs.values()), default=None)

    @property
    def max_abs_error(self) -> float | None:
        """The largest absolute error over all outputs (None without outputs)."""
        return max((o.max_abs_error for o in self.outputs.values()), default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "thresholds": dict(self.thresholds),
            "outputs": {k: v.to_json() for k, v in self.outputs.items()},
            "passed": self.passed,
            "failures": list(self.failures),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> VerificationReport:
        """Read the stored dict shape (an absent or partial record reads as an empty, failed one)."""
        data = data or {}
        outputs = data.get("outputs") or {}
        return cls(
            samples=int(data.get("samples", 0)),
            thresholds=dict(data.get("thresholds") or {}),
            outputs={k: OutputAgreement.from_json(v) for k, v in outputs.items() if isinstance(v, Mapping)},
            passed=bool(data.get("passed")),
            failures=list(data.get("failures") or []),
        )


def verification_batches(workload: Workload, samples: int = 48) -> list[Batch]:
    """Real inputs at several batch sizes (and, for text, lengths) to exercise every dynamic axis."""
    batches = [workload.example_inputs(1), workload.example_inputs(3)]
    if any("sequence" in s.shape for s in workload.inputs):
        batches.append(workload.example_inputs(2, seq_len=17))
    for _, batch in workload.eval_batches(limit=samples, batch_size=16):
        batches.append(batch)
    return batches


def _new_stats() -> dict[str, Any]:
    return {
        "max_abs_error": 0.0,
        "max_abs_ref": 0.0,
        "cosine_min": 1.0,
        "judged_min": None,
        "near_zero": 0,
        "cos_sum": 0.0,
        "n": 0,
        "agree": 0,
        "ties": 0,
        "cls": False,
        "signal": 0.0,
        "noise": 0.0,
    }


def _accumulate(
    s: dict[str, Any], o: np.ndarray, r: np.ndarray, near_zero_atol: float, classify: bool
) -> None:
    """Add one batch of one output to its running figures."""
    diff = o.astype(np.float64) - r
    s["max_abs_error"] = max(s["max_abs_error"], float(np.abs(diff).max(initial=0.0)))
    s["max_abs_ref"] = max(s["max_abs_ref"], float(np.abs(r).max(initial=0.0)))
    s["signal"] += float((r.astype(np.float64) ** 2).sum())
    s["noise"] += float((diff**2).sum())
    if r.ndim >= 1 and r.size:
        rows_o, rows_r = o.reshape(r.shape[0], -1), r.reshape(r.shape[0], -1)
        cos = rowwise_cosine(rows_o, rows_r)
        # rows that are all zeros in both agree perfectly
        both_zero = (np.abs(rows_o).sum(1) == 0) & (np.abs(rows_r).sum(1) == 0)
        cos = np.where(both_zero, 1.0, cos)
        s["cosine_min"] = min(s["cosine_min"], float(cos.min()))
        s["cos_sum"] += float(cos.sum())
        s["n"] += len(cos)
        # near zero: every element within near_zero_atol of the parent — the cosine of noise against noise
        near = np.abs(diff.reshape(r.shape[0], -1)).max(1) <= near_zero_atol
        s["near_zero"] += int((near & ~both_zero).sum())
        if (~near).any():
            judged = float(cos[~near].min())
            s["judged_min"] = judged if s["judged_min"] is None else min(s["judged_min"], judged)
    if classify and r.ndim == 2 and r.shape[1] > 1 and r.dtype.kind == "f":
        s["cls"] = True
        agree = o.argmax(1) == r.argmax(1)
        s["agree"] += int(agree.sum())
        # a flipped arg-max where every score is within near_zero_atol of the parent's is a tie, not a disagreement
        s["ties"] += int((~agree & (np.abs(diff).max(1) <= near_zero_atol)).sum())


def _judge(name: str, s: dict[str, Any], thresholds: VerifyThresholds) -> tuple[OutputAgreement, list[str]]:
    entry = OutputAgreement(
        max_abs_error=s["max_abs_error"],
        max_abs_reference=s["max_abs_ref"],
        cosine_min=s["cosine_min"],
        cosine_mean=s["cos_sum"] / max(1, s["n"]),
        top1_agreement=s["agree"] / max(1, s["n"]) if s["cls"] else None,
        sqnr_db=sqnr_db(s["signal"], s["noise"]),
        cosine_excused_samples=s["near_zero"],
        cosine_min_judged=s["judged_min"],
    )
    failures = []
    tol = thresholds.atol + thresholds.rtol * s["max_abs_ref"]
    if entry.max_abs_error > tol:
        failures.append(f"{name}: max abs error {entry.max_abs_error:.3g} > allowed {tol:.3g}")
    if entry.judged_cosine_min < thresholds.min_cosine:
        excused = (
            f" (leaving out {entry.cosine_excused_samples} near-zero sample(s) within {thresholds.near_zero_atol:g} of the parent)"
            if entry.cosine_excused_samples
            else ""
        )
        failures.append(
            f"{name}: min cosine {entry.judged_cosine_min:.6f} < {thresholds.min_cosine}{excused}"
        )
    floor = thresholds.sqnr_floor_db()
    if entry.sqnr_db is not None and entry.sqnr_db < floor:
        failures.append(f"{name}: SQNR {entry.sqnr_db:.1f} dB < {floor:.1f} dB")
    judged_top1 = (s["agree"] + s["ties"]) / max(1, s["n"])
    if entry.top1_agreement is not None and judged_top1 < thresholds.min_top1_agreement:
        ties = (
            f" (counting {s['ties']} tie(s) within {thresholds.near_zero_atol:g} as agreeing)"
            if s["ties"]
            else ""
        )
        failures.append(f"{name}: top-1 agreement {judged_top1:.4f} < {thresholds.min_top1_agreement}{ties}")
    return entry, failures


def compare_outputs(
    parent: Runtime, child: Runtime, batches: Iterable[Batch], thresholds: VerifyThresholds
) -> VerificationReport:
    """Run both on every batch; return per-output figures and whether every threshold holds.

    Every output must hold |Δ| ≤ atol + rtol·max|parent|, an SQNR floor over all samples, and the per-sample cosine
    floor on every sample that isn't near zero (within ``near_zero_atol`` everywhere: there, cosine compares rounding
    noise and says nothing)."""
    stats: dict[str, dict[str, Any]] = {}
    n_samples = 0
    for batch in batches:
        ref = parent.predict(batch)
        out = child.predict(batch)
        n_samples += next(iter(batch.values())).shape[0]
        for name, r in ref.items():
            if name not in out:
                stats.setdefault(name, {})["missing"] = True
                continue
            o = out[name]
            s = stats.setdefault(name, _new_stats())
            if o.shape != r.shape:
                s["shape_mismatch"] = f"{list(o.shape)} vs {list(r.shape)}"
                continue
            # sentence embeddings are 2-D with several columns but no class scores
            _accumulate(s, o, r, thresholds.near_zero_atol, classify="sentence" not in name)
    outputs: dict[str, OutputAgreement] = {}
    failures: list[str] = []
    for name, s in stats.items():
        if s.get("missing"):
            failures.append(f"{name}: missing from the new model's outputs")
            continue
        if "shape_mismatch" in s:
            failures.append(f"{name}: shape {s['shape_mismatch']}")
            continue
        outputs[name], failed = _judge(name, s, thresholds)
        failures.extend(failed)
    return VerificationReport(
        samples=n_samples,
        thresholds=thresholds.model_dump(),
        outputs=outputs,
        passed=not failures,
        failures=failures,
    )
