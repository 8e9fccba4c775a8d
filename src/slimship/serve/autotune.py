"""Serving-config autotune (``slimship serve-tune``), the job Triton's Model Analyzer did: for one model and a p99
latency budget, measure a grid of batching configs (:class:`~slimship.serve.config.TuneGrid`: max batch size, queue
delay, instances, intra-op threads; the default :class:`~slimship.serve.config.BatchingConfig` always among them),
each in a fresh ``slimship serve`` process on 127.0.0.1 under real closed-loop load at several client counts, and
write the chosen one as a serving config the server loads (``slimship serve --config``), with the sweep as JSON and
Markdown.

Load: ``hey`` (a Go HTTP load generator) when it is on PATH, else httpx clients in threads of this process (slower
per request; they share the cores with the server either way). Each of C clients sends one Open Inference Protocol
JSON request as soon as its previous one is answered.

The choice: a config *meets the budget* at a client count when its p99 is within the budget and every request got
200. Client counts at which no config meets the budget are reported (a closed loop of C clients queues C requests:
p99 grows with C) and don't decide. Among the configs that meet the budget at the most client counts, the one whose
worst throughput relative to the best config at the same client count is highest ranks first (max-min: close to the
best at every client count, not great at one and poor at another). The ``finalists`` best and the default are
measured ``confirm_rounds`` more times, interleaved, and ranked again on the medians of all their rounds. A config
replaces the default only if, on those rounds, it keeps the budget wherever the default does, is no slower than the
default at any client count (the lower of the ratio of medians and the median per-round ratio must be ≥ 1), and
gains more than noise: ≥ ``min_gain`` more throughput at some client count, or the budget where the default misses
it. The best-ranked config that passes wins; if none does, the default is kept and the notes say why — the choice is
never slower than the default it was measured against (with confirm rounds, a single lucky round can't win; nor can a config
that is faster at one client count and slower at another).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slimship.errors import ConfigError, ServingError
from slimship.serve.config import BatchingConfig, TuneGrid, load_serve_config

Generator = Literal["auto", "hey", "httpx"]
#: the BatchingConfig fields the grid varies (what the written serving config sets)
TUNED = ("max_batch_size", "max_queue_delay_ms", "instances", "threads", "spinning")


@dataclass(frozen=True)
class LoadResult:
    """One closed-loop measurement: C clients for a fixed time."""

    clients: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    #: connection errors and timeouts (no HTTP status)
    transport_errors: int = 0

    @property
    def failed(self) -> int:
        return self.transport_errors + sum(n for code, n in self.statuses.items() if code != 200)

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "requests": self.requests,
            "rps": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "transport_errors": self.transport_errors,
        }


# ---- load generators -------------------------------------------------------------------------------


def hey_load(url: str, body: Path, clients: int, seconds: float) -> LoadResult:
    """``hey -z {seconds}s -c {clients}`` POSTing ``body`` (JSON) to ``url``."""
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(clients), "-m", "POST", "-T", "application/json"]
    out = subprocess.run([*cmd, "-D", str(body), url], capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = {int(p): float(v) * 1000 for p, v in re.findall(r"\s+(\d+)%+ in ([\d.]+) secs", out)}
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    errors = 0
    if "Error distribution:" in out:
        errors = sum(
            int(n) for n in re.findall(r"^\s+\[(\d+)\]", out.split("Error distribution:", 1)[1], re.M)
        )
    slowest = re.search(r"Slowest:\s+([\d.]+) secs", out)
    if rps is None or slowest is None or not codes:
        return LoadResult(clients, seconds, 0, 0.0, math.inf, math.inf, codes, max(errors, 1))
    # with few responses hey prints "0% in 0.0000 secs" for the high percentiles: the slowest is then the p99
    worst = float(slowest.group(1)) * 1000
    p50, p99 = lat.get(50) or worst, lat.get(99) or worst
    return LoadResult(clients, seconds, sum(codes.values()), float(rps.group(1)), p50, p99, codes, errors)


def httpx_load(url: str, body: bytes, clients: int, seconds: float) -> LoadResult:
    """``clients`` threads, each an httpx client POSTing ``body`` (JSON) in a loop for ``seconds``."""
    import httpx

    lat: list[float] = []
    statuses: dict[int, int] = {}
    transport = [0]
    lock = threading.Lock()
    headers = {"content-type": "application/json"}

    def run(stop: float) -> None:
        mine: list[float] = []
        codes: dict[int, int] = {}
        errs = 0
        with httpx.Client(timeout=60) as c:
            while (
                not mine or time.perf_counter() < stop
            ):  # at least one request, however late the thread starts
                t0 = time.perf_counter()
                try:
                    code = c.post(url, content=body, headers=headers).status_code
                except httpx.HTTPError:
                    errs += 1
                    if time.perf_counter() >= stop:
                        break
                    continue
                mine.append(time.perf_counter() - t0)
                codes[code] = codes.get(code, 0) + 1
        with lock:
            lat.extend(mine)
            for k, v in codes.items():
                statuses[k] = statuses.get(k, 0) + v
            transport[0] += errs

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(t0 + seconds,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if not lat:
        return LoadResult(clients, seconds, 0, 0.0, math.inf, math.inf, statuses, max(transport[0], 1))
    ms = np.asarray(lat) * 1000
    return LoadResult(
        clients,
        seconds,
        len(lat),
        len(lat) / wall,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        statuses,
        transport[0],
    )


def pick_generator(generator: Generator) -> Literal["hey", "httpx"]:
    if generator == "auto":
        return "hey" if shutil.which("hey") else "httpx"
    if generator == "hey" and shutil.which("hey") is None:
        raise ConfigError("--generator hey: `hey` is not on PATH (apt-get install hey), or use httpx")
    return generator


def run_load(
    url: str, body: Path, clients: int, seconds: float, generator: Literal["hey", "httpx"]
) -> LoadResult:
    if generator == "hey":
        return hey_load(url, body, clients, seconds)
    return httpx_load(url, body.read_bytes(), clients, seconds)


# ---- the server under test -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``python -m slimship.cli serve --config …`` on 127.0.0.1 in its own process group, stopped with SIGTERM."""

    def __init__(self, config: dict[str, Any], workdir: Path, ready_timeout: float = 180.0) -> None:
        import httpx
        import yaml

        self.port = free_port()
        cfg = workdir / f"serve-{self.port}.yaml"
        cfg.write_text(yaml.safe_dump({**config, "host": "127.0.0.1", "port": self.port}))
        self.log = workdir / f"serve-{self.port}.log"
        self._log_f = open(self.log, "w")  # noqa: SIM115 - open as long as the server process lives
        cmd = [sys.executable, "-m", "slimship.cli", "serve", "--config", str(cfg), "--no-access-log"]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_f, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                self._log_f.close()
                raise ServingError(f"the server exited while starting:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServingError(
                    f"the server was not ready within {ready_timeout:g} s:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_f.close()


def synth_request(onnx_path: Path, seq: int = 16) -> dict[str, Any]:
    """A one-row Open Inference Protocol JSON body for the model's inputs: dynamic axes 1 row × ``seq``, floats from a
    seeded normal, integers ones (a valid token id and a full attention mask)."""
    import onnxruntime as ort

    from slimship.serve.endpoint import wire_datatype
    from slimship.serve.protocol import DATATYPES

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = []
    for i in sess.get_inputs():
        dt = wire_datatype(i.type)
        if dt not in DATATYPES or dt == "BYTES":
            raise ConfigError(
                f"input {i.name!r} is {i.type}; give a request body with --request (an OIP JSON file)"
            )
        shape = [d if isinstance(d, int) else (1 if k == 0 else seq) for k, d in enumerate(i.shape)]
        npdt = np.dtype(DATATYPES[dt])
        arr = rng.standard_normal(shape).astype(npdt) if npdt.kind == "f" else np.ones(shape, dtype=npdt)
        data = [round(float(v), 4) for v in arr.reshape(-1)] if npdt.kind == "f" else arr.reshape(-1).tolist()
        inputs.append({"name": i.name, "shape": shape, "datatype": dt, "data": data})
    return {"inputs": inputs}


# ---- measurements and the choice -------------------------------------------------------------------


def label(cfg: BatchingConfig) -> str:
    t = "all cores" if cfg.threads is None else f"{cfg.threads} threads"
    return (
        f"batch {cfg.max_batch_size}, delay {cfg.max_queue_delay_ms:g} ms, {cfg.instances} instance"
        f"{'s' if cfg.instances > 1 else ''}, {t}"
        + ("" if cfg.spinning == "auto" else f", spinning {cfg.spinning}")
    )


@dataclass
class Measured:
    """A config and every measurement made of it, by client count."""

    config: BatchingConfig
    default: bool
    runs: dict[int, list[LoadResult]] = field(default_factory=dict)

    def add(self, r: LoadResult) -> None:
        self.runs.setdefault(r.clients, []).append(r)

    def rps(self, c: int) -> float:
        return statistics.median(r.rps for r in self.runs[c])

    def p99(self, c: int) -> float:
        return statistics.median(r.p99_ms for r in self.runs[c])

    def p50(self, c: int) -> float:
        return statistics.median(r.p50_ms for r in self.runs[c])

    def failed(self, c: int) -> int:
        return sum(r.failed for r in self.runs[c])

    def meets(self, c: int, budget_ms: float) -> bool:
        return self.failed(c) == 0 and self.p99(c) <= budget_ms


@dataclass(frozen=True)
class Choice:
    index: int
    #: per config: (client counts meeting the budget among the achievable ones, max-min relative throughput)
    scores: list[tuple[int, float]]
    achievable: list[int]
    notes: list[str]


def paired_ratio(x: Measured, d: Measured, c: int) -> float:
    """``x``'s throughput relative to ``d``'s at ``c`` clients, as the tuner judges it: the lower of the ratio of
    their medians and the median of the per-round ratios (round k of one against round k of the other: the rounds
    are passes over the same configs, so a pair saw the same machine). The lower of the two, so a config is only
    called faster when both ways of reading the rounds agree."""
    base = d.rps(c)
    of_medians = x.rps(c) / base if base > 0 else 0.0
    pairs = [a.rps / b.rps for a, b in zip(x.runs[c], d.runs[c], strict=False) if b.rps > 0]
    return min(of_medians, statistics.median(pairs)) if pairs else of_medians


def against_default(
    x: Measured, d: Measured, budget_ms: float, clients: list[int], min_gain: float
) -> str | None:
    """Why ``x`` may not replace the default ``d`` (None: it may). It must meet the budget wherever the default does,
    be no slower than the default at any client count measured (:func:`paired_ratio` ≥ 1), and gain something that
    is not noise: ≥ ``min_gain`` more throughput at some client count, or the budget at a count the default misses."""
    lost = [c for c in clients if d.meets(c, budget_ms) and not x.meets(c, budget_ms)]
    if lost:
        return f"misses the p99 budget at {', '.join(map(str, lost))} clients, where the default keeps it"
    ratio = {c: paired_ratio(x, d, c) for c in clients}
    slower = [c for c in clients if ratio[c] < 1.0]
    if slower:
        where = ", ".join(f"{ratio[c]:.2f}x at {c} clients" for c in slower)
        return f"is slower than the default ({where})"
    gains_budget = any(x.meets(c, budget_ms) and not d.meets(c, budget_ms) for c in clients)
    if not gains_budget and max(ratio.values()) < 1 + min_gain:
        return f"was within {min_gain:.0%} of the default at every client count"
    return None


def choose(
    measured: list[Measured],
    budget_ms: float,
    clients: list[int],
    min_gain: float,
    among: list[int] | None = None,
) -> Choice:
    """The config to serve with (see the module docstring); ServingError when no config meets the budget anywhere.
    ``among``: the indices that may win (the finalists, measured in the same rounds; default all), which also set the
    best throughput each score is relative to. The best-scored config wins only if :func:`against_default` lets it
    replace the default; otherwise the next best that it lets, else the default — so the choice is never slower
    than the default it was measured against."""
    eligible = [measured[k] for k in among] if among is not None else measured
    achievable = [c for c in clients if any(m.meets(c, budget_ms) for m in eligible)]
    if not achievable:
        raise ServingError(_unmet_message(measured, budget_ms, clients))
    best_rps = {c: max(m.rps(c) for m in eligible) for c in clients}
    scores = []
    for m in measured:
        n = sum(m.meets(c, budget_ms) for c in achievable)
        rel = min(m.rps(c) / best_rps[c] if best_rps[c] > 0 else 0.0 for c in clients)
        scores.append((n, rel))
    d = next(k for k, m in enumerate(measured) if m.default)
    ranked = sorted(
        among if among is not None else range(len(measured)), key=lambda k: scores[k], reverse=True
    )
    notes: list[str] = []
    win = d
    for k in ranked:
        why = None if k == d else against_default(measured[k], measured[d], budget_ms, clients, min_gain)
        if why is None:
            win = k
            break
        notes.append(f"not {label(measured[k].config)}: it {why}")
    if win == d and notes:
        notes = [f"kept the default: {notes[0]}", *notes[1:]]
    unmet = [
        f"at {c} clients no config kept p99 within {budget_ms:g} ms (the chosen one: {measured[win].p99(c):.1f} ms); "
        "a closed loop of that many clients queues that many requests"
        for c in clients
        if c not in achievable
    ]
    return Choice(win, scores, achievable, [*unmet, *notes])


def _unmet_message(measured: list[Measured], budget_ms: float, clients: list[int]) -> str:
    best = min(
        ((m.p99(c), m, c) for m in measured for c in clients if m.failed(c) == 0),
        default=None,
        key=lambda x: x[0],
    )
    low = (
        f"; the lowest p99 without errors was {best[0]:.2f} ms ({label(best[1].config)}, {best[2]} clients)"
        if best
        else "; every config had failed requests"
    )
    return (
        f"no serving config kept p99 ≤ {budget_ms:g} ms at any client count measured ({', '.join(map(str, clients))})"
        f"{low}. Raise --p99-ms above it, measure fewer clients (--clients), or serve a faster model"
    )


@dataclass
class TuneResult:
    model: str
    path: str
    budget_ms: float
    clients: list[int]
    duration_s: float
    generator: str
    measured: list[Measured]
    #: None when no config met the budget at any client count
    choice: Choice | None
    request: dict[str, Any]
    load_average: list[tuple[float, float, float]]

    @property
    def chosen(self) -> BatchingConfig:
        if self.choice is None:
            raise ServingError(f"no serving config met the p99 budget of {self.budget_ms:g} ms")
        return self.measured[self.choice.index].config

    def score(self, k: int) -> tuple[int, float] | None:
        return self.choice.scores[k] if self.choice is not None else None


def _measure(
    spec: dict[str, Any],
    m: Measured,
    clients: list[int],
    duration_s: float,
    body: Path,
    generator: Literal["hey", "httpx"],
    workdir: Path,
    warmup_s: float,
) -> None:
    srv = ServeProcess(
        {"models": [{**spec, "batching": m.config.model_dump(exclude_defaults=True)}]}, workdir
    )
    try:
        url = f"{srv.base}/v2/models/{spec['name']}/infer"
        if warmup_s > 0:
            run_load(url, body, max(clients), warmup_s, generator)
        for c in clients:
            m.add(run_load(url, body, c, duration_s, generator))
    finally:
        srv.stop()


def autotune(
    model_path: str | Path,
    budget_ms: float,
    *,
    name: str = "model",
    grid: TuneGrid | None = None,
    clients: tuple[int, ...] = (1, 4, 16),
    duration_s: float = 3.0,
    warmup_s: float = 1.0,
    finalists: int = 3,
    confirm_rounds: int = 2,
    min_gain: float = 0.03,
    request: dict[str, Any] | None = None,
    generator: Generator = "auto",
    progress: Callable[[str], None] | None = None,
    out_dir: str | Path | None = None,
) -> TuneResult:
    """Measure the grid's configs under load and choose one (see the module docstring). With ``out_dir``, the
    serving config and the sweep are written there (:func:`write_outputs`); the sweep also when no config meets the
    budget (ServingError then)."""
    if budget_ms <= 0 or not math.isfinite(budget_ms):
        raise ConfigError(f"p99 budget {budget_ms!r} ms: give a positive number of milliseconds, e.g. 50")
    if not clients or any(c < 1 for c in clients):
        raise ConfigError(f"client counts {list(clients)}: give positive integers, e.g. 1,4,16")
    if duration_s <= 0:
        raise ConfigError(
            f"duration {duration_s!r} s: give a positive number of seconds per measurement, e.g. 3"
        )
    gen = pick_generator(generator)
    path = Path(model_path)
    spec = {"name": name, "path": str(path)}
    onnx = Path(load_serve_config(None, {"models": [spec]}).models[0].onnx_path())
    body_data = request if request is not None else synth_request(onnx)
    say = progress or (lambda s: None)
    clients_l = sorted(set(clients))
    from slimship.machine import default_threads

    configs = (grid or TuneGrid()).configs(default_threads())
    measured = [Measured(cfg, k == 0) for k, cfg in enumerate(configs)]
    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="slimship-serve-tune-") as tmp:
        work = Path(tmp)
        body = work / "request.json"
        body.write_text(json.dumps(body_data))
        for k, m in enumerate(measured):
            _measure(spec, m, clients_l, duration_s, body, gen, work, warmup_s)
            say(_line(k, m, clients_l))
        try:
            first = choose(measured, budget_ms, clients_l, min_gain)
        except ServingError:
            first = None
        if first is not None and confirm_rounds > 0:
            ranked = sorted(range(len(measured)), key=lambda k: first.scores[k], reverse=True)
            again = list(
                dict.fromkeys([*ranked[:finalists], next(k for k, m in enumerate(measured) if m.default)])
            )
            for rnd in range(confirm_rounds):
                for k in again if rnd % 2 else again[::-1]:
                    _measure(spec, measured[k], clients_l, duration_s, body, gen, work, warmup_s)
                    say(f"confirm {rnd + 1}: " + _line(k, measured[k], clients_l))
            finals: list[int] | None = sorted(again)  # only configs measured in the same rounds compete
        else:
            finals = None
        loads.append(os.getloadavg())
    try:
        choice: Choice | None = choose(measured, budget_ms, clients_l, min_gain, finals)
        unmet = None
    except ServingError as err:
        choice, unmet = None, err
    result = TuneResult(
        name, str(path), budget_ms, clients_l, duration_s, gen, measured, choice, body_data, loads
    )
    if out_dir is not None:
        write_outputs(result, out_dir)
    if unmet is not None:
        where = f" (the sweep: {Path(out_dir) / 'serve_tune.md'})" if out_dir is not None else ""
        raise ServingError(f"{unmet}{where}")
    return result


def _line(k: int, m: Measured, clients: list[int]) -> str:
    cells = "  ".join(f"c={c}: {m.rps(c):7.1f} req/s p99 {m.p99(c):7.1f} ms" for c in clients)
    return f"[{k:2d}] {label(m.config):48s} {cells}"


# ---- output ----------------------------------------------------------------------------------------


def serving_config(result: TuneResult, model_path: str | None = None) -> dict[str, Any]:
    """The chosen config as a serving config mapping (what `slimship serve --config` reads); ``model_path``: the
    model's path to write instead of the one measured (e.g. relative to where the config will be served from)."""
    chosen = result.chosen.model_dump()
    batching = {k: chosen[k] for k in TUNED if chosen[k] is not None}
    return {
        "host": "127.0.0.1",
        "port": 8000,
        "models": [{"name": result.model, "path": model_path or result.path, "batching": batching}],
    }


def write_outputs(result: TuneResult, out_dir: str | Path, model_path: str | None = None) -> dict[str, Path]:
    """``serve.yaml`` (checked by loading it), ``serve_tune.json`` and ``serve_tune.md`` in ``out_dir``.
    ``model_path``: the model's path to write in them instead of the one measured — a relative path keeps a committed
    config free of this machine's directories (``slimship serve`` resolves it against its working directory)."""
    import yaml

    from slimship.machine import cpu_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "serve_tune.json", "md": out / "serve_tune.md"}
    paths["json"].write_text(json.dumps(result_json(result, model_path), indent=1))
    paths["md"].write_text(result_markdown(result))
    if result.choice is None:
        return paths
    cfg_path = out / "serve.yaml"
    ch = result.measured[result.choice.index]
    head = (
        f"# written by `slimship serve-tune` (CPU class {cpu_class()}): p99 budget {result.budget_ms:g} ms at "
        f"{', '.join(map(str, result.clients))} clients\n# chosen: {label(ch.config)}; "
        + "; ".join(f"{c} clients {ch.rps(c):.1f} req/s p99 {ch.p99(c):.1f} ms" for c in result.clients)
        + "\n"
    )
    if model_path is not None and not Path(model_path).is_absolute():
        head += "# the model path is relative: serve this config from the directory it is relative to\n"
    cfg_path.write_text(head + yaml.safe_dump(serving_config(result, model_path), sort_keys=False))
    load_serve_config(cfg_path, {})  # the server must take what we wrote
    paths["config"] = cfg_path
    return paths


def result_json(result: TuneResult, model_path: str | None = None) -> dict[str, Any]:
    from slimship.machine import cpu_class

    def cell(m: Measured, c: int) -> dict[str, Any]:
        return {
            "rps": m.rps(c),
            "p50_ms": m.p50(c),
            "p99_ms": m.p99(c),
            "failed": m.failed(c),
            "meets_budget": m.meets(c, result.budget_ms),
            "rounds": [r.as_dict() for r in m.runs[c]],
        }

    return {
        "cpu_class": cpu_class(),
        "model": result.model,
        "path": model_path or result.path,
        "p99_budget_ms": result.budget_ms,
        "clients": result.clients,
        "duration_s": result.duration_s,
        "generator": result.generator,
        "load_average": result.load_average,
        "chosen": result.choice.index if result.choice else None,
        "chosen_batching": result.chosen.model_dump() if result.choice else None,
        "achievable_clients": result.choice.achievable if result.choice else [],
        "notes": result.choice.notes if result.choice else ["no config met the budget at any client count"],
        "configs": [
            {
                "label": label(m.config),
                "default": m.default,
                "batching": m.config.model_dump(),
                "clients_meeting_budget": sum(m.meets(c, result.budget_ms) for c in result.clients),
                "score_min_relative_rps": (result.score(k) or (0, None))[1],
                "by_clients": {str(c): cell(m, c) for c in result.clients},
            }
            for k, m in enumerate(result.measured)
        ],
        "serving_config": serving_config(result, model_path) if result.choice else None,
    }


def result_markdown(result: TuneResult) -> str:
    from slimship.machine import cpu_class

    head = " | ".join(f"{c} clients req/s (p99 ms)" for c in result.clients)
    lines = [
        f"# serve-tune: {result.model} (CPU class {cpu_class()})",
        "",
        f"p99 budget {result.budget_ms:g} ms; closed loop, {result.duration_s:g} s per cell, load from {result.generator}; "
        f"load average {result.load_average[0][0]:.2f} before, {result.load_average[-1][0]:.2f} after. "
        "✓ = p99 within budget and no failed request; score = worst throughput relative to the best config at the "
        "same client count (medians of every round of the config). The configs measured in more than one round are "
        "the finalists (and the default); only they compete for the choice, scored against each other.",
        "",
        f"| # | config | rounds | {head} | score |",
        "|---|---|---|" + "---|" * len(result.clients) + "---|",
    ]
    for k, m in enumerate(result.measured):
        name = label(m.config) + (" (default)" if m.default else "")
        if result.choice is not None and k == result.choice.index:
            name = f"**{name} — chosen**"
        cells = " | ".join(
            f"{m.rps(c):.1f} ({m.p99(c):.1f}{' ✓' if m.meets(c, result.budget_ms) else ''})"
            for c in result.clients
        )
        sc = result.score(k)
        rounds = len(m.runs[result.clients[0]])
        score = f"{sc[1]:.2f}" if sc else "—"
        lines.append(f"| {k} | {name} | {rounds} | {cells} | {score} |")
    notes = result.choice.notes if result.choice else ["**no config met the p99 budget at any client count**"]
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines).rstrip() + "\n"
