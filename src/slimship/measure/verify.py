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


#: thresholds that never fail: for lossy passes that record fidelity instead of enforcing it
RECORD_ONLY = VerifyThresholds(min_cosine=0.0, atol=float("inf"), rtol=0.0, min_top1_agreement=0.0)


@dataclass(frozen=True)
class OutputAgreement:
    """How closely one output of the new artifact matches its parent's, over all verification samples."""

    max_abs_error: float
    max_abs_reference: float
    cosine_min: float
    cosine_mean: float
    #: share of samples whose arg-max agrees (2-D outputs with several columns only)
    top1_agreement: float | None = None

    def to_json(self) -> dict[str, float]:
        out = {
            "max_abs_error": self.max_abs_error,
            "max_abs_reference": self.max_abs_reference,
            "cosine_min": self.cosine_min,
            "cosine_mean": self.cosine_mean,
        }
        if self.top1_agreement is not None:
            out["top1_agreement"] = self.top1_agreement
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutputAgreement:
        top1 = data.get("top1_agreement")
        return cls(
            max_abs_error=float(data.get("max_abs_error", 0.0)),
            max_abs_reference=float(data.get("max_abs_reference", 0.0)),
            cosine_min=float(data.get("cosine_min", 1.0)),
            cosine_mean=float(data.get("cosine_mean", data.get("cosine_min", 1.0))),
            top1_agreement=None if top1 is None else float(top1),
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


def compare_outputs(
    parent: Runtime, child: Runtime, batches: Iterable[Batch], thresholds: VerifyThresholds
) -> VerificationReport:
    """Run both on every batch; return per-output figures and whether every threshold holds."""
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
            s = stats.setdefault(
                name,
                {
                    "max_abs_error": 0.0,
                    "max_abs_ref": 0.0,
                    "cosine_min": 1.0,
                    "cos_sum": 0.0,
                    "n": 0,
                    "agree": 0,
                    "cls": False,
                },
            )
            if o.shape != r.shape:
                s["shape_mismatch"] = f"{list(o.shape)} vs {list(r.shape)}"
                continue
            s["max_abs_error"] = max(s["max_abs_error"], float(np.abs(o.astype(np.float64) - r).max()))
            s["max_abs_ref"] = max(s["max_abs_ref"], float(np.abs(r).max()))
            if r.ndim >= 1 and r.size:
                cos = rowwise_cosine(o.reshape(r.shape[0], -1), r.reshape(r.shape[0], -1))
                # rows that are all zeros in both agree perfectly
                both_zero = (np.abs(o.reshape(r.shape[0], -1)).sum(1) == 0) & (
                    np.abs(r.reshape(r.shape[0], -1)).sum(1) == 0
                )
                cos = np.where(both_zero, 1.0, cos)
                s["cosine_min"] = min(s["cosine_min"], float(cos.min()))
                s["cos_sum"] += float(cos.sum())
                s["n"] += len(cos)
            if r.ndim == 2 and r.shape[1] > 1 and r.dtype.kind == "f" and "sentence" not in name:
                s["cls"] = True
                s["agree"] += int((o.argmax(1) == r.argmax(1)).sum())
    outputs: dict[str, OutputAgreement] = {}
    failures: list[str] = []
    for name, s in stats.items():
        if s.get("missing"):
            failures.append(f"{name}: missing from the new model's outputs")
            continue
        if "shape_mismatch" in s:
            failures.append(f"{name}: shape {s['shape_mismatch']}")
            continue
        entry = OutputAgreement(
            max_abs_error=s["max_abs_error"],
            max_abs_reference=s["max_abs_ref"],
            cosine_min=s["cosine_min"],
            cosine_mean=s["cos_sum"] / max(1, s["n"]),
            top1_agreement=s["agree"] / max(1, s["n"]) if s["cls"] else None,
        )
        outputs[name] = entry
        tol = thresholds.atol + thresholds.rtol * s["max_abs_ref"]
        if entry.max_abs_error > tol:
            failures.append(f"{name}: max abs error {entry.max_abs_error:.3g} > allowed {tol:.3g}")
        if entry.cosine_min < thresholds.min_cosine:
            failures.append(f"{name}: min cosine {entry.cosine_min:.6f} < {thresholds.min_cosine}")
        if entry.top1_agreement is not None and entry.top1_agreement < thresholds.min_top1_agreement:
            failures.append(
                f"{name}: top-1 agreement {entry.top1_agreement:.4f} < {thresholds.min_top1_agreement}"
            )
    return VerificationReport(
        samples=n_samples,
        thresholds=thresholds.model_dump(),
        outputs=outputs,
        passed=not failures,
        failures=failures,
    )
