"""`slimship run | tune | report | quickstart`: jobs driven by a recipe — run one (resumable, optionally
registering the result), search its space, rebuild a report, and the quickstart's export → optimise → measure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slimship.cli._app import DataOpt, LimitOpt, ThreadsOpt, WorkloadOpt, app, console, parse_ints


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
    timing_budget: Annotated[
        float,
        typer.Option(
            "--timing-budget",
            min=0.0,
            help="Seconds of timed calls per candidate and batch size after which the timing of slow batches may "
            "stop (never under 10 rounds; fast batches still get 30+). 0: full 30 rounds everywhere. A batch size "
            "a latency constraint is judged at always gets full rounds.",
        ),
    ] = 8.0,
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
    recorded with its reason and the steps after it are skipped. A step verified equal to its parent (export,
    optimize) reuses its parent's quality instead of a full evaluation. When the constraints fail and a step
    declares `fallbacks`, each is tried in turn (`fallback_policy: first` stops at the first that holds;
    `fastest` tries all and keeps the fastest that holds); report.html lists every attempt.

    Exit codes: 0 the constraints hold · 3 they do not hold (no attempt held; results and report are written) ·
    2 a bad recipe or another error.

    Examples: `slimship run` (the built-in default on minilm) ·
    `slimship run examples/recipes/mnist.yaml -o runs/mnist` (prune → distil → quantize; re-run to resume)
    """
    from slimship.pipeline.runner import run_recipe

    recipe = _recipe_path(recipe)
    dest = out or Path("runs") / recipe.stem
    result = run_recipe(
        recipe,
        dest,
        evaluate_limit=limit,
        bench_batch_sizes=parse_ints(batch_sizes, "--batch-sizes"),
        timing_budget_s=timing_budget or None,
    )
    for s in result["steps"]:
        extra = s.get("reason") or s.get("candidate", "")
        typer.echo(f"{s['label']:20s} {s['status']:8s} {extra}")
    verdict = result["constraints"]
    _echo_attempts(result)
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
    for warning in bench.get("warnings", []):  # e.g. timed on a busy machine: the ratios above are suspect
        console().print(f"[bold yellow]timing warning:[/bold yellow] {warning}")
    typer.echo(f"final: {verdict['final']}; constraints {'hold' if verdict['holds'] else 'do not hold'}")
    typer.echo(f"results: {dest / 'results.json'}")
    typer.echo(f"report:  {dest / 'report.html'}")
    if register:
        _register_run(result, dest, register, registry_root, registry_url)
    if not verdict["holds"]:
        console().print(
            f"[bold red]the constraints do not hold[/bold red] (exit code {EXIT_CONSTRAINTS_FAIL}); see {dest / 'report.html'}"
        )
        raise typer.Exit(EXIT_CONSTRAINTS_FAIL)


#: `slimship run`'s exit code when the final constraints do not hold (no attempt held)
EXIT_CONSTRAINTS_FAIL = 3


def _echo_attempts(result: dict[str, Any]) -> None:
    """One line per attempt when the recipe has fallbacks."""
    attempts = result.get("attempts") or []
    fb = result.get("fallback") or {}
    if fb.get("attempts_declared", 1) <= 1:
        return
    for a in attempts:
        drop = "—" if a.get("quality_drop") is None else f"{a['quality_drop']:+.3g}"
        mark = "kept" if a.get("kept") else ("holds" if a["holds"] else "fails")
        typer.echo(f"attempt {a['attempt']} {a['label']:28s} quality drop {drop:>8s}  {mark}")
    typer.echo(f"kept attempt {fb['kept']} ({fb['kept_label']}): {fb['reason']}")


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
            on = f"{t['precision']} on {t['runtime']}, " if t.get("runtime") else ""
            typer.echo(
                f"{head} {on}speed-up {t['speedup']:.2f}x, quality {t['quality']:.4g}, "
                f"{'feasible' if t['feasible'] else 'violates constraints'}"
            )
    best = result["best"]
    if best:
        typer.echo(
            f"best within constraints: trial {best['trial']} ({best['candidate']}): {best['speedup']:.2f}x faster than the "
            f"original at batch {result['batch_size']}, quality drop {best['quality_drop']:.3g}"
            + (
                f"; {best['precision']} on {best['runtime']} ({best.get('cpu_class')})"
                if best.get("runtime")
                else ""
            )
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
    stderr = console()
    results = run_quickstart(
        workload,
        out,
        limit=limit,
        batch_sizes=parse_ints(batch_sizes, "--batch-sizes"),
        seq_len=seq_len,
        runs=runs,
        warmup=warmup,
        threads=threads,
        memory=memory,
        data=data,
        log=lambda msg: stderr.print(f"[bold]·[/bold] {msg}"),
    )
    typer.echo((out / "summary.md").read_text())
    typer.echo(results["headline"])
    typer.echo(f"results: {out / 'results.json'}\nsummary: {out / 'summary.md'}")
