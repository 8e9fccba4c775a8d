"""Probes: a few dozen real inputs and the original model's outputs for them, carried by a candidate, so any host
can re-verify the candidate before serving it (``slimship verify``, the server at every load).

A probe is ``probe.npz`` in the candidate's directory plus ``info["probe"]`` in candidate.json: the file's sha256,
the fidelity the candidate had to the original on the probe where it was recorded (per output: row cosine mean /
min, top-1 agreement for classifier outputs) and the CPU class and runtime settings it was measured with.
:func:`check_probe` runs the candidate on this host with its deployment settings and compares: falling short of the
recorded fidelity by more than the margins fails, naming both CPU classes.

Probe inputs and reference outputs are inherited from the parent's probe when it has one, so a chain of passes
pays for the original model's run once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship.errors import CandidateError
from slimship.workload.base import Batch, rowwise_cosine

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload

__all__ = [
    "PROBE_FILE",
    "OutputFidelity",
    "ProbeCheck",
    "ProbeMargins",
    "ProbeRecord",
    "add_probe",
    "check_probe",
    "load_probe_batches",
    "probe_fidelity",
]

PROBE_FILE = "probe.npz"
DEFAULT_SAMPLES = 32

Predict = Callable[[Batch], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class ProbeMargins:
    """How far below its recorded fidelity a candidate may fall on another host before it is refused."""

    cosine_mean: float = 0.002
    cosine_min: float = 0.005
    top1_agreement: float = 0.07  # two of 32 samples


@dataclass(frozen=True)
class OutputFidelity:
    """Agreement of one output with the original's on the probe."""

    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None = None  # for classifier outputs (2-D float, several columns)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> OutputFidelity:
        return cls(
            float(d["cosine_mean"]),
            float(d["cosine_min"]),
            None if d.get("top1_agreement") is None else float(d["top1_agreement"]),
        )


@dataclass(frozen=True)
class ProbeRecord:
    """``info["probe"]`` in candidate.json."""

    file: str
    sha256: str
    samples: int
    batches: int
    outputs: dict[str, OutputFidelity]
    cpu_class: str
    session_config: dict[str, str] = field(default_factory=dict)
    reference: str = "the original model (root of the lineage)"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = {k: asdict(v) for k, v in self.outputs.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ProbeRecord:
        try:
            return cls(
                file=str(d["file"]),
                sha256=str(d["sha256"]),
                samples=int(d["samples"]),
                batches=int(d["batches"]),
                outputs={k: OutputFidelity.from_json(v) for k, v in d["outputs"].items()},
                cpu_class=str(d.get("cpu_class", "")),
                session_config={str(k): str(v) for k, v in d.get("session_config", {}).items()},
                reference=str(d.get("reference", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CandidateError(
                f"candidate.json's probe record is malformed ({err!r}): re-create it with `slimship verify DIR --add-probe -w WORKLOAD`"
            ) from err


@dataclass(frozen=True)
class ProbeCheck:
    """The outcome of running a candidate's probe on this host."""

    passed: bool
    host_cpu_class: str
    recorded_cpu_class: str
    host: dict[str, OutputFidelity]
    recorded: dict[str, OutputFidelity]
    failures: list[str]
    session_config: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "host_cpu_class": self.host_cpu_class,
            "recorded_cpu_class": self.recorded_cpu_class,
            "host": {k: asdict(v) for k, v in self.host.items()},
            "recorded": {k: asdict(v) for k, v in self.recorded.items()},
            "failures": list(self.failures),
            "session_config": dict(self.session_config),
        }

    def summary(self) -> str:
        figs = "; ".join(
            f"{k}: cosine mean {v.cosine_mean:.4f} (recorded {self.recorded[k].cosine_mean:.4f}), min {v.cosine_min:.4f} "
            f"(recorded {self.recorded[k].cosine_min:.4f})"
            + (
                f", top-1 {v.top1_agreement:.3f} (recorded {self.recorded[k].top1_agreement:.3f})"
                if v.top1_agreement is not None and self.recorded[k].top1_agreement is not None
                else ""
            )
            for k, v in self.host.items()
            if k in self.recorded
        )
        verdict = "holds" if self.passed else "FAILS: " + "; ".join(self.failures)
        return f"probe on {self.host_cpu_class} (recorded on {self.recorded_cpu_class}): {verdict}. {figs}"


def _is_classifier(name: str, arr: np.ndarray) -> bool:
    return arr.ndim == 2 and arr.shape[1] > 1 and arr.dtype.kind == "f" and "embedding" not in name


def probe_fidelity(
    outputs: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, OutputFidelity]:
    """Per output: row cosine mean/min over all probe rows (rows zero in both count as equal), top-1 agreement for
    classifier-shaped outputs."""
    out: dict[str, OutputFidelity] = {}
    for name in reference[0]:
        cos_all, agree, rows, cls = [], 0, 0, False
        for o, r in zip(outputs, reference, strict=True):
            if name not in o:
                raise CandidateError(
                    f"the model has no output {name!r}, which the probe's reference has; is this the probe's model?"
                )
            a, b = np.asarray(o[name]), np.asarray(r[name])
            if a.shape != b.shape:
                raise CandidateError(
                    f"output {name!r} has shape {list(a.shape)} but the probe's reference has {list(b.shape)}"
                )
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            cos = rowwise_cosine(a2, b2)
            both_zero = (np.abs(a2).sum(1) == 0) & (np.abs(b2).sum(1) == 0)
            cos_all.append(np.where(both_zero, 1.0, cos))
            if _is_classifier(name, b):
                cls = True
                agree += int((a.argmax(1) == b.argmax(1)).sum())
            rows += b.shape[0]
        c = np.concatenate(cos_all)
        out[name] = OutputFidelity(
            round(float(c.mean()), 6), round(float(c.min()), 6), round(agree / rows, 4) if cls else None
        )
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_npz(path: Path, batches: Sequence[Batch], reference: Sequence[Mapping[str, np.ndarray]]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, (b, r) in enumerate(zip(batches, reference, strict=True)):
        arrays.update({f"in{i}/{k}": v for k, v in b.items()})
        arrays.update({f"ref{i}/{k}": np.asarray(v) for k, v in r.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    tmp.replace(path)


def load_probe_batches(path: Path) -> tuple[list[Batch], list[dict[str, np.ndarray]]]:
    """(input batches, reference outputs) of a probe file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
            n = 1 + max(int(k.split("/", 1)[0][2:]) for k in files if k.startswith("in"))
            batches: list[Batch] = [{} for _ in range(n)]
            refs: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
            for k in files:
                head, name = k.split("/", 1)
                (batches if head.startswith("in") else refs)[
                    int(head[2:] if head.startswith("in") else head[3:])
                ][name] = z[k]
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise CandidateError(
            f"{path} is not a readable probe file ({err}); re-create it with `slimship verify DIR --add-probe -w WORKLOAD`"
        ) from err
    return batches, refs


def _runner(candidate: Candidate, workload: Workload) -> tuple[Predict, dict[str, str]]:
    from slimship.runtime import create_runtime

    rt = create_runtime(candidate, workload)
    settings = getattr(rt, "settings", None)
    return rt.predict, dict(settings.session_config) if settings is not None else {}


def add_probe(
    candidate: Candidate, workload: Workload, samples: int = DEFAULT_SAMPLES, parent: Candidate | None = None
) -> Candidate:
    """Write ``probe.npz`` into the candidate's directory and record the fidelity it has on it here."""
    from slimship.candidate import load_candidate
    from slimship.machine import cpu_class

    path = candidate.path / PROBE_FILE
    parent = parent or (
        load_candidate(candidate.parent_path)
        if candidate.parent_path and Path(candidate.parent_path, "candidate.json").exists()
        else None
    )
    inherited = parent is not None and "probe" in parent.info and (parent.path / PROBE_FILE).exists()
    if inherited:
        assert parent is not None
        batches, reference = load_probe_batches(parent.path / PROBE_FILE)
    else:
        batches = [b for _, b in workload.eval_batches(limit=samples, batch_size=8)]
        root = candidate.lineage()[-1]
        run_root, _ = _runner(root, workload)
        reference = [dict(run_root(b)) for b in batches]
    run, session_config = _runner(candidate, workload)
    outputs = [dict(run(b)) for b in batches]
    fid = probe_fidelity(outputs, reference)
    _save_npz(path, batches, reference)
    record = ProbeRecord(
        file=PROBE_FILE,
        sha256=_sha(path),
        samples=sum(next(iter(b.values())).shape[0] for b in batches),
        batches=len(batches),
        outputs=fid,
        cpu_class=cpu_class(),
        session_config=session_config,
    )
    return candidate.with_info(probe=record.to_json()).save()


def check_probe(
    candidate: Candidate,
    run: Predict,
    session_config: Mapping[str, str] | None = None,
    margins: ProbeMargins | None = None,
) -> ProbeCheck:
    """Run the probe with ``run`` (the candidate's runtime on this host) and compare with the recorded fidelity.
    Raises :class:`CandidateError` when the candidate has no probe, the probe file was changed, or the artifact's
    bytes differ from what candidate.json records."""
    from slimship.machine import cpu_class

    margins = margins or ProbeMargins()
    if "probe" not in candidate.info:
        raise CandidateError(
            f"candidate {candidate.id} has no probe (made by an older slimship, or not an ONNX candidate); add one with "
            f"`slimship verify {candidate.path} --add-probe -w WORKLOAD` on the machine whose figures it should carry"
        )
    candidate.verify_artifact()
    record = ProbeRecord.from_json(candidate.info["probe"])
    path = candidate.path / record.file
    if not path.exists():
        raise CandidateError(
            f"candidate {candidate.id}: probe file {path} is missing; re-create it with `slimship verify {candidate.path} --add-probe -w WORKLOAD`"
        )
    if _sha(path) != record.sha256:
        raise CandidateError(
            f"candidate {candidate.id}: probe file {path} was changed after it was recorded (sha256 differs)"
        )
    batches, reference = load_probe_batches(path)
    outputs = []
    for b in batches:
        try:
            outputs.append(dict(run(b)))
        except Exception as err:
            names = {k: list(v.shape) for k, v in b.items()}
            raise CandidateError(
                f"candidate {candidate.id}: the model can't run its probe's inputs {names}: {err}"
            ) from err
    host = probe_fidelity(outputs, reference)
    failures: list[str] = []
    here = cpu_class()
    for name, rec in record.outputs.items():
        got = host.get(name)
        if got is None:
            failures.append(f"{name}: missing from the model's outputs")
            continue
        if got.cosine_mean < rec.cosine_mean - margins.cosine_mean:
            failures.append(
                f"{name}: cosine mean {got.cosine_mean:.4f} < recorded {rec.cosine_mean:.4f} − {margins.cosine_mean}"
            )
        if got.cosine_min < rec.cosine_min - margins.cosine_min:
            failures.append(
                f"{name}: cosine min {got.cosine_min:.4f} < recorded {rec.cosine_min:.4f} − {margins.cosine_min}"
            )
        if (
            rec.top1_agreement is not None
            and got.top1_agreement is not None
            and got.top1_agreement < rec.top1_agreement - margins.top1_agreement
        ):
            failures.append(
                f"{name}: top-1 agreement {got.top1_agreement:.3f} < recorded {rec.top1_agreement:.3f} − {margins.top1_agreement}"
            )
    if failures:
        failures.append(f"on this host ({here}) vs where it was recorded ({record.cpu_class or 'unknown'})")
    return ProbeCheck(
        not failures, here, record.cpu_class, host, record.outputs, failures, dict(session_config or {})
    )
