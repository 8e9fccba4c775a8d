"""Replicated ingress on Ray: `slimship serve --ray` with 1 and with 2 ingress replicas (`--ingress-replicas`), same
model deployment (1 replica × 1 CPU), same closed-loop `hey` load as serving.py, configurations interleaved round by
round (ratios from one run; the load average before each cell is recorded beside it).

    SLIMSHIP_CACHE_DIR=.cache/test .venv/bin/python benchmarks/ray_ingress.py   # ≈ 5 minutes
    # writes benchmarks/results/ray_ingress-<cpu class>.{json,md}

The model is the digits MLP exported here (a tiny model: the ingress, not the model, is what is measured). With 2
ingress replicas every answered request also reports to the shared-state actor (A/B ids and tallies) before it is
answered, and the replicas share the machine's cores with the proxy, the model replica, the actor and `hey`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import RESULTS, free_port

from slimship.serve.autotune import hey_load


def hey(url: str, body: Path, clients: int, seconds: float) -> dict:
    """One closed-loop `hey` run: req/s, p50/p99 (inf when nothing was answered), status codes, transport errors."""
    r = hey_load(url, body, clients, seconds)
    return {
        "rps": r.rps,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "codes": r.statuses,
        "transport_errors": r.transport_errors,
    }


CONFIGS = {"1 ingress replica": 1, "2 ingress replicas": 2}


def digits_model(tmp: Path) -> tuple[Path, dict]:
    import numpy as np

    from slimship.candidate import original_candidate
    from slimship.passes import export
    from slimship.workload import resolve_workload

    w = resolve_workload("digits")
    exp = export(original_candidate(w, tmp / "original"), w, out_dir=tmp / "exported")
    x = next(iter(w.eval_batches(limit=1, batch_size=1)))[1]["pixels"][:1].astype(np.float32)
    body = {
        "inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    return exp.artifact_path, body


def start(ingress: int, path: Path, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    spec = {
        "name": "digits",
        "path": str(path),
        "batching": {"max_batch_size": 32, "max_queue": 1024},
        "replicas": {"num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 64},
    }
    cfg = tmp / f"serve-{port}.yaml"
    cfg.write_text(
        yaml.safe_dump({"host": "127.0.0.1", "port": port, "ingress_replicas": ingress, "models": [spec]})
    )
    log = open(tmp / f"serve-{port}.log", "w")  # noqa: SIM115 - lives as long as the server
    cmd = [sys.executable, "-m", "slimship.cli", "serve", "--config", str(cfg), "--no-access-log", "--ray"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / f"serve-{port}.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{ingress} ingress replicas did not become ready")


def stop(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGTERM)  # the driver removes the deployments and stops its Ray instance
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    from slimship.machine import cpu_class

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8, help="seconds of load per measurement")
    ap.add_argument("--clients", default="8,32", help="closed-loop client counts")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over both configurations (median reported)")
    ap.add_argument("--stem", default=None, help="results file stem (default ray_ingress-<cpu class>)")
    ap.add_argument(
        "--context", default="", help="what else ran on the machine meanwhile (written beside the loads)"
    )
    args = ap.parse_args()
    klass = cpu_class()
    rows = []
    load_start, t_start = os.getloadavg(), time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path, payload = digits_model(tmp)
        body = tmp / "body.json"
        body.write_text(json.dumps(payload))
        for rnd in range(args.rounds):
            order = list(CONFIGS.items())
            for label, n in order if rnd % 2 == 0 else order[::-1]:  # neither always first
                proc, port = start(n, path, tmp)
                try:
                    url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
                    hey(url, body, 4, 3)  # warm up
                    for c in [int(x) for x in args.clients.split(",")]:
                        load = os.getloadavg()[0]
                        r = hey(url, body, c, args.duration)
                        rows.append({"round": rnd, "config": label, "clients": c, "loadavg_1m": load, **r})
                        if set(r["codes"]) != {200} or r["transport_errors"]:
                            print((tmp / f"serve-{port}.log").read_text()[-3000:], flush=True)
                        print(
                            f"round {rnd} {label:20} c{c:<3} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:.1f} ms  "
                            f"p99 {r['p99_ms']:.1f} ms  codes {r['codes']}  load {load:.1f}",
                            flush=True,
                        )
                finally:
                    stop(proc)
    load_end = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"ray_ingress-{klass}"
    command = "benchmarks/ray_ingress.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {
                "cpu_class": klass,
                "cores": os.cpu_count(),
                "duration_s": args.duration,
                "rounds": args.rounds,
                "priority": os.nice(0),
                "load_average_start": load_start,
                "load_average_end": load_end,
                "wall_s": time.monotonic() - t_start,
                "context": args.context,
                "command": command,
                "rows": rows,
            },
            indent=1,
        )
    )

    def median(xs: list[float]) -> float:
        s = sorted(xs)
        return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2

    lines = [
        f"# Replicated ingress on Ray (`--ingress-replicas`), CPU class {klass}, one interleaved run",
        "",
        f"`hey` closed loop, {args.duration:g} s per cell, {args.rounds} rounds (median; the order of the two "
        "configurations alternates by round), one JSON digits request each; model deployment 1 replica × 1 CPU, "
        "dynamic batching up to 32; "
        f"{os.cpu_count()} cores shared by the proxy, the ingress replica(s), the model replica, the shared-state actor "
        f"and `hey`. This run at {'normal priority' if os.nice(0) == 0 else f'nice {os.nice(0)}'}; load average "
        f"(1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end"
        + (f"; meanwhile: {args.context}" if args.context else "")
        + ".",
        "",
        "| config | clients | req/s | × 1 ingress | p50 ms | p99 ms | non-200 | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in CONFIGS:
        for c in sorted({r["clients"] for r in rows}):
            cell = [r for r in rows if r["config"] == label and r["clients"] == c]
            one = [r for r in rows if r["config"] == "1 ingress replica" and r["clients"] == c]
            rps = median([r["rps"] for r in cell])
            bad = sum(n for r in cell for code, n in r["codes"].items() if code != 200)
            loads = ", ".join(f"{r['loadavg_1m']:.1f}" for r in cell)
            lines.append(
                f"| {label} | {c} | {rps:.1f} | {rps / median([r['rps'] for r in one]):.2f} | "
                f"{median([r['p50_ms'] for r in cell]):.1f} | {median([r['p99_ms'] for r in cell]):.1f} | {bad} | "
                f"{loads} |"
            )
    lines += [
        "",
        f"Command: `SLIMSHIP_CACHE_DIR=.cache/test PYTHONPATH=src .venv/bin/python {command.rstrip()}`",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
