"""`slimship quantize`: quantize an ONNX candidate (INT8 dynamic / static QDQ, INT4 weight-only, or QAT of a
PyTorch candidate), with a preflight, a per-node diagnosis, an accuracy-aware mode and a speed check against the
parent. Options that set one quantization-config field take their help from that field's description."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from slimship.cli._app import (
    DataOpt,
    ThreadsOpt,
    WorkloadOpt,
    app,
    cli_workload,
    config_option,
    console,
    option_given,
)
from slimship.passes.quantize import DynamicQuantConfig, Int4WeightOnlyConfig, StaticQuantConfig
from slimship.report.summary import size_ratio_words

if TYPE_CHECKING:
    from slimship.candidate import Candidate


def _measured_mode(cand: Candidate, mode: str, measuring: bool) -> str:
    """--diagnose / accuracy-aware on a CNN without --mode: static INT8 (dynamic mode leaves convolutions in
    float, so a diagnosis of it would not see them), said on stderr."""
    if not measuring or mode != "dynamic" or option_given("mode"):
        return mode
    import onnx

    from slimship.passes.quantize import quantizable_nodes

    model = onnx.load(str(cand.artifact_path), load_external_data=False)
    if not quantizable_nodes(model, ("Conv",)):
        return mode
    typer.echo(
        "a CNN: measuring static INT8 (QDQ, the mode that quantizes convolutions); give --mode dynamic for dynamic",
        err=True,
    )
    return "static"


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
        config_option(DynamicQuantConfig, "per_channel", "--per-channel/--per-tensor"),
    ] = True,
    weight_type: Annotated[str, config_option(DynamicQuantConfig, "weight_type")] = "int8",
    calibration: Annotated[
        str,
        config_option(StaticQuantConfig, "calibration", prefix="static: "),
    ] = "auto",
    keep_float: Annotated[
        str,
        config_option(DynamicQuantConfig, "keep_float"),
    ] = "none",
    exclude: Annotated[
        list[str] | None,
        config_option(DynamicQuantConfig, "exclude_nodes", "--exclude", suffix=" (repeatable)"),
    ] = None,
    block_size: Annotated[int, config_option(Int4WeightOnlyConfig, "block_size", prefix="int4: ")] = 32,
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
            help="Rank nodes (and, with --mode static, CNN blocks) by the harm INT8 of --mode does to each (emulated SQNR + measured only-this / revert-this fidelity) and print an exclusion list; writes diagnosis.json into --out.",
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
            help="Accuracy-aware (dynamic or static): revert the most harmful nodes to float until fidelity ≥ this, e.g. 0.99."
        ),
    ] = None,
    fidelity_metric: Annotated[
        str, typer.Option(help="Fidelity used by --min-fidelity: cosine_min, cosine_mean or top1_agreement.")
    ] = "cosine_min",
    max_quality_drop: Annotated[
        float | None,
        typer.Option(
            help="Accuracy-aware (dynamic or static): largest allowed drop of the workload's quality metric, in points, e.g. 1.0."
        ),
    ] = None,
    smooth: Annotated[
        str,
        config_option(DynamicQuantConfig, "smooth", prefix="dynamic: "),
    ] = "none",
    smooth_alpha: Annotated[
        float,
        config_option(DynamicQuantConfig, "smooth_alpha", prefix="dynamic: "),
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
        w = cli_workload(workload, data)
        q = run_pass("qat", cand, w, {}, out or cand.path.parent / f"{cand.name}-qat")
        f = next(iter(q.info["fidelity_to_parent"]["outputs"].values()))
        typer.echo(
            f"{q.name}: {q.artifact_path} ({q.size_bytes / 1e6:.2f} MB, {size_ratio_words(q.info['size_ratio_vs_parent'])}); "
            f"{q.info['steps']} fine-tuning steps in {q.info['train_seconds']} s; cosine to the original mean "
            f"{f['cosine_mean']:.5f}, min {f['cosine_min']:.5f}; QDQ export verified against the fake-quantized model"
        )
        return
    if cand.format != "onnx":
        raise ConfigError(
            f"{target} is a PyTorch candidate; quantization works on ONNX graphs: `slimship export` first"
        )
    accuracy_aware = min_fidelity is not None or max_quality_drop is not None
    mode = _measured_mode(cand, mode, diagnose_only or accuracy_aware)
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
    w = cli_workload(workload, data)
    out = out or cand.path.parent / f"{cand.name}-{mode}"
    if diagnose_only or accuracy_aware:
        if mode not in ("dynamic", "static"):
            raise ConfigError(
                "--diagnose, --min-fidelity and --max-quality-drop work with --mode dynamic or --mode static"
            )
        from slimship._util import write_json_atomic

        if diagnose_only:
            from slimship.measure.diagnose import diagnose, format_diagnosis

            report = diagnose(cand, w, config, measure_top=diagnose_top or 10**9, mode=mode)
            text = format_diagnosis(report, limit=10**9)
            typer.echo(format_diagnosis(report))
            write_json_atomic(out / "diagnosis.json", report)
            (out / "diagnosis.md").write_text(
                f"# Quantization diagnosis of {cand.id}\n\n```\n{text}\n```\n\nPaste into a {passes_by_mode[mode]} config:\n\n"
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
            mode=mode,  # type: ignore[arg-type]
        )
        typer.echo(result["message"])
        typer.echo(f"reverted to float: {result['reverted_nodes']}")
        typer.echo(f"chosen: {result['chosen']['candidate']}")
        typer.echo(f"record: {out / 'accuracy_aware.json'}")
        if not result["met_budget"]:
            console().print("[bold red]WARNING: no configuration met the budget[/bold red]")
            raise typer.Exit(1)
        return
    q = run_pass(passes_by_mode[mode], cand, w, config, out)
    fid = q.info["fidelity_to_parent"]["outputs"]
    typer.echo(
        f"{q.name}: {q.artifact_path} ({q.size_bytes / 1e6:.1f} MB, {size_ratio_words(q.info['size_ratio_vs_parent'], than='its parent')})"
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
            console().print(
                f"[bold red]WARNING: the quantized model is SLOWER than its parent at batch {slower} on this machine[/bold red] "
                "— ship the parent unless size is what you need (preflight warnings above name known causes)."
            )
