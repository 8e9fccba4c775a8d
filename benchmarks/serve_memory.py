"""Memory under sustained valid traffic: 30,000 Open Inference Protocol requests (one real digit each, the digits
fp32 model exported from the built-in workload) against a real `slimship serve` process on 127.0.0.1; the server's
resident set (VmRSS from /proc/PID/status) is sampled every 1,000 requests.

Every request carries a fresh body ``id`` (and the server makes an x-request-id), so the A/B feedback map holds two
ids per request until its window is full. The window is bounded (``limits.max_remembered_ids``); this run sets it
to 1,000 ids, full after 500 requests, so what grows after that is not the window. The figure reported is the
least-squares slope of RSS over requests 10,000..30,000 (after warm-up: allocator arenas, the drift monitor's
window, ONNX Runtime's first batches), per 10,000 requests. Goal: < 2 MB per 10k.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_memory.py      # ≈ 1-2 min; writes benchmarks/results/serve_memory-avx2.{json,md}
    ... --tracemalloc          # a debug run: the server under tracemalloc, top allocation growth 10k → 30k in the log
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


TRACE_WRAPPER = r"""
import signal, sys, tracemalloc
out = sys.argv[1]
def dump(*_):  # first signal: start tracing; second: what is still allocated since then, by traceback
    if not tracemalloc.is_tracing():
        tracemalloc.start(15)
        return
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    with open(out, "w") as f:
        stats = snap.statistics("traceback")
        f.write(f"{sum(s.size for s in stats) / 1024:.1f} KiB in {sum(s.count for s in stats)} blocks alive\n\n")
        for st in stats[:12]:
            f.write(f"{st.size / 1024:+.1f} KiB in {st.count} blocks\n")
            f.write("\n".join(st.traceback.format(limit=8)) + "\n\n")
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["slimship", *sys.argv[2:]]
from slimship.cli import main
main()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def build_model(out: Path) -> tuple[Path, list[dict]]:
    """The digits model exported to ONNX (a candidate dir, so drift monitoring is on as in production) and 64
    request bodies of real digits."""
    from slimship.candidate import load_candidate, original_candidate
    from slimship.passes import export
    from slimship.workload import resolve_workload

    w = resolve_workload("digits")
    exp_dir = out / "exported"
    if not (exp_dir / "candidate.json").exists():
        orig = original_candidate(w, out / "original")
        export(orig, w, out_dir=exp_dir)
    cand = load_candidate(exp_dir)
    x = next(iter(w.eval_batches(limit=64, batch_size=64)))[1]
    name, arr = next(iter(x.items()))
    bodies = [
        {
            "inputs": [
                {
                    "name": name,
                    "shape": [1, *arr.shape[1:]],
                    "datatype": "FP32",
                    "data": [round(float(v), 4) for v in arr[i].astype(np.float32).reshape(-1)],
                }
            ]
        }
        for i in range(min(64, len(arr)))
    ]
    return cand.path, bodies


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="slimship-serve-memory-"))
    model_dir, bodies = build_model(RESULTS.parent / "runs" / "serve_memory")
    port = free_port()
    cfg = tmp / "serve.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "host": "127.0.0.1",
                "port": port,
                "limits": {"max_remembered_ids": args.window},
                "models": [{"name": "digits", "path": str(model_dir)}],
            }
        )
    )
    env = {**os.environ}
    cmd = [sys.executable, "-m", "slimship.cli", "serve", "--config", str(cfg), "--no-access-log"]
    trace_out = tmp / "tracemalloc.txt"
    if (
        args.tracemalloc
    ):  # the server under tracemalloc; SIGUSR1 takes a snapshot, the second is compared with the first
        cmd = [sys.executable, "-c", TRACE_WRAPPER, str(trace_out), *cmd[3:]]
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError((tmp / "server.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready")
            time.sleep(0.2)
        samples = [{"requests": 0, "rss_kb": rss_kb(proc.pid)}]
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        done = [0]

        def client(i: int, n: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for k in range(n):
                    body = {**bodies[(i + k * args.clients) % len(bodies)], "id": f"c{i}-{k}"}
                    r = c.post("/v2/models/digits/infer", json=body)
                    with lock:
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                        done[0] += 1

        t0 = time.perf_counter()
        per_block = args.every
        for block in range(args.requests // per_block):
            threads = [
                threading.Thread(target=client, args=(block * 1000 + i, per_block // args.clients))
                for i in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            samples.append({"requests": done[0], "rss_kb": rss_kb(proc.pid)})
            if args.tracemalloc and done[0] in (args.warmup, args.requests):
                os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(10 if done[0] == args.requests else 1)
            print(f"{done[0]:6d} requests  RSS {samples[-1]['rss_kb'] / 1024:7.1f} MB", flush=True)
        wall = time.perf_counter() - t0
        stats = httpx.get(f"{url}/v2/models/digits/stats", timeout=10).json()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    tail = [s for s in samples if s["requests"] >= args.warmup]
    xs = np.array([s["requests"] for s in tail], dtype=float)
    ys = np.array([s["rss_kb"] for s in tail], dtype=float) / 1024.0
    slope = float(np.polyfit(xs, ys, 1)[0]) * 10_000 if len(tail) >= 2 else float("nan")
    return {
        "samples": samples,
        "statuses": statuses,
        "wall_s": wall,
        "growth_mb_per_10k": slope,
        "growth_from": args.warmup,
        "rss_first_mb": samples[1]["rss_kb"] / 1024,
        "rss_last_mb": samples[-1]["rss_kb"] / 1024,
        "server_stats": stats,
        "server_log_tail": (tmp / "server.log").read_text()[-2000:],
        "tracemalloc": trace_out.read_text() if trace_out.exists() else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30_000)
    ap.add_argument("--every", type=int, default=1000, help="RSS sampled every this many requests")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop httpx clients")
    ap.add_argument("--window", type=int, default=1000, help="limits.max_remembered_ids of the server")
    ap.add_argument("--warmup", type=int, default=10_000, help="requests before the growth slope is taken")
    ap.add_argument("--tracemalloc", action="store_true", help="debug run (not written to results)")
    ap.add_argument("--before", type=Path, help="a result JSON of an earlier run to show beside this one")
    ap.add_argument("--before-label", default="before", help="what the earlier run was")
    ap.add_argument("--out", default="serve_memory-avx2", help="result file stem in benchmarks/results/")
    args = ap.parse_args()
    from slimship.machine import cpu_class, machine_info, physical_cores

    load_before = os.getloadavg()
    r = run(args)
    load_after = os.getloadavg()
    goal = 2.0
    ok = r["growth_mb_per_10k"] < goal
    out = {
        "machine": machine_info(physical_cores()),
        "cpu_class": cpu_class(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "requests": args.requests,
        "clients": args.clients,
        "max_remembered_ids": args.window,
        "goal_mb_per_10k": goal,
        "meets_goal": ok,
        **{k: v for k, v in r.items() if k not in ("server_log_tail", "tracemalloc")},
        "command": "benchmarks/serve_memory.py " + " ".join(sys.argv[1:]),
    }
    if args.tracemalloc:
        print(r["tracemalloc"] or r["server_log_tail"])
        print(json.dumps({k: out[k] for k in ("growth_mb_per_10k", "rss_first_mb", "rss_last_mb")}))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
    lines = [
        f"# Server memory under 30,000 valid requests (CPU class {out['cpu_class']})",
        "",
        f"A real `slimship serve` on 127.0.0.1 serving the digits fp32 model (exported candidate, drift monitoring on); "
        f"{args.requests:,} single-row Open Inference Protocol JSON requests from {args.clients} closed-loop httpx clients, "
        f"each with a fresh body `id`; the request-id window (`limits.max_remembered_ids`) set to {args.window:,} ids, "
        "full after the first few hundred requests. RSS is the server process's VmRSS from /proc, sampled every "
        f"{args.every:,} requests. Shared 2-core machine (other jobs ran niced beside it): load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; memory figures don't depend on load the way timings do.",
        "",
        f"**RSS growth beyond the id window: {r['growth_mb_per_10k']:+.2f} MB per 10,000 requests** (least-squares "
        f"slope over requests {args.warmup:,}..{args.requests:,}); goal < {goal:g} MB: "
        f"{'met' if ok else '**missed**'}. RSS {r['rss_first_mb']:.1f} MB after 1,000 requests, "
        f"{r['rss_last_mb']:.1f} MB after {args.requests:,}. Statuses: {codes}. {r['wall_s']:.0f} s in all.",
        "",
    ]
    before = json.loads(args.before.read_text()) if args.before else None
    if before is not None:
        out["before"] = {"label": args.before_label, **before}
        (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
        lines += [
            f"{args.before_label}: {before['growth_mb_per_10k']:+.2f} MB per 10,000 requests (RSS "
            f"{before['rss_first_mb']:.1f} → {before['rss_last_mb']:.1f} MB, load average "
            f"{before['load_average_before'][0]:.2f}).",
            "",
        ]
    by_n = {s["requests"]: s["rss_kb"] for s in before["samples"]} if before else {}
    lines += [
        "| requests | RSS MB | " + (f"{args.before_label}: RSS MB |" if before else ""),
        "|---|---|" + ("---|" if before else ""),
        *[
            f"| {s['requests']:,} | {s['rss_kb'] / 1024:.1f} |"
            + (f" {by_n[s['requests']] / 1024:.1f} |" if s["requests"] in by_n else (" |" if before else ""))
            for s in r["samples"]
        ],
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/serve_memory.py {' '.join(sys.argv[1:])}`".rstrip(),
    ]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
