"""`slimship quickstart`: the built-in ``quickstart`` recipe (export → optimise) run through the runner's steps
on any workload, then every candidate evaluated and PyTorch timed against ONNX Runtime side by side.

Writes into ``out_dir``: one directory per candidate (``original``, ``exported``, ``optimized`` — the recipe's
step names; a directory whose candidate has the same pass, config and parent is reused, as in `slimship run`),
``results.json`` (machine-readable; schema ``slimship.quickstart/1``) and ``summary.md``.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimship._util import write_json_atomic
from slimship.pipeline.recipe import load_recipe
from slimship.pipeline.runner import execute_steps, reuse_candidate

if TYPE_CHECKING:
    from slimship.candidate import Candidate

SCHEMA = "slimship.quickstart/1"
RECIPE = "quickstart"


def quickstart(
    workload_ref: str = "minilm",
    out_dir: str | Path = "runs/quickstart-minilm",
    limit: int | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    seq_len: int = 128,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    memory: bool = True,
    data: str | None = None,
    log: Any = print,
    command: str | None = None,
) -> dict[str, Any]:
    from slimship.candidate import load_candidate, original_candidate
    from slimship.machine import default_threads
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate
    from slimship.passes import PASSES
    from slimship.recipes import builtin_recipes
    from slimship.report.summary import render_summary
    from slimship.workload import resolve_workload

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or default_threads()
    recipe = load_recipe(builtin_recipes()[RECIPE])
    workload = resolve_workload(workload_ref, data=data)
    log(
        f"workload {workload.name}"
        + (f": {workload.description}" if workload.name not in workload.description else "")
    )

    orig_dir = out / "original"
    original = reuse_candidate(orig_dir, workload=workload.ref)
    if original is None:
        log("saving the original model")
        original = original_candidate(workload, orig_dir)
    # a step whose pass takes another format than the model has by then is omitted (export, for an ONNX model)
    passes, fmt = [], original.format
    for step in recipe.passes:
        cls = PASSES[step.pass_name]
        passes.append(step.model_copy(update={"skip": cls.input_format != fmt}))
        fmt = fmt if cls.input_format != fmt else cls.output_format
    steps = execute_steps(
        passes, recipe.step_labels(), workload, original, out, log, layout="flat", raise_errors=True
    )
    chain = [original] + [load_candidate(s["candidate"]) for s in steps if s["status"] in ("ran", "reused")]
    optimized = chain[-1]

    targets: list[tuple[str, Candidate, str]] = []
    if original.format == "torch":
        targets.append(("pytorch-fp32", original, "torch"))
        targets.append(("ort-fp32", chain[1], "onnxruntime"))
    else:
        targets.append(("ort-original", original, "onnxruntime"))
    targets.append(("ort-fp32-optimized", optimized, "onnxruntime"))

    evaluations: dict[str, dict[str, Any]] = {}
    for label, cand, backend in targets:
        log(f"evaluating {label}")
        evaluations[label] = evaluate(cand, workload, backend, threads, limit)
    log(f"benchmarking {', '.join(t[0] for t in targets)} interleaved at batch sizes {list(batch_sizes)}")
    bench_result = bench(
        [BenchTarget(label, cand, backend) for label, cand, backend in targets],
        workload,
        batch_sizes=batch_sizes,
        seq_len=seq_len,
        runs=runs,
        warmup=warmup,
        threads=threads,
        baseline=targets[0][0],
        memory=memory,
    )
    for warning in bench_result.get("warnings", []):
        log(f"WARNING: {warning}")
    for c in chain:
        for note in c.info.get("notes", []) + ([c.info["import"]["note"]] if c.info.get("import") else []):
            log(f"{c.name}: {note}")
    best = targets[-1][0]
    best_rows = next(c for c in bench_result["candidates"] if c["label"] == best)["results"]
    speed = ", ".join(f"{r['speedup_vs_baseline_p50']:.2f}x at batch {r['batch_size']}" for r in best_rows)
    pm = workload.primary_metric
    headline = f"{best} vs {targets[0][0]}: {speed} (p50 latency)"
    if pm and pm in evaluations[best]["quality"] and pm in evaluations[targets[0][0]]["quality"]:
        delta = evaluations[best]["quality"][pm] - evaluations[targets[0][0]]["quality"][pm]
        headline += f"; {pm} {evaluations[best]['quality'][pm]:.2f} ({delta:+.2f})"
    fid = evaluations[best]["fidelity"]
    if "cosine_mean" in fid:
        headline += f"; cosine to the original mean {fid['cosine_mean']:.7f}, min {fid['cosine_min']:.7f}"
    elif "top1_agreement" in fid:
        headline += f"; top-1 agreement with the original {fid['top1_agreement'] * 100:.2f}%"
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "workload": workload.describe() | {"ref": workload.ref},
        "headline": headline,
        "limit": limit,
        "candidates": [
            {
                "name": c.name,
                "id": c.id,
                "path": str(c.path),
                "format": c.format,
                "parent_id": c.parent_id,
                "pass_name": c.pass_name,
                "pass_config": c.pass_config,
                "size_bytes": c.size_bytes,
                "verification": c.info.get("verification"),
                "exporter": c.info.get("exporter"),
                "exporter_attempts": c.info.get("exporter_attempts"),
                "fused_operators": c.info.get("fused_operators"),
                "notes": c.info.get("notes", []),
                "import": c.info.get("import"),
            }
            for c in chain
        ],
        "evaluations": evaluations,
        "bench": bench_result,
        "seconds": round(time.perf_counter() - t_start, 1),
        "command": command or " ".join(shlex.quote(a) for a in ["slimship", *sys.argv[1:]]),
    }
    write_json_atomic(out / "results.json", results)
    (out / "summary.md").write_text(render_summary(results))
    return results
