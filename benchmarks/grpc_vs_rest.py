"""REST vs gRPC on the same slimship server: one `slimship serve --grpc-port` process, the same model and batching,
closed-loop clients (tritonclient.http with binary tensors vs tritonclient.grpc with raw contents, each in a process
of its own, N threads each sending one single-row request as soon as its previous one is answered). Rounds alternate
the protocols; the table reports the median round. Server and clients share the machine's cores (2 here).

    .venv/bin/python benchmarks/grpc_vs_rest.py                      # writes benchmarks/results/grpc_vs_rest.{json,md}
    .venv/bin/python benchmarks/grpc_vs_rest.py --duration 5 --rounds 1 --model path/to/model.onnx   # a quick look

Default model: all-MiniLM-L6-v2 INT8 from benchmarks/quantize_minilm.py (seq 128), else pass --model (any ONNX file;
inputs are filled with ones / zeros of the model's types, dynamic axes set to 1 row and --seq).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODEL = ROOT / "benchmarks" / "runs" / "minilm_int8" / "int8-smooth-all" / "model.onnx"

CLIENT = r"""
import json, sys, threading, time
import numpy as np
proto, url, spec, clients, duration = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
if proto == "grpc":
    import tritonclient.grpc as tc
else:
    import tritonclient.http as tc
lat, stop = [], time.perf_counter() + duration
def run():
    c = tc.InferenceServerClient(url) if proto == "grpc" else tc.InferenceServerClient(url, concurrency=1)
    inputs = []
    for s in spec:
        arr = np.full(s["shape"], s["fill"], dtype=s["numpy"])
        i = tc.InferInput(s["name"], s["shape"], s["datatype"])
        i.set_data_from_numpy(arr) if proto == "grpc" else i.set_data_from_numpy(arr, binary_data=True)
        inputs.append(i)
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        c.infer("m", inputs)
        lat.append(time.perf_counter() - t0)
threads = [threading.Thread(target=run) for _ in range(clients)]
t0 = time.perf_counter()
[t.start() for t in threads]; [t.join() for t in threads]
wall = time.perf_counter() - t0
lat.sort()
print(json.dumps({"requests": len(lat), "rps": len(lat) / wall, "p50_ms": lat[len(lat) // 2] * 1e3,
                  "p99_ms": lat[int(len(lat) * 0.99)] * 1e3}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def input_spec(model: Path, seq: int) -> list[dict]:
    import onnxruntime as ort

    types = {
        "tensor(float)": ("FP32", "float32", 0.5),
        "tensor(int64)": ("INT64", "int64", 1),
        "tensor(int32)": ("INT32", "int32", 1),
    }
    out = []
    for i in ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs():
        dt, np_t, fill = types[i.type]
        shape = [d if isinstance(d, int) else (1 if k == 0 else seq) for k, d in enumerate(i.shape)]
        out.append({"name": i.name, "shape": shape, "datatype": dt, "numpy": np_t, "fill": fill})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "grpc_vs_rest")
    args = ap.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model} not found: run benchmarks/quantize_minilm.py or pass --model")
    from slimship.machine import cpu_class

    spec = input_spec(args.model, args.seq)
    load_before = os.getloadavg()[0]
    port, gport = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "serve.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "host": "127.0.0.1",
                "port": port,
                "grpc_port": gport,
                "models": [{"name": "m", "path": str(args.model), "batching": {"verify": "off"}}],
            }
        )
    )
    srv = subprocess.Popen(
        [sys.executable, "-m", "slimship.cli", "serve", "--config", str(cfg), "--no-access-log"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "serve.log", "w"),  # noqa: SIM115 - open while the server runs
        start_new_session=True,
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit((tmp / "serve.log").read_text())
        cells: dict[str, dict[str, list[dict]]] = {}
        for r in range(args.rounds):
            for n in args.clients:
                order = ["rest", "grpc"] if r % 2 == 0 else ["grpc", "rest"]
                for proto in order:
                    url = f"127.0.0.1:{gport if proto == 'grpc' else port}"
                    run = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            CLIENT,
                            proto,
                            url,
                            json.dumps(spec),
                            str(n),
                            str(args.duration),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    res = json.loads(run.stdout.strip().splitlines()[-1])
                    cells.setdefault(str(n), {}).setdefault(proto, []).append(res)
                    print(
                        f"round {r + 1} clients {n} {proto}: {res['rps']:.1f} req/s p99 {res['p99_ms']:.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        os.killpg(srv.pid, signal.SIGTERM)
        srv.wait(60)
    median = {
        n: {
            p: {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_ms", "p99_ms")}
            for p, rs in ps.items()
        }
        for n, ps in cells.items()
    }
    meta = {
        "cpu_class": cpu_class(),
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "seq": args.seq,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({**meta, "median": median, "rounds_raw": cells}, indent=1)
    )
    lines = [
        f"# REST vs gRPC on one slimship server (CPU class {meta['cpu_class']}, {meta['cores']} cores shared "
        f"with the clients)",
        "",
        f"Model {meta['model']} (seq {args.seq}), one row per request, "
        f"{args.rounds} rounds × {args.duration:g} s, median round. Reproduce: "
        f"`.venv/bin/python benchmarks/grpc_vs_rest.py --rounds {args.rounds} --duration {args.duration:g}`.",
        f"Machine load (1-min average) before / after: {meta['load_average_1min'][0]:g} / "
        f"{meta['load_average_1min'][1]:g} — above the core count, the figures are noisy.",
        "",
        "| clients | REST req/s | gRPC req/s | gRPC / REST | REST p99 ms | gRPC p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for n, ps in median.items():
        rest, grpc_ = ps["rest"], ps["grpc"]
        lines.append(
            f"| {n} | {rest['rps']:.1f} | {grpc_['rps']:.1f} | {grpc_['rps'] / rest['rps']:.2f}x | "
            f"{rest['p99_ms']:.1f} | {grpc_['p99_ms']:.1f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
