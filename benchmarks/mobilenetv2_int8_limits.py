"""Is MobileNetV2's static INT8 agreement limited by the calibration data or by 8-bit activations themselves — and
what do NNCF's post-training quantizers reach on the same crops? Agreement with the fp32 original on the workload's
332 held-out crops (overall, confident), and batch-32 latency against each runtime's own fp32, on THIS CPU.

Rows:
- slimship ``quantize-static`` as shipped (128 calibration crops of the calibration photos, auto calibration, bias
  correction);
- the same with all 560 calibration crops (the photos' crops and their mirror images);
- the same with percentile 99.99 / 99.9999 instead of auto;
- **oracle calibration** (diagnosis only, never a result to ship): ranges calibrated on the *evaluation* crops
  themselves. If this row is not much better than the first, calibration data is not what limits agreement: the
  8-bit per-tensor activation grid is;
- NNCF 3.x ``quantize-nncf-onnx`` (NNCF's ONNX backend → QDQ graph on ONNX Runtime), performance preset (symmetric
  activations, NNCF's CNN default) and mixed preset (asymmetric), fast bias correction, 300 calibration samples;
- NNCF ``quantize-nncf`` on OpenVINO (the IR from ``convert-openvino``), run on OpenVINO's CPU plugin.

    .venv/bin/python benchmarks/mobilenetv2_int8_limits.py        # ≈ 10 min on 2 cores; idle machine please

Writes benchmarks/results/mobilenetv2_int8_limits-<cpu class>.{json,md}.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "runs" / "bench-mobilenetv2-limits"
THREADS = 2
REPEATS = 8


def _agreement(out: np.ndarray, w: Any) -> dict[str, float]:
    from slimship.workload.imagenet import image_quality

    return image_quality(out, w.reference_logits(), w._eval[1])


def _outputs(rt: Any, x: np.ndarray) -> np.ndarray:
    return np.concatenate([rt.predict({"pixels": x[i : i + 32]})["logits"] for i in range(0, len(x), 32)])


def _b32_ms(rt: Any, x: np.ndarray) -> list[float]:
    feed = {"pixels": np.ascontiguousarray(x[:32])}
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        rt.predict(feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# MobileNetV2 INT8: what limits agreement ({result['cpu_class']}: {m['cpu_model']}, {m['physical_cores']} cores)",
        "",
        f"Run {result['date']} UTC, load average at start {result['load_avg']}, at end {result['load_avg_end']}; "
        f"{THREADS} threads; agreement with the fp32 PyTorch original on {result['eval_crops']} held-out crops "
        f"({result['confident_crops']} confident: fp32 max prob ≥ 0.5); batch-32 latency is the median of "
        f"{REPEATS} runs, interleaved per round, against the same runtime's fp32 graph.",
        "",
        "| variant | runtime | top-1 agr. all | top-1 agr. confident | top-5 agr. | b32 p50 ms | × fp32 (same runtime) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = r["quality"]
        lines.append(
            f"| {r['label']} | {r['runtime']} | {q['top1_agreement']:.1f} | {q['top1_agreement_confident']:.1f} | "
            f"{q['top5_agreement']:.1f} | {r['b32_ms']:.0f} | {r['speedup_b32']:.2f} |"
        )
    lines += [""] + [f"- {n}" for n in result.get("notes", [])]
    lines += ["", "Reproduce: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import psutil

    from slimship.candidate import original_candidate
    from slimship.machine import cpu_class, machine_info
    from slimship.passes import export as export_pass
    from slimship.passes.export import ExportConfig
    from slimship.passes.nncf_quant import (
        NNCFOnnxQuantizeConfig,
        NNCFOnnxQuantizePass,
        NNCFQuantizeConfig,
        NNCFQuantizePass,
    )
    from slimship.passes.openvino import OpenVINOConvertConfig, OpenVINOConvertPass
    from slimship.passes.quantize import StaticQuantConfig, StaticQuantPass
    from slimship.runtime import create_runtime
    from slimship.workload import resolve_workload

    cls = cpu_class()
    stem = HERE / "results" / f"mobilenetv2_int8_limits-{cls}"
    if "--render-only" in sys.argv:
        stem.with_suffix(".md").write_text(render(json.loads(stem.with_suffix(".json").read_text())))
        return
    load = [round(v, 2) for v in psutil.getloadavg()]
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    w = resolve_workload("mobilenetv2")
    x = w._eval[0]  # type: ignore[attr-defined]
    shutil.rmtree(WORK, ignore_errors=True)
    orig = original_candidate(w, WORK / "original")
    exported = export_pass(orig, w, ExportConfig(), WORK / "exported")

    made: list[tuple[str, Any, str]] = [("fp32 (exported)", exported, "onnxruntime")]

    def static(label: str, name: str, wl: Any = w, **cfg: Any) -> None:
        print(f"· {label}", flush=True)
        made.append(
            (label, StaticQuantPass()(exported, wl, StaticQuantConfig(**cfg), WORK / name), "onnxruntime")
        )

    static("slimship quantize-static (128 crops, auto, bias correction)", "slim", bias_correction=True)
    static(
        "… calibrated on all 560 crops (+ 64 held out)",
        "slim-560",
        calibration_samples=496,
        holdout_samples=64,
        bias_correction=True,
    )
    static(
        "… percentile 99.99", "slim-p9999", calibration="percentile", percentile=99.99, bias_correction=True
    )
    static(
        "… percentile 99.9999",
        "slim-p999999",
        calibration="percentile",
        percentile=99.9999,
        bias_correction=True,
    )
    oracle = resolve_workload("mobilenetv2")
    oracle.__dict__["_calib"] = w._eval  # type: ignore[attr-defined]  # diagnosis only: calibrate on the eval crops
    static(
        "ORACLE: calibrated on the evaluation crops themselves (diagnosis only)",
        "oracle",
        wl=oracle,
        calibration_samples=268,
        holdout_samples=64,
        bias_correction=True,
    )
    for preset in ("performance", "mixed"):
        print(f"· nncf onnx {preset}", flush=True)
        made.append(
            (
                f"NNCF quantize (ONNX backend → QDQ), {preset} preset",
                NNCFOnnxQuantizePass()(
                    exported, w, NNCFOnnxQuantizeConfig(preset=preset), WORK / f"nncf-onnx-{preset}"
                ),
                "onnxruntime",
            )
        )
    print("· openvino", flush=True)
    ir = OpenVINOConvertPass()(exported, w, OpenVINOConvertConfig(), WORK / "ov-fp32")
    made.append(("fp32 IR (convert-openvino)", ir, "openvino"))
    made.append(
        (
            "NNCF quantize (OpenVINO IR), default preset",
            NNCFQuantizePass()(ir, w, NNCFQuantizeConfig(), WORK / "nncf-ov"),
            "openvino",
        )
    )

    runtimes = {label: create_runtime(c, w, threads=THREADS, spin=False) for label, c, _ in made}
    rows = []
    for label, _, backend in made:
        rows.append(
            {"label": label, "runtime": backend, "quality": _agreement(_outputs(runtimes[label], x), w)}
        )
        print(label, rows[-1]["quality"], flush=True)
    times: dict[str, list[float]] = {label: [] for label in runtimes}
    for _ in range(3):  # interleaved rounds
        for label, rt in runtimes.items():
            times[label] += _b32_ms(rt, x)
    base = {b: float(np.median(times[lbl])) for lbl, _, b in made if lbl.startswith("fp32")}
    for r in rows:
        r["b32_ms"] = float(np.median(times[r["label"]]))
        r["speedup_b32"] = base[r["runtime"]] / r["b32_ms"]
    result = {
        "cpu_class": cls,
        "machine": machine_info(THREADS),
        "date": date,
        "load_avg": load,
        "load_avg_end": [round(v, 2) for v in psutil.getloadavg()],
        "eval_crops": len(x),
        "confident_crops": int(rows[0]["quality"]["confident_crops"]),
        "rows": rows,
        "infos": {
            lbl: {k: c.info.get(k) for k in ("calibration_method", "nncf", "fake_quantize_nodes")}
            for lbl, c, _ in made
        },
        "command": ".venv/bin/python benchmarks/mobilenetv2_int8_limits.py",
    }
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
