"""Static INT8 helpers for CNNs (used by ``passes/quantize.py``'s static path).

* :func:`calibrate_ranges` — activation ranges from ONNX Runtime's calibrators, with histograms that
  have enough bins to differ from MinMax: ORT's ``quantize_static`` builds its Entropy calibrator with
  128 histogram bins and 128 quantized bins, which makes Entropy return MinMax's ranges to 16 digits.
  Entropy and Percentile here share one histogram collection of :data:`HISTOGRAM_BINS` bins.
* :func:`correct_biases` — empirical bias correction (Nagel et al., "Data-Free Quantization Through
  Weight Equalization and Bias Correction", ICCV 2019, §4.2 in its empirical form): the per-channel
  mean shift that int8 weights cause at each convolution's output is measured on calibration data
  and subtracted from the bias, layer after layer in graph order (each layer sees its predecessors
  corrected). Depthwise convolutions, whose 9-weight kernels quantize coarsely, gain the most.
* :func:`float_graph_outputs` — the QuantizeLinear→DequantizeLinear pair ORT puts on a graph output
  (e.g. the logits) is removed: quantizing the logits to 256 levels flips near-tied top-1 answers
  (MobileNetV2 on AVX2: top-1 agreement 68 % → 86 % with the logits kept float).
* :func:`unquantize_outputs` — a node excluded from quantization really stays float: the Q→DQ pair on its output
  goes, otherwise ONNX Runtime quantizes its weights itself at session time (see the function).
* :func:`translate_ort_error` — ORT's raw quantization errors in words that name the fix, without the
  hidden temporary file names the tool puts in them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import CompressionError

__all__ = [
    "HISTOGRAM_BINS",
    "calibrate_ranges",
    "correct_biases",
    "float_graph_outputs",
    "translate_ort_error",
    "unquantize_outputs",
    "upgrade_opset",
]

#: histogram bins for Entropy/Percentile (TensorRT's and ORT's Percentile default); Entropy searches
#: thresholds over them with :data:`QUANTIZED_BINS` quantized bins
HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128
#: ONNX opset from which DequantizeLinear has an ``axis`` (per-channel weights)
PER_CHANNEL_OPSET = 13


class _Reader:
    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self._batches = list(batches)
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return self._batches[self._i - 1]

    def rewind(self) -> None:
        self._i = 0


#: ORT's calibrators keep every intermediate output of one ``collect_data`` call in memory (MobileNetV2: ≈ 40 MB per
#: crop; 560 crops took 24 GB and were OOM-killed), so batches are fed in chunks of at most this many rows; MinMax
#: ranges and histograms merge across calls, and up to this many rows calibrate exactly as in one call
CALIBRATION_CHUNK_ROWS = 128


def calibration_chunks(
    batches: Sequence[dict[str, np.ndarray]], rows: int = CALIBRATION_CHUNK_ROWS
) -> list[list[dict[str, np.ndarray]]]:
    """``batches`` grouped so each group holds at most ``rows`` rows (a larger single batch is a group alone)."""
    chunks: list[list[dict[str, np.ndarray]]] = []
    held = 0
    for b in batches:
        n = len(next(iter(b.values()))) if b else 0
        if not chunks or held + n > rows:
            chunks.append([])
            held = 0
        chunks[-1].append(b)
        held += n
    return chunks


def method_base(method: str) -> str:
    """``"percentile@99.99"`` → ``"percentile"``; other names unchanged."""
    return method.split("@", 1)[0]


def method_percentile(method: str) -> float | None:
    """The percentile a ``"percentile@P"`` calibration candidate names (``None`` for every other name)."""
    base, _, at = method.partition("@")
    return float(at) if base == "percentile" and at else None


def valid_method(method: str, known: Sequence[str]) -> bool:
    """A calibration method name: one of ``known`` or ``percentile@P`` with 90 < P ≤ 100."""
    if method in known:
        return True
    base, _, at = method.partition("@")
    try:
        return base == "percentile" and 90.0 < float(at) <= 100.0
    except ValueError:
        return False


def calibrate_ranges(
    model_path: Path,
    batches: Sequence[dict[str, np.ndarray]],
    methods: Sequence[str],
    op_types: Sequence[str],
    work_dir: Path,
    percentile: float,
) -> dict[str, Any]:
    """Activation ranges per method (ORT ``TensorsData``), from one MinMax pass and one shared histogram.
    ``percentile@P`` methods take their thresholds at percentile P from the same histogram (plain
    ``percentile`` at ``percentile``)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, create_calibrator

    out: dict[str, Any] = {}
    if "minmax" in methods:
        cal = create_calibrator(
            model_path,
            list(op_types),
            augmented_model_path=str(work_dir / ".augmented-minmax.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
        )
        for chunk in calibration_chunks(batches):
            cal.collect_data(_Reader(chunk))
        out["minmax"] = cal.compute_data()
        del cal
    hist_methods = [m for m in methods if method_base(m) in ("entropy", "percentile", "distribution")]
    if hist_methods:
        cal = create_calibrator(
            model_path,
            list(op_types),
            augmented_model_path=str(work_dir / ".augmented-histogram.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": HISTOGRAM_BINS, "num_quantized_bins": QUANTIZED_BINS},
        )
        for chunk in calibration_chunks(batches):
            cal.collect_data(_Reader(chunk))
        collector = cal.collector
        enums = {
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
            "distribution": CalibrationMethod.Distribution,
        }
        for method in hist_methods:
            base, at = method_base(method), method_percentile(method)
            collector.method = base
            collector.percentile = at if at is not None else percentile
            out[method] = TensorsData(enums[base], collector.compute_collection_result())
        del cal
    for leftover in work_dir.glob(".augmented-*"):
        leftover.unlink(missing_ok=True)
    return out


def ranges_differ(a: Any, b: Any) -> float:
    """Largest relative difference between two methods' ranges over the tensors both calibrated."""
    worst = 0.0
    for name in a.data:
        if name not in b.data:
            continue
        ra = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in a[name].range_value])
        rb = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in b[name].range_value])
        if ra.shape != rb.shape:
            continue
        span = max(float(np.abs(ra).max()), 1e-12)
        worst = max(worst, float(np.abs(ra - rb).max()) / span)
    return worst


def upgrade_opset(model: Any) -> tuple[Any, int | None]:
    """Per-channel DequantizeLinear needs opset ≥ 13: convert older graphs (returns the old opset, or None)."""
    import onnx
    from onnx import version_converter

    ai = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not ai or ai[0].version >= PER_CHANNEL_OPSET:
        return model, None
    old = int(ai[0].version)
    try:
        converted = version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(converted)
    except Exception as err:
        raise CompressionError(
            f"per-channel INT8 needs ONNX opset ≥ {PER_CHANNEL_OPSET} (DequantizeLinear's axis) and converting this "
            f"opset-{old} graph failed ({type(err).__name__}: {str(err)[:200]}); re-export at opset "
            f"{PER_CHANNEL_OPSET} or later, or set per_channel: false"
        ) from err
    return converted, old


def _fake_quant_weight(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """The float value ORT's symmetric int8 weights stand for (scale = max|w| / 127.5, clipped to ±127/−128)."""
    axes = tuple(range(1, w.ndim)) if per_channel else None
    absmax = np.abs(w).max(axis=axes, keepdims=True) if axes else np.abs(w).max()
    scale = np.where(absmax > 0, absmax / 127.5, 1.0)
    return (np.clip(np.round(w / scale), -128, 127) * scale).astype(w.dtype)


def _conv_layers(model: Any) -> list[tuple[Any, str]]:
    """(Conv node, name of its bias initializer) for every Conv with constant weights, in graph order;
    convolutions without a bias get a zero one."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if len(node.input) < 3 or node.input[2] not in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            name = f"{node.input[1]}__bias"
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(w.shape[0], w.dtype), name))
            inits[name] = model.graph.initializer[-1]
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
        layers.append((node, node.input[2]))
    return layers


def correct_biases(
    model: Any, batches: Sequence[dict[str, np.ndarray]], per_channel: bool, samples: int = 32
) -> tuple[Any, dict[str, Any]]:
    """Empirical bias correction for int8 weights, in graph order; returns the corrected float model."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    layers = _conv_layers(model)
    if not layers:
        return model, {"corrected_convs": 0}
    feed = _stack(batches, samples)
    inits = {t.name: t for t in model.graph.initializer}
    outputs = [node.output[0] for node, _ in layers]

    def session(graph_model: Any, bias_inputs: bool) -> Any:
        m = onnx.ModelProto.FromString(graph_model.SerializeToString())
        del m.graph.output[:]
        for name in outputs:
            m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        if bias_inputs:
            keep = [t for t in m.graph.initializer if t.name not in {b for _, b in layers}]
            del m.graph.initializer[:]
            m.graph.initializer.extend(keep)
            for _, b in layers:
                shape = list(inits[b].dims)
                m.graph.input.append(helper.make_tensor_value_info(b, onnx.TensorProto.FLOAT, shape))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    reference = dict(zip(outputs, session(model, False).run(outputs, feed), strict=True))
    ref_means = {k: v.mean(axis=(0, *range(2, v.ndim))) for k, v in reference.items()}
    del reference
    quant = onnx.ModelProto.FromString(model.SerializeToString())
    qinits = {t.name: t for t in quant.graph.initializer}
    for node, _ in layers:
        w = numpy_helper.to_array(qinits[node.input[1]])
        qinits[node.input[1]].CopyFrom(
            numpy_helper.from_array(_fake_quant_weight(w, per_channel), node.input[1])
        )
    sess = session(quant, True)
    biases = {b: numpy_helper.to_array(inits[b]).astype(np.float32).copy() for _, b in layers}
    shifts = []
    for node, b in layers:
        (out,) = sess.run([node.output[0]], {**feed, **biases})
        delta = ref_means[node.output[0]] - out.mean(axis=(0, *range(2, out.ndim)))
        biases[b] = (biases[b] + delta).astype(np.float32)
        shifts.append(float(np.abs(delta).max()))
    for _, b in layers:
        inits[b].CopyFrom(numpy_helper.from_array(biases[b], b))
    return model, {
        "corrected_convs": len(layers),
        "samples": int(next(iter(feed.values())).shape[0]),
        "max_bias_shift": max(shifts),
    }


def _stack(batches: Sequence[dict[str, np.ndarray]], samples: int) -> dict[str, np.ndarray]:
    names = list(batches[0])
    out = {n: np.concatenate([b[n] for b in batches])[:samples] for n in names}
    return out


def float_graph_outputs(model: Any) -> list[str]:
    """Remove Q→DQ pairs that end in a graph output, so the output stays float; returns those outputs."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    done = []
    for out in graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in {o.name for o in graph.output}:
            continue
        source = q.input[0]
        graph.node.remove(dq)
        if not any(q.output[0] in n.input for n in graph.node):
            graph.node.remove(q)
        for n in graph.node:
            n.output[:] = [out.name if v == source else v for v in n.output]
            n.input[:] = [out.name if v == source else v for v in n.input]
        done.append(out.name)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return done


_HIDDEN = re.compile(
    r"(/[^\s'\"]*)?/?\.?[\w.-]*(ort\.quant\.|augmented|\.minmax|\.entropy|\.percentile)[^\s'\"]*"
)


def translate_ort_error(err: BaseException, method: str, graph: str) -> CompressionError:
    """ORT's raw quantization error as a slimship error that says what to do."""
    raw = _HIDDEN.sub("<temporary file>", f"{type(err).__name__}: {err}")[:400]
    bias = re.search(r"Unable to get valid quantization scale for input '([^']+)'", str(err))
    if bias:
        return CompressionError(
            f"static INT8 ({method}) of {graph}: ONNX Runtime found no valid scale for the bias fed by "
            f"'{bias.group(1)}' (its calibrated range is empty or the weight scale underflows). Quantize the exported "
            "graph rather than an optimised one, calibrate with more varied samples, or exclude the node that "
            f"consumes '{bias.group(1)}' (exclude_nodes). ONNX Runtime said: {raw}"
        )
    if "Unrecognized attribute: axis" in str(err) or ("DequantizeLinear" in str(err) and "axis" in str(err)):
        return CompressionError(
            f"static INT8 ({method}) of {graph}: per-channel weights need ONNX opset ≥ {PER_CHANNEL_OPSET}; "
            f"re-export at opset {PER_CHANNEL_OPSET}+ or set per_channel: false. ONNX Runtime said: {raw}"
        )
    return CompressionError(f"ONNX Runtime's quantize_static ({method}) failed on {graph}: {raw}")


def unquantize_outputs(model: Any, node_names: Sequence[str]) -> list[str]:
    """Remove the QuantizeLinear→DequantizeLinear pairs on the outputs of ``node_names`` (the consumers read the float
    value). Without this a Conv excluded from quantization does not stay float: ONNX Runtime (≥ 1.21, its
    ``WeightBiasQuantization`` transformer) quantizes the float weights of any Conv/Gemm between a DequantizeLinear
    and a QuantizeLinear at session time and runs it as a QLinearConv (MobileNetV2 on AVX2: 17 depthwise convs
    "excluded", 52 of 52 QLinearConv after session optimisation). The consumers of a value made float then read
    float and run as float convolutions too (their weights dequantized). Not covered: a float node whose output reaches
    its QuantizeLinear through MaxPool/Reshape (ORT moves the QuantizeLinear up through them and still quantizes
    the node). Returns the tensors made float."""
    graph = model.graph
    wanted = set(node_names)
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    drop: list[Any] = []
    done = []
    for node in graph.node:
        if node.name not in wanted:
            continue
        for value in node.output:
            # through the float activation a node keeps when its own output is not quantized (Conv → Clip → Q)
            while len(consumers.get(value, [])) == 1 and consumers[value][0].op_type in ("Relu", "Clip"):
                value = consumers[value][0].output[0]
            qs = [c for c in consumers.get(value, []) if c.op_type == "QuantizeLinear"]
            for q in qs:
                dqs = consumers.get(q.output[0], [])
                if q.output[0] in outputs or any(d.op_type != "DequantizeLinear" for d in dqs):
                    continue
                for dq in dqs:
                    for c in consumers.get(dq.output[0], []):
                        c.input[:] = [value if i == dq.output[0] else i for i in c.input]
                    if dq.output[0] in outputs:
                        continue
                    drop.append(dq)
                drop.append(q)
                done.append(value)
    for n in drop:
        if n in graph.node:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return sorted(set(done))
