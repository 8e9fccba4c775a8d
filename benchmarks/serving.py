"""Serving benchmark: slimship vs a plain FastAPI + ONNX Runtime server (no batching) vs MLServer 1.7 with a custom
ONNX Runtime runtime (its own virtual environment, adaptive batching on), same models, same closed-loop load.

Load: `hey` (Debian package) keeps C clients busy for a fixed time, each sending one Open Inference Protocol JSON
request (one row: a real BBC text for minilm, a real digit for mnist) as soon as its previous one is answered.
Every server gets the same ONNX file and 2 cores (shared with the load generator, as on a real 2-core host).
Rounds alternate the servers; the table reports the median round.

    .venv/bin/python benchmarks/serving.py                  # ≈ 12 minutes; writes benchmarks/results/serving.{json,md}
    .venv/bin/python benchmarks/serving.py --duration 5 --rounds 1   # a quick look

MLServer needs its own venv (it pins older dependencies and crashes with uvloop ≥ 0.22):
    python3.11 -m venv benchmarks/runs/mlserver-venv   # (the committed result: --instances 2)
    benchmarks/runs/mlserver-venv/bin/pip install "mlserver>=1.7,<1.8" "uvloop<0.22" onnxruntime numpy
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"
RESULTS = ROOT / "benchmarks" / "results"
MLSERVER_VENV = RUNS / "mlserver-venv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def models() -> dict[str, dict]:
    """The ONNX files and one real request body each."""
    from slimship.workload import resolve_workload

    out = {}
    minilm = RUNS / "minilm_int8" / "int8-smooth-all" / "model.onnx"
    mnist = RUNS / "mnist_fp32" / "optimized" / "model.onnx"
    for p, hint in ((minilm, "benchmarks/quantize_minilm.py"), (mnist, "benchmarks/fp32_runtimes.py")):
        if not p.exists():
            sys.exit(f"{p} is missing: run {hint} first (it builds the models this benchmark serves)")
    w = resolve_workload("minilm")
    batch = w.example_inputs(batch_size=1)  # a real article, 128 tokens
    out["minilm-int8"] = {
        "path": minilm,
        "inputs": [
            {
                "name": k,
                "shape": list(v[:1].shape),
                "datatype": "INT64",
                "data": v[:1].astype(np.int64).reshape(-1).tolist(),
            }
            for k, v in batch.items()
        ],
    }
    m = resolve_workload("mnist")
    x = next(iter(m.eval_batches(limit=1, batch_size=1)))[1]["pixels"][:1].astype(np.float32)
    out["mnist"] = {
        "path": mnist,
        "inputs": [
            {
                "name": "pixels",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": [round(float(v), 4) for v in x.reshape(-1)],
            }
        ],
    }
    return out


class Srv:
    def __init__(
        self,
        kind: str,
        model: str,
        path: Path,
        tmp: Path,
        max_batch: int,
        delay_ms: float,
        instances: int = 1,
    ) -> None:
        self.kind, self.port = kind, free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        log = open(tmp / f"{kind}-{model}.log", "w")  # noqa: SIM115 - lives as long as the server
        if kind == "slimship":
            cmd = [
                sys.executable,
                "-m",
                "slimship.cli",
                "serve",
                "-m",
                f"{model}={path}",
                "--port",
                str(self.port),
                "--max-batch-size",
                str(max_batch),
                "--max-queue-delay-ms",
                str(delay_ms),
                "--no-access-log",
                "--max-queue",
                "1024",
                "--instances",
                str(instances),
            ]
        elif kind == "plain-fastapi":
            cmd = [
                sys.executable,
                str(ROOT / "benchmarks" / "servers" / "plain_fastapi.py"),
                str(path),
                str(self.port),
            ]
        else:
            mdir = tmp / f"mlserver-{model}"
            shutil.copytree(ROOT / "benchmarks" / "servers" / "mlserver_onnx", mdir, dirs_exist_ok=True)
            (mdir / "settings.json").write_text(
                json.dumps(
                    {
                        "http_port": self.port,
                        "grpc_port": free_port(),
                        "host": "127.0.0.1",
                        "metrics_port": free_port(),
                        "parallel_workers": 0,
                    }
                )
            )
            (mdir / "model-settings.json").write_text(
                json.dumps(
                    {
                        "name": model,
                        "implementation": "runtime.OnnxRuntimeModel",
                        "parameters": {"uri": str(path)},
                        "max_batch_size": max_batch,
                        "max_batch_time": delay_ms / 1000.0,
                    }
                )
            )
            cmd = [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(mdir)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=tmp / f"mlserver-{model}" if kind == "mlserver" else None,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {(tmp / f'{kind}-{model}.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{kind} did not become ready")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def hey(url: str, body: Path, clients: int, seconds: float) -> dict:
    out = subprocess.run(
        [
            "hey",
            "-z",
            f"{seconds}s",
            "-c",
            str(clients),
            "-m",
            "POST",
            "-T",
            "application/json",
            "-D",
            str(body),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {int(p): float(v) * 1000 for p, v in re.findall(r"\s+(\d+)% in ([\d.]+) secs", out)}
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    errors = len(re.findall(r"Error distribution", out))
    return {
        "rps": rps,
        "p50_ms": lat.get(50),
        "p99_ms": lat.get(99),
        "codes": codes,
        "transport_errors": errors,
    }


def ceiling(path: Path, inputs: list[dict], seconds: float = 5.0) -> dict[str, float]:
    """What the hardware gives without HTTP: rows/s of ONNX Runtime in-process — one row per run from one thread
    and from 2 threads at once (what a thread-pool server does), and 32-row batches (what batching does)."""
    import threading

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    dt = {"FP32": np.float32, "INT64": np.int64}
    one = {i["name"]: np.asarray(i["data"], dtype=dt[i["datatype"]]).reshape(i["shape"]) for i in inputs}
    out = {}
    for label, rows, threads in (("b1 x1 thread", 1, 1), ("b1 x2 threads", 1, 2), ("b32 x1 thread", 32, 1)):
        feeds = {k: np.repeat(v, rows, axis=0) for k, v in one.items()}
        sess.run(None, feeds)
        count = [0] * threads
        stop = time.perf_counter() + seconds

        def work(
            i: int, feeds: dict = feeds, stop: float = stop, count: list = count, rows: int = rows
        ) -> None:
            while time.perf_counter() < stop:
                sess.run(None, feeds)
                count[i] += rows

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        out[label] = sum(count) / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15, help="seconds of load per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all servers (median reported)")
    ap.add_argument("--clients", default="8,32", help="closed-loop client counts")
    ap.add_argument("--servers", default="slimship,plain-fastapi,mlserver", help="which servers")
    ap.add_argument("--models", default="minilm-int8,mnist", help="which models")
    ap.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="slimship's batching queue delay (0: a batch starts when the previous ends)",
    )
    ap.add_argument(
        "--mlserver-delay-ms",
        type=float,
        default=2.0,
        help="MLServer's max_batch_time (its adaptive batching does worse at 0: 109 vs 134 req/s on minilm here)",
    )
    ap.add_argument("--instances", type=int, default=1, help="slimship model instances per endpoint")
    ap.add_argument("--out", default="serving", help="result file stem in benchmarks/results/")
    args = ap.parse_args()
    if shutil.which("hey") is None:
        sys.exit("needs `hey` (apt-get install hey)")
    kinds = [
        k for k in args.servers.split(",") if k != "mlserver" or (MLSERVER_VENV / "bin" / "mlserver").exists()
    ]
    clients = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="slimship-serving-"))
    rows: dict[tuple[str, str, int], list[dict]] = {}
    ceilings: dict[str, dict[str, float]] = {}
    for model, spec in models().items():
        if model not in args.models.split(","):
            continue
        body = tmp / f"{model}.json"
        body.write_text(json.dumps({"inputs": spec["inputs"]}))
        ceilings[model] = ceiling(spec["path"], spec["inputs"])
        print(
            f"{model:12s} ONNX Runtime in-process, rows/s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in ceilings[model].items()),
            flush=True,
        )
        for rnd in range(args.rounds):
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                srv = Srv(
                    kind,
                    model,
                    spec["path"],
                    tmp,
                    max_batch=32,
                    delay_ms=args.mlserver_delay_ms if kind == "mlserver" else args.delay_ms,
                    instances=args.instances,
                )
                try:
                    url = f"http://127.0.0.1:{srv.port}/v2/models/{model}/infer"
                    hey(url, body, 8, 2)  # warm-up
                    for c in clients:
                        r = hey(url, body, c, args.duration)
                        rows.setdefault((model, kind, c), []).append(r)
                        print(
                            f"{model:12s} {kind:14s} c={c:3d} {r['rps']:8.1f} req/s p50 {r['p50_ms']:7.1f} ms "
                            f"p99 {r['p99_ms']:7.1f} ms {r['codes']}",
                            flush=True,
                        )
                finally:
                    srv.stop()
    from slimship.machine import machine_info, physical_cores

    table = []
    for (model, kind, c), rs in rows.items():
        med = sorted(rs, key=lambda r: r["rps"])[len(rs) // 2]
        table.append(
            {
                "model": model,
                "server": kind,
                "clients": c,
                "rps": med["rps"],
                "p50_ms": med["p50_ms"],
                "p99_ms": med["p99_ms"],
                "rounds": [r["rps"] for r in rs],
                "codes": med["codes"],
            }
        )
    for t in table:
        base = next(
            (
                x
                for x in table
                if x["model"] == t["model"]
                and x["clients"] == t["clients"]
                and x["server"] == "plain-fastapi"
            ),
            None,
        )
        t["x_plain"] = t["rps"] / base["rps"] if base else float("nan")
    out = {
        "machine": machine_info(physical_cores()),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "rows": table,
        "ceiling_rows_per_s": ceilings,
        "delay_ms": args.delay_ms,
        "instances": args.instances,
        "command": "benchmarks/serving.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    lines = [
        "# Serving: slimship vs plain FastAPI + ONNX Runtime vs MLServer (closed loop, one row per request)",
        "",
        f"`hey`, {args.duration:g} s per cell, median of {args.rounds} rounds (servers alternated); 2 cores shared with the load "
        "generator; minilm = all-MiniLM-L6-v2 INT8 (seq 128, a real BBC text), mnist = the CNN fp32 (a real digit). "
        f"slimship: {args.instances} model instance(s) per endpoint, dynamic batching up to 32 rows, queue delay {args.delay_ms:g} ms (a batch starts as soon as the "
        "previous one ends; requests that arrive meanwhile join it). MLServer 1.7: adaptive batching up to 32 rows, "
        f"max_batch_time {args.mlserver_delay_ms:g} ms (its better setting here), custom ONNX Runtime runtime. Plain: FastAPI, one session.run per request, no batching.",
        "",
        "| model | clients | server | req/s | × plain | p50 ms | p99 ms | rounds (req/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(table, key=lambda t: (t["model"], t["clients"], -t["rps"])):
        lines.append(
            f"| {t['model']} | {t['clients']} | {t['server']} | {t['rps']:.1f} | {t['x_plain']:.2f} | {t['p50_ms']:.1f} | "
            f"{t['p99_ms']:.1f} | {', '.join(f'{r:.0f}' for r in t['rounds'])} |"
        )
    lines += [
        "",
        "What the hardware gives without HTTP (ONNX Runtime in-process, rows/s, 5 s each):",
        "",
        "| model | b1, 1 thread | b1, 2 threads at once | b32, 1 thread |",
        "|---|---|---|---|",
    ]
    for model, c in ceilings.items():
        lines.append(
            f"| {model} | {c['b1 x1 thread']:.0f} | {c['b1 x2 threads']:.0f} | {c['b32 x1 thread']:.0f} |"
        )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
