"""MobileNetV2 static INT8 with the *last* inverted-residual blocks kept float: how many float blocks buy ≥ 95 % top-1
agreement with fp32, and what speed is left? (Issue 18 asks for ≥ 95 % overall, ≥ 98 % on confident crops and ≥ 1.4x
fp32 ONNX Runtime at batch 32.) The late blocks have the most channels and the smallest feature maps, and the
noise-floor benchmark shows error building up towards the logits, so a float tail is the cheapest float share to try.

Each variant is slimship's ``quantize-static`` (percentile 99.99 — what ``auto`` picks here — and bias correction)
with ``exclude_nodes`` naming every Conv / Add / Gemm from block k on (features[k] … features[18], classifier);
agreement on the workload's 332 held-out crops, latency at batch 1 and 32 timed interleaved in one run, 2 threads,
spinning off, sessions from slimship's deployment settings.

The block count is read off the evaluation crops, so the row that first reaches 95 % is an optimistic pick; the
accuracy-aware mode (``float_until_top1`` with ``float_order="output_first"``, the last row) chooses on held-out
*calibration* crops instead.

    .venv/bin/python benchmarks/mobilenetv2_float_tail.py          # ≈ 12 min on 2 cores; idle machine please

Writes benchmarks/results/mobilenetv2_float_tail-<cpu class>.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "runs" / "bench-mobilenetv2-float-tail"
THREADS = 2
REPEATS = 12
TAILS = (None, 13, 10, 8, 7, 6)  # float from features[k] on; None = every conv INT8
SEARCH_FLOOR = 0.9  # float_until_top1 on the 64 held-out calibration crops (all-INT8 there: ≈ 0.8)


def _tail_nodes(model: Any, k: int) -> list[str]:
    """Names of the Conv / Add / Gemm nodes of features[k:] and the classifier, in a MobileNetV2 export whose node
    names carry no module path: the convs are counted in graph order (features[0]: 1 conv, features[1]: 2,
    features[2..17]: 3 each, features[18]: 1), and everything after the first conv of block k is taken."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if len(convs) != 52:
        raise SystemExit(f"expected MobileNetV2's 52 convolutions, found {len(convs)}")
    first = 3 + 3 * (k - 2)
    start = next(i for i, n in enumerate(model.graph.node) if n.name == convs[first].name)
    return [n.name for n in model.graph.node[start:] if n.op_type in ("Conv", "Add", "Gemm")]


def _float_convs(model: Any) -> int:
    """Convs of a saved QDQ graph whose weight is a plain float initializer (not a DequantizeLinear output)."""
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits)


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import onnx
    import onnxruntime as ort
    import psutil

    from slimship.candidate import original_candidate
    from slimship.machine import cpu_class, machine_info
    from slimship.passes import export as export_pass
    from slimship.passes.export import ExportConfig
    from slimship.passes.quantize import StaticQuantConfig, StaticQuantPass
    from slimship.runtime.settings import decide_settings
    from slimship.workload import resolve_workload
    from slimship.workload.imagenet import image_quality

    cls = cpu_class()
    load = [round(v, 2) for v in psutil.getloadavg()]
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    t_start = time.time()
    w = resolve_workload("mobilenetv2")
    x, photo = w._eval  # type: ignore[attr-defined]
    ref = w.reference_logits()  # type: ignore[attr-defined]
    orig = original_candidate(w, WORK / "original")  # type: ignore[arg-type]
    exported = export_pass(orig, w, ExportConfig(), WORK / "exported")
    fp32 = exported.artifact_path
    graph = onnx.load(str(fp32))
    convs_in_graph = sum(1 for n in graph.graph.node if n.op_type == "Conv")

    variants: list[tuple[str, Path, int]] = [("ORT fp32 (exported)", fp32, 0)]
    for k in TAILS:
        names = [] if k is None else _tail_nodes(graph, k)
        label = "INT8, every conv" if k is None else f"INT8, features[{k}:] + classifier float"
        print(f"· {label} ({sum(1 for n in names if n.startswith('node_Conv'))} float convs)", flush=True)
        cfg = StaticQuantConfig(
            calibration="percentile", percentile=99.99, bias_correction=True, exclude_nodes=tuple(names)
        )
        cand = StaticQuantPass()(exported, w, cfg, WORK / ("int8-all" if k is None else f"int8-tail{k}"))
        n_float = _float_convs(onnx.load(str(cand.artifact_path)))
        variants.append((label, cand.artifact_path, n_float))

    cfg = StaticQuantConfig(
        calibration="percentile",
        percentile=99.99,
        bias_correction=True,
        float_until_top1=SEARCH_FLOOR,
        float_order="output_first",
        float_step=4,
        max_float_nodes=48,
    )
    print(f"· accuracy-aware search (output_first, floor {SEARCH_FLOOR})", flush=True)
    cand = StaticQuantPass()(exported, w, cfg, WORK / "int8-search")
    search = cand.info["mixed_precision"]
    label = (
        f"INT8, float_until_top1={SEARCH_FLOOR} output_first (chosen on held-out calibration crops: "
        f"{len(search['float_nodes'])} nodes float, {'met' if search['met'] else 'not met'})"
    )
    variants.append((label, cand.artifact_path, _float_convs(onnx.load(str(cand.artifact_path)))))

    rows, sessions = [], {}
    for label, path, n_float in variants:
        settings = decide_settings(path, threads=THREADS, spinning=False)
        sess = ort.InferenceSession(str(path), settings.session_options(), providers=["CPUExecutionProvider"])
        out = np.concatenate([sess.run(None, {"pixels": x[i : i + 32]})[0] for i in range(0, len(x), 32)])
        rows.append(
            {
                "label": label,
                "file": str(path.relative_to(ROOT)),
                "float_convs": n_float,
                "quality": image_quality(out, ref, photo),
            }
        )
        sessions[label] = sess
    timing: dict[str, dict[int, list[float]]] = {r["label"]: {1: [], 32: []} for r in rows}
    for rep in range(REPEATS + 2):
        for label, sess in sessions.items():
            for bs in (1, 32):
                t0 = time.perf_counter()
                sess.run(None, {"pixels": x[:bs]})
                if rep >= 2:
                    timing[label][bs].append(time.perf_counter() - t0)
    base = {bs: float(np.median(timing[rows[0]["label"]][bs])) for bs in (1, 32)}
    for r in rows:
        med = {bs: float(np.median(timing[r["label"]][bs])) for bs in (1, 32)}
        r["p50_ms"] = {str(bs): med[bs] * 1e3 for bs in (1, 32)}
        r["speedup"] = {str(bs): base[bs] / med[bs] for bs in (1, 32)}
    result = {
        "cpu_class": cls,
        "machine": machine_info(THREADS),
        "date": date,
        "load_avg": load,
        "load_avg_end": [round(v, 2) for v in psutil.getloadavg()],
        "seconds": round(time.time() - t_start, 1),
        "convs": convs_in_graph,
        "eval_crops": len(x),
        "rows": rows,
        "search": {k: search[k] for k in ("floor_top1", "met", "float_nodes", "steps")},
        "command": ".venv/bin/python benchmarks/mobilenetv2_float_tail.py",
    }
    stem = HERE / "results" / f"mobilenetv2_float_tail-{cls}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# MobileNetV2 static INT8 with a float tail ({r['cpu_class']}: {m['cpu_model']}, {m['physical_cores']} cores)",
        "",
        f"Run {r['date']} UTC ({r['seconds']:.0f} s), load average at start {r['load_avg']}, at end {r['load_avg_end']}. "
        "slimship quantize-static (percentile 99.99, bias correction, per-channel weights) with every Conv / Add / Gemm "
        "from block k on kept float; one interleaved timing run, 2 threads, spinning off; agreement with the fp32 "
        f"PyTorch original on {r['eval_crops']} held-out crops. The float-conv count is read off each saved graph.",
        "",
        "| variant | float convs | top-1 agr. all | top-1 agr. confident | top-5 agr. | b1 p50 ms | b32 p50 ms | "
        "× fp32 b1 / b32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        q = row["quality"]
        lines.append(
            f"| {row['label']} | {row['float_convs']} | {q['top1_agreement']:.1f} | {q['top1_agreement_confident']:.1f} | "
            f"{q['top5_agreement']:.1f} | {row['p50_ms']['1']:.1f} | {row['p50_ms']['32']:.0f} | "
            f"{row['speedup']['1']:.2f} / {row['speedup']['32']:.2f} |"
        )
    meets = [
        row["label"]
        for row in r["rows"][1:]
        if row["quality"]["top1_agreement"] >= 95
        and row["quality"]["top1_agreement_confident"] >= 98
        and row["speedup"]["32"] >= 1.4
    ]
    lines += [
        "",
        "Meeting all three targets (≥ 95 % overall, ≥ 98 % confident, ≥ 1.4x fp32 at batch 32) in this run: "
        + (", ".join(meets) if meets else "none")
        + ". The fixed tails are chosen on the evaluation crops here, so a fixed-tail row that meets them is an optimistic "
        "pick; the float_until_top1 row chose its tail on held-out calibration crops. Its steps (float nodes → "
        "held-out calibration top-1): "
        + ", ".join(
            f"{st['float_nodes']} → {st.get('top1_agreement', 0):.3f}"
            for st in r.get("search", {}).get("steps", [])
        )
        + ".",
        "",
        f"Reproduce: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
