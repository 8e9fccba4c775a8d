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
    typer.Option(
        "--data",
        help="For an ONNX workload: an .npz with one array per model input (batch first) and optional `labels`.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", "-t", min=1, help="Intra-op threads for every runtime (default: physical cores)."
    ),
]


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{what} is a comma-separated list of integers, e.g. 1,8,32; got {text!r}"
        ) from None
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
        raise ConfigError(
            f"unknown runtime {backend!r} in {spec!r}; use one of {list(BACKENDS)}, e.g. original@torch"
        )
    if target == "original":
        orig_dir = (
            cache_dir()
            / "originals"
            / f"{workload.name.replace('/', '_').replace(':', '_')[:60]}-{workload.fingerprint()}"
        )
        cand: Candidate = (
            load_candidate(orig_dir)
            if (orig_dir / "candidate.json").exists()
            else original_candidate(workload, orig_dir)
        )
    elif target.endswith(".onnx"):
        path = Path(target)
        if not path.is_file():
            raise CandidateError(f"{path} does not exist")
        from slimship._util import sha256_file

        cand = Candidate(
            path=path.parent.resolve(),
            id=f"file-{sha256_file(path)[:12]}",
            name=path.stem,
            format="onnx",
            artifact=path.name,
            workload=dict(workload.ref),
            artifact_sha256=sha256_file(path),
        )
    else:
        cand = load_candidate(target)
    backend = backend or ("torch" if cand.format == "torch" else "onnxruntime")
    return label or default_label or f"{cand.name}@{backend}", cand, backend


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time


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


@app.command()
def passes() -> None:
    """List the passes, what each takes and makes, and its config with defaults.

    Example: `slimship passes`
    """
    from slimship.passes import list_passes

    for p in list_passes():
        typer.echo(f"{p['name']:10s} {p['input']} → {p['output']}  {p['summary']}")
        typer.echo(f"{'':10s} config: {json.dumps(p['config'], default=str)}")


@app.command()
def export(
    workload: WorkloadOpt = "minilm",
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Directory for the candidates (original/, exported/, optimized/)."),
    ] = Path("runs/export"),
    opset: Annotated[int, typer.Option(help="ONNX opset (14–21).")] = 18,
    exporter: Annotated[
        str, typer.Option(help="auto (dynamo, then TorchScript), dynamo or torchscript.")
    ] = "auto",
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize/--no-optimize",
            help="Also run the graph-optimisation pass (transformer fusions for BERT-family models).",
        ),
    ] = True,
    level: Annotated[
        str,
        typer.Option(
            help="Graph optimisation level saved into the artifact: basic, extended, all (this CPU only)."
        ),
    ] = "extended",
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
        f"{name}: max|Δ| {o['max_abs_error']:.2e}, cosine min {o['cosine_min']:.7f}"
        for name, o in ver.get("outputs", {}).items()
    )
    extra = f" exporter={c.info['exporter']}" if c.info.get("exporter") else ""
    if c.info.get("fused_operators"):
        extra += f" fused={c.info['fused_operators']}"
    typer.echo(f"{c.name}: {c.path / c.artifact} ({c.size_bytes / 1e6:.1f} MB){extra}")
    typer.echo(f"  verified on {ver.get('samples')} real samples: {figures}")


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
        int, typer.Option(min=1, help="Untimed warm-up runs per candidate and batch size.")
    ] = 5,
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
                f"{c['memory']['peak_rss_mb']:.0f}" if c.get("memory") else "—",
            )
    Console(width=max(120, Console().width)).print(table)
    if json_out:
        write_json_atomic(json_out, result)
        typer.echo(f"wrote {json_out}")


@app.command()
def quantize(
    target: Annotated[
        str,
        typer.Argument(
            help="The ONNX candidate to quantize: a candidate directory (e.g. runs/export/exported)."
        ),
    ],
    workload: WorkloadOpt = "minilm",
    mode: Annotated[
        str,
        typer.Option(
            help="dynamic (INT8 weights, run-time activation scales), static (INT8 QDQ, calibrated), int4 (weight-only MatMulNBits), qat (fine-tune a PyTorch candidate with fake quantization, export INT8 QDQ)."
        ),
    ] = "dynamic",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Directory for the new candidate (default: beside TARGET, named after the mode).",
        ),
    ] = None,
    per_channel: Annotated[
        bool,
        typer.Option(
            "--per-channel/--per-tensor",
            help="INT8 weight scales per output channel (fidelity) or per tensor.",
        ),
    ] = True,
    weight_type: Annotated[
        str, typer.Option(help="int8 (signed, the fast u8s8 path on VNNI/AMX) or uint8.")
    ] = "int8",
    calibration: Annotated[
        str,
        typer.Option(
            help="static: auto (pick by held-out output error), minmax, entropy, percentile, distribution."
        ),
    ] = "auto",
    keep_float: Annotated[
        str,
        typer.Option(
            help="none, or ffn_out: keep MatMuls fed by a GELU (transformer FFN output projections) in float."
        ),
    ] = "none",
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Node name to keep in float (repeatable).")
    ] = None,
    block_size: Annotated[int, typer.Option(help="int4: weights per quantization block (16–256).")] = 32,
    preflight_only: Annotated[
        bool,
        typer.Option(
            "--preflight",
            help="Only report whether and how quantization pays off on this machine; write nothing.",
        ),
    ] = False,
    diagnose_only: Annotated[
        bool,
        typer.Option(
            "--diagnose",
            help="Rank nodes by the harm dynamic INT8 does to each (emulated SQNR + measured impact) and print an exclusion list; writes diagnosis.json into --out.",
        ),
    ] = False,
    diagnose_top: Annotated[
        int,
        typer.Option(
            min=0,
            help="--diagnose: measure quantize-only / revert-only fidelity for the N nodes with the lowest SQNR (0 = every node; slow on big models).",
        ),
    ] = 6,
    min_fidelity: Annotated[
        float | None,
        typer.Option(
            help="Accuracy-aware (dynamic): revert the most harmful nodes to float until fidelity ≥ this, e.g. 0.99."
        ),
    ] = None,
    fidelity_metric: Annotated[
        str, typer.Option(help="Fidelity used by --min-fidelity: cosine_min, cosine_mean or top1_agreement.")
    ] = "cosine_min",
    max_quality_drop: Annotated[
        float | None,
        typer.Option(
            help="Accuracy-aware (dynamic): largest allowed drop of the workload's quality metric, in points, e.g. 1.0."
        ),
    ] = None,
    smooth: Annotated[
        str,
        typer.Option(
            help="dynamic: none, ffn_out (SmoothQuant-style migration of post-GELU outliers into the FFN output weights) or all (every MatMul group: best measured on minilm)."
        ),
    ] = "none",
    smooth_alpha: Annotated[
        float,
        typer.Option(
            help="dynamic: smoothing strength 0–1 (how much activation range moves into the weights)."
        ),
    ] = 0.7,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare/--no-compare",
            help="Time the result against its parent (interleaved) and warn loudly if it is slower.",
        ),
    ] = True,
    threads: ThreadsOpt = None,
    data: DataOpt = None,
) -> None:
    """Quantize an ONNX candidate (INT8 dynamic / static QDQ, INT4 weight-only), with preflight and a speed check.

    Example: `slimship quantize runs/export/optimized -w minilm --mode dynamic --keep-float ffn_out`
    """
    from slimship.candidate import load_candidate
    from slimship.errors import ConfigError
    from slimship.measure.preflight import format_preflight, preflight
    from slimship.passes import run_pass
    from slimship.workload import resolve_workload

    passes_by_mode = {
        "dynamic": "quantize-dynamic",
        "static": "quantize-static",
        "int4": "quantize-int4",
        "qat": "qat",
    }
    if mode not in passes_by_mode:
        raise ConfigError(f"unknown --mode {mode!r}; choose one of {sorted(passes_by_mode)}")
    cand = load_candidate(target)
    if mode == "qat":
        if cand.format != "torch":
            raise ConfigError(
                f"--mode qat fine-tunes a PyTorch candidate (e.g. runs/mnist/original); {target} is {cand.format}"
            )
        w = resolve_workload(workload, data=data)
        q = run_pass("qat", cand, w, {}, out or cand.path.parent / f"{cand.name}-qat")
        f = next(iter(q.info["fidelity_to_parent"]["outputs"].values()))
        typer.echo(
            f"{q.name}: {q.artifact_path} ({q.size_bytes / 1e6:.2f} MB, {q.info['size_ratio_vs_parent']:.2f}x smaller); "
            f"{q.info['steps']} fine-tuning steps in {q.info['train_seconds']} s; cosine to the original mean "
            f"{f['cosine_mean']:.5f}, min {f['cosine_min']:.5f}; QDQ export verified against the fake-quantized model"
        )
        return
    if cand.format != "onnx":
        raise ConfigError(
            f"{target} is a PyTorch candidate; quantization works on ONNX graphs: `slimship export` first"
        )
    accuracy_aware = min_fidelity is not None or max_quality_drop is not None
    if preflight_only or not (diagnose_only or accuracy_aware):
        typer.echo(format_preflight(preflight(cand.artifact_path), None if preflight_only else mode))
    if preflight_only:
        return
    common = {"exclude_nodes": list(exclude or []), "keep_float": keep_float}
    config = {
        "dynamic": {
            **common,
            "per_channel": per_channel,
            "weight_type": weight_type,
            "smooth": smooth,
            "smooth_alpha": smooth_alpha,
        },
        "static": {
            **common,
            "per_channel": per_channel,
            "weight_type": weight_type,
            "calibration": calibration,
        },
        "int4": {**common, "block_size": block_size},
    }[mode]
    w = resolve_workload(workload, data=data)
    out = out or cand.path.parent / f"{cand.name}-{mode}"
    if diagnose_only or accuracy_aware:
        if mode != "dynamic":
            raise ConfigError("--diagnose, --min-fidelity and --max-quality-drop work with --mode dynamic")
        from slimship._util import write_json_atomic

        if diagnose_only:
            from slimship.measure.diagnose import diagnose, format_diagnosis

            report = diagnose(cand, w, config, measure_top=diagnose_top or 10**9)
            text = format_diagnosis(report, limit=10**9)
            typer.echo(format_diagnosis(report))
            write_json_atomic(out / "diagnosis.json", report)
            (out / "diagnosis.md").write_text(
                f"# Quantization diagnosis of {cand.id}\n\n```\n{text}\n```\n\nPaste into a quantize-dynamic config:\n\n"
                f"```json\n{json.dumps(report['paste_into_config'], indent=2)}\n```\n"
            )
            typer.echo(f"wrote {out / 'diagnosis.json'} and {out / 'diagnosis.md'}")
            return
        from slimship.pipeline.accuracy_aware import quantize_accuracy_aware

        result = quantize_accuracy_aware(
            cand,
            w,
            out,
            config,
            min_fidelity=min_fidelity,
            fidelity_metric=fidelity_metric,  # type: ignore[arg-type]
            max_quality_drop=max_quality_drop,
            log=typer.echo,
        )
        typer.echo(result["message"])
        typer.echo(f"reverted to float: {result['reverted_nodes']}")
        typer.echo(f"chosen: {result['chosen']['candidate']}")
        typer.echo(f"record: {out / 'accuracy_aware.json'}")
        if not result["met_budget"]:
            _console().print("[bold red]WARNING: no configuration met the budget[/bold red]")
            raise typer.Exit(1)
        return
    q = run_pass(passes_by_mode[mode], cand, w, config, out)
    fid = q.info["fidelity_to_parent"]["outputs"]
    typer.echo(
        f"{q.name}: {q.artifact_path} ({q.size_bytes / 1e6:.1f} MB, {q.info['size_ratio_vs_parent']:.2f}x smaller than its parent)"
    )
    for name, f in fid.items():
        typer.echo(
            f"  {name}: cosine to parent mean {f['cosine_mean']:.5f}, min {f['cosine_min']:.5f}"
            + (f", top-1 agreement {f['top1_agreement']:.4f}" if "top1_agreement" in f else "")
        )
    for warning in q.info.get("warnings", []):
        typer.echo(f"WARNING: {warning}")
    if q.info.get("calibration_comparison"):
        scores = ", ".join(f"{m} {v['cosine_min']:.5f}" for m, v in q.info["calibration_comparison"].items())
        typer.echo(f"  calibration: chose {q.info['calibration_method']} (held-out min cosine: {scores})")
    if compare:
        from slimship.measure.bench import BenchTarget
        from slimship.measure.bench import bench as run_bench

        is_text = any("sequence" in s.shape for s in w.inputs)
        result = run_bench(
            [BenchTarget("parent", cand, "onnxruntime"), BenchTarget(q.name, q, "onnxruntime")],
            w,
            batch_sizes=(1, 32),
            seq_len=128 if is_text else None,
            threads=threads,
            memory=False,
            min_seconds=0.5,
        )
        rows = result["candidates"][1]["results"]
        speeds = {r["batch_size"]: r["speedup_vs_baseline_p50"] for r in rows}
        typer.echo(
            "  speed vs parent (p50, interleaved): "
            + ", ".join(f"{s:.2f}x at batch {b}" for b, s in speeds.items())
        )
        q.with_info(speed_vs_parent=speeds).save()
        slower = [b for b, s in speeds.items() if s < 1.0]
        if slower:
            _console().print(
                f"[bold red]WARNING: the quantized model is SLOWER than its parent at batch {slower} on this machine[/bold red] "
                "— ship the parent unless size is what you need (preflight warnings above name known causes)."
            )


@app.command()
def quickstart(
    workload: WorkloadOpt = "minilm",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/quickstart-<workload>).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Evaluate on the first N samples only (minilm: N articles). Default: all."),
    ] = None,
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", "-b", help="Comma-separated batch sizes to benchmark.")
    ] = "1,32",
    seq_len: Annotated[int, typer.Option(min=1, help="Sequence length for text benchmarks.")] = 128,
    runs: Annotated[int, typer.Option(min=30, help="Timed runs per candidate and batch size.")] = 30,
    warmup: Annotated[int, typer.Option(min=1, help="Warm-up runs per candidate and batch size.")] = 5,
    threads: ThreadsOpt = None,
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure peak RSS per candidate in a fresh process.")
    ] = True,
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


import slimship.cli_compress  # noqa: E402 - registers prune / lowrank / share / distill on `app`
import slimship.cli_registry  # noqa: E402 - registers `slimship registry …`
import slimship.cli_rollout  # noqa: E402 - registers `slimship rollout …`
import slimship.cli_serve  # noqa: E402,F401 - registers `slimship serve`


def main() -> None:
    # under `python -m slimship.cli` this file runs as __main__; the verbs of cli_compress register on the
    # importable module's app, so run that one
    from slimship.cli import app as registered

    try:
        registered()
    except SlimshipError as err:
        from rich.markup import escape

        # escaped: a message like "pip install 'slimship[ray]'" must not lose its brackets to rich markup
        _console().print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, markup=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
