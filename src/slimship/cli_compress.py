"""`slimship prune | lowrank | share | distill`: the structural-compression verbs (registered on the main app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slimship.cli import DataOpt, ThreadsOpt, WorkloadOpt, _resolve_target, app

TargetArg = Annotated[
    str,
    typer.Argument(
        help="The PyTorch model to compress: `original` (the workload's own model) or a PyTorch candidate directory."
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Directory for the new candidate (default: runs/VERB-WORKLOAD)."),
]
EpochsOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="Recovery: training epochs over the workload's training data (early stopping may end sooner).",
    ),
]
MaxSecondsOpt = Annotated[
    float, typer.Option(min=1, help="Recovery: wall-clock budget in seconds; the best model so far is kept.")
]
LrOpt = Annotated[
    float | None,
    typer.Option(
        help="Recovery: learning rate (default 1e-3 for classification, 5e-5 for embedding models)."
    ),
]
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
LimitOpt = Annotated[
    int | None, typer.Option(min=1, help="--eval on the first N samples only (minilm: N articles).")
]


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
            f"{cand.info['shipped_ratio_vs_original']:.1f}x smaller than the original's {cand.info['original_bytes'] / 1e3:.1f} kB; "
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


def _load(target: str, workload: str, data: str | None) -> tuple[Any, Any]:
    from slimship.errors import ConfigError
    from slimship.workload import resolve_workload

    w = resolve_workload(workload, data=data)
    _, cand, _ = _resolve_target(target, w, "")
    if cand.format != "torch":
        raise ConfigError(
            f"{target} is an ONNX candidate; compression passes work on PyTorch models (`original` or a pass's output)"
        )
    return w, cand


@app.command()
def prune(
    target: TargetArg = "original",
    workload: WorkloadOpt = "mnist",
    method: Annotated[
        str,
        typer.Option(
            help="structured (channels / FFN neurons / heads, physically removed), depth (drop transformer layers) or unstructured (zero single weights: smaller compressed file, not faster)."
        ),
    ] = "structured",
    channel_ratio: Annotated[
        float, typer.Option(help="structured: fraction of channels / FFN neurons removed, in [0, 1).")
    ] = 0.5,
    head_ratio: Annotated[
        float,
        typer.Option(
            help="structured: fraction of attention heads removed per layer (BERT family), in [0, 1)."
        ),
    ] = 0.0,
    head_dim_ratio: Annotated[
        float,
        typer.Option(
            help="structured: fraction of dimensions removed inside every attention head (BERT family), in [0, 1); not with --head-ratio."
        ),
    ] = 0.0,
    importance: Annotated[
        str,
        typer.Option(
            help="structured: l1, l2 (weight magnitude), taylor (|gradient × weight|, needs labels) or bn_scale."
        ),
    ] = "l2",
    scope: Annotated[
        str, typer.Option(help="structured: uniform (same ratio per layer) or global (ranked across layers).")
    ] = "uniform",
    layer_ratio: Annotated[
        list[str] | None,
        typer.Option(
            "--layer-ratio",
            help="structured: LAYER=RATIO overriding --channel-ratio for one layer (repeatable), e.g. 0=0.25.",
        ),
    ] = None,
    round_to: Annotated[
        int | None,
        typer.Option(
            min=1, help="structured: keep channel counts multiples of this (8 or 16 suit SIMD kernels)."
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option("--ignore", help="Layer to leave whole (repeatable). The output layer is always kept."),
    ] = None,
    keep_layers: Annotated[int, typer.Option(min=1, help="depth: transformer layers to keep.")] = 3,
    criterion: Annotated[
        str,
        typer.Option(
            help="depth: alternate (evenly spaced), first, last, or fidelity (greedily drop the layer that hurts the output least)."
        ),
    ] = "alternate",
    sparsity: Annotated[
        float, typer.Option(help="unstructured: fraction of weights zeroed, in (0, 1).")
    ] = 0.8,
    sparsity_scope: Annotated[
        str, typer.Option(help="unstructured: global (one threshold) or layer (same sparsity per layer).")
    ] = "global",
    l1_weight: Annotated[
        float,
        typer.Option(
            min=0,
            help="Recovery: L1 penalty on Linear/Conv weights (sparse training; pairs with --method unstructured).",
        ),
    ] = 0.0,
    steps: Annotated[
        int,
        typer.Option(min=1, help="unstructured: pruning steps on a cubic schedule, fine-tuning after each."),
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

    w, cand = _load(target, workload, data)
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
    target: TargetArg = "original",
    workload: WorkloadOpt = "mnist",
    energy: Annotated[
        float | None,
        typer.Option(
            help="Rank per layer: keep this fraction of squared singular values, e.g. 0.9 (the default rule)."
        ),
    ] = None,
    param_ratio: Annotated[
        float | None,
        typer.Option(
            help="Rank per layer from a global budget: factorised layers keep this fraction of their parameters, e.g. 0.5."
        ),
    ] = None,
    sensitivity: Annotated[
        float | None,
        typer.Option(
            help="Rank per layer by measurement: the smallest rank that, factorised alone, keeps the output cosine ≥ this, e.g. 0.99."
        ),
    ] = None,
    rank: Annotated[
        list[str] | None,
        typer.Option(
            "--rank",
            help="LAYER=RANK for one layer (repeatable), e.g. backbone.encoder.layer.0.intermediate.dense=96.",
        ),
    ] = None,
    layers: Annotated[
        list[str] | None,
        typer.Option(
            "--layers",
            help="Glob over layer names to factorise (repeatable), e.g. '*.intermediate.dense'. Default: every Linear/1x1 Conv but the output layer.",
        ),
    ] = None,
    round_to: Annotated[int, typer.Option(min=1, help="Round ranks up to a multiple of this.")] = 8,
    min_speedup: Annotated[
        float,
        typer.Option(
            min=0,
            help="Keep a layer dense unless its factorised shape times this much faster on ONNX Runtime (0: factorise regardless).",
        ),
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

    w, cand = _load(target, workload, data)
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
def share(
    target: TargetArg = "original",
    workload: WorkloadOpt = "mnist",
    bits: Annotated[
        int, typer.Option(min=2, max=8, help="Index bits per weight: 2**bits shared values per layer.")
    ] = 5,
    layer_bits: Annotated[
        list[str] | None,
        typer.Option("--layer-bits", help="LAYER=BITS for one layer (repeatable), e.g. 0=8."),
    ] = None,
    init: Annotated[str, typer.Option(help="k-means initialisation: linear or density.")] = "linear",
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="Layer stored losslessly instead (repeatable).")
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

    w, cand = _load(target, workload, data)
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
    target: TargetArg = "original",
    workload: WorkloadOpt = "mnist",
    num_layers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Student transformer layers (evenly spaced teacher layers initialise them)."
        ),
    ] = None,
    width: Annotated[
        float, typer.Option(help="Fraction of FFN neurons / channels the student keeps, in (0, 1].")
    ] = 0.5,
    init: Annotated[
        str, typer.Option(help="teacher (start from the teacher's weights) or random (from scratch).")
    ] = "teacher",
    loss: Annotated[
        str,
        typer.Option(
            help="auto, kl (+ labels, weight --alpha), labels (no teacher: the baseline), cosine or mse (embeddings)."
        ),
    ] = "auto",
    temperature: Annotated[float, typer.Option(help="kl: softmax temperature.")] = 4.0,
    alpha: Annotated[
        float, typer.Option(help="kl: weight of the teacher term against the labels' cross-entropy.")
    ] = 0.7,
    feature_weight: Annotated[
        float,
        typer.Option(help="Weight of hidden-state matching between kept layers and their teacher layers."),
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

    w, cand = _load(target, workload, data)
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


@app.command()
def layers(
    target: TargetArg = "original",
    workload: WorkloadOpt = "mnist",
    data: DataOpt = None,
) -> None:
    """List a PyTorch model's Linear / Conv / attention layers: the names that --ignore, --layer-ratio, --rank,
    --layers and --layer-bits take, with shapes and parameter counts.

    Example: `slimship layers -w minilm`
    """
    import torch

    from slimship.candidate import load_torch_model

    w, cand = _load(target, workload, data)
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
def _recipe_path(recipe: Path | None) -> Path:
    """A recipe file, or a built-in recipe by name (`minilm-fast`, the default)."""
    from importlib import resources

    from slimship.errors import ConfigError

    builtin = {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in resources.files("slimship.recipes").iterdir()
        if p.name.endswith(".yaml")
    }
    if recipe is None:
        return builtin["minilm-fast"]
    if recipe.exists():
        return recipe
    if str(recipe) in builtin:
        return builtin[str(recipe)]
    raise ConfigError(
        f"no recipe file {recipe}; built-in recipes: {sorted(builtin)} (or see examples/recipes/)"
    )


@app.command()
def run(
    recipe: Annotated[
        Path | None,
        typer.Argument(
            help="The recipe YAML (see examples/recipes/ and docs/recipe.schema.json), "
            "or a built-in recipe's name. Default: minilm-fast (MiniLM to INT8, a few minutes)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Run directory (default: runs/RECIPE-NAME). Re-running into it resumes."
        ),
    ] = None,
    limit: LimitOpt = None,
    batch_sizes: Annotated[
        str,
        typer.Option(
            "--batch-sizes",
            "-b",
            help="Batch sizes timed for the original and the final candidate (plus the latency constraint's).",
        ),
    ] = "1,32",
    register: Annotated[
        str | None,
        typer.Option(
            help="Register the final candidate in the model registry under this name, with "
            "the recipe, the run and its measurements as lineage."
        ),
    ] = None,
    registry_root: Annotated[
        Path | None,
        typer.Option(
            envvar="SLIMSHIP_REGISTRY",
            help="Registry directory for --register (default: $SLIMSHIP_REGISTRY or ~/.local/share/slimship/registry).",
        ),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(
            envvar="SLIMSHIP_REGISTRY_URL",
            help="Registry database URL for --register (default: SQLite in the registry directory).",
        ),
    ] = None,
) -> None:
    """Run a recipe's passes in order, evaluate every step, time the result against the original and check the constraints.

    An interrupted run resumes: steps whose pass, config and parent are unchanged are reused. A failing step is
    recorded with its reason and the steps after it are skipped.

    Examples: `slimship run` (the built-in default on minilm) ·
    `slimship run examples/recipes/mnist.yaml -o runs/mnist` (prune → distil → quantize; re-run to resume)
    """
    from slimship.cli import _parse_ints
    from slimship.pipeline.runner import run_recipe

    recipe = _recipe_path(recipe)
    dest = out or Path("runs") / recipe.stem
    result = run_recipe(
        recipe, dest, evaluate_limit=limit, bench_batch_sizes=_parse_ints(batch_sizes, "--batch-sizes")
    )
    for s in result["steps"]:
        extra = s.get("reason") or s.get("candidate", "")
        typer.echo(f"{s['label']:20s} {s['status']:8s} {extra}")
    verdict = result["constraints"]
    for name, c in verdict["checks"].items():
        measured = "—" if c["measured"] is None else f"{c['measured']:.4g}"
        typer.echo(
            f"constraint {name}: limit {c['limit']}, measured {measured} → {'holds' if c['holds'] else 'FAILS'}"
        )
    if not verdict.get("complete", True):
        typer.echo(
            f"recipe incomplete: a step failed, so the final candidate is the last one that finished ({verdict['final']})"
        )
    bench = result.get("bench") or {}
    for c in bench.get("candidates", []):
        if c["label"] == verdict["final"]:
            for r in c["results"]:
                typer.echo(
                    f"batch {r['batch_size']}: p50 {r['latency_ms']['p50']:.3g} ms, "
                    f"{r.get('speedup_vs_baseline_p50', 1.0):.2f}x the original"
                )
    typer.echo(f"final: {verdict['final']}; constraints {'hold' if verdict['holds'] else 'do not hold'}")
    typer.echo(f"results: {dest / 'results.json'}")
    typer.echo(f"report:  {dest / 'report.html'}")
    if register:
        _register_run(result, dest, register, registry_root, registry_url)


def _register_run(result: dict[str, Any], dest: Path, name: str, root: Path | None, url: str | None) -> None:
    from slimship.errors import ConfigError
    from slimship.registry import Registry

    verdict = result["constraints"]
    final = next((s for s in result["steps"] if s["label"] == verdict["final"]), None)
    if final is None:
        raise ConfigError("--register: no step finished, nothing to register")
    bench = next(
        (c for c in (result.get("bench") or {}).get("candidates", []) if c["label"] == final["label"]), None
    )
    measurements = {
        "evaluation": result["evaluations"].get(final["label"], {}),
        "original_evaluation": result["evaluations"].get("original", {}),
        "latency": bench["results"] if bench else [],
        "constraints": verdict,
    }
    v = Registry(root, url=url).register(
        final["candidate"],
        name,
        recipe=result["recipe"],
        measurements=measurements,
        run={
            "dir": str(dest.resolve()),
            "results": str((dest / "results.json").resolve()),
            "step": final["label"],
        },
        tags={"constraints": "hold" if verdict["holds"] else "fail"},
    )
    typer.echo(
        f"registered {v.label} ({v.digest[:12]}){'' if verdict['holds'] else ' — note: the constraints did NOT hold'}"
    )


@app.command()
def tune(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="A recipe with a `search` section (see examples/recipes/minilm-tune.yaml, docs/recipe.schema.json)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Directory for the search (default: runs/RECIPE-tune). Steps and evaluations already there are reused.",
        ),
    ] = None,
    trials: Annotated[
        int | None,
        typer.Option(min=1, help="Most candidates to evaluate (overrides the recipe's search.trials)."),
    ] = None,
    limit: LimitOpt = None,
    executor: Annotated[
        str,
        typer.Option(
            help="Where trials run: local (this process, one after another) or ray (each a Ray Tune trial on a Ray worker; pip install 'slimship[ray]')."
        ),
    ] = "local",
    seed: Annotated[
        int, typer.Option(help="Seed of the sampler: the same seed and recipe propose the same candidates.")
    ] = 0,
    address: Annotated[
        str | None,
        typer.Option(
            help="ray: the cluster — host:port of the head's GCS (e.g. 10.0.0.5:6379), ray://host:10001 (Ray Client) or auto; default: start a Ray instance on this machine (127.0.0.1)."
        ),
    ] = None,
    trial_cpus: Annotated[
        float | None,
        typer.Option(
            help="ray: CPUs reserved per trial (timing inside a trial uses that many threads), e.g. 2. Default 1."
        ),
    ] = None,
    concurrent_trials: Annotated[
        int | None,
        typer.Option(
            help="ray: trials running at once. Default 1: the same proposals as --executor local with the same seed; more trade that for throughput."
        ),
    ] = None,
    max_failures: Annotated[
        int | None,
        typer.Option(
            help="ray: restarts of a trial whose worker died before it is recorded as failed (the search goes on). Default 2."
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="ray: where Ray Tune keeps its experiment state, a path or a URI (s3://bucket/prefix). Default OUT/ray. Candidates go to OUT, which every node must see at the same path."
        ),
    ] = None,
) -> None:
    """Search the recipe's `search` space for the fastest (or smallest) candidate within its constraints.

    Every candidate is built through the recipe's passes (shared steps are reused), screened with cheap signals
    (exact size; quality and fidelity on a small slice), then evaluated in full and timed against the original on
    its real runtime, interleaved. Optuna's seeded multi-objective TPE sampler learns from speed, quality and the
    constraint violations; the search stops at the trial or time budget, when every combination was tried, or when
    a feasible candidate has not been beaten for `patience` trials. Writes tune.json and report.html.

    Example: `slimship tune examples/recipes/mnist-tune.yaml --trials 10`;
    on Ray: `slimship tune examples/recipes/mnist-tune.yaml --executor ray --address auto --trial-cpus 2 --concurrent-trials 4`
    """
    from slimship.pipeline.search import executor_for, tune_recipe

    dest = out or Path("runs") / f"{recipe.stem}-tune"
    ex = executor_for(
        executor,
        seed=seed,
        address=address,
        trial_cpus=trial_cpus,
        concurrent_trials=concurrent_trials,
        max_failures=max_failures,
        storage=storage,
    )
    result = tune_recipe(recipe, dest, trials=trials, evaluate_limit=limit, executor=ex)
    for t in result["trials"]:
        head = f"trial {t['trial']:3d}{'*' if t.get('pareto') else ' '} {t['params']}"
        if t.get("reused_from") is not None:
            typer.echo(f"{head} repeat of trial {t['reused_from']}")
        elif t["status"] == "screened":
            sc = t["screen"]
            typer.echo(f"{head} screened out: {sc['signal']} {sc['measured']:.4g} vs limit {sc['limit']:.4g}")
        elif t["status"] != "ok":
            typer.echo(f"{head} failed: {t.get('reason')}")
        else:
            typer.echo(
                f"{head} speed-up {t['speedup']:.2f}x, quality {t['quality']:.4g}, "
                f"{'feasible' if t['feasible'] else 'violates constraints'}"
            )
    best = result["best"]
    if best:
        typer.echo(
            f"best within constraints: trial {best['trial']} ({best['candidate']}): {best['speedup']:.2f}x faster than the "
            f"original at batch {result['batch_size']}, quality drop {best['quality_drop']:.3g}"
        )
    else:
        typer.echo(
            "no trial met the constraints; closest: "
            + (", ".join(str(t["trial"]) for t in result["closest_if_none_feasible"]) or "none evaluated")
        )
    typer.echo(f"{result['evaluations']} candidates evaluated; stopped: {result['stopped']}")
    typer.echo(f"results: {dest / 'tune.json'} (* = on the Pareto front of speed and quality)")
    typer.echo(f"report:  {dest / 'report.html'}")


@app.command()
def report(
    directory: Annotated[
        Path, typer.Argument(help="A run directory (results.json) or a search directory (tune.json).")
    ],
) -> None:
    """Rebuild report.html of a finished run or search from its JSON results (e.g. after upgrading slimship).

    Example: `slimship report runs/minilm-fast`
    """
    from slimship.report.html import rebuild_report

    typer.echo(f"report: {rebuild_report(directory)}")
