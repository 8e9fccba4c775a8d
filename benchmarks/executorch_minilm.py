"""ExecuTorch (.pte, XNNPACK delegate) beside ONNX Runtime fp32 and PyTorch eager for MiniLM-L6 (the `minilm` workload),
on this x86 host: file size, retrieval quality, fidelity to the original and batch-1 latency at sequence 128, timed
interleaved in one run at a fixed thread count.

The program is fixed at batch 1 with the sequence dynamic up to 128: XNNPACK's reshape takes one dynamic dimension, and
MiniLM's attention-head split has two when batch and sequence are both dynamic (that conversion is refused by name).
The runtime takes any batch, one row at a time.

    .venv/bin/python benchmarks/executorch_minilm.py                 # ~10 min on 2 idle cores (the conversion: ~5)
    .venv/bin/python benchmarks/executorch_minilm.py --render-only   # rewrite the .md from the committed .json

These are figures on this x86 host (its CPU class is in the file name), measured with ExecuTorch's Python runtime:
they are not phone figures. The load average before and after the timing is recorded beside them.
Writes benchmarks/results/executorch-minilm-<cpu class>.{json,md}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
THREADS = 2
EVAL_LIMIT = 300
CONFIG = {"max_batch": 1, "dynamic_batch": False, "max_sequence": 128, "verify_samples": 64}


def _stem() -> str:
    sys.path.insert(0, str(HERE.parent / "src"))
    from slimship.machine import cpu_class

    return f"executorch-minilm-{cpu_class()}"


def _candidate(path: Path, make: Any) -> Any:
    from slimship.candidate import load_candidate

    return load_candidate(path) if (path / "candidate.json").exists() else make()


def measure() -> dict[str, Any]:
    from slimship.candidate import original_candidate
    from slimship.machine import machine_info
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate
    from slimship.passes import export, run_pass
    from slimship.workload import resolve_workload

    w = resolve_workload("minilm")
    run = HERE / "runs" / "minilm_executorch"
    original = _candidate(run / "original", lambda: original_candidate(w, run / "original"))
    onnx = _candidate(run / "exported", lambda: export(original, w, out_dir=run / "exported"))
    t0 = time.perf_counter()
    pte = _candidate(
        run / "executorch", lambda: run_pass("convert-executorch", original, w, CONFIG, run / "executorch")
    )
    convert_wall = round(time.perf_counter() - t0, 1)
    variants = {
        "ort-fp32": (onnx, "onnxruntime"),
        "executorch-xnnpack": (pte, "executorch"),
        "pytorch": (original, "torch"),
    }
    evaluations = {
        label: evaluate(c, w, b, THREADS, limit=EVAL_LIMIT, progress=False)
        for label, (c, b) in variants.items()
    }
    load_before = os.getloadavg()
    timing = bench(
        [BenchTarget(label, c, b) for label, (c, b) in variants.items()],
        w,
        batch_sizes=(1,),
        seq_len=128,
        runs=30,
        threads=THREADS,
        memory=False,
        progress=False,
        baseline="ort-fp32",
    )
    load_after = os.getloadavg()
    rows = []
    for c in timing["candidates"]:
        cand, backend = variants[c["label"]]
        ev = evaluations[c["label"]]
        r = c["results"][0]
        rows.append(
            {
                "label": c["label"],
                "runtime": backend,
                "candidate": cand.id,
                "file_size_bytes": c["file_size_bytes"],
                "quality": ev["quality"],
                "primary_metric": ev["primary_metric"],
                "fidelity_to_original": ev["fidelity"],
                "b1_seq128_p50_ms": r["latency_ms"]["p50"],
                "b1_seq128_p90_ms": r["latency_ms"]["p90"],
                "speedup_vs_ort_fp32_p50": r["speedup_vs_baseline_p50"],
            }
        )
    return {
        "what": f"on this x86 host (CPU class {machine_info()['cpu_class']}), not phone figures",
        "machine": machine_info(),
        "threads": THREADS,
        "eval_limit": EVAL_LIMIT,
        "convert_config": CONFIG,
        "convert_wall_seconds_this_run": convert_wall,
        "executorch": pte.info["executorch"],
        "executorch_convert_seconds": pte.info["convert_seconds"],
        "executorch_verification": pte.info["verification"],
        "rows": rows,
        "bench": timing,
        "load_average_1_5_15": {"before_timing": load_before, "after_timing": load_after},
    }


def _avg(load: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    load = result["load_average_1_5_15"]
    ver = result["executorch_verification"]
    out = next(iter(ver["outputs"].values()))
    et = result["executorch"]
    lines = [
        f"# ExecuTorch vs ONNX Runtime vs PyTorch — MiniLM-L6 (minilm), {result['what']}",
        "",
        f"CPU: {m.get('cpu_model')} (class **{m['cpu_class']}**), {result['threads']} threads, one interleaved run "
        f"(`benchmarks/executorch_minilm.py`). Load average (1/5/15 min) before timing {_avg(load['before_timing'])}, "
        f"after {_avg(load['after_timing'])} on 2 cores: the machine was shared, so read the ratios, not the "
        f"milliseconds. ExecuTorch {et['version']} through its Python runtime (XNNPACK delegate, "
        f"{et['delegate_calls']} delegate calls; outside it: {et['ops_outside_delegate']}). The program is fixed at "
        f"batch 1 with the sequence dynamic up to {et['dim_max'].get('sequence')} (convert config "
        f"`{json.dumps(result['convert_config'])}`, export + lowering {result['executorch_convert_seconds']} s); the "
        "runtime takes any batch one row at a time.",
        "",
        f"The .pte against its PyTorch parent ({ver['samples']} real texts): cosine min {out['cosine_min']:.6f}, "
        f"max |Δ| {out['max_abs_error']:.2e}, SQNR {out['sqnr_db']:.0f} dB.",
        "",
        f"| variant | runtime | file MB | {result['rows'][0]['primary_metric']} (first {result['eval_limit']}) | "
        "b1 seq128 p50 ms (× ORT) | p90 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = r["quality"][r["primary_metric"]]
        lines.append(
            f"| {r['label']} | {r['runtime']} | {r['file_size_bytes'] / 2**20:.1f} | {q:.2f} | "
            f"{r['b1_seq128_p50_ms']:.2f} ({r['speedup_vs_ort_fp32_p50']:.2f}x) | {r['b1_seq128_p90_ms']:.2f} |"
        )
    lines += [
        "",
        "× ORT: ONNX Runtime fp32's p50 divided by the row's (above 1: faster than ORT). Not phone figures: on a phone",
        "the same .pte runs under ExecuTorch's Android/iOS runtime on ARM cores, which this host says nothing about.",
        "With batch and sequence both dynamic the conversion is refused by name (XNNPACK's reshape takes one dynamic",
        "dimension: the attention heads' split `aten.view_copy`).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    stem = _stem()
    out = HERE / "results"
    if "--render-only" in sys.argv:
        result = json.loads((out / f"{stem}.json").read_text())
    else:
        result = measure()
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        result = json.loads((out / f"{stem}.json").read_text())
    (out / f"{stem}.md").write_text(render(result))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
