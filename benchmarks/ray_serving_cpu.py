"""Where the Ray path's time goes: CPU milliseconds per request of each process under `slimship serve --ray`
(1 replica x 2 CPUs, 32 closed-loop `hey` clients for 10 s). Writes benchmarks/results/ray_serving_cpu.json.

    .venv/bin/python benchmarks/ray_serving_cpu.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import RESULTS, free_port, hey, models


def cpu_by_process(procs: list[psutil.Process]) -> dict[int, tuple[str, float]]:
    out = {}
    for q in procs:
        try:
            t = q.cpu_times()
            cmd = q.cmdline()
            name = cmd[0] if cmd[0].startswith("ray::") else Path(cmd[0]).name
            out[q.pid] = (name, t.user + t.system)
        except (psutil.Error, IndexError):
            pass
    return out


def main() -> None:
    ms = models()
    res = {}
    for model in ("mnist", "minilm-int8"):
        tmp = Path(tempfile.mkdtemp())
        port = free_port()
        spec = {
            "name": model,
            "path": str(ms[model]["path"]),
            "batching": {"max_queue": 1024},
            "replicas": {"num_cpus": 2},
        }
        (tmp / "serve.yaml").write_text(yaml.safe_dump({"host": "127.0.0.1", "port": port, "models": [spec]}))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "slimship.cli",
                "serve",
                "--config",
                str(tmp / "serve.yaml"),
                "--ray",
                "--no-access-log",
            ],
            stdout=open(tmp / "log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            body = tmp / "body.json"
            body.write_text(json.dumps({"inputs": ms[model]["inputs"]}))
            url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
            hey(url, body, 4, 3)  # warm up
            procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            before = cpu_by_process(procs)
            r = hey(url, body, 32, 10)
            after = cpu_by_process(procs)
            n = sum(r["codes"].values())
            per: dict[str, float] = {}
            for pid, (name, t) in after.items():
                if pid in before:
                    per[name] = per.get(name, 0.0) + (t - before[pid][1]) * 1000 / n
            res[model] = {
                "requests": n,
                "rps": r["rps"],
                "cpu_ms_per_request": {
                    k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0.05
                },
            }
            print(model, json.dumps(res[model], indent=1), flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    (RESULTS / "ray_serving_cpu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
