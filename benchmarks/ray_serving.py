"""Ray Serve sizing: `slimship serve --ray` with 1 replica (2 CPUs) and 2 replicas (1 CPU each) against the
single-process `slimship serve` (the anchor, same run), same models, same closed-loop `hey` load as serving.py.

    .venv/bin/python benchmarks/ray_serving.py          # ≈ 8 minutes; writes benchmarks/results/ray_serving.{json,md}

Every configuration gets the same 2 cores, shared with the load generator and — on Ray — with Ray's HTTP proxy, the
protocol ingress and the GCS/raylet, as they would be on one 2-core node.
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
from serving import RESULTS, free_port, hey, models

CONFIGS = {  # label → (--ray?, replicas block)
    "single process": (False, None),
    "ray, 1 replica x 2 CPUs": (True, {"num_replicas": 1, "num_cpus": 2, "max_ongoing_requests": 64}),
    "ray, 2 replicas x 1 CPU": (True, {"num_replicas": 2, "num_cpus": 1, "max_ongoing_requests": 64}),
}


def start(label: str, model: str, path: Path, tmp: Path) -> tuple[subprocess.Popen, int]:
    ray, replicas = CONFIGS[label]
    port = free_port()
    spec = {"name": model, "path": str(path), "batching": {"max_batch_size": 32, "max_queue": 1024}}
    if replicas:
        spec["replicas"] = replicas
    cfg = tmp / f"{model}-{port}.yaml"
    cfg.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": port, "models": [spec]}))
    log = open(tmp / f"{model}-{port}.log", "w")  # noqa: SIM115 - lives as long as the server
    cmd = [
        sys.executable,
        "-m",
        "slimship.cli",
        "serve",
        "--config",
        str(cfg),
        "--no-access-log",
        *(["--ray"] if ray else []),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / f"{model}-{port}.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{label} did not become ready")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15, help="seconds of load per measurement")
    ap.add_argument("--clients", default="8,32", help="closed-loop client counts")
    ap.add_argument("--models", default="minilm-int8,mnist", help="which models")
    args = ap.parse_args()
    ms = models()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for model in args.models.split(","):
            body = tmp / f"{model}.json"
            body.write_text(json.dumps({"inputs": ms[model]["inputs"]}))
            for label in CONFIGS:
                proc, port = start(label, model, ms[model]["path"], tmp)
                try:
                    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
                    hey(url, body, 4, 3)  # warm up
                    for c in [int(x) for x in args.clients.split(",")]:
                        r = hey(url, body, c, args.duration)
                        rows.append({"model": model, "config": label, "clients": c, **r})
                        print(
                            f"{model:12} {label:26} c{c:<3} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                            f"codes {r['codes']}",
                            flush=True,
                        )
                finally:
                    stop(proc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray_serving.json").write_text(
        json.dumps({"rows": rows, "duration_s": args.duration}, indent=1)
    )
    lines = [
        "# Ray Serve sizing (`slimship serve --ray`) against the single-process server, same run",
        "",
        f"`hey` closed loop, {args.duration:g} s per cell, one JSON request of one row each (a BBC article for minilm, "
        "a digit for mnist); 2 shared cores. From `benchmarks/ray_serving.py`.",
        "",
        "| model | config | clients | req/s | × single process | p50 ms | p99 ms | non-200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        anchor = next(
            a
            for a in rows
            if a["model"] == r["model"] and a["clients"] == r["clients"] and a["config"] == "single process"
        )
        bad = sum(n for code, n in r["codes"].items() if code != 200)
        lines.append(
            f"| {r['model']} | {r['config']} | {r['clients']} | {r['rps']:.1f} | {r['rps'] / anchor['rps']:.2f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {bad} |"
        )
    (RESULTS / "ray_serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
