"""MobileNetV2 static INT8 on THIS CPU, follow-up to quantize_mobilenetv2.py: accuracy-aware mixed precision (K
convolutions kept float, worst emulated static SQNR first — the ranking ``quantize-static``'s ``float_until_top1``
uses) and where the time goes. One calibration (percentile 99.999, 128 crops) and one bias correction are shared by
every variant; each variant is one ``quantize_static`` from the cached ranges. Agreement with the fp32 PyTorch
original on the workload's 332 held-out crops; latency at batch 1 and 32 of every variant and ORT fp32, timed
interleaved in one run (2 threads, spinning off, sessions from slimship's deployment settings); then an ONNX Runtime
op-type profile at batch 32 (milliseconds per op type, fp32 vs INT8).

    nice -n 19 .venv/bin/python benchmarks/mobilenetv2_mixed_precision.py      # ≈ 10 min idle on 2 cores

Intermediate files are cached in runs/bench-mobilenetv2-mixed (delete it to start over). Writes
benchmarks/results/mobilenetv2_mixed_precision-<cpu class>.{json,md}.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "runs" / "bench-mobilenetv2-mixed"
THREADS = 2
REPEATS = 8
KS = (0, 4, 8, 16)
COMMAND = "nice -n 19 .venv/bin/python benchmarks/mobilenetv2_mixed_precision.py"


def _prepared(w: object) -> tuple[Path, Path, Path, list[dict]]:
    """Exported graph, bias-corrected graph, percentile ranges (ORT's JSON cache), and the float ranking."""
    import onnx
    from onnxruntime.quantization.calibrate import save_tensors_data

    from slimship.candidate import original_candidate
    from slimship.passes import export as export_pass
    from slimship.passes._mixed_precision import rank_for_float
    from slimship.passes._static_int8 import calibrate_ranges, correct_biases, upgrade_opset
    from slimship.passes.export import ExportConfig
    from slimship.passes.quantize import _static_op_types, quantizable_nodes

    WORK.mkdir(parents=True, exist_ok=True)
    exported = WORK / "exported" / "model.onnx"
    if not exported.exists():
        orig = original_candidate(w, WORK / "original")  # type: ignore[arg-type]
        export_pass(orig, w, ExportConfig(), WORK / "exported")  # type: ignore[arg-type]
    calib = list(w.calibration_batches(128, 16))  # type: ignore[attr-defined]
    bc = WORK / "bias-corrected.onnx"
    if not bc.exists():
        model, _ = upgrade_opset(onnx.load(str(exported)))
        onnx.save_model(correct_biases(model, calib, True)[0], str(bc))
    ranges = WORK / "ranges-percentile.json"
    if not ranges.exists():
        r = calibrate_ranges(bc, calib, ["percentile"], _static_op_types(), WORK, 99.999)
        save_tensors_data(r["percentile"], ranges)
    rank = WORK / "ranking.json"
    if not rank.exists():
        targets = quantizable_nodes(onnx.load(str(bc)), ("Conv", "MatMul", "Gemm"))
        rank.write_text(json.dumps(rank_for_float(bc, w, targets, True)))  # type: ignore[arg-type]
    return exported, bc, ranges, json.loads(rank.read_text())


def _variants(bc: Path, ranges: Path, ranking: list[dict]) -> dict[str, tuple[Path, list[str]]]:
    from onnxruntime.quantization.calibrate import load_tensors_data

    from slimship.passes.quantize import StaticQuantConfig, StaticQuantPass, _static_op_types

    cfg = StaticQuantConfig(calibration="percentile", bias_correction=True)
    data = load_tensors_data(ranges)
    out = {}
    for k in KS:
        path = WORK / f"int8-float{k:02d}.onnx"
        excluded = [r["node"] for r in ranking[:k]]
        if not path.exists():
            StaticQuantPass._quantize(bc, path, data, "percentile", cfg, _static_op_types(), excluded)
        out[f"INT8, {k} worst conv(s) float" if k else "INT8, all convs (percentile, bias correction)"] = (
            path,
            excluded,
        )
    return out


def _profile(path: Path, settings: object, batch: np.ndarray) -> dict[str, float]:
    """Milliseconds per op type for one batch-32 run (mean of 3 runs after warm-up)."""
    import onnxruntime as ort

    so = settings.session_options()  # type: ignore[attr-defined]
    so.enable_profiling = True
    so.profile_file_prefix = str(WORK / f"profile-{path.stem}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"pixels": batch})
    for _ in range(3):
        sess.run(None, {"pixels": batch})
    prof = Path(sess.end_profiling())
    totals: collections.Counter[str] = collections.Counter()
    events = json.loads(prof.read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    cut = runs[0]["ts"] + runs[0]["dur"] if runs else 0  # drop the warm-up run
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev["ts"] > cut:
            totals[ev["args"]["op_name"]] += ev["dur"]
    prof.unlink()
    return {k: v / 3 / 1e3 for k, v in totals.most_common()}


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# MobileNetV2 INT8 mixed precision on {result['cpu_class']} ({m['cpu_model']}, {m['physical_cores']} cores)",
        "",
        f"One interleaved run, {result['threads']} threads, ORT spinning off, sessions from slimship's deployment "
        f"settings, every command at nice 19; agreement with the fp32 PyTorch original on {result['eval_crops']} "
        f"held-out crops ({result['confident_crops']} confident: fp32 max prob ≥ 0.5). Load average at start "
        f"{result['load_avg']}, at end {result['load_avg_end']} (shared machine: compare the ratios).",
        "",
        "| variant | float convs | top-1 agr. all | top-1 agr. confident | top-5 agr. | b1 p50 ms | b32 p50 ms | "
        "× fp32 b1 / b32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = r["quality"]
        lines.append(
            f"| {r['label']} | {len(r['float_nodes'])} | {q['top1_agreement']:.1f} | "
            f"{q['top1_agreement_confident']:.1f} | {q['top5_agreement']:.1f} | {r['p50_ms']['1']:.1f} | "
            f"{r['p50_ms']['32']:.0f} | {r['speedup']['1']:.2f} / {r['speedup']['32']:.2f} |"
        )
    lines += [
        "",
        "ONNX Runtime op-type profile at batch 32, ms per run (kernel time; mean of 3 runs):",
        "",
        "| op type | " + " | ".join(result["profiles"]) + " |",
        "|---|" + "---|" * len(result["profiles"]),
    ]
    ops: list[str] = []
    for prof in result["profiles"].values():
        ops += [k for k in prof if k not in ops]
    for op in ops[:10]:
        cells = [f"{p[op]:.1f}" if op in p else "—" for p in result["profiles"].values()]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [f"{sum(p.values()):.1f}" for p in result["profiles"].values()]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    lines += ["", *[f"- {n}" for n in result["notes"]], "", f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import onnxruntime as ort
    import psutil

    from slimship.machine import cpu_class, machine_info
    from slimship.runtime.settings import decide_settings
    from slimship.workload import resolve_workload
    from slimship.workload.imagenet import image_quality

    cls = cpu_class()
    stem = HERE / "results" / f"mobilenetv2_mixed_precision-{cls}"
    if "--render-only" in sys.argv:
        stem.with_suffix(".md").write_text(render(json.loads(stem.with_suffix(".json").read_text())))
        return
    load = [round(x, 2) for x in psutil.getloadavg()]
    w = resolve_workload("mobilenetv2")
    exported, bc, ranges, ranking = _prepared(w)
    paths = {"ORT fp32 (exported)": (exported, [])} | _variants(bc, ranges, ranking)
    x, photo = w._eval  # type: ignore[attr-defined]
    ref = w.reference_logits()  # type: ignore[attr-defined]
    rows, sessions = [], {}
    for label, (path, excluded) in paths.items():
        settings = decide_settings(path, threads=THREADS, spinning=False)
        sess = ort.InferenceSession(str(path), settings.session_options(), providers=["CPUExecutionProvider"])
        out = np.concatenate([sess.run(None, {"pixels": x[i : i + 32]})[0] for i in range(0, len(x), 32)])
        rows.append({"label": label, "float_nodes": excluded, "quality": image_quality(out, ref, photo)})
        sessions[label] = (sess, settings, path)
    timing: dict[str, dict[int, list[float]]] = {r["label"]: {1: [], 32: []} for r in rows}
    for rep in range(REPEATS + 1):
        for label, (sess, _, _) in sessions.items():
            for bs in (1, 32):
                t0 = time.perf_counter()
                sess.run(None, {"pixels": x[:bs]})
                if rep:
                    timing[label][bs].append(time.perf_counter() - t0)
    base = {bs: float(np.median(timing[rows[0]["label"]][bs])) for bs in (1, 32)}
    for r in rows:
        med = {bs: float(np.median(timing[r["label"]][bs])) for bs in (1, 32)}
        r["p50_ms"] = {str(bs): med[bs] * 1e3 for bs in (1, 32)}
        r["speedup"] = {str(bs): base[bs] / med[bs] for bs in (1, 32)}
    labels = list(sessions)
    profiles = {lab: _profile(sessions[lab][2], sessions[lab][1], x[:32]) for lab in (labels[0], labels[1])}
    result = {
        "cpu_class": cls,
        "machine": machine_info(THREADS),
        "threads": THREADS,
        "load_avg": load,
        "load_avg_end": [round(v, 2) for v in psutil.getloadavg()],
        "eval_crops": len(x),
        "confident_crops": int(rows[0]["quality"]["confident_crops"]),
        "ranking": ranking[: max(KS)],
        "rows": rows,
        "profiles": profiles,
        "notes": json.loads((HERE / "results" / "mobilenetv2_mixed_precision-notes.json").read_text())
        if (HERE / "results" / "mobilenetv2_mixed_precision-notes.json").exists()
        else [],
        "command": COMMAND,
    }
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
