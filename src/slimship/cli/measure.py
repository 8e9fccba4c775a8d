"""`slimship workloads | info | eval | bench | verify | layers`: what there is to work with and how well a candidate does —
the built-in workloads, this machine, a candidate's quality and fidelity, interleaved timing, a model's layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from slimship.cli._app import (
    DataOpt,
    ThreadsOpt,
    TorchTargetArg,
    WorkloadOpt,
    app,
    cli_workload,
    console,
    load_torch_target,
    parse_ints,
    resolve_target,
)


@app.command()
def workloads(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the built-in workloads (and how to bring your own).

    Example: `slimship workloads --json`
    """
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
    typer.echo(
        "Bring your own: -w path/to/file.py:build | -w hf:path/to/model_dir | -w model.onnx --data inputs.npz"
    )


def int8_settings_lines(cls: str) -> list[str]:
    """What slimship's deployment settings do for int8 graphs on this CPU class, in words."""
    import onnx
    from onnx import TensorProto, helper

    from slimship.runtime.settings import decide_settings

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "probe",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 1]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [1, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
    )
    s = decide_settings(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]))
    entries = ", ".join(f"{k}={v}" for k, v in s.session_config.items()) or "none needed"
    return [f"ONNX Runtime session entries for int8 models here: {entries}"] + [
        f"  {k}: {v}" for k, v in s.reasons.items()
    ]


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """This machine: CPU, cores, the ISA flags that decide int8 speed, library versions.

    Example: `slimship info --json > machine.json`
    """
    from slimship.machine import machine_info

    m = machine_info()
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(f"cpu            {m['cpu_model']} ({m['arch']})")
    typer.echo(
        f"cores          {m['physical_cores']} physical, {m['logical_cpus']} logical; {m['memory_gib']} GiB RAM"
    )
    typer.echo("isa            " + "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in m["isa"].items()))
    typer.echo(f"int8 kernels   {m['int8_kernels']}")
    typer.echo(f"cpu class      {m['cpu_class']}")
    for line in int8_settings_lines(m["cpu_class"]):
        typer.echo(f"int8 settings  {line}")
    typer.echo("packages       " + "  ".join(f"{k} {v}" for k, v in m["packages"].items() if v))


@app.command("eval")
def eval_cmd(
    target: Annotated[
        str,
        typer.Argument(
            help="`original` (the workload's own model, saved once under the cache dir), a candidate directory, or a .onnx file; append @torch or @onnxruntime to pick the runtime."
        ),
    ],
    workload: WorkloadOpt = "minilm",
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Evaluate on the first N samples (minilm: N articles) for a quick look."),
    ] = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="Also write the result as JSON to this file.")
    ] = None,
    data: DataOpt = None,
) -> None:
    """Task quality and fidelity to the original model for one candidate.

    Example: `slimship eval runs/mnist/optimized -w mnist`
    """
    from slimship._util import write_json_atomic
    from slimship.measure.evaluate import evaluate

    w = cli_workload(workload, data)
    _label, cand, backend = resolve_target(target, w, "")
    result = evaluate(cand, w, backend, threads, limit)
    for section in ("quality", "fidelity"):
        typer.echo(f"{section:9s} " + "  ".join(f"{k}={v:.6g}" for k, v in result[section].items()))
    typer.echo(f"samples   {result['samples']} on {result['runtime']['backend']} ({result['seconds']} s)")
    if json_out:
        write_json_atomic(json_out, result)


@app.command()
def bench(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="Candidates as `[LABEL=]TARGET[@RUNTIME]`; TARGET is `original` (the workload's own model), a candidate directory or a .onnx file. Example: `torch=original@torch ort=runs/export/optimized`."
        ),
    ],
    workload: WorkloadOpt = "minilm",
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", "-b", help="Comma-separated batch sizes.")
    ] = "1,8,32",
    seq_len: Annotated[
        int,
        typer.Option(
            min=1, help="Sequence length for text workloads (inputs are real text, truncated/padded to it)."
        ),
    ] = 128,
    runs: Annotated[int, typer.Option(min=30, help="Timed runs per candidate and batch size (≥ 30).")] = 30,
    warmup: Annotated[
        int,
        typer.Option(
            min=1,
            help="Untimed warm-up runs per candidate and batch size (at most; two suffice once they took 1 s).",
        ),
    ] = 5,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            min=0.001,
            help="Seconds of timed calls per candidate and batch size after which slow batches may stop early "
            "(never under 10 rounds; such rows say runs_cut_by_time_budget and their p90/p99 are rough). "
            "Default: no budget, ≥ --runs rounds.",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    baseline: Annotated[
        str | None, typer.Option(help="Label that ratios are computed against (default: the first).")
    ] = None,
    memory: Annotated[
        bool,
        typer.Option("--memory/--no-memory", help="Measure peak RSS of each candidate in a fresh process."),
    ] = True,
    json_out: Annotated[
        Path | None,
        typer.Option("--json-out", help="Write the full result (with machine info) as JSON here."),
    ] = None,
    energy_seconds: Annotated[
        float | None,
        typer.Option(
            min=60,
            help="Also measure joules per inference from the CPU's RAPL counters over a window of this many seconds "
            "(≥ 60) per candidate at the largest batch; hosts without /sys/class/powercap (most VMs) say so instead.",
        ),
    ] = None,
    data: DataOpt = None,
) -> None:
    """Time candidates interleaved (A B A B …): latency percentiles, throughput, size, peak memory, ratios.

    Example: `slimship bench pytorch=original@torch ort=runs/mnist/optimized -w mnist -b 1,32 --json-out runs/mnist/bench.json`
    """
    from rich.console import Console
    from rich.table import Table

    from slimship._util import write_json_atomic
    from slimship.measure.bench import BenchTarget
    from slimship.measure.bench import bench as run_bench

    w = cli_workload(workload, data)
    resolved = [resolve_target(t, w, "") for t in targets]
    result = run_bench(
        [BenchTarget(label, cand, backend) for label, cand, backend in resolved],
        w,
        batch_sizes=parse_ints(batch_sizes, "--batch-sizes"),
        seq_len=seq_len,
        runs=runs,
        warmup=warmup,
        threads=threads,
        baseline=baseline,
        memory=memory,
        energy_seconds=energy_seconds,
        max_seconds=time_budget,
    )
    from slimship.report.summary import fmt_bytes, fmt_ms

    table = Table(
        title=f"{w.name}: ≥ {runs} interleaved runs per row (runs column), threads {result['settings']['threads']}"
    )
    for col in (
        "candidate",
        "batch",
        "runs",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "items/s",
        "CPU ms/inf",
        f"× {result['baseline']}",
        "size",
        "peak RSS MB",
    ):
        table.add_column(col, justify="right" if col != "candidate" else "left", overflow="fold")
    for c in result["candidates"]:
        for r in c["results"]:
            lat = r["latency_ms"]
            table.add_row(
                c["label"],
                str(r["batch_size"]),
                str(r["runs"]),
                fmt_ms(lat["p50"]),
                fmt_ms(lat["p90"]),
                fmt_ms(lat["p99"]),
                f"{r['throughput_items_per_s']:.0f}",
                f"{r['cpu_ms_per_inference']:.2f}",
                f"{r['speedup_vs_baseline_p50']:.2f}",
                fmt_bytes(c["file_size_bytes"]),
                f"{c['memory']['peak_rss_mb']:.0f}" if c.get("memory", {}).get("peak_rss_mb") else "—",
            )
    Console(width=max(120, Console().width)).print(table)
    for warning in result.get("warnings", []):
        console().print(f"[bold yellow]WARNING:[/bold yellow] {warning}", highlight=False)
    if json_out:
        write_json_atomic(json_out, result)
        typer.echo(f"wrote {json_out}")


@app.command()
def layers(
    target: TorchTargetArg = "original",
    workload: WorkloadOpt = "mnist",
    data: DataOpt = None,
) -> None:
    """List a PyTorch model's Linear / Conv / attention layers: the names that --ignore, --layer-ratio, --rank,
    --layers and --layer-bits take, with shapes and parameter counts.

    Example: `slimship layers -w minilm`
    """
    import torch

    from slimship.candidate import load_torch_model

    w, cand = load_torch_target(target, workload, data)
    model = load_torch_model(cand, w)
    typer.echo(f"{'layer':58s} {'type':18s} {'shape':>18s} {'params':>10s}")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d):
            shape = "x".join(str(d) for d in mod.weight.shape)
            n = sum(p.numel() for p in mod.parameters(recurse=False))
            typer.echo(f"{name:58s} {type(mod).__name__:18s} {shape:>18s} {n:>10,}")
        elif hasattr(mod, "num_attention_heads"):
            typer.echo(f"{name:58s} {'attention':18s} {str(mod.num_attention_heads) + ' heads':>18s}")


@app.command()
def verify(
    target: Annotated[
        str, typer.Argument(help="An ONNX candidate directory (what a pass or `slimship run` wrote).")
    ],
    add_probe: Annotated[
        bool,
        typer.Option(
            "--add-probe",
            help="(Re)make the candidate's probe on this machine first — real inputs from the workload, the original "
            "model's outputs, the fidelity the candidate has on them here — e.g. for a candidate made before probes existed.",
        ),
    ] = False,
    workload: Annotated[
        str | None,
        typer.Option(
            "--workload",
            "-w",
            help="The candidate's workload, needed only with --add-probe (default: the one it records).",
        ),
    ] = None,
    data: DataOpt = None,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the check as JSON.")] = False,
) -> None:
    """Re-verify a candidate on THIS host: its artifact's sha256, then its probe run with the deployment settings it
    records (precision entries re-decided for this CPU), against the fidelity recorded where it was made. Exit code 0
    when it holds, 1 when it falls short (the message names both CPU classes), 2 for a bad candidate.

    Example: `slimship verify runs/minilm-fast/steps/02-quantize-dynamic-… ` or `slimship verify DIR --add-probe -w minilm`
    """
    from slimship.candidate import load_candidate
    from slimship.measure.probe import add_probe as make_probe
    from slimship.measure.probe import check_probe
    from slimship.runtime.settings import settings_for_candidate

    cand = load_candidate(target)
    if cand.format not in ("onnx", "openvino", "executorch"):
        raise typer.BadParameter(
            f"{target} is a {cand.format} candidate; verify checks ONNX, OpenVINO and ExecuTorch candidates (export it first)"
        )
    if add_probe:
        from slimship.workload import resolve_workload

        w = resolve_workload(workload, data=data) if workload else resolve_workload(cand.workload)
        cand = make_probe(cand, w)
        typer.echo(
            f"probe written: {cand.path / cand.info['probe']['file']} ({cand.info['probe']['samples']} samples)"
        )
    settings, notes = settings_for_candidate(cand.info, cand.artifact_path)
    rt = _probe_runtime(cand, settings, threads or settings.intra_op_threads or _cores())
    check = check_probe(cand, rt.predict, settings.session_config)
    if as_json:
        typer.echo(json.dumps({**check.to_json(), "settings_notes": notes}, indent=2))
    else:
        typer.echo(f"settings  {settings.describe()}" + (f" ({'; '.join(notes)})" if notes else ""))
        typer.echo(check.summary())
    raise typer.Exit(0 if check.passed else 1)


def _probe_runtime(cand: Any, settings: Any, threads: int) -> Any:
    """The candidate's runtime with exactly its deployment settings (ONNX Runtime, OpenVINO or ExecuTorch)."""
    if settings.runtime == "executorch":
        from slimship.runtime import create_runtime
        from slimship.workload import resolve_workload

        return create_runtime(cand, resolve_workload(cand.workload), threads=threads)
    if settings.runtime == "openvino":
        from slimship.runtime.openvino_backend import OpenVINORuntime

        return OpenVINORuntime(cand.artifact_path, threads, settings=settings)
    from slimship.runtime.ort_backend import OrtRuntime

    return OrtRuntime(cand.artifact_path, threads, settings=settings)


def _cores() -> int:
    from slimship.machine import default_threads

    return default_threads()
