"""Where MobileNetV2's static INT8 error comes from, on THIS CPU (agreement only, no timing): the same QDQ graph
run on ONNX Runtime's int8 kernels and with graph optimisation off (Q/DQ executed as ops around float convs: the
quantization grid without the kernels), weights-only int8, session.x64quantprecision off, uint8 and 7-bit weights,
and the logit error against the fp32 top-1/top-2 margins. Reuses the cache of mobilenetv2_mixed_precision.py
(run that first).

    nice -n 19 .venv/bin/python benchmarks/mobilenetv2_int8_probes.py     # ≈ 5 min idle on 2 cores

Writes benchmarks/results/mobilenetv2_int8_probes-<cpu class>.json (rendered into the mixed-precision result).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "runs" / "bench-mobilenetv2-mixed"


def _run(path: Path, x: np.ndarray, fake: bool = False, x64: bool | None = None) -> np.ndarray:
    import onnxruntime as ort

    from slimship.runtime.settings import decide_settings

    so = decide_settings(path, threads=2, spinning=False).session_options()
    if fake:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if x64 is not None:
        so.add_session_config_entry("session.x64quantprecision", "1" if x64 else "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"pixels": x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def _weights_only(bc: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    from slimship.passes._static_int8 import _fake_quant_weight

    model = onnx.load(str(bc))
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm") and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(_fake_quant_weight(w, True), n.input[1]))
    out = WORK / "weights-only.onnx"
    onnx.save_model(model, str(out))
    return out


def _requantize(bc: Path, name: str, **kw: object) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from slimship.passes._static_int8 import float_graph_outputs
    from slimship.passes.quantize import _static_op_types

    out = WORK / f"{name}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(bc),
            str(out),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(_static_op_types()),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            calibration_cache_path=str(WORK / "ranges-percentile.json"),
            **kw,  # type: ignore[arg-type]
        )
    q = onnx.load(str(out))
    float_graph_outputs(q)
    onnx.save_model(q, str(out))
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import psutil
    from onnxruntime.quantization import QuantType

    from slimship.machine import cpu_class
    from slimship.workload import resolve_workload
    from slimship.workload.imagenet import image_quality

    w = resolve_workload("mobilenetv2")
    x, photo = w._eval  # type: ignore[attr-defined]
    ref = w.reference_logits()  # type: ignore[attr-defined]
    bc, int8 = WORK / "bias-corrected.onnx", WORK / "int8-float00.onnx"
    load = [round(v, 2) for v in psutil.getloadavg()]
    rows = []

    def row(label: str, out: np.ndarray) -> None:
        q = image_quality(out, ref, photo)
        rows.append(
            {"variant": label, **{k: round(q[k], 1) for k in ("top1_agreement", "top1_agreement_confident")}}
        )
        print(rows[-1], flush=True)

    out = _run(int8, x)
    row("INT8 (percentile, bias correction), ORT int8 kernels", out)
    margins = np.sort(ref, axis=1)
    margin = margins[:, -1] - margins[:, -2]
    err = float((out - ref).std())
    row(
        "same QDQ graph, graph optimisation off (float convs between Q/DQ: the grid, not the kernels)",
        _run(int8, x, True),
    )
    row("same graph, session.x64quantprecision=0", _run(int8, x, x64=False))
    row("weights-only int8 per-channel, float activations", _run(_weights_only(bc), x))
    row(
        "uint8 weights (u8u8 kernels)",
        _run(_requantize(bc, "uint8-weights", weight_type=QuantType.QUInt8), x),
    )
    row(
        "7-bit weights (reduce_range)",
        _run(_requantize(bc, "reduce-range", weight_type=QuantType.QInt8, reduce_range=True), x),
    )
    result = {
        "cpu_class": cpu_class(),
        "load_avg": load,
        "rows": rows,
        "logit_error_std": err,
        "top1_top2_margin_percentiles": dict(
            zip(("p10", "p25", "p50"), np.percentile(margin, [10, 25, 50]).round(3).tolist(), strict=True)
        ),
        "crops_with_margin_under_2_sigma": float((margin < 2 * err).mean()),
        "command": "nice -n 19 .venv/bin/python benchmarks/mobilenetv2_int8_probes.py",
    }
    path = HERE / "results" / f"mobilenetv2_int8_probes-{result['cpu_class']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
