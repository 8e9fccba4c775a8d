"""What `slimship serve` serves: a YAML file or command-line flags, validated before anything loads.

host: 127.0.0.1
port: 8000
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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimship.errors import ConfigError
from slimship.serve.app import Limits, TrafficPolicy
from slimship.serve.drift import DriftConfig
from slimship.serve.endpoint import BatchingConfig
from slimship.serve.ray_serve import ReplicaConfig


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
            if cand.format != "onnx":
                raise ConfigError(
                    f"{p} holds a {cand.format} candidate; the server runs ONNX — export it first "
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
    registry: str | None = None
    registry_url: str | None = None
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
