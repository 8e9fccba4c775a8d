"""Accuracy-aware mixed precision inside ``quantize-static`` (``float_until_top1``).

Calibration and bias correction run once; the graph is then re-quantized with the same activation ranges and
more nodes kept float each step — the worst by the emulated static SQNR of :mod:`slimship.measure.sqnr`
first, or (``float_order="output_first"``) from the graph's output backwards — until the top-1 agreement with the
parent on the held-out calibration samples reaches the floor.
Each re-quantization is one ``quantize_static`` call from cached ranges (seconds), not a new calibration
(minutes on a CNN), which is what makes a search over a MobileNetV2's 52 convolutions affordable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimship.workload import Workload

__all__ = ["FloatSearch", "rank_for_float", "rank_from_output", "search_float_nodes"]


@dataclass
class FloatSearch:
    """The steps of the search (float nodes and held-out scores per step) and the nodes finally kept float."""

    floor: float
    ranking: list[dict[str, Any]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    met: bool = False

    def to_info(self) -> dict[str, Any]:
        return {
            "floor_top1": self.floor,
            "met": self.met,
            "float_nodes": list(self.float_nodes),
            "steps": self.steps,
            "ranking": self.ranking[:24],
        }


def rank_for_float(
    staged: Path, workload: Workload, targets: list[str], per_channel: bool
) -> list[dict[str, Any]]:
    """Quantizable nodes, worst emulated static SQNR first (the order they are returned to float)."""
    from slimship.measure.sqnr import emulated_sqnr_static

    sq = emulated_sqnr_static(staged, workload, targets, per_channel)
    return [
        {"node": name, "op_type": v["op_type"], "sqnr_db": round(float(v["sqnr_db"]), 2)}
        for name, v in sorted(sq.items(), key=lambda kv: kv[1]["sqnr_db"])
    ]


def rank_from_output(
    model: Any, targets: list[str], excluded: list[str], op_types: tuple[str, ...]
) -> list[dict[str, Any]]:
    """``targets`` and the graph's quantized Add nodes, last in graph order first: a float tail grows from the
    output backwards, the residual Adds inside it float too (a float Add's inputs need no requantization)."""
    wanted = set(targets)
    add_ok = "Add" in op_types
    order = [
        n
        for n in model.graph.node
        if n.name not in excluded and (n.name in wanted or (add_ok and n.op_type == "Add" and n.name))
    ]
    return [{"node": n.name, "op_type": n.op_type, "from_output": i} for i, n in enumerate(reversed(order))]


def search_float_nodes(
    ranking: list[dict[str, Any]],
    base_excluded: list[str],
    floor: float,
    step: int,
    max_nodes: int,
    quantize: Callable[[list[str], Path], None],
    score: Callable[[Path], dict[str, float]],
    work: Path,
) -> tuple[FloatSearch, Path]:
    """Quantize with ``base_excluded`` plus the first k ranked nodes float, k = 0, step, 2·step, … ≤ max_nodes,
    until ``score(path)["top1_agreement"] >= floor``; returns the record and the chosen graph (the first that
    meets the floor, else the best scored)."""
    record = FloatSearch(floor=floor, ranking=ranking)
    order = [r["node"] for r in ranking if r["node"] not in base_excluded]
    best: tuple[float, float, int] | None = None
    best_path = work / ".float-00.onnx"
    k = 0
    while True:
        extra = order[:k]
        path = work / f".float-{k:02d}.onnx"
        quantize(sorted({*base_excluded, *extra}), path)
        s = score(path)
        top1 = float(s.get("top1_agreement", 0.0))
        record.steps.append(
            {"float_nodes": len(extra), "added": order[max(0, k - step) : k] if k else [], **s}
        )
        if top1 >= floor:
            record.met, best_path, record.float_nodes = True, path, list(extra)
            break
        key = (top1, float(s.get("cosine_min", 0.0)), -k)
        if best is None or key > best:
            if best is not None:
                best_path.unlink(missing_ok=True)
            best, best_path, record.float_nodes = key, path, list(extra)
        else:
            path.unlink(missing_ok=True)
        if k >= min(max_nodes, len(order)):
            break
        k = min(k + step, max_nodes, len(order))
    for left in work.glob(".float-*.onnx"):
        if left != best_path:
            left.unlink(missing_ok=True)
    return record, best_path
