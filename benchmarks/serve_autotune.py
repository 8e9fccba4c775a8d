"""Does `slimship serve-tune` pick a serving config that pays? For each model: run the autotuner (a p99 budget, a grid
of max batch size × queue delay × instances × intra-op threads, closed-loop `hey` load at 1, 4 and 16 clients), then
measure, in rounds that rotate the order, three servers with the same load: slimship with the default batching
config, slimship with the chosen config, and the plain FastAPI + ONNX Runtime server of benchmarks/servers/ (one
session.run per request, no batching). Medians of the rounds; ratios per round too.

The machine may be shared: absolute figures move with the load, so only the interleaved ratios mean much; the load
average is recorded at the start and end and beside every cell, and `--context` says what else ran.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_autotune.py      # writes benchmarks/results/serve_autotune-<cpu class>.{json,md}
    ... --models mnist --rounds 1 --duration 2 --stem smoke           # a quick look (results/smoke.{json,md})

The serving config each run writes (results/<stem>/<model>/serve.yaml) names its model relative to the repository
root (benchmarks/runs/…, built by this script): serve it from there.

Models: mnist = the built-in CNN fp32 (exported + graph-optimised here from the cached reference; a real digit per
request); minilm = all-MiniLM-L6-v2 INT8 from benchmarks/quantize_minilm.py (a real BBC text, 128 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from slimship.serve.autotune import ServeProcess, autotune, free_port, hey_load, label, write_outputs
from slimship.serve.config import BatchingConfig, parse_tune_grid

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"


def mnist_model() -> tuple[Path, dict]:
    from slimship.candidate import load_candidate, original_candidate
    from slimship.passes import export, optimize_graph
    from slimship.workload import resolve_workload

    w = resolve_workload("mnist")
    root = RUNS / "serve_autotune" / "mnist"
    if not (root / "optimized" / "candidate.json").exists():
        orig = original_candidate(w, root / "original")
        exp = export(orig, w, out_dir=root / "exported")
        optimize_graph(exp, w, out_dir=root / "optimized")
    cand = load_candidate(root / "optimized")
    x = next(iter(w.eval_batches(limit=1, batch_size=1)))[1]["pixels"][:1].astype(np.float32)
    body = {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": [round(float(v), 4) for v in x.reshape(-1)],
            }
        ]
    }
    return cand.artifact_path, body


def minilm_model(path: Path) -> tuple[Path, dict]:
    from slimship.workload import resolve_workload

    if not path.exists():
        sys.exit(f"{path} is missing: run benchmarks/quantize_minilm.py first, or pass --minilm PATH")
    batch = resolve_workload("minilm").example_inputs(batch_size=1)
    body = {
        "inputs": [
            {
                "name": k,
                "shape": list(v[:1].shape),
                "datatype": "INT64",
                "data": v[:1].astype(np.int64).reshape(-1).tolist(),
            }
            for k, v in batch.items()
        ]
    }
    return path, body


def slimship_session_entries(path: Path) -> dict[str, str]:
    """The ONNX Runtime session config entries slimship serves ``path`` with on this host: its candidate's precision
    entries (e.g. `session.x64quantprecision` on AVX2 without VNNI) and the default BatchingConfig's spinning (on
    with one instance since 2026-12-02; the run of 02:28 UTC that day still measured plain-same with spinning off)."""
    from slimship.runtime.settings import settings_for_candidate
    from slimship.serve.config import BatchingConfig, spins

    meta = path.parent / "candidate.json"
    info = json.loads(meta.read_text()).get("info", {}) if meta.exists() else {}
    settings, _ = settings_for_candidate(info, path)
    spinning = {} if spins(BatchingConfig()) else {"session.intra_op.allow_spinning": "0"}
    return {**settings.session_config, **spinning}


class Plain:
    """benchmarks/servers/plain_fastapi.py on 127.0.0.1 (the serving benchmark's anchor); ``entries``: session config
    entries it adds (none: ONNX Runtime's defaults)."""

    def __init__(self, path: Path, tmp: Path, entries: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(tmp / f"plain-{self.port}.log", "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "servers" / "plain_fastapi.py"),
                str(path),
                str(self.port),
                *([json.dumps(entries)] if entries else []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the plain server exited")
            try:
                if httpx.get(f"{self.base}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the plain server did not become ready")

    def stop(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        self._log.close()


def compare(
    name: str,
    path: Path,
    body: Path,
    chosen: BatchingConfig,
    clients: list[int],
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, dict[int, list[dict]]]:
    """Rounds over default / chosen / plain / plain with slimship's session settings, order rotated each round; every
    cell a `hey` run."""
    kinds = ["default", "chosen", "plain", "plain-same"]
    runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in clients} for k in kinds}
    for rnd in range(args.rounds):
        order = kinds[rnd % len(kinds) :] + kinds[: rnd % len(kinds)]
        for kind in order:
            if kind == "plain":
                srv: ServeProcess | Plain = Plain(path, tmp)
            elif kind == "plain-same":
                srv = Plain(path, tmp, slimship_session_entries(path))
            else:
                cfg = BatchingConfig() if kind == "default" else chosen
                srv = ServeProcess(
                    {
                        "models": [
                            {
                                "name": name,
                                "path": str(path),
                                "batching": cfg.model_dump(exclude_defaults=True),
                            }
                        ]
                    },
                    tmp,
                )
            try:
                url = f"{srv.base}/v2/models/{name}/infer"
                hey_load(url, body, max(clients), args.warmup)
                for c in clients:
                    r = hey_load(url, body, c, args.duration)
                    runs[kind][c].append({**r.as_dict(), "load_average": os.getloadavg()[0]})
                    print(
                        f"round {rnd + 1} {name:7s} {kind:8s} c={c:3d} {r.rps:8.1f} req/s p50 {r.p50_ms:7.1f} "
                        f"p99 {r.p99_ms:7.1f} ms {r.statuses}",
                        flush=True,
                    )
            finally:
                srv.stop()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist,minilm")
    ap.add_argument("--minilm", type=Path, default=RUNS / "minilm_int8" / "int8-smooth-all" / "model.onnx")
    ap.add_argument("--budget-mnist", type=float, default=100.0, help="p99 budget in ms for mnist")
    ap.add_argument("--budget-minilm", type=float, default=1000.0, help="p99 budget in ms for minilm")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--tune-duration", type=float, default=3.0, help="seconds per cell in the autotuner")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per cell in the comparison")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="comparison rounds (median reported)")
    ap.add_argument("--finalists", type=int, default=3, help="autotune: best configs measured again")
    ap.add_argument("--confirm-rounds", type=int, default=2, help="autotune: extra rounds of the finalists")
    ap.add_argument(
        "--grid",
        default="{max_batch_size: [1, 8, 32], max_queue_delay_ms: [0, 2], instances: [1, 2], threads: [null, 1]}",
    )
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    ap.add_argument("--stem", default=None, help="results file stem (default serve_autotune-<cpu class>)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other models of an existing results file (each model records its own run)",
    )
    ap.add_argument(
        "--context",
        default="",
        help="what else ran on the machine meanwhile (written beside the load averages)",
    )
    args = ap.parse_args()
    from slimship.machine import cpu_class, machine_info, physical_cores

    stem = args.stem or f"serve_autotune-{cpu_class()}"
    if args.render_only:
        rep = json.loads((RESULTS / f"{stem}.json").read_text())
        (RESULTS / f"{stem}.md").write_text(markdown(rep, stem))
        print(markdown(rep, stem))
        return

    clients = [int(c) for c in args.clients.split(",")]
    grid = parse_tune_grid(args.grid, "--grid")
    tmp = Path(tempfile.mkdtemp(prefix="slimship-serve-autotune-"))
    out_dir = RESULTS / stem
    old = RESULTS / f"{stem}.json"
    kept = json.loads(old.read_text())["models"] if args.merge and old.exists() else {}
    command = "benchmarks/serve_autotune.py " + " ".join(sys.argv[1:])
    report: dict = {
        "machine": machine_info(physical_cores()),
        "cpu_class": cpu_class(),
        "load_average_start": os.getloadavg(),
        "clients": clients,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "tune_duration_s": args.tune_duration,
        "grid": grid.model_dump(),
        "models": {k: v for k, v in kept.items() if k not in args.models.split(",")},
        "command": command,
        "context": args.context,
        "priority": os.nice(0),
    }
    for name in args.models.split(","):
        path, body_data = mnist_model() if name == "mnist" else minilm_model(args.minilm)
        budget = args.budget_mnist if name == "mnist" else args.budget_minilm
        body = tmp / f"{name}.json"
        body.write_text(json.dumps(body_data))
        t0, load0 = time.monotonic(), os.getloadavg()
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        result = autotune(
            path,
            budget,
            name=name,
            grid=grid,
            clients=tuple(clients),
            duration_s=args.tune_duration,
            warmup_s=args.warmup,
            request=body_data,
            generator="hey",
            finalists=args.finalists,
            confirm_rounds=args.confirm_rounds,
            progress=lambda s: print(s, flush=True),
        )
        rel = _relative(path)
        paths = write_outputs(result, out_dir / name, model_path=rel)
        tune_s = time.monotonic() - t0
        print(f"{name}: chosen {label(result.chosen)} in {tune_s:.0f} s", flush=True)
        runs = compare(name, path, body, result.chosen, clients, args, tmp)
        report["models"][name] = {
            "path": rel,
            "p99_budget_ms": budget,
            "tune_seconds": tune_s,
            "chosen": result.chosen.model_dump(),
            "chosen_label": label(result.chosen),
            "tune_notes": result.choice.notes if result.choice else [],
            "sweep": json.loads(paths["json"].read_text()),
            "runs": {k: {str(c): v for c, v in by.items()} for k, by in runs.items()},
            "plain_same_entries": slimship_session_entries(path),
            "run": {
                "started": started,
                "command": command,
                "context": args.context,
                "priority": os.nice(0),
                "load_average_start": load0,
                "load_average_end": os.getloadavg(),
                "rounds": args.rounds,
                "duration_s": args.duration,
                "tune_duration_s": args.tune_duration,
                "grid": grid.model_dump(),
                "finalists": args.finalists,
                "confirm_rounds": args.confirm_rounds,
            },
        }
        report["load_average_end"] = (
            os.getloadavg()
        )  # written after each model: a long run keeps what it measured
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (RESULTS / f"{stem}.md").write_text(markdown(report, stem))
    print(markdown(report, stem))


def _relative(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (what the committed results name)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def markdown(rep: dict, stem: str) -> str:
    med = statistics.median
    cores = rep["machine"].get("physical_cores", "?")
    lines = [
        f"# serve-tune's chosen config vs the default vs plain FastAPI + ONNX Runtime (CPU class {rep['cpu_class']})",
        "",
        f"{rep['machine'].get('cpu_model', '')} ({rep['machine'].get('int8_kernels', '')}), {cores} cores. Per model: "
        "`slimship serve-tune` (the autotuner) chooses a config, then the servers get the same closed-loop `hey` "
        "load in rounds that rotate their order — slimship with the default `BatchingConfig()` (max batch 32, queue "
        "delay 0, 1 instance, all cores), slimship with the chosen config, the plain FastAPI + ONNX Runtime "
        "server (benchmarks/servers/plain_fastapi.py: one session.run per request, ONNX Runtime's default session "
        "options) and `plain-same`, that plain server with the session settings slimship runs the model with "
        "(spinning off, the candidate's precision entries) — one real single-row JSON request each. Medians of the rounds; absolute req/s move with the "
        "machine's load, the ratios come from the same rounds. Each model's run (time, priority, load, command) is "
        "given under it.",
        "",
    ]
    for name, m in rep["models"].items():
        budget = m["p99_budget_ms"]
        run = m.get("run") or {  # results written before runs were recorded per model
            k: rep.get(k)
            for k in ("command", "context", "priority", "rounds", "duration_s", "tune_duration_s", "grid")
        } | {"load_average_start": rep["load_average_start"], "load_average_end": rep["load_average_end"]}
        prio = "normal priority" if run.get("priority", 19) == 0 else f"niced ({run.get('priority')})"
        lines += [
            f"## {name}: p99 budget {budget:g} ms — chosen: {m['chosen_label']} (autotune {m['tune_seconds']:.0f} s)",
            "",
            f"Run {run.get('started', '')} at {prio}; load average (1 min) {run['load_average_start'][0]:.2f} at the "
            f"start, {run['load_average_end'][0]:.2f} at the end"
            + (f"; meanwhile: {run['context']}" if run.get("context") else "")
            + f". Comparison: {run['rounds']} rounds of {run['duration_s']:g} s per cell. Autotune: "
            f"{run['tune_duration_s']:g} s per cell, grid {json.dumps(run['grid'])} (+ the default), the finalists "
            "and the default measured again in interleaved rounds. "
            f"Command: `PYTHONPATH=src .venv/bin/python {run['command'].rstrip()}`",
            "",
            "| clients | server | req/s | p50 ms | p99 ms | within budget | × default | × plain | × plain-same "
            "| per-round × plain |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        kinds = [k for k in ("chosen", "default", "plain", "plain-same") if k in m["runs"]]
        for c in rep["clients"]:
            cell = {k: m["runs"][k][str(c)] for k in kinds}
            rps = {k: med(r["rps"] for r in v) for k, v in cell.items()}
            for k in kinds:
                p99 = med(r["p99_ms"] for r in cell[k])
                per_round = ", ".join(
                    f"{a['rps'] / b['rps']:.2f}" for a, b in zip(cell[k], cell["plain"], strict=True)
                )
                same = f"{rps[k] / rps['plain-same']:.2f}" if "plain-same" in rps else "—"
                lines.append(
                    f"| {c} | {k} | {rps[k]:.1f} | {med(r['p50_ms'] for r in cell[k]):.1f} | {p99:.1f} | "
                    f"{'yes' if p99 <= budget else '**no**'} | {rps[k] / rps['default']:.2f} | "
                    f"{rps[k] / rps['plain']:.2f} | {same} | {per_round if k != 'plain' else ''} |"
                )

        def slower(than: str, m: dict = m) -> list[int]:
            return [
                c
                for c in rep["clients"]
                if than in m["runs"]
                and med(r["rps"] for r in m["runs"]["chosen"][str(c)])
                < med(r["rps"] for r in m["runs"][than][str(c)])
            ]

        losses, losses_same = slower("plain"), slower("plain-same")
        worse_than_default = [
            c
            for c in rep["clients"]
            if med(r["rps"] for r in m["runs"]["chosen"][str(c)])
            < med(r["rps"] for r in m["runs"]["default"][str(c)])
        ]
        kept = m["chosen"] == BatchingConfig().model_dump()
        lines += [""]
        lines.append(
            f"- **The chosen config is slower than the plain server at {', '.join(map(str, losses))} clients** "
            "(medians above)."
            if losses
            else "- The chosen config is at least as fast as the plain server at every client count measured (medians)."
        )
        if "plain-same" in m["runs"]:
            lines.append(
                "- `plain-same` is the same plain server with slimship's ONNX Runtime session settings for this model "
                f"on this host ({json.dumps(m.get('plain_same_entries', {}))}): "
                + (
                    f"**the chosen config is slower than it at {', '.join(map(str, losses_same))} clients**."
                    if losses_same
                    else "the chosen config is at least as fast as it at every client count measured."
                )
            )
        if kept:
            lines.append(
                "- The tuner kept the default (see its notes): the `chosen` and `default` rows are the same config "
                "measured as two servers in each round, so their ratio shows the noise between two runs of one config."
            )
        lines.append(
            f"- Slower than the default at {', '.join(map(str, worse_than_default))} clients (medians)."
            if worse_than_default
            else "- At least as fast as the default at every client count measured (medians)."
        )
        lines += [f"- autotune: {n}" for n in m["tune_notes"]]
        loads = [r["load_average"] for k in kinds for v in m["runs"][k].values() for r in v]
        lines += [
            f"- Load average (1 min) after the comparison cells: {min(loads):.2f}–{max(loads):.2f}.",
            f"- The sweep: [{stem}/{name}/serve_tune.md]({stem}/{name}/serve_tune.md); the serving config it wrote: "
            f"[{stem}/{name}/serve.yaml]({stem}/{name}/serve.yaml) (its model path is relative to the repository "
            "root, where this script builds the model).",
            "",
        ]
    lines += [f"- **{k}: not measured** — {why}." for k, why in rep.get("not_measured", {}).items()]
    if rep.get("reading"):  # written after the run, by hand, into the JSON (then --render-only)
        lines += ["## Reading these runs", "", *rep["reading"], ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
