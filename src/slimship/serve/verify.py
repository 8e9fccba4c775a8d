"""Verification at load: before a version is served, its candidate's probe runs on THIS host with the settings the
endpoint applies, and is compared with the fidelity recorded where the candidate was made
(:mod:`slimship.measure.probe`). Every load path goes through it — start-up, admin load, registry load, Ray replica
start — because it runs when an :class:`~slimship.serve.endpoint.Endpoint` is built.

Policy (``batching.verify`` of a served model): ``refuse`` (default) — a candidate whose artifact changed after it
was recorded, or that falls short of its recorded fidelity here, is not loaded (the error names both CPU classes);
``warn`` — a fidelity shortfall is logged and served (a changed artifact is still refused); ``off`` — not checked.
A bare ONNX file, or a candidate made before probes existed, is served with ``status: "unverified"`` and the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from slimship.errors import ServingError, SlimshipError

log = logging.getLogger("slimship.serve")

__all__ = ["check_integrity", "verify_on_load"]


def check_integrity(model: str, version: str, path: Path, policy: str) -> None:
    """Before any session is built: the artifact's bytes must be the ones its candidate.json records."""
    meta = path.parent / "candidate.json"
    if policy == "off" or not meta.exists():
        return
    from slimship.candidate import load_candidate
    from slimship.errors import CandidateError

    try:
        cand = load_candidate(path.parent)
        if cand.artifact_path.resolve() == path.resolve():
            cand.verify_artifact()
    except CandidateError as err:
        raise ServingError(f"refusing {model} v{version}: {err}") from err


def verify_on_load(
    model: str, version: str, path: Path, session: Any, settings: Any, policy: str
) -> dict[str, Any]:
    """Run the probe of the candidate whose artifact is ``path`` with ``session``; a record for admin state, metrics
    and the registry. Raises :class:`ServingError` when the policy refuses."""
    from slimship.machine import cpu_class

    here = cpu_class()
    if policy == "off":
        return {"status": "off", "cpu_class": here}
    meta = path.parent / "candidate.json"
    if not meta.exists():
        return {
            "status": "unverified",
            "cpu_class": here,
            "reason": f"{path} has no candidate.json beside it (a bare ONNX file)",
        }
    from slimship.candidate import load_candidate
    from slimship.errors import CandidateError
    from slimship.measure.probe import check_probe

    try:
        cand = load_candidate(path.parent)
        if cand.artifact_path.resolve() != path.resolve():
            return {
                "status": "unverified",
                "cpu_class": here,
                "reason": f"candidate.json describes {cand.artifact}, not {path.name}",
            }
        if "probe" not in cand.info:  # its bytes were checked before the session was built (check_integrity)
            return {
                "status": "unverified",
                "cpu_class": here,
                "reason": f"candidate {cand.id} has no probe; add one with `slimship verify {cand.path} --add-probe -w WORKLOAD`",
            }
        names = [o.name for o in session.get_outputs()]
        check = check_probe(
            cand, lambda b: dict(zip(names, session.run(names, b), strict=True)), settings.session_config
        )
    except CandidateError as err:
        # a changed artifact or probe file, or inputs that don't fit: never served
        raise ServingError(f"refusing {model} v{version}: {err}") from err
    except SlimshipError as err:
        raise ServingError(f"refusing {model} v{version}: its probe could not run: {err}") from err
    record = {"status": "passed" if check.passed else "failed", **check.to_json(), "candidate": cand.id}
    event = {
        "event": "verified" if check.passed else "verification_failed",
        "model": model,
        "version": version,
        "summary": check.summary(),
    }
    if check.passed:
        log.info(json.dumps(event))
        return record
    if policy == "warn":
        log.warning(json.dumps({**event, "policy": "warn: served anyway"}))
        return record
    raise ServingError(
        f"refusing {model} v{version}: {check.summary()} — the candidate's figures don't hold on this {here} host; "
        "re-make it here, or serve it with batching.verify: warn to accept the shortfall"
    )
