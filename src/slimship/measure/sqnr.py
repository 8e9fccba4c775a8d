"""Emulated per-node SQNR of static INT8 (shared by the quantization diagnosis and the static pass's
accuracy-aware mixed precision): each Conv / Gemm / MatMul is run alone on ONNX Runtime on the inputs it saw in
the float graph, once float and once with its input and weight fake-quantized the static way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from slimship.workload import Workload

__all__ = ["emulated_sqnr_static", "fake_quant_act_u8", "sqnr_db"]


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    noise = float(((ref.astype(np.float64) - approx) ** 2).sum())
    signal = float((ref.astype(np.float64) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)


def fake_quant_act_u8(x: np.ndarray) -> np.ndarray:
    """ORT DynamicQuantizeLinear: uint8, asymmetric, per tensor, range always includes 0."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def _fake_quant_per_channel_s8(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 weights with one scale per slice along ``axis`` (None: one scale for the tensor)."""
    if axis is None:
        amax = np.abs(w).max(keepdims=True)
    else:
        amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True)
    scale = np.where(amax == 0, 1.0, amax / 127.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def _weight_axis(node: Any) -> int:
    """The output-channel axis of a Conv / Gemm / MatMul weight (what per-channel static quantization scales)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return 0
    return 1


def _single_node_session(
    model: Any, node: Any, x: np.ndarray, replace: dict[str, np.ndarray] | None = None
) -> Any:
    """An ONNX Runtime session running just ``node`` on an input like ``x``, its other inputs as initializers
    (those named in ``replace`` with the given values)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    inits.update({k: numpy_helper.from_array(v, k) for k, v in (replace or {}).items()})
    graph = helper.make_graph(
        [node],
        "one-node",
        [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, [None] * x.ndim)],
        [onnx.ValueInfoProto(name=node.output[0])],
        [inits[i] for i in node.input[1:] if i in inits],
    )
    one = helper.make_model(graph, opset_imports=list(model.opset_import))
    one.ir_version = model.ir_version
    return ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])


def _capture(model: Any, workload: Workload, names: list[str], samples: int) -> dict[str, np.ndarray]:
    """The values ``names`` take over ``samples`` calibration inputs (one graph run per batch)."""
    import onnx
    import onnxruntime as ort

    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    captured: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in workload.calibration_batches(samples, 8):
        for name, value in zip(names, sess.run(names, batch), strict=True):
            captured[name].append(value)
    return {k: np.concatenate(v) for k, v in captured.items()}


def emulated_sqnr_static(
    onnx_path: str | Path,
    workload: Workload,
    node_names: list[str],
    per_channel: bool = True,
    samples: int = 32,
) -> dict[str, dict[str, Any]]:
    """Output SQNR (dB) of each Conv / Gemm / MatMul node when only it is quantized the static way: its input
    activation uint8 over its calibrated (min/max) range, its weight int8 symmetric, per output channel or per
    tensor. Each node is run alone on ONNX Runtime on the inputs it saw in the float graph, with float and with
    fake-quantized input and weight, so any Conv (groups, strides, dilations) is emulated exactly."""
    import onnx

    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.name in set(node_names) and n.input[1] in inits]
    out: dict[str, dict[str, Any]] = {}
    # a few nodes at a time: a CNN's activations over all its nodes would not fit in memory at once
    for start in range(0, len(nodes), _NODES_PER_CAPTURE):
        chunk = nodes[start : start + _NODES_PER_CAPTURE]
        acts = _capture(
            model, workload, sorted({n.input[0] for n in chunk if n.input[0] not in inits}), samples
        )
        for node in chunk:
            if node.input[0] in acts:
                out[node.name] = _static_node_sqnr(model, node, acts[node.input[0]], per_channel)
    return out


#: nodes whose inputs one capture run keeps (MobileNetV2 at 224 px, 32 samples: ≤ ~0.5 GB)
_NODES_PER_CAPTURE = 8


def _static_node_sqnr(model: Any, node: Any, x: np.ndarray, per_channel: bool) -> dict[str, Any]:
    """SQNR of one node's output with its input and weight fake-quantized the static way (see emulated_sqnr_static)."""
    from onnx import numpy_helper

    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1]))
    w = w.astype(np.float32)
    w_q = _fake_quant_per_channel_s8(w, _weight_axis(node) if per_channel else None)
    ref = _single_node_session(model, node, x).run(None, {node.input[0]: x})[0]
    approx = _single_node_session(model, node, x, {node.input[1]: w_q}).run(
        None, {node.input[0]: fake_quant_act_u8(x).astype(np.float32)}
    )[0]
    return {
        "op_type": node.op_type,
        "sqnr_db": sqnr_db(ref, approx),
        "weight_sqnr_db": sqnr_db(w, w_q),
        "activation_absmax_over_p99": float(np.abs(x).max() / max(np.percentile(np.abs(x), 99), 1e-12)),
        "emulated": f"uint8 per-tensor activations × int8 {'per-channel' if per_channel else 'per-tensor'} weights",
    }
