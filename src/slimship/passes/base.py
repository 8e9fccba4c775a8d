"""The Pass protocol: one technique, one typed, versioned, JSON-serialisable config.

``run(candidate, workload, config, out_dir) -> Candidate`` never mutates its input candidate; it
writes a new artifact into ``out_dir`` and returns the new candidate, whose metadata records the
pass name, its config and whatever the pass measured (verification, graph statistics, ...).
Pass modules import only light dependencies at module level, so listing passes stays cheap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from slimship.errors import ConfigError

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys are errors, carries a ``version``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: bumped when a field's meaning changes; old versions keep loading through ``upgrade``
    version: int = 1

    @classmethod
    def parse(cls, data: dict[str, Any] | PassConfig | None) -> PassConfig:
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if isinstance(data, PassConfig):
            raise ConfigError(f"expected a {cls.__name__}, got a {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = []
            for e in err.errors():
                loc = ".".join(str(p) for p in e["loc"]) or "(config)"
                msg = e["msg"].removeprefix("Value error, ")
                given = e.get("input")
                problems.append(
                    f"{loc}: {msg}"
                    + (f" (given: {given!r})" if e["loc"] and not isinstance(given, dict) else "")
                )

            def default(f: Any) -> str:
                value = f.get_default(call_default_factory=True)
                return "{…}" if isinstance(value, BaseModel) else repr(value)

            fields = ", ".join(f"{n}={default(f)}" for n, f in cls.model_fields.items() if n != "version")
            raise ConfigError(
                f"invalid {cls.__name__}: " + "; ".join(problems) + f". Valid fields and defaults: {fields}"
            ) from err

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Pass(ABC):
    """One technique. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]]
    input_format: ClassVar[str]  # "torch" | "onnx"
    output_format: ClassVar[str]
    #: pip extras or packages the pass needs beyond the core install
    requires: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def run(self, candidate: Candidate, workload: Workload, config: PassConfig, out_dir: Path) -> Candidate:
        """Write a new candidate into ``out_dir`` from ``candidate``."""

    def __call__(
        self,
        candidate: Candidate,
        workload: Workload,
        config: PassConfig | dict[str, Any] | None = None,
        out_dir: str | Path | None = None,
    ) -> Candidate:
        cfg = self.config_cls.parse(config)
        if candidate.format != self.input_format:
            raise ConfigError(
                f"pass {self.name!r} takes a {self.input_format} candidate, but {candidate.id} is {candidate.format}"
            )
        out = Path(out_dir) if out_dir is not None else candidate.path.parent / self.name
        if out.resolve() == candidate.path.resolve():
            raise ConfigError(f"pass {self.name!r} must write a new directory, not its input's ({out})")
        out.mkdir(parents=True, exist_ok=True)
        return record_deployment(self.run(candidate, workload, cfg, out))


def record_deployment(candidate: Candidate) -> Candidate:
    """Record the runtime settings an ONNX candidate was measured with on this machine (``info["deployment"]``,
    decided by :mod:`slimship.runtime.settings`); every consumer applies them."""
    if candidate.format != "onnx":
        return candidate
    from slimship.runtime.settings import decide_settings

    settings = decide_settings(candidate.artifact_path)
    return candidate.with_info(deployment=settings.to_json()).save()
