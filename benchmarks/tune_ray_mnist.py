"""Search throughput: `slimship tune examples/recipes/mnist-tune.yaml` on the local executor against the Ray
executor with 1 trial at a time (2 CPUs each) and 2 at a time (1 CPU each), same seed, same trial budget.

    .venv/bin/python benchmarks/tune_ray_mnist.py [--trials 4]

Each search starts from an empty search directory (nothing reused; the trained original comes from the cache,
warmed first) and the Ray runs start their own local instance (127.0.0.1), so Ray's start-up is in the wall
time. Writes benchmarks/results/tune_ray_mnist.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "recipes" / "mnist-tune.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    args = ap.parse_args()
    from slimship.machine import machine_info, physical_cores
    from slimship.pipeline.search import executor_for, tune_recipe
    from slimship.workload import resolve_workload

    resolve_workload("mnist")  # trains (or loads) the cached original once, outside the timed runs
    runs = {
        "local": dict(name="local"),
        "ray, 1 at a time (2 CPUs each)": dict(name="ray", trial_cpus=2, concurrent_trials=1),
        "ray, 2 at a time (1 CPU each)": dict(name="ray", trial_cpus=1, concurrent_trials=2),
    }
    results = {}
    scratch = Path(tempfile.mkdtemp(prefix="tune-ray-bench-"))
    for label, opts in runs.items():
        out = scratch / label.split(",")[0].replace(" ", "") / str(len(results))
        name = opts.pop("name")
        t0 = time.perf_counter()
        res = tune_recipe(RECIPE, out, trials=args.trials, executor=executor_for(name, seed=0, **opts))
        wall = time.perf_counter() - t0
        rows = sorted(res["trials"], key=lambda t: t["trial"])
        results[label] = {
            "wall_seconds": round(wall, 1),
            "evaluations": res["evaluations"],
            "seconds_per_candidate": round(wall / max(1, res["evaluations"]), 1),
            "trial_seconds": [t.get("seconds") for t in rows if t.get("reused_from") is None],
            "proposals": [t["params"] for t in rows],
            "rows": [
                {
                    k: t.get(k)
                    for k in ("trial", "status", "reused_from", "size_bytes", "quality", "speedup", "pareto")
                }
                for t in rows
            ],
            "stopped": res["stopped"],
        }
        print(label, results[label]["wall_seconds"], "s")
    shutil.rmtree(scratch, ignore_errors=True)
    local, ray1 = results["local"], results["ray, 1 at a time (2 CPUs each)"]
    same = [(r["trial"], r["status"], r["size_bytes"], r["quality"]) for r in local["rows"]] == [
        (r["trial"], r["status"], r["size_bytes"], r["quality"]) for r in ray1["rows"]
    ]
    record = {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "trials": args.trials,
        "machine": machine_info(physical_cores()),
        "runs": results,
        "ray_1_at_a_time_matches_local": same,
    }
    dest = ROOT / "benchmarks" / "results"
    (dest / "tune_ray_mnist.json").write_text(json.dumps(record, indent=1, default=str))
    base = local["wall_seconds"]
    lines = [
        f"# Search throughput: local vs Ray executor (`{record['recipe']}`, {args.trials} trials, seed 0)",
        "",
        f"From `benchmarks/tune_ray_mnist.py` on {record['machine'].get('cpu_model', 'this machine')}, "
        f"{physical_cores()} cores, one run each (the machine is shared: ratios move by ~10%).",
        "",
        "| executor | wall s | candidates | s / candidate | vs local | trial seconds |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['wall_seconds']} | {r['evaluations']} | {r['seconds_per_candidate']} | "
            f"{base / r['wall_seconds']:.2f}x | {', '.join(str(s) for s in r['trial_seconds'])} |"
        )
    lines += [
        "",
        f"Ray 1-at-a-time proposals, sizes and accuracies equal the local run's: **{same}** "
        "(speed-ups are timings and differ run to run).",
    ]
    (dest / "tune_ray_mnist.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
