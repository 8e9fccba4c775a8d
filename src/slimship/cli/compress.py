"""`slimship export | passes | prune | lowrank | separable | share | distill`: make a new candidate from a model — export
to ONNX (verified, optionally graph-optimised), list the passes, and the PyTorch compression verbs (structured,
depth and unstructured pruning, low-rank factorisation, depthwise-separable conversion, weight sharing, distillation), each recovering quality by
distillation and then exporting and evaluating the result. Options that set one pass-config field take their
help from that field's description (`config_option`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from slimship.cli._app import (
    DataOpt,
    LimitOpt,
    ThreadsOpt,
    TorchTargetArg,
    WorkloadOpt,
    app,
    cli_workload,
    config_option,
    console,
    load_torch_target,
)
from slimship.passes import (
    DepthPruneConfig,
    DistillConfig,
    ExportConfig,
    GraphOptimizeConfig,
    LowRankConfig,
    SeparableConfig,
    StructuredPruneConfig,
    StudentSpec,
    UnstructuredPruneConfig,
    WeightShareConfig,
)
from slimship.report.summary import size_ratio_words
from slimship.train.trainer import FinetuneConfig

OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Directory for the new candidate (default: runs/VERB-WORKLOAD)."),
]

EpochsOpt = Annotated[int, config_option(FinetuneConfig, "epochs", min=1, prefix="Recovery: ")]
MaxSecondsOpt = Annotated[float, config_option(FinetuneConfig, "max_seconds", min=1, prefix="Recovery: ")]
LrOpt = Annotated[float | None, config_option(FinetuneConfig, "lr", prefix="Recovery: ")]

FinetuneOpt = Annotated[
    bool,
    typer.Option(
        "--finetune/--no-finetune",
        help="Recover quality by distillation from the input model after compressing.",
    ),
]

ExportOpt = Annotated[
    bool,
    typer.Option(
        "--export/--no-export", help="Also export the result to ONNX and verify it against PyTorch."
    ),
]

EvalOpt = Annotated[
    bool,
    typer.Option(
        "--eval/--no-eval", help="Evaluate quality and fidelity of the result against the original."
    ),
]


@app.command()
def passes(
    name: Annotated[
        str | None, typer.Argument(help="Only this pass (e.g. quantize-dynamic), with every field explained.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (name, formats, requirements, fields).")
    ] = False,
) -> None:
    """List the passes, what each takes and makes, and its config fields with defaults and what each means (the
    same descriptions as the recipe schema and the options' help).

    Example: `slimship passes` or `slimship passes quantize-dynamic`
    """
    from slimship.errors import ConfigError
    from slimship.passes import list_passes

    found = [p for p in list_passes() if name is None or p["name"] == name]
    if not found:
        raise ConfigError(f"no pass named {name!r}; passes: {[p['name'] for p in list_passes()]}")
    if as_json:
        typer.echo(json.dumps(found, indent=2, default=str))
        return
    for p in found:
        typer.echo(f"{p['name']:10s} {p['input']} → {p['output']}  {p['summary']}")
        if name is None:
            typer.echo(f"{'':10s} config: {json.dumps(p['config'], default=str)}")
            continue
        for field, f in p["fields"].items():
            typer.echo(f"  {field} = {json.dumps(f['default'], default=str)}")
            typer.echo(f"      {f['description']}")
    if name is None:
        from slimship.passes import UNVERIFIABLE_TARGETS

        for target, why in UNVERIFIABLE_TARGETS.items():
            typer.echo(f"{target:10s} {why}")


@app.command()
def export(
    workload: WorkloadOpt = "minilm",
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Directory for the candidates (original/, exported/, optimized/)."),
    ] = Path("runs/export"),
    opset: Annotated[int, config_option(ExportConfig, "opset")] = 18,
    exporter: Annotated[str, config_option(ExportConfig, "exporter")] = "auto",
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize/--no-optimize",
            help="Also run the graph-optimisation pass (transformer fusions for BERT-family models).",
        ),
    ] = True,
    level: Annotated[
        str,
        config_option(GraphOptimizeConfig, "level"),
    ] = "extended",
    data: DataOpt = None,
) -> None:
    """Export a workload's model to ONNX, verify it against PyTorch on real inputs, optionally optimise.

    Example: `slimship export -w mnist -o runs/mnist`
    """
    from slimship.candidate import original_candidate
    from slimship.passes import export as export_pass
    from slimship.passes import optimize_graph

    w = cli_workload(workload, data)
    orig = original_candidate(w, out / "original")
    cfg = ExportConfig.parse({"opset": opset, "exporter": exporter})
    cand = export_pass(orig, w, cfg, out / "exported")
    _print_candidate(cand)
    if optimize:
        opt = optimize_graph(cand, w, GraphOptimizeConfig.parse({"level": level}), out / "optimized")
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


def _finetune(enabled: bool, epochs: int, max_seconds: float, lr: float | None) -> dict[str, Any] | None:
    return {"epochs": epochs, "max_seconds": max_seconds, "lr": lr} if enabled else None


def _kv(items: list[str] | None, what: str, cast: type) -> dict[str, Any]:
    from slimship.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"{what} takes LAYER=VALUE, e.g. `0=0.25`; got {item!r}")
        try:
            out[name] = cast(value)
        except ValueError:
            raise ConfigError(f"{what}: {value!r} is not a {cast.__name__} (in {item!r})") from None
    return out


def _finish(
    cand: Any, workload: Any, out: Path, export: bool, evaluate_: bool, limit: int | None, threads: int | None
) -> None:
    """Print what the pass recorded, then optionally export + verify and evaluate."""
    cx = cand.info.get("complexity")
    typer.echo(
        f"{cand.name}: {cand.path} ({cand.info.get('parameters', 0):,} parameters, {cand.size_bytes / 1e6:.2f} MB)"
    )
    if cx:
        typer.echo(
            f"  MACs {cx['macs_before'] / 1e6:,.1f}M → {cx['macs_after'] / 1e6:,.1f}M ({cx['macs_ratio']:.2f}x fewer); "
            f"params {cx['params_ratio']:.2f}x fewer; measured PyTorch latency at batch {cx['batch_size']}: "
            f"{cx['torch_latency_ms_before']:.1f} → {cx['torch_latency_ms_after']:.1f} ms ({cx['torch_speedup']:.2f}x)"
        )
    rec = (cand.info.get("pruning") or {}).get("reconstruction")
    if rec:
        typer.echo(
            f"  refit: {len(rec['layers'])} layer(s) reading pruned channels, by least squares on {rec['samples']} "
            f"calibration samples; mean relative output error {rec['mean_err_before']:.3g} → {rec['mean_err_after']:.3g}"
        )
    ft = cand.info.get("finetune")
    for rep in ft if isinstance(ft, list) else [ft] if ft else []:
        typer.echo(
            f"  recovery: {rep['steps']} steps, {rep['epochs_run']} epoch(s) in {rep['seconds']} s (stopped by {rep['stopped_by']}); "
            f"held-out distillation loss {rep['val_loss_before']:.4g} → {rep['val_loss_best']:.4g}"
        )
        if rep.get("kept", "trained") != "trained":
            typer.echo(
                "  note: fine-tuning never beat the model it started from on the held-out slice, so those weights were kept "
                "(try a lower --lr or more --epochs)"
            )
    if "sparsity" in cand.info:
        typer.echo(
            f"  sparsity {cand.info['sparsity']:.1%}; compressed (xz) {cand.info['compressed_bytes'] / 1e3:.1f} kB. {cand.info['note']}"
        )
    if "shipped_bytes" in cand.info:
        typer.echo(
            f"  shipped file {cand.path / cand.info['shipped_file']}: {cand.info['shipped_bytes'] / 1e3:.1f} kB, "
            f"{size_ratio_words(cand.info['shipped_ratio_vs_original'], 1, than='the original')} ({cand.info['original_bytes'] / 1e3:.1f} kB); "
            f"runtime form {cand.info['runtime_bytes'] / 1e3:.1f} kB"
        )
    if export:
        from slimship.passes import export as export_pass

        onnx_cand = export_pass(cand, workload, None, out / "exported")
        ver = onnx_cand.info.get("verification", {})
        worst = min((o.get("cosine_min", 1.0) for o in ver.get("outputs", {}).values()), default=1.0)
        typer.echo(
            f"  exported: {onnx_cand.path / onnx_cand.artifact} (verified on {ver.get('samples')} samples, cosine min {worst:.7f})"
        )
    if evaluate_:
        from slimship.measure.evaluate import evaluate

        res = evaluate(cand, workload, None, threads, limit)
        typer.echo("  quality  " + "  ".join(f"{k}={v:.4g}" for k, v in res["quality"].items()))
        typer.echo("  fidelity " + "  ".join(f"{k}={v:.4g}" for k, v in res["fidelity"].items()))


@app.command()
def prune(
    target: TorchTargetArg = "original",
    workload: WorkloadOpt = "mnist",
    method: Annotated[
        str,
        typer.Option(
            help="structured (channels / FFN neurons / heads, physically removed), depth (drop transformer layers) or unstructured (zero single weights: smaller compressed file, not faster)."
        ),
    ] = "structured",
    channel_ratio: Annotated[
        float, config_option(StructuredPruneConfig, "channel_ratio", prefix="structured: ")
    ] = 0.5,
    head_ratio: Annotated[
        float,
        config_option(StructuredPruneConfig, "head_ratio", prefix="structured: "),
    ] = 0.0,
    head_dim_ratio: Annotated[
        float,
        config_option(StructuredPruneConfig, "head_dim_ratio", prefix="structured: "),
    ] = 0.0,
    importance: Annotated[
        str,
        config_option(StructuredPruneConfig, "importance", prefix="structured: "),
    ] = "l2",
    scope: Annotated[str, config_option(StructuredPruneConfig, "scope", prefix="structured: ")] = "uniform",
    channel_scope: Annotated[
        str, config_option(StructuredPruneConfig, "channel_scope", prefix="structured: ")
    ] = "all",
    reconstruct: Annotated[
        str, config_option(StructuredPruneConfig, "reconstruct", prefix="structured: ")
    ] = "least-squares",
    layer_ratio: Annotated[
        list[str] | None,
        config_option(
            StructuredPruneConfig,
            "layer_ratios",
            "--layer-ratio",
            prefix="structured: ",
            suffix=" — on the command line LAYER=RATIO, repeatable, e.g. 0=0.25",
        ),
    ] = None,
    round_to: Annotated[
        int | None,
        config_option(StructuredPruneConfig, "round_to", min=1, prefix="structured: "),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        config_option(
            StructuredPruneConfig,
            "ignore",
            "--ignore",
            prefix="structured, unstructured: ",
            suffix=" (repeatable)",
        ),
    ] = None,
    keep_layers: Annotated[int, config_option(DepthPruneConfig, "keep_layers", min=1, prefix="depth: ")] = 3,
    criterion: Annotated[
        str,
        config_option(DepthPruneConfig, "criterion", prefix="depth: "),
    ] = "alternate",
    sparsity: Annotated[
        float, config_option(UnstructuredPruneConfig, "sparsity", prefix="unstructured: ")
    ] = 0.8,
    sparsity_scope: Annotated[
        str, config_option(UnstructuredPruneConfig, "scope", prefix="unstructured: ")
    ] = "global",
    l1_weight: Annotated[
        float,
        config_option(FinetuneConfig, "l1_weight", min=0, prefix="Recovery: "),
    ] = 0.0,
    steps: Annotated[
        int,
        config_option(UnstructuredPruneConfig, "steps", min=1, prefix="unstructured: "),
    ] = 1,
    finetune: FinetuneOpt = True,
    epochs: EpochsOpt = 3,
    max_seconds: MaxSecondsOpt = 600.0,
    lr: LrOpt = None,
    out: OutOpt = None,
    export: ExportOpt = True,
    evaluate: EvalOpt = True,
    limit: LimitOpt = None,
    threads: ThreadsOpt = None,
    data: DataOpt = None,
) -> None:
    """Prune a PyTorch model: structured (faster dense kernels), depth (fewer layers) or unstructured (smaller file).

    Records MACs, parameters and measured latency side by side, recovers quality by distillation from the input
    model, then exports to ONNX (verified) and evaluates.

    Examples: `slimship prune -w mnist --channel-ratio 0.5` ·
    `slimship prune -w minilm --channel-ratio 0.5 --max-seconds 600` (FFN neurons) ·
    `slimship prune -w minilm --method depth --keep-layers 3` ·
    `slimship prune -w mnist --method unstructured --sparsity 0.9 --steps 3`
    """
    from slimship.errors import ConfigError
    from slimship.passes import run_pass

    w, cand = load_torch_target(target, workload, data)
    ft = _finetune(finetune, epochs, max_seconds, lr)
    if ft is not None and l1_weight:
        ft["l1_weight"] = l1_weight
    if method == "structured":
        name, cfg = (
            "prune",
            {
                "channel_ratio": channel_ratio,
                "head_ratio": head_ratio,
                "head_dim_ratio": head_dim_ratio,
                "importance": importance,
                "scope": scope,
                "channel_scope": channel_scope,
                "reconstruct": reconstruct,
                "layer_ratios": _kv(layer_ratio, "--layer-ratio", float),
                "round_to": round_to,
                "ignore": ignore or [],
                "finetune": ft,
            },
        )
    elif method == "depth":
        name, cfg = "depth-prune", {"keep_layers": keep_layers, "criterion": criterion, "finetune": ft}
    elif method == "unstructured":
        name, cfg = (
            "sparsify",
            {
                "sparsity": sparsity,
                "scope": sparsity_scope,
                "steps": steps,
                "ignore": ignore or [],
                "finetune": ft,
            },
        )
    else:
        raise ConfigError(f"unknown --method {method!r}; choose structured, depth or unstructured")
    dest = out or Path("runs") / f"prune-{w.name}"
    result = run_pass(name, cand, w, cfg, dest / name)
    _finish(result, w, dest / name, export, evaluate, limit, threads)


@app.command()
def lowrank(
    target: TorchTargetArg = "original",
    workload: WorkloadOpt = "mnist",
    energy: Annotated[
        float | None,
        config_option(LowRankConfig, "energy"),
    ] = None,
    param_ratio: Annotated[
        float | None,
        config_option(LowRankConfig, "param_ratio"),
    ] = None,
    sensitivity: Annotated[
        float | None,
        config_option(LowRankConfig, "sensitivity"),
    ] = None,
    rank: Annotated[
        list[str] | None,
        config_option(
            LowRankConfig,
            "ranks",
            "--rank",
            suffix=" — on the command line LAYER=RANK, repeatable, e.g. backbone.encoder.layer.0.intermediate.dense=96",
        ),
    ] = None,
    layers: Annotated[
        list[str] | None,
        config_option(
            LowRankConfig, "layers", "--layers", suffix=" (repeatable, e.g. '*.intermediate.dense')"
        ),
    ] = None,
    round_to: Annotated[int, config_option(LowRankConfig, "round_to", min=1)] = 8,
    min_speedup: Annotated[
        float,
        config_option(LowRankConfig, "min_speedup", min=0),
    ] = 1.05,
    finetune: FinetuneOpt = True,
    epochs: EpochsOpt = 3,
    max_seconds: MaxSecondsOpt = 600.0,
    lr: LrOpt = None,
    out: OutOpt = None,
    export: ExportOpt = True,
    evaluate: EvalOpt = True,
    limit: LimitOpt = None,
    threads: ThreadsOpt = None,
    data: DataOpt = None,
) -> None:
    """Factorise Linear / 1x1 Conv layers by truncated SVD where it measures faster, then recover by distillation.

    Examples: `slimship lowrank -w minilm --layers '*.intermediate.dense' --energy 0.8` ·
    `slimship lowrank -w mnist --param-ratio 0.3 --min-speedup 0`
    """
    from slimship.passes import run_pass

    w, cand = load_torch_target(target, workload, data)
    cfg = {
        "energy": energy,
        "param_ratio": param_ratio,
        "sensitivity": sensitivity,
        "ranks": _kv(rank, "--rank", int),
        "layers": layers or [],
        "round_to": round_to,
        "min_speedup": min_speedup,
        "finetune": _finetune(finetune, epochs, max_seconds, lr),
    }
    dest = out or Path("runs") / f"lowrank-{w.name}"
    result = run_pass("lowrank", cand, w, cfg, dest / "lowrank")
    decided = result.info["layers"]
    for name, d in decided.items():
        typer.echo(
            f"  {name}: rank {d['rank']}/{d['full_rank']} (energy {d['energy_kept']:.3f}, {d['params_ratio']:.0%} of its weights) — {d['decision']}"
        )
    budget = f" (budget {param_ratio:.0%})" if param_ratio is not None else ""
    typer.echo(
        f"  factorised layers keep {result.info['params_kept_in_factorised_layers']:.0%} of their weights{budget}"
    )
    _finish(result, w, dest / "lowrank", export, evaluate, limit, threads)


@app.command()
def separable(
    target: TorchTargetArg = "original",
    workload: WorkloadOpt = "mnist",
    min_kernel_size: Annotated[int, config_option(SeparableConfig, "min_kernel_size", min=2)] = 3,
    min_in_channels: Annotated[int, config_option(SeparableConfig, "min_in_channels", min=1)] = 8,
    layers: Annotated[
        list[str] | None,
        config_option(SeparableConfig, "layers", "--layers", suffix=" (repeatable)"),
    ] = None,
    ignore: Annotated[
        list[str] | None, config_option(SeparableConfig, "ignore", "--ignore", suffix=" (repeatable)")
    ] = None,
    only_if_fewer_macs: Annotated[
        bool,
        config_option(SeparableConfig, "only_if_fewer_macs", "--only-if-fewer-macs/--always"),
    ] = True,
    min_energy: Annotated[float, config_option(SeparableConfig, "min_energy", min=0, max=1)] = 0.0,
    min_fidelity: Annotated[float, config_option(SeparableConfig, "min_fidelity", min=0, max=1)] = 0.95,
    finetune: FinetuneOpt = True,
    epochs: EpochsOpt = 3,
    max_seconds: MaxSecondsOpt = 600.0,
    lr: LrOpt = None,
    out: OutOpt = None,
    export: ExportOpt = True,
    evaluate: EvalOpt = True,
    limit: LimitOpt = None,
    threads: ThreadsOpt = None,
    data: DataOpt = None,
) -> None:
    """Depthwise-separable conversion: each k×k Conv2d becomes a depthwise k×k + pointwise 1×1 pair, initialised
    by the best rank-1 approximation (SVD) of each input channel's Cout × k² slice, then recovered by distillation.

    Prints per layer the energy the rank-1 initialisation keeps, the MACs, parameters and measured latency before
    and after, and quality before / after recovery; then exports to ONNX (verified) and evaluates.

    Examples: `slimship separable -w mnist --epochs 2` · `slimship separable -w mnist --min-energy 0.5 --no-finetune`
    """
    from slimship.passes import run_pass

    w, cand = load_torch_target(target, workload, data)
    cfg = {
        "min_kernel_size": min_kernel_size,
        "min_in_channels": min_in_channels,
        "layers": layers or [],
        "ignore": ignore or [],
        "only_if_fewer_macs": only_if_fewer_macs,
        "min_energy": min_energy,
        "min_fidelity": min_fidelity,
        "finetune": _finetune(finetune, epochs, max_seconds, lr),
    }
    dest = out or Path("runs") / f"separable-{w.name}"
    result = run_pass("separable", cand, w, cfg, dest / "separable")
    for name, d in result.info["layers"].items():
        energy = f", rank-1 keeps {d['energy_kept']:.3f} of the kernel energy" if "energy_kept" in d else ""
        typer.echo(
            f"  {name}: {d['in']}→{d['out']} {d['kernel'][0]}x{d['kernel'][1]}, MACs/pixel "
            f"{d['macs_per_pixel_before']:,} → {d['macs_per_pixel_after']:,}{energy} — {d['decision']}"
        )
    before, init, after = (
        result.info["quality_input_model"],
        result.info["quality_after_init"],
        result.info["quality_after_recovery"],
    )
    for metric in before:
        typer.echo(
            f"  {metric} on {result.info['quality_eval_samples'] or 'all'} eval samples: input {before[metric]:.4g}, "
            f"after init {init[metric]:.4g}, after recovery {after[metric]:.4g}"
        )
    for warning in result.info.get("warnings", []):
        console().print(f"[bold red]WARNING:[/bold red] {warning}", highlight=False)
    _finish(result, w, dest / "separable", export, evaluate, limit, threads)


@app.command()
def share(
    target: TorchTargetArg = "original",
    workload: WorkloadOpt = "mnist",
    bits: Annotated[int, config_option(WeightShareConfig, "bits", min=2, max=8)] = 5,
    layer_bits: Annotated[
        list[str] | None,
        config_option(
            WeightShareConfig,
            "layer_bits",
            "--layer-bits",
            suffix=" — on the command line LAYER=BITS, repeatable, e.g. 0=8",
        ),
    ] = None,
    init: Annotated[str, config_option(WeightShareConfig, "init")] = "linear",
    ignore: Annotated[
        list[str] | None, config_option(WeightShareConfig, "ignore", "--ignore", suffix=" (repeatable)")
    ] = None,
    finetune: FinetuneOpt = True,
    epochs: EpochsOpt = 2,
    max_seconds: MaxSecondsOpt = 600.0,
    lr: LrOpt = None,
    out: OutOpt = None,
    evaluate: EvalOpt = True,
    limit: LimitOpt = None,
    threads: ThreadsOpt = None,
    data: DataOpt = None,
) -> None:
    """Weight sharing: k-means codebooks per layer, centroid fine-tuning, and a compact shipped file
    (codebook + bit-packed, Huffman/xz-coded indices). Run it after pruning for Deep Compression.

    Examples: `slimship share runs/prune-mnist/sparsify -w mnist --bits 5` ·
    `slimship share original -w mnist --bits 4 --layer-bits 0=8`
    """
    from slimship.passes import run_pass

    w, cand = load_torch_target(target, workload, data)
    cfg = {
        "bits": bits,
        "layer_bits": _kv(layer_bits, "--layer-bits", int),
        "init": init,
        "ignore": ignore or [],
        "finetune": _finetune(finetune, epochs, max_seconds, lr),
    }
    dest = out or Path("runs") / f"share-{w.name}"
    result = run_pass("share", cand, w, cfg, dest / "share")
    _finish(result, w, dest / "share", False, evaluate, limit, threads)


@app.command()
def distill(
    target: TorchTargetArg = "original",
    workload: WorkloadOpt = "mnist",
    num_layers: Annotated[
        int | None,
        config_option(StudentSpec, "num_layers", min=1),
    ] = None,
    width: Annotated[float, config_option(StudentSpec, "width")] = 0.5,
    init: Annotated[str, config_option(StudentSpec, "init")] = "teacher",
    loss: Annotated[
        str,
        config_option(FinetuneConfig, "loss"),
    ] = "auto",
    temperature: Annotated[float, config_option(FinetuneConfig, "temperature", prefix="kl: ")] = 4.0,
    alpha: Annotated[float, config_option(FinetuneConfig, "alpha", prefix="kl: ")] = 0.7,
    feature_weight: Annotated[
        float,
        config_option(DistillConfig, "feature_weight"),
    ] = 0.0,
    epochs: EpochsOpt = 10,
    max_seconds: MaxSecondsOpt = 600.0,
    lr: LrOpt = None,
    out: OutOpt = None,
    export: ExportOpt = True,
    evaluate: EvalOpt = True,
    limit: LimitOpt = None,
    threads: ThreadsOpt = None,
    data: DataOpt = None,
) -> None:
    """Distil the model into a smaller student built from it (fewer layers, narrower FFN / fewer channels).

    Examples: `slimship distill -w mnist --width 0.5 --init random` ·
    `slimship distill -w minilm --num-layers 3 --width 1.0 --feature-weight 1 --max-seconds 600`
    """
    from slimship.passes import run_pass

    w, cand = load_torch_target(target, workload, data)
    cfg = {
        "student": {"num_layers": num_layers, "width": width, "init": init},
        "finetune": {
            "epochs": epochs,
            "max_seconds": max_seconds,
            "lr": lr,
            "loss": loss,
            "temperature": temperature,
            "alpha": alpha,
            "patience": 3,
        },
        "feature_weight": feature_weight,
    }
    dest = out or Path("runs") / f"distill-{w.name}"
    result = run_pass("distill", cand, w, cfg, dest / "distill")
    _finish(result, w, dest / "distill", export, evaluate, limit, threads)
