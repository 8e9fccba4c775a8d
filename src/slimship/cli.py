"""`slimship <verb>`: the command-line entry point. Only this module and the server configure logging."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slimship.errors import SlimshipError

app = typer.Typer(
    name="slimship",
    help="Compress, convert, measure and ship trained models. Start with `slimship quickstart`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

WorkloadOpt = Annotated[
    str,
    typer.Option(
        "--workload",
        "-w",
        help="Built-in name (minilm, mnist, digits), path/to/file.py:build (a factory), hf:path/to/model_dir, "
        "or path/to/model.onnx (with --data). Example: `-w mnist`.",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="For an ONNX workload: an .npz with one array per model input (batch first) and optional `labels`."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", "-t", min=1, help="Intra-op threads for every runtime (default: physical cores)."),
]


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} is a comma-separated list of integers, e.g. 1,8,32; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{what} must be positive integers, e.g. 1,8,32; got {text!r}")
    return values


def _resolve_target(spec: str, workload: Any, default_label: str) -> tuple[str, Any, str]:
    """`[LABEL=]TARGET[@RUNTIME]` → (label, candidate, backend). TARGET: `original`, a candidate dir, or a .onnx file."""
    from slimship._util import cache_dir
    from slimship.candidate import Candidate, load_candidate, original_candidate
    from slimship.errors import CandidateError, ConfigError
    from slimship.runtime import BACKENDS

    label, sep, rest = spec.partition("=")
    if not sep:
        label, rest = "", spec
    target, at, backend = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if at and backend not in BACKENDS:
        raise ConfigError(f"unknown runtime {backend!r} in {spec!r}; use one of {list(BACKENDS)}, e.g. original@torch")
    if target == "original":
        orig_dir = cache_dir() / "originals" / f"{workload.name.replace('/', '_').replace(':', '_')[:60]}-{workload.fingerprint()}"
        cand: Candidate = load_candidate(orig_dir) if (orig_dir / "candidate.json").exists() else original_candidate(workload, orig_dir)
    elif target.endswith(".onnx"):
        path = Path(target)
        if not path.is_file():
            raise CandidateError(f"{path} does not exist")
        from slimship._util import sha256_file

        cand = Candidate(
            path=path.parent.resolve(), id=f"file-{sha256_file(path)[:12]}", name=path.stem, format="onnx",
            artifact=path.name, workload=dict(workload.ref), artifact_sha256=sha256_file(path),
        )
    else:
        cand = load_candidate(target)
    backend = backend or ("torch" if cand.format == "torch" else "onnxruntime")
    return label or default_label or f"{cand.name}@{backend}", cand, backend


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages to stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time


@app.command()
def workloads(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """List the built-in workloads (and how to bring your own)."""
    from rich.console import Console
    from rich.table import Table

    from slimship.workload import list_workloads

    items = list_workloads()
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    table = Table(title="built-in workloads")
    table.add_column("name")
    table.add_column("what")
    for w in items:
        table.add_row(w["name"], w["description"])
    Console().print(table)
    typer.echo("Bring your own: -w path/to/file.py:build | -w hf:path/to/model_dir | -w model.onnx --data inputs.npz")


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """This machine: CPU, cores, the ISA flags that decide int8 speed, library versions."""
    from slimship.machine import machine_info

    m = machine_info()
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(f"cpu            {m['cpu_model']} ({m['arch']})")
    typer.echo(f"cores          {m['physical_cores']} physical, {m['logical_cpus']} logical; {m['memory_gib']} GiB RAM")
    typer.echo("isa            " + "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in m["isa"].items()))
    typer.echo(f"int8 kernels   {m['int8_kernels']}")
    typer.echo("packages       " + "  ".join(f"{k} {v}" for k, v in m["packages"].items() if v))


@app.command()
def passes() -> None:
    """List the passes, what each takes and makes, and its config with defaults."""
    from slimship.passes import list_passes

    for p in list_passes():
        typer.echo(f"{p['name']:10s} {p['input']} → {p['output']}  {p['summary']}")
        typer.echo(f"{'':10s} config: {json.dumps(p['config'], default=str)}")


@app.command()
def export(
    workload: WorkloadOpt = "minilm",
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the candidates (original/, exported/, optimized/).")] = Path("runs/export"),
    opset: Annotated[int, typer.Option(help="ONNX opset (14–21).")] = 18,
    exporter: Annotated[str, typer.Option(help="auto (dynamo, then TorchScript), dynamo or torchscript.")] = "auto",
    optimize: Annotated[bool, typer.Option("--optimize/--no-optimize", help="Also run the graph-optimisation pass (transformer fusions for BERT-family models).")] = True,
    level: Annotated[str, typer.Option(help="Graph optimisation level saved into the artifact: basic, extended, all (this CPU only).")] = "extended",
    data: DataOpt = None,
) -> None:
    """Export a workload's model to ONNX, verify it against PyTorch on real inputs, optionally optimise.

    Example: `slimship export -w mnist -o runs/mnist`
    """
    from slimship.candidate import original_candidate
    from slimship.passes import ExportConfig, GraphOptimizeConfig, optimize_graph
    from slimship.passes import export as export_pass
    from slimship.workload import resolve_workload

    w = resolve_workload(workload, data=data)
    orig = original_candidate(w, out / "original")
    cfg = ExportConfig.parse({"opset": opset, "exporter": exporter})
    cand = export_pass(orig, w, cfg, out / "exported")  # type: ignore[arg-type]
    _print_candidate(cand)
    if optimize:
        opt = optimize_graph(cand, w, GraphOptimizeConfig.parse({"level": level}), out / "optimized")  # type: ignore[arg-type]
        _print_candidate(opt)


def _print_candidate(c: Any) -> None:
    ver = c.info.get("verification", {})
    figures = "; ".join(
        f"{name}: max|Δ| {o['max_abs_error']:.2e}, cosine min {o['cosine_min']:.7f}" for name, o in ver.get("outputs", {}).items()
    )
    extra = f" exporter={c.info['exporter']}" if c.info.get("exporter") else ""
    if c.info.get("fused_operators"):
        extra += f" fused={c.info['fused_operators']}"
    typer.echo(f"{c.name}: {c.path / c.artifact} ({c.size_bytes / 1e6:.1f} MB){extra}")
    typer.echo(f"  verified on {ver.get('samples')} real samples: {figures}")


@app.command("eval")
def eval_cmd(
    target: Annotated[str, typer.Argument(help="`original`, a candidate directory, or a .onnx file; append @torch or @onnxruntime to pick the runtime.")],
    workload: WorkloadOpt = "minilm",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate on the first N samples (minilm: N articles) for a quick look.")] = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the result as JSON to this file.")] = None,
    data: DataOpt = None,
) -> None:
    """Task quality and fidelity to the original model for one candidate.

    Example: `slimship eval runs/export/optimized -w minilm --limit 200`
    """
    from slimship._util import write_json_atomic
    from slimship.measure.evaluate import evaluate
    from slimship.workload import resolve_workload

    w = resolve_workload(workload, data=data)
    _label, cand, backend = _resolve_target(target, w, "")
    result = evaluate(cand, w, backend, threads, limit)
    for section in ("quality", "fidelity"):
        typer.echo(f"{section:9s} " + "  ".join(f"{k}={v:.6g}" for k, v in result[section].items()))
    typer.echo(f"samples   {result['samples']} on {result['runtime']['backend']} ({result['seconds']} s)")
    if json_out:
        write_json_atomic(json_out, result)


@app.command()
def bench(
    targets: Annotated[list[str], typer.Argument(help="Candidates as `[LABEL=]TARGET[@RUNTIME]`; TARGET is `original`, a candidate directory or a .onnx file. Example: `torch=original@torch ort=runs/export/optimized`.")],
    workload: WorkloadOpt = "minilm",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-b", help="Comma-separated batch sizes.")] = "1,8,32",
    seq_len: Annotated[int, typer.Option(min=1, help="Sequence length for text workloads (inputs are real text, truncated/padded to it).")] = 128,
    runs: Annotated[int, typer.Option(min=30, help="Timed runs per candidate and batch size (≥ 30).")] = 30,
    warmup: Annotated[int, typer.Option(min=1, help="Untimed warm-up runs per candidate and batch size.")] = 5,
    threads: ThreadsOpt = None,
    baseline: Annotated[str | None, typer.Option(help="Label that ratios are computed against (default: the first).")] = None,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure peak RSS of each candidate in a fresh process.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Write the full result (with machine info) as JSON here.")] = None,
    data: DataOpt = None,
) -> None:
    """Time candidates interleaved (A B A B …): latency percentiles, throughput, size, peak memory, ratios.

    Example: `slimship bench pytorch=original@torch ort=runs/export/optimized -w minilm -b 1,32 --json-out bench.json`
    """
    from rich.console import Console
    from rich.table import Table

    from slimship._util import write_json_atomic
    from slimship.measure.bench import BenchTarget
    from slimship.measure.bench import bench as run_bench
    from slimship.workload import resolve_workload

    w = resolve_workload(workload, data=data)
    resolved = [_resolve_target(t, w, "") for t in targets]
    result = run_bench(
        [BenchTarget(label, cand, backend) for label, cand, backend in resolved],
        w,
        batch_sizes=_parse_ints(batch_sizes, "--batch-sizes"),
        seq_len=seq_len,
        runs=runs,
        warmup=warmup,
        threads=threads,
        baseline=baseline,
        memory=memory,
    )
    table = Table(title=f"{w.name}: {runs} interleaved runs, threads {result['settings']['threads']}")
    for col in ("candidate", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", f"× {result['baseline']}", "MB", "peak RSS MB"):
        table.add_column(col, justify="right" if col != "candidate" else "left")
    for c in result["candidates"]:
        for r in c["results"]:
            lat = r["latency_ms"]
            table.add_row(
                c["label"], str(r["batch_size"]), f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}",
                f"{r['throughput_items_per_s']:.1f}", f"{r['speedup_vs_baseline_p50']:.2f}", f"{c['file_size_mb']:.1f}",
                f"{c['memory']['peak_rss_mb']:.0f}" if c.get("memory") else "—",
            )
    Console().print(table)
    if json_out:
        write_json_atomic(json_out, result)
        typer.echo(f"wrote {json_out}")


@app.command()
def quickstart(
    workload: WorkloadOpt = "minilm",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/quickstart-<workload>).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate on the first N samples only (minilm: N articles). Default: all.")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-b", help="Comma-separated batch sizes to benchmark.")] = "1,32",
    seq_len: Annotated[int, typer.Option(min=1, help="Sequence length for text benchmarks.")] = 128,
    runs: Annotated[int, typer.Option(min=30, help="Timed runs per candidate and batch size.")] = 30,
    warmup: Annotated[int, typer.Option(min=1, help="Warm-up runs per candidate and batch size.")] = 5,
    threads: ThreadsOpt = None,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure peak RSS per candidate in a fresh process.")] = True,
    data: DataOpt = None,
) -> None:
    """The main job: export → optimise → evaluate → benchmark PyTorch fp32 against ONNX Runtime fp32.

    Writes `results.json` and `summary.md` into the run directory. Example: `slimship quickstart -w mnist`
    """
    from slimship.pipeline.quickstart import quickstart as run_quickstart

    out = out or Path("runs") / f"quickstart-{workload.replace('/', '_').replace(':', '_')}"
    console = _console()
    results = run_quickstart(
        workload,
        out,
        limit=limit,
        batch_sizes=_parse_ints(batch_sizes, "--batch-sizes"),
        seq_len=seq_len,
        runs=runs,
        warmup=warmup,
        threads=threads,
        memory=memory,
        data=data,
        log=lambda msg: console.print(f"[bold]·[/bold] {msg}"),
    )
    typer.echo((out / "summary.md").read_text())
    typer.echo(results["headline"])
    typer.echo(f"results: {out / 'results.json'}\nsummary: {out / 'summary.md'}")


def main() -> None:
    try:
        app()
    except SlimshipError as err:
        _console().print(f"[bold red]error:[/bold red] {err}", highlight=False, markup=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
