"""Background compares judge agreement with the served version's workload fidelity function (its first metric, as
offline) where the workload is known, and with the heuristic otherwise; every record says which judged."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from slimship.serve.compare import HEURISTIC, FidelityJudge, Judges, ShadowStats, heuristic_agreement
from slimship.serve.config import DriftConfig


def _logits(n_classes: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A reference and an answer that agree on the top class but not much in direction."""
    ref = np.zeros((4, n_classes), np.float32)
    ref[:, 0] = 10.0
    out = np.full((4, n_classes), 0.9, np.float32)
    out[:, 0] = 1.0
    return {"logits": ref}, {"logits": out}


def test_the_workload_judges_where_the_heuristic_would_disagree(digits):
    ref, out = _logits(1001)  # more columns than the heuristic reads as classes: it takes the cosine
    assert heuristic_agreement(ref, out) < 0.1
    a = FidelityJudge(digits)(ref, out)
    assert a.value == 1.0 and a.judge == "workload digits: top1_agreement"
    assert a.value == digits.fidelity(out, ref)["top1_agreement"]  # what the offline measurement reads
    # answers the workload can't read (other output names): the heuristic judges, and says so
    other = FidelityJudge(digits)({"y": ref["logits"]}, {"y": out["logits"]})
    assert other.judge == HEURISTIC and other.value == pytest.approx(heuristic_agreement(ref, out))


def _ep(source: dict, workload: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(source=source, drift_config=DriftConfig(workload=workload) if workload else None)


def test_judges_resolve_the_versions_workload_once_and_fall_back_to_the_heuristic():
    ref, out = _logits(1001)

    async def run() -> list:
        judges = Judges()
        lineage = _ep({"registry": "digits", "workload": {"name": "digits"}})
        bare = _ep({"path": "model.onnx"})
        named = _ep({"path": "model.onnx"}, workload="digits")
        unknown = _ep({"path": "model.onnx", "workload": {"name": "no-such-workload"}})
        return [
            await judges.judge(lineage, bare, ref, out),  # the reference version's workload
            await judges.judge(bare, lineage, ref, out),  # else the other version's
            await judges.judge(named, named, ref, out),  # the drift config names it
            await judges.judge(bare, bare, ref, out),  # no workload known
            await judges.judge(unknown, unknown, ref, out),  # a workload that can't be resolved
        ]

    agreements = asyncio.run(run())
    assert [a.judge for a in agreements] == ["workload digits: top1_agreement"] * 3 + [HEURISTIC] * 2
    stats = ShadowStats()
    for a in agreements:
        stats.add(a)
    assert stats.as_dict()["judged_by"] == {"workload digits: top1_agreement": 3, HEURISTIC: 2}
