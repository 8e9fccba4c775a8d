"""SmoothQuant-style smoothing: migrate per-channel activation outliers into the weights of the MatMuls
that consume them (X·W = (X/s)·(s·W)), so per-tensor activation scales fit. Exact in float."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship.errors import ConfigError

if TYPE_CHECKING:
    from slimship.workload import Workload

#: ops whose output carries the post-activation outliers that hurt the next MatMul (FFN output projection)
GELU_OPS = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu"}


def _gelu_fed_matmuls(model: Any) -> list[Any]:
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    return [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[0] in producer
        and producer[n.input[0]].op_type in GELU_OPS
        and n.input[1] in inits
    ]


def _activation_absmax(
    path: Path, names: list[str], batches: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of intermediate values, by running the graph with them as outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for batch in batches:
        values = sess.run(names, batch)
        for name, v in zip(names, values, strict=True):
            m = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    return maxima


def smooth_matmuls(
    staged: Path, workload: Workload, alpha: float, samples: int, scope: str = "ffn_out"
) -> list[dict[str, Any]]:
    """Rewrite ``staged`` in place (SmoothQuant): for each group of MatMuls sharing an input X (``scope``
    "ffn_out": those fed by a GELU; "all": every MatMul with constant weights), insert one ``X * (1/s)``
    and scale the rows of every weight in the group by ``s``, with s_j = max|X_j|^α / max_group|W_j|^(1-α).
    Exact in float; returns per-group statistics."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(staged))
    if scope == "ffn_out":
        targets = _gelu_fed_matmuls(model)
    else:
        init_names = {t.name for t in model.graph.initializer}
        targets = [
            n
            for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in init_names and n.input[0] not in init_names
        ]
    if not targets:
        raise ConfigError(
            f"smooth={scope!r} found no MatMul to smooth in this graph (it targets transformer MatMuls with constant weights)"
        )
    batches = list(workload.calibration_batches(samples, 16))
    maxima = _activation_absmax(staged, sorted({n.input[0] for n in targets}), batches)
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    stats = []
    inserts: dict[str, Any] = {}
    groups: dict[str, list[Any]] = {}
    for node in targets:
        groups.setdefault(node.input[0], []).append(node)
    for k, (x_name, members) in enumerate(sorted(groups.items())):
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in members]
        if any(w.ndim != 2 or w.shape[0] != maxima[x_name].shape[0] for w in weights):
            continue  # not a plain X[..., K] @ W[K, N]
        x_max = np.maximum(maxima[x_name].astype(np.float64), 1e-5)
        w_max = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64), 1e-5)
        scale = np.clip(x_max**alpha / w_max ** (1.0 - alpha), 1e-4, 1e4)
        for j, (node, w) in enumerate(zip(members, weights, strict=True)):
            new_w = numpy_helper.from_array((w * scale[:, None]).astype(np.float32), node.input[1])
            if uses.get(node.input[1], 0) == 1:
                inits[node.input[1]].CopyFrom(new_w)
            else:
                new_w.name = f"{node.input[1]}_smoothed{k}_{j}"
                model.graph.initializer.append(new_w)
                node.input[1] = new_w.name
        inv_name = f"{x_name}_smooth_inv_scale{k}"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inv_name))
        smoothed = f"{x_name}_smoothed{k}"
        first = members[0]
        inserts[first.name] = onnx.helper.make_node(
            "Mul", [x_name, inv_name], [smoothed], name=f"{first.name}_smooth"
        )
        for node in members:
            node.input[0] = smoothed
        stats.append(
            {
                "nodes": [n.name for n in members],
                "activation_absmax_max_over_median": float(x_max.max() / np.median(x_max)),
                "smoothed_absmax_max_over_median": float((x_max / scale).max() / np.median(x_max / scale)),
            }
        )
    # each Mul goes right before its MatMul, so the graph stays topologically sorted
    rebuilt: list[Any] = []
    for n in model.graph.node:
        if n.name in inserts:
            rebuilt.append(inserts[n.name])
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        rebuilt.append(copy)
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    onnx.save_model(model, str(staged))
    return stats
