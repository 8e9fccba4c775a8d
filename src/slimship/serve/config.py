"""Every config and wire model of the server, validated before anything loads (no other serve module is imported
here): the serving config (:class:`ServeConfig`, :class:`ModelSpec`), per-version settings (:class:`BatchingConfig`,
:class:`DriftConfig`, :class:`ReplicaConfig`), traffic policies, rollout policies (:class:`RolloutPolicy`) and the
admin API's request bodies.

What `slimship serve` serves, as a YAML file (command-line flags add to it)::

    host: 127.0.0.1
    port: 8000
    grpc_port: 8001                                 # optional: OIP over gRPC too
    registry: ~/.local/share/slimship/registry    # optional (and registry_url for PostgreSQL)
    limits: {max_body_bytes: 67108864}
    models:
      - name: minilm
        registry: production          # a version number or stage of the registry model `minilm`
        batching: {max_batch_size: 32, max_queue_delay_ms: 2}
      - name: minilm
        registry: 4
      - name: mnist
        path: runs/mnist/optimized    # an ONNX file or a candidate directory
        version: "1"
    traffic:
      minilm: {weights: {"3": 95, "4": 5}, sticky_header: x-user-id, shadow: {version: "4", fraction: 1.0}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from slimship.errors import ConfigError


class Limits(BaseModel):
    """What one request may cost the server: bytes, time, and what it leaves behind."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: largest request body in bytes (413 beyond)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_id_chars: int = Field(
        default=256,
        ge=16,
        le=4096,
        description="Longest request id (the body's `id` and the x-request-id header); longer is refused with 400.",
    )
    max_remembered_ids: int = Field(
        default=200_000,
        ge=100,
        description="Request ids kept for A/B feedback (oldest dropped first); with max_id_chars this bounds the "
        "map's memory: about max_id_chars + 500 bytes per id (200,000 ids of 256 characters: about 150 MB, of 32: "
        "about 100 MB).",
    )
    parse_in_process_bytes: int = Field(
        default=1 << 20,
        ge=0,
        description="Infer bodies of at least this many bytes are parsed in a worker process, off the event loop.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a connection may take to send a request's headers before it is closed.",
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, description="Seconds a request's body may take to arrive; beyond, 408."
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0, description="Seconds an idle keep-alive connection is held open."
    )


class ShadowPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str
    #: share of the model's traffic mirrored to the shadow version, in [0, 1]
    fraction: float = Field(default=1.0, ge=0, le=1)


class TrafficPolicy(BaseModel):
    """How versionless requests to a model are split between its versions."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: version → weight (any non-negative numbers; normalised); empty = the registry's production version takes all
    #: when it is loaded, else the newest loaded version
    weights: dict[str, float] = Field(default_factory=dict)
    #: a request header whose value pins a caller to one variant (e.g. x-user-id); None = random per request
    sticky_header: str | None = None
    shadow: ShadowPolicy | None = None


class BatchingConfig(BaseModel):
    """How an endpoint batches and protects itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: most rows in one executed batch (a request with more rows is refused)
    max_batch_size: int = Field(default=32, ge=1)
    #: longest the batcher waits for more requests once it has one, in milliseconds. 0 (default): a batch starts as
    #: soon as the previous one ends, holding whatever arrived meanwhile — on a CPU that already batches under load
    #: and adds no latency when idle; raise it only when arrivals are sparse and a run's fixed cost is high
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    #: most requests waiting; beyond it requests get 503 with Retry-After
    max_queue: int = Field(default=256, ge=1)
    #: pad variable-length sequences (axis 1) to batch them: auto = when the model has an attention_mask input
    pad: Literal["auto", "on", "off"] = "auto"
    #: a request not answered within this many seconds gets 504
    timeout_s: float = Field(default=30.0, gt=0)
    #: intra-op threads in all (None: physical cores), split between the instances
    threads: int | None = Field(default=None, ge=1)
    #: model instances running batches side by side, each with its own session and threads/instances intra-op
    #: threads (Triton's instance count): one batch's serial parts overlap another's
    instances: int = Field(default=1, ge=1, le=16)
    #: ONNX Runtime's worker threads spin between operators instead of sleeping: "auto" (default) = on with one
    #: instance, off with several (their pools would spin against each other). MiniLM dynamic INT8, 2 threads, AMD
    #: EPYC Zen 3 (AVX2): 35.4 vs 29.0 rows/s at batch 1 (+22 %), +2 % at batch 16; a spinning session then spent
    #: 58 ms of CPU in the idle second after a run before blocking
    spinning: Literal["auto", "on", "off"] = "auto"
    #: with several instances, the intra-op threads of a batch that runs alone (no other instance busy, nothing
    #: queued): "all" (default) = an extra session of the same model with all the threads runs it, so a lone request is
    #: as fast as on one instance while concurrent batches still run side by side on their instances' shares;
    #: "instance" = its instance's share. Costs one more copy of the weights. MiniLM dynamic INT8, AMD EPYC Zen 3
    #: (AVX2), 2 cores: batch 1 on 1 thread 24.9 rows/s, on 2 threads 33.9; 2 instances × 1 thread 46–48 rows/s at
    #: 4 rows in flight against 41 for one 2-thread session
    lone_batch_threads: Literal["all", "instance"] = "all"
    #: a single-row request that finds the endpoint idle runs on the event loop's thread instead of a worker thread
    #: when the model's single-row runs take less than this many milliseconds (a moving average; the first is timed on
    #: a worker): no hand-off to a worker and back, a real share of a tiny model's request; a request arriving
    #: meanwhile waits at most that long. 0: always a worker thread
    inline_below_ms: float = Field(default=1.0, ge=0)
    #: the session an inline row runs on: "single-thread" (default, ONNX Runtime only) = one more session of the model
    #: with one intra-op thread, so no pool thread spins beside the event loop for a sub-millisecond run; "instance" =
    #: the instance's own session. mnist fp32 at 1 client, Intel Xeon (AMX), 2 cores: 2-thread spinning session 58 µs
    #: per run alone but its spinning worker took 87 % of a core from the event loop and the client under load
    inline_session: Literal["single-thread", "instance"] = "single-thread"
    #: a single-row request that is the only request the server holds (headers read, response not yet written),
    #: with nothing queued or running and no queue delay, runs on the event loop's thread on the instance's own
    #: session (all its threads) when the model's single-row runs take less than this many milliseconds: the two
    #: thread hand-offs of a larger model's lone request go. A request arriving meanwhile is parsed when the run
    #: ends (at most this long; on a worker it would have queued behind the same run). 0: only inline_below_ms
    alone_inline_below_ms: float = Field(default=30.0, ge=0)
    verify: Literal["refuse", "warn", "off"] = Field(
        default="refuse",
        description="at load, run the candidate's probe on this host with the settings the endpoint applies: "
        '"refuse" a changed artifact or a shortfall from the fidelity recorded offline (default), "warn" '
        'and serve on a shortfall, or "off"',
    )


class DriftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    #: the workload whose evaluation data is the reference (default: the one in the version's lineage)
    workload: str | None = None
    #: evaluation samples the reference is built from
    samples: int = Field(default=512, ge=32)
    #: most recent rows the live distribution is taken from
    window: int = Field(default=1000, ge=50)
    #: rows needed before the score is reported
    min_rows: int = Field(default=200, ge=20)
    bins: int = Field(default=10, ge=4, le=50)
    warn_psi: float = Field(default=0.1, gt=0)
    alert_psi: float = Field(default=0.25, gt=0)


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    #: requests in flight per replica Serve aims for when it scales
    target_ongoing_requests: float = Field(default=16, gt=0)

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling: max_replicas {self.max_replicas} < min_replicas {self.min_replicas}"
            )
        return self


class ReplicaConfig(BaseModel):
    """How a model version runs on Ray Serve (ignored by the single-process server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_replicas: int = Field(default=1, ge=1)
    #: replaces num_replicas when given
    autoscaling: Autoscaling | None = None
    #: requests one replica holds at once (its batcher forms batches from them); Serve's default 5 starves it
    max_ongoing_requests: int = Field(default=64, ge=1)
    #: requests waiting in Serve for a replica, per handle; beyond, 503 at once
    max_queued_requests: int = Field(default=256, ge=1)
    #: CPUs reserved per replica (its ONNX Runtime threads)
    num_cpus: float = Field(default=1.0, gt=0)
    #: seconds a version loaded at run time may take until every replica is up; beyond, it is removed and the
    #: load answers 503 (a replica Ray can't place, or one that crashes while loading, would otherwise hang it)
    start_timeout_s: float = Field(default=180.0, gt=0)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    #: an ONNX file, or a candidate directory holding one
    path: str | None = None
    #: a version number or stage (production, staging, latest) of the registry model `registry_model` (default: name)
    registry: str | None = None
    registry_model: str | None = None
    #: the version label it is served under (default: the registry version number, or 1)
    version: str | None = None
    batching: BatchingConfig = BatchingConfig()
    #: drift monitoring against the workload's evaluation data (on when the workload is known)
    drift: DriftConfig = DriftConfig()
    #: replicas, autoscaling and backpressure on Ray Serve (`slimship serve --ray`; ignored otherwise)
    replicas: ReplicaConfig = ReplicaConfig()

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.registry is None):
            raise ValueError(
                f"model {self.name!r}: give either `path` (an ONNX file or candidate directory) or `registry` "
                "(a version number or stage)"
            )
        return self

    def onnx_path(self) -> str:
        return self.resolve()[0]

    def resolve(self) -> tuple[str, dict[str, Any] | None]:
        """The ONNX file to serve and the workload it belongs to (None for a bare ONNX file)."""
        assert self.path is not None
        p = Path(self.path)
        if p.is_dir():
            from slimship.candidate import load_candidate

            cand = load_candidate(p)
            if cand.format not in ("onnx", "openvino", "executorch"):
                raise ConfigError(
                    f"{p} holds a {cand.format} candidate; the server runs ONNX, OpenVINO IR and ExecuTorch programs — export it first "
                    f"(`slimship export` or a recipe's export step)"
                )
            return str(cand.artifact_path), dict(cand.workload)
        if not p.is_file():
            raise ConfigError(f"model {self.name!r}: {p} does not exist")
        return str(p), None


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Also serve the Open Inference Protocol over gRPC (KServe's inference.GRPCInferenceService, "
        "what tritonclient.grpc speaks) on this port of the same host; None (default): no gRPC; 0 picks a free port. "
        "Same models, batching, traffic policy, limits, token and metrics as HTTP.",
    )
    registry: str | None = None
    registry_url: str | None = None
    ingress_replicas: int = Field(
        default=1,
        ge=1,
        description="With --ray: replicas of the ingress (the protocol app: routing, validation, rollouts, A/B). "
        "Above 1, traffic policies, rollout windows and decisions, A/B ids, outcomes and tallies and shadow counts "
        "live in one shared Ray actor, so every replica routes alike and a rollout decides once; /metrics, stats, "
        "live figures and drift are per replica. An admin load or unload sent to any replica reaches them all at "
        "their next sync (the load deploys once; the unload deletes the application once every replica dropped it).",
    )
    limits: Limits = Limits()
    models: list[ModelSpec] = Field(default_factory=list)
    traffic: dict[str, TrafficPolicy] = Field(default_factory=dict)
    #: seconds uvicorn waits for in-flight requests on shutdown
    graceful_shutdown_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        seen = set()
        for m in self.models:
            key = (m.name, m.version or m.registry)
            if key in seen:
                raise ValueError(f"model {m.name!r} version {key[1]!r} is listed twice")
            seen.add(key)
        names = {m.name for m in self.models}
        for t in self.traffic:
            if t not in names:
                raise ValueError(f"traffic for {t!r}, which is not among the models {sorted(names)}")
        return self


def load_serve_config(path: str | Path | None, overrides: dict[str, Any]) -> ServeConfig:
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"serving config {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a serving config is a mapping (host, port, models, traffic, …)")
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "models":
            data["models"] = list(data.get("models", [])) + v
        elif k == "limits" and isinstance(data.get("limits"), dict):
            data["limits"] = {**data["limits"], **v}  # a flag overrides one limit, not the block
        else:
            data[k] = v
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as err:
        where = f"{path}: " if path else ""
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(config)'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{where}invalid serving config: {msgs}") from err


# ---- serving-config autotune (`slimship serve-tune`) ----------------------------------------------


class TuneGrid(BaseModel):
    """The serving configs `slimship serve-tune` measures: every combination of these values (BatchingConfig fields),
    plus the default BatchingConfig, each in a fresh `slimship serve` process under real concurrent load."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch_size: list[Annotated[int, Field(ge=1)]] = Field(
        default=[1, 8, 32],
        min_length=1,
        description="Most rows per executed batch to try (1: no batching, one run per request).",
    )
    max_queue_delay_ms: list[Annotated[float, Field(ge=0)]] = Field(
        default=[0.0, 2.0],
        min_length=1,
        description="Longest wait for more requests once one is queued, in milliseconds, to try.",
    )
    instances: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        default=[1, 2],
        min_length=1,
        description="Model instances per endpoint to try (each its own session, running batches side by side).",
    )
    threads: list[Annotated[int, Field(ge=1)] | None] = Field(
        default=[None],
        min_length=1,
        description="ONNX Runtime intra-op threads in all, split between the instances, to try (null: the "
        "physical cores).",
    )

    spinning: list[Literal["auto", "on", "off"]] = Field(
        default=["auto"],
        min_length=1,
        description='ONNX Runtime thread spinning to try ("auto": on with one instance, off with several).',
    )

    def configs(self, cores: int | None = None) -> list[BatchingConfig]:
        """The default BatchingConfig first, then every combination of the grid, without the ones that run the same
        as an earlier one: a queue delay with max_batch_size 1 (nothing to wait for), and — given the host's
        ``cores`` — thread counts that split into the same intra-op threads per instance."""

        def runs_as(c: BatchingConfig) -> tuple[int, float, int, int | None, bool]:
            per = None if cores is None else max(1, (c.threads or cores) // c.instances)
            delay = 0.0 if c.max_batch_size == 1 else c.max_queue_delay_ms
            return (c.max_batch_size, delay, c.instances, per if cores is not None else c.threads, spins(c))

        out = [BatchingConfig()]
        seen = {runs_as(out[0])}
        for b in self.max_batch_size:
            for d in self.max_queue_delay_ms:
                for i in self.instances:
                    for t in self.threads:
                        for sp in self.spinning:
                            cfg = BatchingConfig(
                                max_batch_size=b, max_queue_delay_ms=d, instances=i, threads=t, spinning=sp
                            )
                            if runs_as(cfg) not in seen:
                                seen.add(runs_as(cfg))
                                out.append(cfg)
        return out


def spins(config: BatchingConfig) -> bool:
    """Whether an endpoint with ``config`` lets ONNX Runtime's threads spin (see ``BatchingConfig.spinning``)."""
    return config.spinning == "on" or (config.spinning == "auto" and config.instances == 1)


def parse_tune_grid(data: Any, source: str = "grid") -> TuneGrid:
    """A grid from a mapping or YAML text; unknown keys and bad values are errors that name the key and the fix."""
    if isinstance(data, str):
        import yaml

        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a tune grid is a mapping of {sorted(TuneGrid.model_fields)} to lists")
    unknown = sorted(set(data) - set(TuneGrid.model_fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {unknown}; a tune grid takes {sorted(TuneGrid.model_fields)}, each a list, "
            "e.g. {max_batch_size: [1, 8, 32], max_queue_delay_ms: [0, 2], instances: [1, 2]}"
        )
    data = {k: v if isinstance(v, list) else [v] for k, v in data.items()}
    try:
        return TuneGrid.model_validate(data)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{source}: invalid tune grid: {msgs}") from err


# ---- rollout policies ------------------------------------------------------------------------------


class Gates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: lowest mean agreement of candidate and baseline outputs on the same inputs, in (0, 1]
    min_fidelity: float | None = Field(default=None, gt=0, le=1)
    #: highest candidate p99 latency in milliseconds
    max_latency_p99_ms: float | None = Field(default=None, gt=0)
    #: highest candidate p99 / baseline p99 in the same window (1.5 = at most 50% slower)
    max_latency_p99_ratio: float | None = Field(default=None, gt=0)
    #: highest share of failed candidate requests, in [0, 1)
    max_error_rate: float | None = Field(default=None, ge=0, lt=1)

    def merged(self, over: Gates | None) -> Gates:
        if over is None:
            return self
        return Gates(**{**self.model_dump(), **over.model_dump(exclude_unset=True)})


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None
    #: percent of versionless requests the candidate answers (0 = shadow only)
    traffic: float = Field(ge=0, le=100)
    #: percent of requests also run on the other version to measure fidelity (default: 100 in shadow, 25 otherwise)
    compare: float | None = Field(default=None, ge=0, le=100)
    #: candidate requests (answered or shadow) before the stage can pass
    min_requests: int = Field(ge=1)
    #: shortest time in the stage, in seconds (a soak time)
    min_seconds: float = Field(default=0.0, ge=0)
    #: gates of this stage, overriding the policy's gates key by key
    gates: Gates | None = None

    @property
    def compare_percent(self) -> float:
        return self.compare if self.compare is not None else (100.0 if self.traffic == 0 else 25.0)

    def label(self, index: int) -> str:
        return self.name or (
            "shadow" if self.traffic == 0 else "full" if self.traffic == 100 else f"canary-{self.traffic:g}"
        )


class RolloutPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stages: list[Stage] = Field(min_length=1)
    gates: Gates = Gates()
    #: compared requests needed before the fidelity gate is judged
    min_pairs: int = Field(default=30, ge=1)
    #: after the last stage, make the candidate production in the registry (false: stay at the last stage's split)
    promote: bool = True
    #: seconds between evaluations of the gates
    tick_s: float = Field(default=0.25, gt=0, le=60)

    @model_validator(mode="after")
    def _possible(self) -> RolloutPolicy:
        prev = -1.0
        for i, st in enumerate(self.stages):
            where = f"stage {i + 1} ({st.label(i)})"
            if st.traffic < prev:
                raise ValueError(
                    f"{where}: traffic {st.traffic:g}% is below the previous stage's {prev:g}%; a rollout only "
                    "moves traffic towards the candidate"
                )
            prev = st.traffic
            g = self.gates.merged(st.gates)
            if st.traffic == 0 and st.compare_percent == 0:
                raise ValueError(
                    f"{where}: traffic 0 and compare 0 — the candidate would never see a request; "
                    "give compare > 0 (e.g. 100 for a shadow stage)"
                )
            if g.min_fidelity is not None and st.compare_percent == 0:
                raise ValueError(
                    f"{where}: a min_fidelity gate with compare 0 can never be judged (fidelity comes from "
                    "requests run on both versions); give compare > 0 or drop the gate"
                )
        if self.promote and self.stages[-1].traffic != 100:
            raise ValueError(
                f"the last stage sends {self.stages[-1].traffic:g}% to the candidate; promotion needs a last "
                "stage at traffic 100 (or set promote: false to hold at the last split)"
            )
        return self


DEFAULT_POLICY: dict[str, Any] = {
    "stages": [
        {"name": "shadow", "traffic": 0, "compare": 100, "min_requests": 200},
        {"name": "canary-5", "traffic": 5, "min_requests": 50},
        {"name": "canary-25", "traffic": 25, "min_requests": 100},
        {"name": "canary-50", "traffic": 50, "min_requests": 100},
        {"name": "full", "traffic": 100, "min_requests": 100},
    ],
    "gates": {"min_fidelity": 0.98, "max_error_rate": 0.01, "max_latency_p99_ratio": 1.5},
    "min_pairs": 30,
}


def parse_policy(data: Any, source: str = "policy") -> RolloutPolicy:
    """A policy from a mapping, YAML/JSON text, or None (the default); errors name the key and the fix."""
    if data is None:
        data = DEFAULT_POLICY
    if isinstance(data, str):
        import yaml

        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a rollout policy is a mapping with `stages` (and `gates`, `min_pairs`, `promote`)"
        )
    try:
        return RolloutPolicy.model_validate(data)
    except ValidationError as err:
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(policy)'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{source}: invalid rollout policy: {msgs}") from err


# ---- admin API bodies ------------------------------------------------------------------------------


class LoadBody(BaseModel):
    """``POST /v2/admin/models/{m}/load``: a file or a registry version, and how to serve it."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    registry: str | None = None  # a version number or stage of the registry model with this name
    registry_model: str | None = None
    version: str | None = None
    batching: BatchingConfig = BatchingConfig()
    drift: DriftConfig = DriftConfig()
    replicas: ReplicaConfig | None = (
        None  # on Ray Serve (`serve --ray`); ignored by the single-process server
    )


class StageBody(BaseModel):
    """``POST /v2/admin/models/{m}/versions/{v}/stage``."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    reason: str = ""


class FeedbackBody(BaseModel):
    """``POST /v2/models/{m}/feedback``: an outcome for an answered request."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=4096)
    outcome: StrictBool | StrictInt | StrictFloat  # true/false, 0/1 or any number; "yes" is refused
    metric: str = Field(default="outcome", pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class RolloutBody(BaseModel):
    """``POST /v2/admin/models/{m}/rollout``."""

    model_config = ConfigDict(extra="forbid")
    candidate: str
    baseline: str | None = None
    policy: dict[str, Any] | None = None


class ReasonBody(BaseModel):
    """``POST /v2/admin/models/{m}/rollout/{pause|resume|abort}``."""

    model_config = ConfigDict(extra="forbid")
    reason: str = ""
