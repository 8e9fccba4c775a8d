"""Cross-layer equalization of ONNX convolutions (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, §4.1).

For two convolutions in a row, ``A → act → C``, with positively homogeneous ops between them (ReLU,
max-pooling: ``relu(x / s) = relu(x) / s`` for ``s > 0``), output channel ``i`` of ``A`` is divided by ``s_i`` and input
channel ``i`` of ``C`` multiplied by it: the float model computes the same function, and with
``s_i = sqrt(r1_i · r2_i) / r2_i`` (``r1``, ``r2`` the channel's weight ranges in ``A`` and ``C``) both
layers' per-channel ranges become ``sqrt(r1_i · r2_i)``, which per-tensor weight scales (and the
activation between them) quantize better. Depthwise convolutions, whose channels range over orders of
magnitude, gain the most. Chains (expansion 1×1 → depthwise → projection 1×1) are equalized pair by pair,
iterated until the scales settle.

ReLU6 (``Clip(0, 6)``) is not positively homogeneous: ``relu6(x / s) ≠ relu6(x) / s``. ``relu6="to_relu"``
replaces the Clips between equalized pairs by ReLU first (the float model changes where pre-activations
exceed 6; measure it), ``relu6="keep"`` equalizes only pairs joined by ReLU or nothing (exact).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

__all__ = ["equalize_convs"]


def _scalar(model: Any, name: str) -> float | None:
    from onnx import numpy_helper

    if not name:
        return None
    for t in model.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t)
            return float(arr) if arr.size == 1 else None
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            from onnx import helper

            for a in n.attribute:
                if a.name == "value":
                    arr = numpy_helper.to_array(helper.get_attribute_value(a))
                    return float(arr) if arr.size == 1 else None
    return None


def _clip_bounds(model: Any, node: Any) -> tuple[float | None, float | None]:
    lo = hi = None
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        if a.name == "max":
            hi = a.f
    if len(node.input) > 1:
        lo = _scalar(model, node.input[1])
    if len(node.input) > 2:
        hi = _scalar(model, node.input[2])
    return lo, hi


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


#: ops that commute with a positive per-channel scale (``f(x / s) = f(x) / s``)
_HOMOGENEOUS = ("Relu", "MaxPool", "Clip")


def _pairs(model: Any, relu6: str) -> list[tuple[Any, list[Any], Any]]:
    """(A, the ops between, C) for every Conv → [Relu | MaxPool | Clip(0, ·)]* → Conv with single consumers."""
    inits = {t.name for t in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}

    def only(value: str) -> Any | None:
        users = consumers.get(value, [])
        return users[0] if len(users) == 1 and value not in outputs else None

    def between_ok(node: Any) -> bool:
        if node.op_type != "Clip":
            return True
        lo, hi = _clip_bounds(model, node)
        return lo == 0.0 and (hi is None or relu6 != "keep")

    found = []
    for a in model.graph.node:
        if a.op_type != "Conv" or len(a.input) < 2 or a.input[1] not in inits:
            continue
        acts: list[Any] = []
        nxt = only(a.output[0])
        while nxt is not None and nxt.op_type in _HOMOGENEOUS and len(acts) < 3:
            if not between_ok(nxt):
                nxt = None
                break
            acts.append(nxt)
            nxt = only(nxt.output[0])
        if nxt is None or nxt.op_type != "Conv" or len(nxt.input) < 2 or nxt.input[1] not in inits:
            continue
        if nxt.input[0] != (acts[-1].output[0] if acts else a.output[0]):
            continue
        found.append((a, acts, nxt))
    return found


def equalize_convs(
    model: Any, relu6: Literal["to_relu", "keep"] = "to_relu", iterations: int = 20
) -> tuple[Any, dict[str, Any]]:
    """Equalize every eligible Conv pair of ``model`` (a copy is returned) and report what changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    pairs = _pairs(model, relu6)
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(t).astype(np.float32).copy() for name, t in inits.items()}
    usable = []
    for a, acts, c in pairs:
        wa, wc = arrays[a.input[1]], arrays[c.input[1]]
        group = _attr(c, "group", 1)
        depthwise = group > 1 and group == wc.shape[0] and wc.shape[1] == 1
        if _attr(a, "group", 1) > 1 and _attr(a, "group", 1) != wa.shape[0]:
            continue
        if group > 1 and not depthwise:
            continue
        if (wc.shape[0] if depthwise else wc.shape[1]) != wa.shape[0]:
            continue
        usable.append((a, acts, c, depthwise))
    relus = 0
    for _, acts, _, _ in usable:
        for act in acts:
            if act.op_type == "Clip" and _clip_bounds(model, act)[1] is not None:
                act.op_type = "Relu"
                del act.input[1:]
                del act.attribute[:]
                relus += 1
    worst = 0.0
    for _ in range(iterations):
        worst = 0.0
        for a, _, c, depthwise in usable:
            s = _equalize_pair(arrays, a, c, depthwise)
            worst = max(worst, float(np.abs(np.log(s)).max()))
        if worst < 1e-3:
            break
    changed = {n for a, _, c, _ in usable for n in (*a.input[1:3], c.input[1]) if n}
    for name in changed:
        inits[name].CopyFrom(numpy_helper.from_array(arrays[name], name))
    return model, {
        "equalized_pairs": len(usable),
        "relu6_replaced_by_relu": relus,
        "last_iteration_max_log_scale": worst,
    }


def _equalize_pair(arrays: dict[str, np.ndarray], a: Any, c: Any, depthwise: bool) -> np.ndarray:
    wa, wc = arrays[a.input[1]], arrays[c.input[1]]
    r1 = np.abs(wa).reshape(wa.shape[0], -1).max(axis=1)
    if depthwise:
        r2 = np.abs(wc).reshape(wc.shape[0], -1).max(axis=1)
    else:
        r2 = np.abs(np.moveaxis(wc, 1, 0)).reshape(wc.shape[1], -1).max(axis=1)
    ok = (r1 > 1e-12) & (r2 > 1e-12)
    s = np.where(ok, np.sqrt(np.where(ok, r1 * r2, 1.0)) / np.where(ok, r2, 1.0), 1.0).astype(np.float32)
    shape_a = (-1,) + (1,) * (wa.ndim - 1)
    wa /= s.reshape(shape_a)
    if len(a.input) > 2 and a.input[2]:
        arrays[a.input[2]] /= s
    if depthwise:
        wc *= s.reshape((-1,) + (1,) * (wc.ndim - 1))
    else:
        wc *= s.reshape((1, -1) + (1,) * (wc.ndim - 2))
    return s


def equalizable(model: Any, relu6: Literal["to_relu", "keep"] = "to_relu") -> Iterable[str]:
    """Names of the first convolution of each pair :func:`equalize_convs` would equalize."""
    return [a.name for a, _, _ in _pairs(model, relu6)]
