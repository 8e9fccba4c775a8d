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
import dataclasses
import json
import re
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
X64_OFF = "INT8, all convs, without session.x64quantprecision=1 (ORT's default kernels)"
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
    depthwise = sorted(n.name for n in onnx_nodes(bc) if n.op_type == "Conv" and n.name in _depthwise(bc))
    path = WORK / "int8-depthwise-float.onnx"
    if not path.exists():
        StaticQuantPass._quantize(bc, path, data, "percentile", cfg, _static_op_types(), depthwise)
    out[f"INT8, the {len(depthwise)} depthwise convs float"] = (path, depthwise)
    return out


def _depthwise(path: Path) -> set[str]:
    """Names of the depthwise Conv nodes (group > 1) of a graph, and of the values they (and a Clip after them)
    produce: ONNX Runtime's profile names a fused node after its output (``hardtanh_3_nchwc``)."""
    import onnx

    graph = onnx.load(str(path)).graph
    names = set()
    for n in graph.node:
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute):
            names |= {n.name, n.output[0]}
            names |= {c.output[0] for c in graph.node if c.op_type == "Clip" and c.input[0] == n.output[0]}
    return names


def onnx_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path)).graph.node)


def _profiles(chosen: dict[str, tuple[Path, object]], batch: np.ndarray, rounds: int = 5) -> dict[str, dict]:
    """Milliseconds per op type for one batch-32 run: the profiled sessions run in turn, ``rounds`` times after a
    warm-up (interleaved, like the timing), and each op type's per-run total is the median over the rounds."""
    import onnxruntime as ort

    sessions = {}
    for label, (path, settings) in chosen.items():
        so = settings.session_options()  # type: ignore[attr-defined]
        so.enable_profiling = True
        so.profile_file_prefix = str(WORK / f"profile-{path.stem}")
        sessions[label] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(rounds + 1):
        for sess in sessions.values():
            sess.run(None, {"pixels": batch})
    depthwise = _depthwise(WORK / "exported" / "model.onnx") | _depthwise(WORK / "bias-corrected.onnx")
    out = {}
    for label, sess in sessions.items():
        prof = Path(sess.end_profiling())
        events = json.loads(prof.read_text())
        prof.unlink()
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
        per_run: list[collections.Counter[str]] = [collections.Counter() for _ in runs]
        for ev in events:
            if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
                continue
            i = next((k for k, (a, b) in enumerate(runs) if a <= ev["ts"] <= b), None)
            if i is None:
                continue  # the warm-up run
            op = ev["args"]["op_name"]
            if op in ("Conv", "QLinearConv", "FusedConv"):
                node = re.sub(r"(_token_\d+|_nchwc)$", "", ev["name"][: -len("_kernel_time")])
                op += " depthwise" if node in depthwise else " other"
            per_run[i][op] += ev["dur"]
        ops = sorted({k for c in per_run for k in c}, key=lambda k: -sum(c[k] for c in per_run))
        out[label] = {k: float(np.median([c[k] for c in per_run])) / 1e3 for k in ops}
    return out


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
        "ONNX Runtime op-type profile at batch 32, ms per run (kernel time; the three sessions profiled in turn, median of 5 "
        "rounds; depthwise = group > 1, other = the 1x1 convolutions and the first 3x3):",
        "",
        "| op type | " + " | ".join(result["profiles"]) + " |",
        "|---|" + "---|" * len(result["profiles"]),
    ]
    ops: list[str] = []
    for prof in result["profiles"].values():
        ops += [k for k in prof if k not in ops]
    for op in ops[:12]:
        cells = [f"{p[op]:.1f}" if op in p else "—" for p in result["profiles"].values()]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [f"{sum(p.values()):.1f}" for p in result["profiles"].values()]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    probes_path = HERE / "results" / f"mobilenetv2_int8_probes-{result['cpu_class']}.json"
    if probes_path.exists():
        probes = json.loads(probes_path.read_text())
        m = probes["top1_top2_margin_percentiles"]
        lines += [
            "",
            f"## Where the error comes from (benchmarks/mobilenetv2_int8_probes.py, {probes['cpu_class']}, load average "
            f"{probes['load_avg']}; agreement only)",
            "",
            "| variant | top-1 agr. all | top-1 agr. confident |",
            "|---|---|---|",
            *[
                f"| {r['variant']} | {r['top1_agreement']:.1f} | {r['top1_agreement_confident']:.1f} |"
                for r in probes["rows"]
            ],
            "",
            f"INT8 logit error (std over all logits) {probes['logit_error_std']:.2f}; the fp32 top-1 − top-2 logit margin is "
            f"under {m['p10']} on 10 % of the crops, under {m['p25']} on 25 %, under {m['p50']} on half; "
            f"{probes['crops_with_margin_under_2_sigma']:.0%} of the crops have a margin under twice the error. "
            f"Reproduce: `{probes['command']}`",
        ]
    notes_path = HERE / "results" / "mobilenetv2_mixed_precision-notes.md"
    if notes_path.exists():
        lines += ["", notes_path.read_text().rstrip()]
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import onnxruntime as ort
    import psutil

    from slimship.machine import cpu_class, machine_info
    from slimship.runtime.settings import X64_QUANT_PRECISION, decide_settings
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
    paths[X64_OFF] = paths["INT8, all convs (percentile, bias correction)"]
    for label, (path, excluded) in paths.items():
        settings = decide_settings(path, threads=THREADS, spinning=False)
        if label == X64_OFF:
            entries = {k: v for k, v in settings.session_config.items() if k != X64_QUANT_PRECISION}
            settings = dataclasses.replace(settings, session_config=entries)
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
    labels = [r["label"] for r in rows]
    profiles = _profiles({lab: sessions[lab][1:][::-1] for lab in (labels[0], labels[1], labels[-2])}, x[:32])
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
        "command": COMMAND,
    }
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
