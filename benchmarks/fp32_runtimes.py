"""PyTorch fp32 vs ONNX Runtime fp32 (exported, and graph-optimised) on one workload, plus the two
exporters side by side. Produces the committed files benchmarks/results/<workload>_fp32.{json,md}.

    .venv/bin/python benchmarks/fp32_runtimes.py --workload minilm     # ≈ 10 min on 2 cores
    .venv/bin/python benchmarks/fp32_runtimes.py --workload mnist      # ≈ 1 min

Everything is timed interleaved in one process against the PyTorch baseline (ratios are the result;
absolute times drift with the machine's load). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="minilm", help="built-in workload (default: minilm)")
    parser.add_argument(
        "--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default: 1,8,32)"
    )
    parser.add_argument("--runs", type=int, default=30, help="timed runs per candidate and batch size (≥ 30)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the result files go")
    args = parser.parse_args()

    from slimship.measure.bench import BenchTarget, bench
    from slimship.passes import ExportConfig, GraphOptimizeConfig, export, optimize_graph
    from slimship.pipeline.quickstart import quickstart
    from slimship.report.summary import bench_table, render_summary
    from slimship.workload import resolve_workload

    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    run_dir = HERE / "runs" / f"{args.workload}_fp32"
    command = f"python benchmarks/fp32_runtimes.py --workload {args.workload} --batch-sizes {args.batch_sizes} --runs {args.runs}"
    results = quickstart(
        args.workload,
        run_dir,
        batch_sizes=batch_sizes,
        runs=args.runs,
        command=command,
        log=lambda m: print(f"· {m}", file=sys.stderr),
    )

    # the two exporters, each optimised, timed against each other in one interleaved run
    workload = resolve_workload(args.workload)
    from slimship.candidate import load_candidate

    original = load_candidate(run_dir / "original")
    dynamo_opt = load_candidate(run_dir / "optimized")
    ts = export(original, workload, ExportConfig(exporter="torchscript"), run_dir / "exported-torchscript")
    ts_opt = optimize_graph(ts, workload, GraphOptimizeConfig(), run_dir / "optimized-torchscript")
    exporters = bench(
        [
            BenchTarget("dynamo+optimize", dynamo_opt, "onnxruntime"),
            BenchTarget("torchscript+optimize", ts_opt, "onnxruntime"),
        ],
        workload,
        batch_sizes=batch_sizes,
        runs=args.runs,
        memory=False,
    )
    results["exporter_comparison"] = exporters
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.workload}_fp32.json").write_text(json.dumps(results, indent=2) + "\n")
    md = render_summary(results) + (
        "\n## Exporters (both graph-optimised, interleaved)\n\n" + bench_table(exporters) + "\n\n"
        f"TorchScript export ops after optimisation: {sum(ts_opt.info['ops_after'].values())}, "
        f"dynamo: {sum(dynamo_opt.info['ops_after'].values())}.\n"
    )
    (args.out / f"{args.workload}_fp32.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
