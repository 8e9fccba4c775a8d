"""Accuracy-aware quantization: quantize, then revert the most harmful nodes to float, in ranked order,
until a fidelity floor and/or a quality budget holds — re-measuring at every step and keeping every
step's candidate. If no step meets the budget, the result says so and still names the best one found.

Ranking comes from the emulated per-node SQNR (see :mod:`slimship.measure.diagnose`), worst first.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slimship._util import write_json_atomic
from slimship.errors import ConfigError

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload

FidelityMetric = Literal["cosine_min", "cosine_mean", "top1_agreement"]


def _fidelity(cand: Candidate, metric: str) -> float:
    outs = cand.info["fidelity_to_parent"]["outputs"]
    first = next(iter(outs.values()))
    if metric not in first:
        raise ConfigError(
            f"fidelity metric {metric!r} isn't measured for this model; available: {sorted(first)}"
        )
    return float(first[metric])


def quantize_accuracy_aware(
    candidate: Candidate,
    workload: Workload,
    out_dir: str | Path,
    base_config: dict[str, Any] | None = None,
    min_fidelity: float | None = None,
    fidelity_metric: FidelityMetric = "cosine_min",
    max_quality_drop: float | None = None,
    quality_limit: int | None = None,
    max_steps: int = 12,
    nodes_per_step: int = 1,
    fidelity_source: Literal["verification", "evaluation"] = "verification",
    log: Any = None,
    mode: Literal["dynamic", "static"] = "dynamic",
) -> dict[str, Any]:
    """Returns a JSON-ready record of every step, the chosen step and whether the budget was met.

    ``fidelity_source="verification"`` reads fidelity to the parent from the pass's verification batches
    (cheap); ``"evaluation"`` measures fidelity to the original on the workload's evaluation data (first
    ``quality_limit`` samples), which sees far more inputs and so a more honest minimum.

    ``mode="static"`` quantizes with static INT8 QDQ (CNNs: Conv, MatMul, Gemm) and ranks nodes by their emulated
    static SQNR; "auto" calibration is pinned to minmax so every step uses the same activation ranges."""
    from slimship.measure.diagnose import emulated_sqnr, emulated_sqnr_static, parse_diagnosis_config
    from slimship.measure.evaluate import evaluate
    from slimship.passes import run_pass
    from slimship.passes.quantize import quantizable_nodes

    if min_fidelity is None and max_quality_drop is None:
        raise ConfigError(
            "accuracy-aware quantization needs a budget: min_fidelity (e.g. 0.99) and/or max_quality_drop (e.g. 1.0 points)"
        )
    if max_quality_drop is not None and not workload.primary_metric:
        raise ConfigError(
            f"max_quality_drop needs a quality metric, and workload {workload.name} has none; use min_fidelity"
        )
    if max_steps < 0 or nodes_per_step < 1:
        raise ConfigError(
            f"max_steps must be ≥ 0 and nodes_per_step ≥ 1, got {max_steps} and {nodes_per_step}"
        )
    import onnx

    pass_name, base = parse_diagnosis_config(mode, base_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    model = onnx.load(str(candidate.artifact_path))
    default_ops = (
        ("MatMul", "Gemm", "Attention", "Gather") if mode == "dynamic" else ("Conv", "MatMul", "Gemm")
    )
    targets = [
        n for n in quantizable_nodes(model, base.op_types or default_ops) if n not in base.exclude_nodes
    ]
    emulate = emulated_sqnr if mode == "dynamic" else emulated_sqnr_static
    ranking = [
        n
        for n, _ in sorted(
            emulate(candidate.artifact_path, workload, targets, base.per_channel).items(),
            key=lambda kv: kv[1]["sqnr_db"],
        )
    ]
    parent_quality = None
    if max_quality_drop is not None:
        parent_quality = evaluate(candidate, workload, limit=quality_limit, progress=False)["quality"][
            workload.primary_metric
        ]

    steps: list[dict[str, Any]] = []
    reverted: list[str] = []
    t0 = time.perf_counter()
    for step in range(max_steps + 1):
        cfg = {**base.to_json_dict(), "exclude_nodes": sorted({*base.exclude_nodes, *reverted})}
        cand = run_pass(pass_name, candidate, workload, cfg, out / f"step-{step:02d}")
        record: dict[str, Any] = {
            "step": step,
            "reverted_nodes": list(reverted),
            "candidate": str(cand.path),
            "candidate_id": cand.id,
            "size_bytes": cand.size_bytes,
            "fidelity": _fidelity(cand, fidelity_metric),
        }
        evaluation = None
        if fidelity_source == "evaluation" or max_quality_drop is not None:
            evaluation = evaluate(cand, workload, limit=quality_limit, progress=False)
        if fidelity_source == "evaluation":
            assert evaluation is not None
            if fidelity_metric not in evaluation["fidelity"]:
                raise ConfigError(
                    f"fidelity metric {fidelity_metric!r} isn't measured for {workload.name}; available: {sorted(evaluation['fidelity'])}"
                )
            record["fidelity"] = float(evaluation["fidelity"][fidelity_metric])
            record["fidelity_all"] = evaluation["fidelity"]
        ok = True
        if min_fidelity is not None:
            ok &= record["fidelity"] >= min_fidelity
        if max_quality_drop is not None:
            assert evaluation is not None
            q = evaluation["quality"][workload.primary_metric]
            record["quality"] = q
            record["quality_drop"] = (
                (parent_quality or 0.0) - q if workload.higher_is_better else q - (parent_quality or 0.0)
            )
            ok &= record["quality_drop"] <= max_quality_drop
        record["meets_budget"] = ok
        steps.append(record)
        say(
            f"step {step}: {len(reverted)} node(s) in float, {fidelity_metric} {record['fidelity']:.5f}"
            + (f", quality drop {record['quality_drop']:+.2f}" if "quality_drop" in record else "")
            + (" — meets the budget" if ok else "")
        )
        if ok:
            break
        remaining = [n for n in ranking if n not in reverted]
        if len(remaining) <= nodes_per_step:
            say("stopping: reverting more would leave nothing quantized")
            break
        reverted.extend(remaining[:nodes_per_step])
    met = [s for s in steps if s["meets_budget"]]
    chosen = met[0] if met else max(steps, key=lambda s: (s["fidelity"], -s.get("quality_drop", 0.0)))
    budget = {
        "min_fidelity": min_fidelity,
        "fidelity_metric": fidelity_metric,
        "fidelity_source": fidelity_source,
        "max_quality_drop": max_quality_drop,
        "quality_limit": quality_limit,
    }
    message = (
        f"met the budget at step {chosen['step']} with {len(chosen['reverted_nodes'])} node(s) kept in float"
        if met
        else f"no configuration met the budget {budget} within {max_steps} step(s); the best found (step {chosen['step']}, "
        f"{fidelity_metric} {chosen['fidelity']:.5f}) is saved at {chosen['candidate']}"
    )
    result = {
        "schema": "slimship.accuracy-aware/1",
        "parent": candidate.id,
        "mode": mode,
        "base_config": base.to_json_dict(),
        "budget": budget,
        "parent_quality": parent_quality,
        "ranking": ranking,
        "steps": steps,
        "met_budget": bool(met),
        "chosen": chosen,
        "reverted_nodes": chosen["reverted_nodes"],
        "message": message,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / "accuracy_aware.json", result)
    return result
