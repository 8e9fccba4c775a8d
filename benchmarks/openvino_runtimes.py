"""ONNX Runtime and OpenVINO side by side on this CPU: minilm (and mnist) in fp32 and INT8 on each runtime —
quality on the whole evaluation set, fidelity to the original, size, and latency at batch 1 and 32 timed
interleaved in one run, at a fixed thread count.

    .venv/bin/python benchmarks/openvino_runtimes.py            # ≈ 15 min on 2 cores (NNCF calibration ≈ 80 s)
    .venv/bin/python benchmarks/openvino_runtimes.py --render-only   # rewrite the .md from the committed .json

Rows (minilm, seq 128):
- ``ort-fp32``: the exported model after ORT graph optimisation (``optimize``), on ONNX Runtime;
- ``ort-int8-slimship``: slimship's dynamic INT8 (``quantize-dynamic``, smoothing of every MatMul group, α 0.7);
- ``ort-int8-quantize_dynamic-defaults``: the peer on ONNX Runtime — ``onnxruntime.quantization.quantize_dynamic``
  with its defaults (QInt8 weights per tensor; ``DefaultTensorType`` FLOAT, which a fused graph needs) of the same
  optimised graph, the file benchmarks/quantize_minilm.py calls ``ort-default``;
- ``openvino-fp32``: the exported fp32 ONNX converted to an OpenVINO IR (``convert-openvino``), f32 precision hint;
- ``openvino-nncf-int8``: NNCF post-training INT8 of that IR (``quantize-nncf``: 300 calibration texts,
  model_type TRANSFORMER, SmoothQuant + fast bias correction — NNCF's defaults for transformers): the peer on
  OpenVINO.

Every row runs with the deployment settings slimship decides for the host (runtime.settings): on a CPU without
VNNI the ONNX Runtime INT8 rows, the peer's included, get ``session.x64quantprecision = 1``.

``python benchmarks/openvino_runtimes.py minilm`` measures minilm only and keeps the committed mnist part.

Writes benchmarks/results/openvino-<cpu class>.{json,md}. Run it on an otherwise idle machine: the load average
before and after the timing is recorded beside the figures. Reuses the candidates of benchmarks/quantize_minilm.py
(benchmarks/runs/minilm_int8) when they exist.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
THREADS = 2


def _stem() -> str:
    sys.path.insert(0, str(HERE.parent / "src"))
    from slimship.machine import cpu_class

    return f"openvino-{cpu_class()}"


def _candidate(path: Path, make: Any) -> Any:
    from slimship.candidate import load_candidate

    return load_candidate(path) if (path / "candidate.json").exists() else make()


def _minilm(say: Any) -> tuple[Any, dict[str, Any]]:
    from slimship.candidate import original_candidate
    from slimship.passes import export, optimize_graph, run_pass
    from slimship.workload import resolve_workload

    w = resolve_workload("minilm")
    run = HERE / "runs" / "minilm_int8"
    original = _candidate(run / "original", lambda: original_candidate(w, run / "original"))
    exported = _candidate(run / "exported", lambda: export(original, w, out_dir=run / "exported"))
    optimized = _candidate(run / "optimized", lambda: optimize_graph(exported, w, out_dir=run / "optimized"))
    say("slimship dynamic INT8, smoothing all (ORT)")
    int8 = _candidate(
        run / "int8-smooth-all",
        lambda: run_pass(
            "quantize-dynamic", optimized, w, {"smooth": "all", "smooth_alpha": 0.7}, run / "int8-smooth-all"
        ),
    )
    say("ONNX Runtime quantize_dynamic with its defaults (the peer)")
    peer = _ort_quantize_dynamic_defaults(optimized, w, run / "ort-default")
    say("ONNX → OpenVINO IR (verified against the exported ONNX)")
    ov = _candidate(
        run / "openvino-fp32", lambda: run_pass("convert-openvino", exported, w, {}, run / "openvino-fp32")
    )
    say("NNCF INT8 of the IR (300 calibration texts)")
    nncf = _candidate(
        run / "openvino-nncf-int8",
        lambda: run_pass("quantize-nncf", ov, w, {"calibration_samples": 300}, run / "openvino-nncf-int8"),
    )
    return w, {
        "ort-fp32": (optimized, "onnxruntime"),
        "ort-int8-slimship": (int8, "onnxruntime"),
        "ort-int8-quantize_dynamic-defaults": (peer, "onnxruntime"),
        "openvino-fp32": (ov, "openvino"),
        "openvino-nncf-int8": (nncf, "openvino"),
    }


def _ort_quantize_dynamic_defaults(optimized: Any, w: Any, out: Path) -> Any:
    """``quantize_dynamic(model_input, model_output)`` with nothing else set but ``DefaultTensorType`` (without it
    ORT's quantizer refuses the fused graph), recorded as candidate ``ort-default`` like quantize_minilm.py does."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from slimship._util import sha256_file
    from slimship.candidate import Candidate

    p = out / "model.onnx"
    if not p.exists():
        out.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(
            str(optimized.artifact_path),
            str(p),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return Candidate(
        path=out,
        id="ort-default",
        name="ort-default",
        format="onnx",
        artifact=p.name,
        workload=w.ref,
        artifact_sha256=sha256_file(p),
    )


def _mnist(say: Any) -> tuple[Any, dict[str, Any]]:
    from slimship.candidate import original_candidate
    from slimship.passes import export, run_pass
    from slimship.workload import resolve_workload

    w = resolve_workload("mnist")
    run = HERE / "runs" / "mnist_openvino"
    original = _candidate(run / "original", lambda: original_candidate(w, run / "original"))
    exported = _candidate(run / "exported", lambda: export(original, w, out_dir=run / "exported"))
    say("mnist: ONNX → OpenVINO IR, NNCF INT8")
    ov = _candidate(
        run / "openvino-fp32", lambda: run_pass("convert-openvino", exported, w, {}, run / "openvino-fp32")
    )
    nncf = _candidate(
        run / "openvino-nncf-int8",
        lambda: run_pass("quantize-nncf", ov, w, {"calibration_samples": 300}, run / "openvino-nncf-int8"),
    )
    return w, {
        "ort-fp32": (exported, "onnxruntime"),
        "openvino-fp32": (ov, "openvino"),
        "openvino-nncf-int8": (nncf, "openvino"),
    }


def _verified(cand: Any) -> dict[str, Any]:
    """How the candidate was verified against its parent when it was made (its own record)."""
    rec = cand.info.get("verification") or cand.info.get("fidelity_to_parent") or {}
    outs = rec.get("outputs") or {}
    first = next(iter(outs.values()), {})
    return {
        "kind": "verification" if "verification" in cand.info else "fidelity_to_parent",
        "passed": rec.get("passed"),
        "samples": rec.get("samples"),
        "cosine_min": first.get("cosine_min"),
        "cosine_mean": first.get("cosine_mean"),
        "max_abs_error": first.get("max_abs_error"),
        "top1_agreement": first.get("top1_agreement"),
    }


def _earlier_evaluations() -> dict[tuple[str, str], dict[str, Any]]:
    """Evaluations benchmarks/quantize_minilm.py committed for this CPU class, by (candidate id, runtime): quality and
    fidelity of a file don't depend on the machine's load, so the same candidate isn't evaluated twice."""
    from slimship.machine import cpu_class

    out = {}
    for stem in (f"minilm_int8-{cpu_class()}", f"openvino-{cpu_class()}"):
        path = HERE / "results" / f"{stem}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        evaluations = (
            list(data["evaluations"].values())
            if "evaluations" in data
            else [ev for part in data["workloads"] for ev in part["evaluations"].values()]
        )
        for ev in evaluations:
            out.setdefault(
                (ev["candidate"], ev["runtime"]["backend"]),
                {
                    **ev,
                    "evaluation_source": ev.get("evaluation_source") or str(path.relative_to(HERE.parent)),
                },
            )
    return out


#: verify fields VerifyThresholds gained after openvino-avx2.json was first committed: a candidate's id hashes its
#: pass config, so the same IR file got a new id; :func:`_former_id` recomputes the id without them
_NEW_VERIFY_FIELDS = ("near_zero_atol", "min_sqnr_db")


def _former_id(cand: Any) -> str | None:
    """The id this very file (same artifact and companion sha256) had before the verify fields above existed —
    the id is sha256(artifact, pass config, parent id, companions), so a match proves the same bytes."""
    import json as _json

    from slimship._util import sha256_text, stable_json
    from slimship.candidate import load_candidate

    if not cand.parent_id or not cand.pass_name:
        return None
    cfg = _json.loads(_json.dumps(cand.pass_config or {}))
    for k in _NEW_VERIFY_FIELDS:
        (cfg.get("verify") or {}).pop(k, None)
    parent_id = cand.parent_id
    if cand.parent_path and cand.pass_name == "quantize-nncf":
        parent_id = _former_id(load_candidate(cand.parent_path)) or parent_id
    companions = [stable_json(cand.info["companion_sha256"])] if "companion_sha256" in cand.info else []
    cid = sha256_text(cand.artifact_sha256, stable_json(cfg), parent_id, *companions)[:12]
    return f"{cand.name}-{cid}"


def _measure(w: Any, variants: dict[str, Any], say: Any, name: str) -> dict[str, Any]:
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate

    evaluations = {}
    earlier = _earlier_evaluations()
    for label, (cand, backend) in variants.items():
        former = _former_id(cand)
        for cid in (cand.id, former):  # the same file evaluated on the same runtime and CPU class
            if (cid, backend) in earlier:
                evaluations[label] = {
                    **earlier[(cid, backend)],
                    **({"same_file_as": cid} if cid != cand.id else {}),
                }
                break
        if label in evaluations:
            continue
        cached = (
            cand.path / f".bench-evaluation-{backend}.json"
        )  # quality doesn't depend on load: kept for re-timing
        if cached.exists() and json.loads(cached.read_text()).get("candidate") == cand.id:
            evaluations[label] = json.loads(cached.read_text())
            continue
        say(f"{name}: evaluating {label} on {backend}")
        evaluations[label] = evaluate(cand, w, backend, THREADS, progress=False)
        cached.write_text(json.dumps(evaluations[label], default=str))
    say(f"{name}: timing everything interleaved ({THREADS} threads)")
    load_before = os.getloadavg()
    timing = bench(
        [BenchTarget(label, c, b) for label, (c, b) in variants.items()],
        w,
        batch_sizes=(1, 32),
        seq_len=128,
        runs=30,
        threads=THREADS,
        memory=False,
        progress=False,
    )
    load_after = os.getloadavg()
    rows = []
    for c in timing["candidates"]:
        ev = evaluations[c["label"]]
        lat = {r["batch_size"]: r["latency_ms"]["p50"] for r in c["results"]}
        cand = variants[c["label"]][0]
        rows.append(
            {
                "label": c["label"],
                "runtime": variants[c["label"]][1],
                "candidate": cand.id,
                "artifact_sha256": cand.artifact_sha256,
                "file_size_bytes": c["file_size_bytes"],
                "quality": ev["quality"],
                "primary_metric": ev["primary_metric"],
                "fidelity_to_original": ev["fidelity"],
                "p50_ms": lat,
                "speedup_vs_ort_fp32_p50": {
                    r["batch_size"]: r["speedup_vs_baseline_p50"] for r in c["results"]
                },
                "verified_against_parent": _verified(cand),
                "executed": c["runtime"].get("executed"),
                "deployment": c["runtime"].get("deployment"),
                "evaluation_source": ev.get("evaluation_source"),
                "evaluated_as": ev.get("same_file_as"),
            }
        )
    return {
        "workload": name,
        "rows": rows,
        "evaluations": evaluations,
        "bench": timing,
        "load_average_1_5_15": {"before_timing": load_before, "after_timing": load_after},
    }


def _fmt_row(r: dict[str, Any]) -> str:
    q = r["quality"][r["primary_metric"]]
    f = r["fidelity_to_original"]
    cos = (
        f"{f['cosine_mean']:.4f} / {f['cosine_min']:.4f}"
        if "cosine_mean" in f
        else f"top-1 agreement {f.get('top1_agreement', float('nan')):.4f}"
    )
    v = r["verified_against_parent"]
    ver = (
        "— (the peer's own tool: no parent check; fidelity to the original beside it)"
        if v.get("passed") is None
        else f"{'passed' if v['passed'] else 'FAILED'} (cos min {v['cosine_min']:.4f}, {v['samples']} samples)"
    )
    ex = r.get("executed") or {}
    prec = ex.get("inference_precision", "—") + (
        f", ops {ex['runtime_precisions']}" if ex.get("runtime_precisions") else ""
    )
    # batch sizes are int keys in a fresh result and strings once read back from its JSON (--render-only)
    sp = {int(k): x for k, x in r["speedup_vs_ort_fp32_p50"].items()}
    p50 = {int(k): x for k, x in r["p50_ms"].items()}
    return (
        f"| {r['label']} | {r['runtime']} | {r['file_size_bytes'] / 1e6:.1f} MB | {q:.2f} | {cos} | "
        f"{p50[1]:.1f} ({sp[1]:.2f}x) | {p50[32]:.1f} ({sp[32]:.2f}x) | {ver} | {prec} |"
    )


def render(result: dict[str, Any]) -> str:
    from slimship.report.summary import machine_line

    cls = result["cpu_class"]
    lines = [
        f"# ONNX Runtime vs OpenVINO on {cls} — {result['cpu_model']} (one interleaved run per workload, {THREADS} threads)",
        "",
        "Quality on the whole evaluation set; fidelity = agreement with the original PyTorch model's outputs;",
        "latency p50 at seq 128 for text; ratio vs `ort-fp32` from the same interleaved run. *Verified* is the",
        "candidate's own check against its parent when it was made (convert: the ONNX parent on ONNX Runtime,",
        "thresholds of VerifyThresholds; NNCF: fidelity to the fp32 IR, recorded). *Executed* is what the compiled",
        "OpenVINO model reports it used (`INFERENCE_PRECISION_HINT` and ops per runtime precision).",
        "Peers side by side in the same run: `ort-int8-quantize_dynamic-defaults` (ONNX Runtime's `quantize_dynamic`",
        "with its defaults) and `openvino-nncf-int8` (`nncf.quantize` with its defaults for transformers) against",
        "slimship's INT8 (`ort-int8-slimship`); every row runs with the deployment settings slimship decides for the",
        "host (on avx2 the ONNX Runtime INT8 rows get `session.x64quantprecision = 1`). Load averages beside each",
        "table: where other jobs shared the machine, compare the ratios, not the milliseconds.",
        "",
    ]
    for part in result["workloads"]:
        la = part["load_average_1_5_15"]
        lines += [
            f"## {part['workload']} ({cls})",
            "",
            f"Load average (1/5/15 min) before timing {la['before_timing'][0]:.2f}/{la['before_timing'][1]:.2f}/"
            f"{la['before_timing'][2]:.2f}, after {la['after_timing'][0]:.2f}/{la['after_timing'][1]:.2f}/"
            f"{la['after_timing'][2]:.2f} (2 cores, "
            f"{'shared with other jobs' if max(la['before_timing'][0], la['after_timing'][0]) > 2.5 else 'otherwise idle'}).",
            "",
            f"| variant | runtime | file | {part['rows'][0]['primary_metric']} | cosine mean / min to original | "
            "b1 p50 ms | b32 p50 ms | verified vs parent | executed |",
            "|---|---|---|---|---|---|---|---|---|",
            *(_fmt_row(r) for r in part["rows"]),
            "",
        ]
        reused = sorted(
            {
                f"{r['label']} ({r['evaluation_source']}"
                + (
                    f", as {r['evaluated_as']}: the same bytes, id from an older config schema"
                    if r.get("evaluated_as")
                    else ""
                )
                + ")"
                for r in part["rows"]
                if r.get("evaluation_source")
            }
        )
        if reused:
            lines += [
                "Quality and fidelity taken from an earlier evaluation of the same file (same candidate id) on the same "
                "runtime and CPU class: " + "; ".join(reused) + ".",
                "",
            ]
    lines += [
        "## Machine",
        "",
        machine_line(result["workloads"][0]["bench"]["machine"]),
        "",
        f"Reproduce: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    stem = _stem()
    out = HERE / "results"
    if "--render-only" in sys.argv:
        result = json.loads((out / f"{stem}.json").read_text())
        (out / f"{stem}.md").write_text(render(result))
        return
    from slimship.machine import cpu_class, machine_info

    say = lambda m: print(f"· {m}", file=sys.stderr, flush=True)  # noqa: E731
    parts = []
    only = [a for a in sys.argv[1:] if not a.startswith("-")] or ["minilm", "mnist"]
    committed = out / f"{stem}.json"
    kept = (
        {p["workload"]: p for p in json.loads(committed.read_text())["workloads"]}
        if committed.exists()
        else {}
    )
    for name, build in (("minilm", _minilm), ("mnist", _mnist)):
        if name in only:
            w, variants = build(say)
            parts.append(_measure(w, variants, say, name))
        elif (
            name in kept
        ):  # not measured this time: the committed part stays (its own run, its own load average)
            parts.append(kept[name])
    result = {
        "schema": "slimship.bench.openvino-runtimes/1",
        "cpu_class": cpu_class(),
        "cpu_model": machine_info(THREADS).get("cpu_model", ""),
        "threads": THREADS,
        "workloads": parts,
        "command": "python benchmarks/openvino_runtimes.py",
    }
    out.mkdir(exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render(result)
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
