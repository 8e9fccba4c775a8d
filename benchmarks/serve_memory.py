"""Memory under sustained valid traffic: 30,000 Open Inference Protocol requests (one real digit each, the digits
fp32 model exported from the built-in workload) against a real `slimship serve` process on 127.0.0.1; the server's
memory (RssAnon and VmRSS from /proc/PID/status) is sampled every 1,000 requests.

Every request carries a fresh body ``id`` (and the server makes an x-request-id), so the A/B feedback map holds two
ids per request until its window is full. The window is bounded (``limits.max_remembered_ids``); this run sets it
to 1,000 ids, full after 500 requests, so what grows after that is not the window. The figure reported is the
least-squares slope of RssAnon (anonymous pages: what a leak grows; VmRSS also counts shared-library pages the kernel
drops and re-reads under memory pressure) over requests 10,000..30,000, per 10,000 requests. Goal: < 2 MB per 10k.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_memory.py      # writes benchmarks/results/serve_memory-avx2.{json,md}
    ... --server-src OLD/src --results-dir /tmp/m --out before     # the same against another commit's server
    ... --render-only --before /tmp/m/before.json                  # the .md again, with that run beside it
    ... --tracemalloc          # a debug run: the server under tracemalloc, what is still allocated warm-up → end
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


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and its anonymous part (heap: what a leak grows; file-backed pages of the shared libraries come and go
    with the machine's memory pressure), in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    return {"rss_kb": out["VmRSS"], "anon_kb": out["RssAnon"], "file_kb": out["RssFile"]}


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
    if args.server_src:  # e.g. an older commit's src/, to measure before and after a fix side by side
        env["PYTHONPATH"] = str(args.server_src)
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
        samples = [{"requests": 0, **rss_kb(proc.pid)}]
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        done = [0]

        def client(i: int, n: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for k in range(n):
                    body = {**bodies[(i + k * args.clients) % len(bodies)], "id": f"c{i}-{k}"}
                    try:
                        r = c.post("/v2/models/digits/infer", json=body)
                    except (
                        httpx.RemoteProtocolError
                    ):  # the keep-alive race (idle connection closed as we sent)
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
            samples.append({"requests": done[0], **rss_kb(proc.pid)})
            if args.tracemalloc and done[0] in (args.warmup, args.requests):
                os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(10 if done[0] == args.requests else 1)
            print(
                f"{done[0]:6d} requests  RSS {samples[-1]['rss_kb'] / 1024:7.1f} MB, anonymous "
                f"{samples[-1]['anon_kb'] / 1024:7.1f} MB",
                flush=True,
            )
        wall = time.perf_counter() - t0
        stats = httpx.get(f"{url}/v2/models/digits/stats", timeout=10).json()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    tail = [s for s in samples if s["requests"] >= args.warmup]
    xs = np.array([s["requests"] for s in tail], dtype=float)
    fit = lambda key: float(np.polyfit(xs, np.array([s[key] for s in tail]) / 1024.0, 1)[0]) * 10_000  # noqa: E731
    slope, slope_rss = fit("anon_kb"), fit("rss_kb")
    return {
        "samples": samples,
        "statuses": statuses,
        "wall_s": wall,
        "growth_mb_per_10k": slope,
        "vmrss_growth_mb_per_10k": slope_rss,
        "anon_first_mb": samples[1]["anon_kb"] / 1024,
        "anon_last_mb": samples[-1]["anon_kb"] / 1024,
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
    ap.add_argument(
        "--server-src", type=Path, help="PYTHONPATH of the server process (default: as this one's)"
    )
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    ap.add_argument("--out", default="serve_memory-avx2", help="result file stem in benchmarks/results/")
    args = ap.parse_args()
    from slimship.machine import cpu_class, machine_info, physical_cores

    results = args.results_dir
    if args.render_only:
        out = json.loads((results / f"{args.out}.json").read_text())
    else:
        load_before = os.getloadavg()
        r = run(args)
        out = {
            "machine": machine_info(physical_cores()),
            "cpu_class": cpu_class(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "requests": args.requests,
            "every": args.every,
            "warmup": args.warmup,
            "clients": args.clients,
            "max_remembered_ids": args.window,
            "goal_mb_per_10k": GOAL_MB,
            "meets_goal": r["growth_mb_per_10k"] < GOAL_MB,
            **{k: v for k, v in r.items() if k not in ("server_log_tail", "tracemalloc")},
            "command": "benchmarks/serve_memory.py " + " ".join(sys.argv[1:]),
        }
        if args.tracemalloc:
            print(r["tracemalloc"] or r["server_log_tail"])
            print(json.dumps({k: out[k] for k in ("growth_mb_per_10k", "rss_first_mb", "rss_last_mb")}))
            return
    if args.before is not None:
        out["before"] = {"label": args.before_label, **json.loads(args.before.read_text())}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    md = render(out)
    (results / f"{args.out}.md").write_text(md)
    print(md)


GOAL_MB = 2.0


def render(out: dict) -> str:
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(out["statuses"].items()))
    before = out.get("before")
    n, la = out["requests"], out["load_average_before"]
    lines = [
        f"# Server memory under {n:,} valid requests (CPU class {out['cpu_class']})",
        "",
        f"A real `slimship serve` on 127.0.0.1 serving the digits fp32 model (exported candidate, drift monitoring on); "
        f"{n:,} single-row Open Inference Protocol JSON requests from {out['clients']} closed-loop httpx clients, "
        f"each with a fresh body `id`; the request-id window (`limits.max_remembered_ids`) set to "
        f"{out['max_remembered_ids']:,} ids, full after the first few hundred requests. Memory of the server process "
        f"from /proc/PID/status every {out['every']:,} requests: RssAnon (heap and other anonymous pages: what a leak "
        "grows) and VmRSS (which also counts the shared libraries' file-backed pages: on this machine, short of memory "
        "that day, an earlier run saw VmRSS fall by 30 MB as the kernel dropped them, with no change in the heap). "
        f"Shared 2-core machine, other jobs beside this one: load average {la[0]:.2f} before, "
        f"{out['load_average_after'][0]:.2f} after (memory figures don't depend on load the way timings do).",
        "",
        f"**Anonymous-memory growth beyond the id window: {out['growth_mb_per_10k']:+.2f} MB per 10,000 requests** "
        f"(least-squares slope over requests {out['warmup']:,}..{n:,}); goal < {out['goal_mb_per_10k']:g} MB: "
        f"{'met' if out['meets_goal'] else '**missed**'}. RssAnon {out['anon_first_mb']:.1f} MB after the first "
        f"{out['every']:,} requests, {out['anon_last_mb']:.1f} MB at the end; VmRSS slope "
        f"{out['vmrss_growth_mb_per_10k']:+.2f} MB per 10k. Statuses: {codes}. {out['wall_s']:.0f} s in all.",
        "",
    ]
    if before is not None:
        lines += [
            f"{before['label']}, run side by side with this one: {before['growth_mb_per_10k']:+.2f} MB per 10,000 "
            f"requests (RssAnon {before['anon_first_mb']:.1f} → {before['anon_last_mb']:.1f} MB).",
            "",
        ]
    by_n = {s["requests"]: s for s in before["samples"]} if before else {}
    lines += [
        "| requests | RssAnon MB | VmRSS MB |"
        + (" before: RssAnon MB | before: VmRSS MB |" if before else ""),
        "|---|---|---|" + ("---|---|" if before else ""),
    ]
    for s in out["samples"]:
        row = f"| {s['requests']:,} | {s['anon_kb'] / 1024:.1f} | {s['rss_kb'] / 1024:.1f} |"
        if before:
            b = by_n.get(s["requests"])
            row += f" {b['anon_kb'] / 1024:.1f} | {b['rss_kb'] / 1024:.1f} |" if b else " | |"
        lines.append(row)
    lines += ["", f"Command: `PYTHONPATH=src .venv/bin/python {out['command']}`".rstrip()]
    if before is not None:
        lines += [
            "",
            f"Beside it, at the same time: `PYTHONPATH=src .venv/bin/python {before['command']}` (the older server's "
            "sources from `git archive <commit> src | tar -x -C /tmp/autotune/before`); this page then from "
            "`benchmarks/serve_memory.py --render-only --before <that run's JSON>` after copying this run's JSON here.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
