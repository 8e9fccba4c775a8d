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


class Plain:
    """benchmarks/servers/plain_fastapi.py on 127.0.0.1 (the serving benchmark's anchor)."""

    def __init__(self, path: Path, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(tmp / f"plain-{self.port}.log", "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "servers" / "plain_fastapi.py"),
                str(path),
                str(self.port),
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
    """Rounds over default / chosen / plain, order rotated each round; every cell a `hey` run."""
    kinds = ["default", "chosen", "plain"]
    runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in clients} for k in kinds}
    for rnd in range(args.rounds):
        order = kinds[rnd % 3 :] + kinds[: rnd % 3]
        for kind in order:
            if kind == "plain":
                srv: ServeProcess | Plain = Plain(path, tmp)
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
        default="{max_batch_size: [1, 8, 32], max_queue_delay_ms: [0, 2], instances: [1, 2]}",
    )
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    ap.add_argument("--stem", default=None, help="results file stem (default serve_autotune-<cpu class>)")
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
    report: dict = {
        "machine": machine_info(physical_cores()),
        "cpu_class": cpu_class(),
        "load_average_start": os.getloadavg(),
        "clients": clients,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "tune_duration_s": args.tune_duration,
        "grid": grid.model_dump(),
        "models": {},
        "command": "benchmarks/serve_autotune.py " + " ".join(sys.argv[1:]),
        "context": args.context,
        "priority": os.nice(0),
    }
    for name in args.models.split(","):
        path, body_data = mnist_model() if name == "mnist" else minilm_model(args.minilm)
        budget = args.budget_mnist if name == "mnist" else args.budget_minilm
        body = tmp / f"{name}.json"
        body.write_text(json.dumps(body_data))
        t0 = time.monotonic()
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
    la0, la1 = rep["load_average_start"][0], rep["load_average_end"][0]
    cores = rep["machine"].get("physical_cores", "?")
    prio = "normal priority" if rep.get("priority", 19) == 0 else f"niced ({rep.get('priority')})"
    lines = [
        f"# serve-tune's chosen config vs the default vs plain FastAPI + ONNX Runtime (CPU class {rep['cpu_class']})",
        "",
        f"{rep['machine'].get('cpu_model', '')} ({rep['machine'].get('int8_kernels', '')}), {cores} cores; this run at "
        f"{prio}; load average (1 min) {la0:.2f} at the start, {la1:.2f} at the end"
        + (f"; meanwhile: {rep['context']}" if rep.get("context") else "")
        + ". Absolute req/s move with the load; the ratios come from the same rounds (servers rotated each round, "
        f"medians of {rep['rounds']} rounds of {rep['duration_s']:g} s per cell, `hey` closed loop, one real "
        "single-row JSON request each). Autotune: "
        f"{rep['tune_duration_s']:g} s per cell, grid {json.dumps(rep['grid'])} (+ the default), finalists and the "
        "default measured again in interleaved rounds; default = `BatchingConfig()` (max batch 32, queue delay 0, "
        "1 instance, all cores).",
        "",
    ]
    for name, m in rep["models"].items():
        budget = m["p99_budget_ms"]
        lines += [
            f"## {name}: p99 budget {budget:g} ms — chosen: {m['chosen_label']} (autotune {m['tune_seconds']:.0f} s)",
            "",
            "| clients | server | req/s | p50 ms | p99 ms | within budget | × default | × plain | per-round × plain |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in rep["clients"]:
            cell = {k: m["runs"][k][str(c)] for k in ("default", "chosen", "plain")}
            rps = {k: med(r["rps"] for r in v) for k, v in cell.items()}
            for k in ("chosen", "default", "plain"):
                p99 = med(r["p99_ms"] for r in cell[k])
                per_round = ", ".join(
                    f"{a['rps'] / b['rps']:.2f}" for a, b in zip(cell[k], cell["plain"], strict=True)
                )
                lines.append(
                    f"| {c} | {k} | {rps[k]:.1f} | {med(r['p50_ms'] for r in cell[k]):.1f} | {p99:.1f} | "
                    f"{'yes' if p99 <= budget else '**no**'} | {rps[k] / rps['default']:.2f} | "
                    f"{rps[k] / rps['plain']:.2f} | {per_round if k != 'plain' else ''} |"
                )
        losses = [
            c
            for c in rep["clients"]
            if med(r["rps"] for r in m["runs"]["chosen"][str(c)])
            < med(r["rps"] for r in m["runs"]["plain"][str(c)])
        ]
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
        loads = [
            r["load_average"]
            for k in ("default", "chosen", "plain")
            for v in m["runs"][k].values()
            for r in v
        ]
        lines += [
            f"- Load average (1 min) after the comparison cells: {min(loads):.2f}–{max(loads):.2f}.",
            f"- The sweep: [{stem}/{name}/serve_tune.md]({stem}/{name}/serve_tune.md); the serving config it wrote: "
            f"[{stem}/{name}/serve.yaml]({stem}/{name}/serve.yaml) (its model path is relative to the repository "
            "root, where this script builds the model).",
            "",
        ]
    lines += [f"- **{k}: not measured** — {why}." for k, why in rep.get("not_measured", {}).items()]
    if rep.get("reading"):  # written after the run, by hand, into the JSON (then --render-only)
        lines += ["## Reading this run", "", *rep["reading"], ""]
    lines.append(f"Command: `PYTHONPATH=src .venv/bin/python {rep['command']}`".rstrip())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
