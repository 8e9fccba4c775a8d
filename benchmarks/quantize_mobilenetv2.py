"""MobileNetV2 (ImageNet, the ``mobilenetv2`` workload) static INT8 on THIS CPU: ONNX Runtime fp32 vs ORT's own
``quantize_static`` defaults vs slimship's ``quantize-static`` (full QDQ op set with Clip folded, per-channel
weights, float logits, Percentile/Entropy/MinMax chosen on held-out calibration crops, bias correction) —
agreement with fp32 on the workload's 332 held-out crops, and latency at batch 1 and 32, timed interleaved
in one run, 2 threads, spinning off, each session built from slimship's deployment settings (so
``session.x64quantprecision=1`` is on for the INT8 graphs on CPUs without VNNI). Ends with an ONNX Runtime
op-type profile of both INT8 graphs at batch 32 (where the time goes).

    .venv/bin/python benchmarks/quantize_mobilenetv2.py           # ≈ 6 min on 2 cores; idle machine please
    .venv/bin/python benchmarks/quantize_mobilenetv2.py --render-only

Writes benchmarks/results/mobilenetv2_int8-<cpu class>.{json,md}.
"""

from __future__ import annotations

import collections
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "runs" / "bench-mobilenetv2"
THREADS = 2
REPEATS = 12


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# MobileNetV2 INT8 on {result['cpu_class']} ({m['cpu_model']}, {m['physical_cores']} cores)",
        "",
        (f"Run {result['date']} UTC. " if result.get("date") else "")
        + f"One interleaved run, {result['threads']} threads, ORT spinning off, sessions from slimship's deployment "
        f"settings; agreement with the fp32 PyTorch original on {result['eval_crops']} held-out crops "
        f"({result['confident_crops']} confident: fp32 max prob ≥ 0.5). Load average at start: {result['load_avg']}.",
        "",
        "| variant | Q / DQ / Clip nodes | top-1 agr. all | top-1 agr. confident | top-5 agr. | known-class acc. | "
        "b1 p50 ms | b32 p50 ms | × fp32 b1 / b32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = r["quality"]
        lines.append(
            f"| {r['label']} | {r['nodes']} | {q['top1_agreement']:.1f} | {q['top1_agreement_confident']:.1f} | "
            f"{q['top5_agreement']:.1f} | {q['known_class_accuracy']:.1f} | {r['p50_ms']['1']:.1f} | "
            f"{r['p50_ms']['32']:.0f} | {r['speedup']['1']:.2f} / {r['speedup']['32']:.2f} |"
        )
    lines += ["", "ONNX Runtime op-type profile at batch 32 (share of kernel time):", ""]
    for label, prof in result["profiles"].items():
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(prof.items())[:6])
        lines.append(f"- {label}: {top}")
    if result.get("speed_reason"):
        lines += ["", "**Why not faster here:** " + result["speed_reason"]]
    exp = result.get("experiments")
    if exp:
        lines += [
            "",
            f"## Follow-up experiments ({exp['date']}, {exp['cpu_class']}; agreement only, no timing)",
            "",
            f"{exp['machine_note']}. {exp['how']}.",
            "",
            "| variant | top-1 agr. all | top-1 agr. confident | top-5 agr. |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {e['variant']} | {_pct(e['top1_all'])} | {_pct(e['top1_confident'])} | {_pct(e['top5'])} |"
            for e in exp["rows"]
        ]
        lines += [""] + [f"- {n}" for n in exp["notes"]]
    lines += [
        "",
        f"slimship's choice: {result['slimship_choice']}",
        "",
        "Reproduce: `" + result["command"] + "`",
        "",
    ]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _profile(path: Path, settings: object, batch: np.ndarray) -> dict[str, float]:
    import onnxruntime as ort

    so = settings.session_options()  # type: ignore[attr-defined]
    so.enable_profiling = True
    so.profile_file_prefix = str(WORK / f"profile-{path.parent.name}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, {"pixels": batch})
    prof = Path(sess.end_profiling())
    totals: collections.Counter[str] = collections.Counter()
    for ev in json.loads(prof.read_text()):
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            totals[ev["args"]["op_name"]] += ev["dur"]
    prof.unlink()
    total = sum(totals.values()) or 1
    return {k: v / total for k, v in totals.most_common()}


def speed_reason(result: dict) -> str:
    """The measured reason when slimship's INT8 is under 1.4x fp32 at batch 32 (empty otherwise)."""
    slim = result["rows"][2]
    if slim["speedup"]["32"] >= 1.4:
        return ""
    prof = result["profiles"][slim["label"]]
    return (
        f"slimship's INT8 graph runs {slim['speedup']['32']:.2f}x fp32 at batch 32; QLinearConv is "
        f"{prof.get('QLinearConv', 0):.0%} of its kernel time (Q/DQ/Clip overhead is gone: "
        f"{prof.get('QuantizeLinear', 0) + prof.get('DequantizeLinear', 0):.1%} in Quantize/DequantizeLinear), so the "
        f"int8 convolution kernels themselves set the speed. "
        + (
            f"On {result['cpu_class']} (no VNNI) ONNX Runtime's u8s8 convolutions multiply through 16-bit intermediate "
            "sums, and slimship's settings add session.x64quantprecision=1 there to avoid their saturation (not "
            "separated out in this run). "
            if result["cpu_class"] == "avx2"
            else f"On {result['cpu_class']} the int8 dot products have hardware support (VNNI) and no precision "
            "setting is added. "
        )
        + "Ratios come from one interleaved run (load average at start above)"
    )


def build(w: object) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat, quantize_static

    from slimship.candidate import original_candidate
    from slimship.passes import export as export_pass
    from slimship.passes.export import ExportConfig
    from slimship.passes.quantize import StaticQuantConfig, StaticQuantPass

    shutil.rmtree(WORK, ignore_errors=True)
    orig = original_candidate(w, WORK / "original")  # type: ignore[arg-type]
    exported = export_pass(orig, w, ExportConfig(), WORK / "exported")  # type: ignore[arg-type]
    calib = list(w.calibration_batches(128, 16))  # type: ignore[attr-defined]

    class Reader:
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    (WORK / "ort-default").mkdir()
    quantize_static(
        str(exported.artifact_path),
        str(WORK / "ort-default" / "model.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
    )
    cfg = StaticQuantConfig(calibration="auto", bias_correction=True)
    slim = StaticQuantPass().run(exported, w, cfg, WORK / "slimship")  # type: ignore[arg-type]
    return {
        "ORT fp32 (exported)": exported.artifact_path,
        "ORT quantize_static defaults (QDQ, per-tensor, MinMax)": WORK / "ort-default" / "model.onnx",
        "slimship quantize-static (auto calibration, bias correction)": slim.artifact_path,
    }


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import onnx
    import onnxruntime as ort
    import psutil

    from slimship.machine import cpu_class, machine_info
    from slimship.runtime.settings import decide_settings
    from slimship.workload import resolve_workload

    cls = cpu_class()
    stem = HERE / "results" / f"mobilenetv2_int8-{cls}"
    if "--render-only" in sys.argv:
        result = json.loads(stem.with_suffix(".json").read_text())
        result["speed_reason"] = speed_reason(result)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        stem.with_suffix(".md").write_text(render(result))
        return
    load = [round(x, 2) for x in psutil.getloadavg()]
    w = resolve_workload("mobilenetv2")
    paths = build(w)
    x, _ = w._eval  # type: ignore[attr-defined]
    ref = w.reference_logits()  # type: ignore[attr-defined]
    from slimship.workload.imagenet import image_quality

    rows, sessions = [], {}
    for label, path in paths.items():
        settings = decide_settings(path, threads=THREADS, spinning=False)
        sess = ort.InferenceSession(str(path), settings.session_options(), providers=["CPUExecutionProvider"])
        out = np.concatenate([sess.run(None, {"pixels": x[i : i + 32]})[0] for i in range(0, len(x), 32)])
        c = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        rows.append(
            {
                "label": label,
                "file": str(path.relative_to(ROOT)),
                "nodes": f"{c['QuantizeLinear']} / {c['DequantizeLinear']} / {c['Clip']}",
                "session_config": dict(settings.session_config),
                "quality": image_quality(out, ref, w._eval[1]),  # type: ignore[attr-defined]
            }
        )
        sessions[label] = (sess, settings, path)
    timing: dict[str, dict[int, list[float]]] = {r["label"]: {1: [], 32: []} for r in rows}
    for rep in range(REPEATS + 2):
        for label, (sess, _, _) in sessions.items():
            for bs in (1, 32):
                feed = {"pixels": x[:bs]}
                t0 = time.perf_counter()
                sess.run(None, feed)
                if rep >= 2:
                    timing[label][bs].append(time.perf_counter() - t0)
    base = {bs: float(np.median(timing[rows[0]["label"]][bs])) for bs in (1, 32)}
    for r in rows:
        med = {bs: float(np.median(timing[r["label"]][bs])) for bs in (1, 32)}
        r["p50_ms"] = {str(bs): med[bs] * 1e3 for bs in (1, 32)}
        r["speedup"] = {str(bs): base[bs] / med[bs] for bs in (1, 32)}
    profiles = {label: _profile(p, s, x[:32]) for label, (_, s, p) in list(sessions.items())[1:]}
    slim = json.loads((paths[rows[2]["label"]].parent / "candidate.json").read_text())["info"]
    result = {
        "cpu_class": cls,
        "machine": machine_info(THREADS),
        "threads": THREADS,
        "load_avg": load,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "eval_crops": len(x),
        "confident_crops": int(rows[0]["quality"]["confident_crops"]),
        "rows": rows,
        "profiles": profiles,
        "slimship_choice": {
            "calibration_method": slim.get("calibration_method"),
            "comparison": slim.get("calibration_comparison"),
            "bias_correction": slim.get("bias_correction"),
            "warnings": slim.get("warnings"),
        },
        "command": ".venv/bin/python benchmarks/quantize_mobilenetv2.py",
    }
    result["speed_reason"] = speed_reason(result)
    if stem.with_suffix(".json").exists():  # follow-up experiments recorded by hand on this class are kept
        earlier = json.loads(stem.with_suffix(".json").read_text())
        if earlier.get("experiments"):
            result["experiments"] = earlier["experiments"]
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
