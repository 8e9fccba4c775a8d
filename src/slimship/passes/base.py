"""The Pass protocol: one technique, one typed, versioned, JSON-serialisable config.

``Pass[C]`` is generic over its config type ``C``: ``run(candidate, workload, config: C, out_dir) -> Candidate``
receives the parsed config, never mutates its input candidate, writes a new artifact into ``out_dir`` and
returns the new candidate, whose metadata records the pass name, its config and whatever the pass measured
(verification, graph statistics, ...). Pass modules import only light dependencies at module level, so
listing passes stays cheap.

Config versions: each config class carries ``current_version``. :meth:`PassConfig.parse` refuses a
``version`` newer than that (a recipe written for a newer slimship) and passes an older one through
:meth:`PassConfig.upgrade`, which rewrites the old field layout into the current one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimship.errors import ConfigError

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys are errors, carries a ``version``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: the config format version this slimship writes; bump it (and extend ``upgrade``) when a field's
    #: meaning or name changes
    current_version: ClassVar[int] = 1
    version: int = Field(
        default=1,
        description="config format version, 1 today; a newer version than this slimship knows is refused, "
        "older ones are upgraded on load",
    )

    @classmethod
    def upgrade(cls, data: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Rewrite a config written at ``from_version`` (< ``current_version``) into the current layout.
        Every version so far has the same layout, so this is the identity; a subclass that renames or
        reinterprets a field overrides it."""
        return data

    @classmethod
    def _checked_version(cls, data: dict[str, Any]) -> dict[str, Any]:
        given = data.get("version", cls.current_version)
        if not isinstance(given, int) or isinstance(given, bool):
            return data  # the field's own validation reports a non-integer version
        if given > cls.current_version:
            raise ConfigError(
                f"{cls.__name__} version {given} is newer than this slimship supports "
                f"(version {cls.current_version}); upgrade slimship to load it, or write version: "
                f"{cls.current_version} with this version's fields"
            )
        if given < cls.current_version:
            data = {**cls.upgrade(dict(data), given), "version": cls.current_version}
        return data

    @classmethod
    def parse(cls, data: dict[str, Any] | PassConfig | None) -> Self:
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if isinstance(data, PassConfig):
            raise ConfigError(f"expected a {cls.__name__}, got a {type(data).__name__}")
        if isinstance(data, dict):
            data = cls._checked_version(data)
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


C = TypeVar("C", bound=PassConfig)


class StructuralPassConfig(PassConfig):
    """Fields every pass that changes a PyTorch model's architecture shares (prune, depth-prune, lowrank, distill)."""

    measure_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="batch size of the recorded MACs / PyTorch latency comparison before vs after; null: 256 for classification, 8 for text",
    )
    verify_export: bool = Field(
        default=True,
        description="export the result to ONNX (scratch directory) and verify it against PyTorch before returning",
    )


class Pass(ABC, Generic[C]):
    """One technique, generic over its config ``C``. Subclasses set the class attributes and implement
    ``run``, which receives the config already parsed into ``config_cls``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    config_cls: type[C]
    input_format: ClassVar[str]  # "torch" | "onnx"
    output_format: ClassVar[str]
    #: pip extras or packages the pass needs beyond the core install (pyproject's dependencies); () when the core
    #: install is enough
    requires: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def run(self, candidate: Candidate, workload: Workload, config: C, out_dir: Path) -> Candidate:
        """Write a new candidate into ``out_dir`` from ``candidate``."""

    def __call__(
        self,
        candidate: Candidate,
        workload: Workload,
        config: C | dict[str, Any] | None = None,
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
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            result = self.run(candidate, workload, cfg, out)
        except BaseException:
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a failed pass leaves no empty directory that looks like a result
            raise
        return record_probe(record_deployment(result), workload)


def record_deployment(candidate: Candidate) -> Candidate:
    """Record the runtime settings an ONNX, OpenVINO or ExecuTorch candidate was measured with on this machine
    (``info["deployment"]``, decided by :mod:`slimship.runtime.settings`); every consumer applies them."""
    if candidate.format == "executorch":
        from slimship.runtime.settings import decide_executorch_settings

        return candidate.with_info(deployment=decide_executorch_settings().to_json()).save()
    if candidate.format == "openvino":
        from slimship.runtime.settings import decide_openvino_settings

        ov = decide_openvino_settings(precision=str(candidate.info.get("inference_precision", "f32")))
        return candidate.with_info(deployment=ov.to_json()).save()
    if candidate.format != "onnx":
        return candidate
    from slimship.runtime.settings import decide_settings

    settings = decide_settings(candidate.artifact_path)
    return candidate.with_info(deployment=settings.to_json()).save()


def record_probe(candidate: Candidate, workload: Workload) -> Candidate:
    """Give an ONNX candidate its probe (real inputs + the original's outputs + the fidelity it has on them here,
    :mod:`slimship.measure.probe`), so any host can re-verify it before serving. A probe that can't be made is
    recorded with the reason (``info["probe_error"]``) rather than failing the pass."""
    if candidate.format not in ("onnx", "openvino", "executorch"):
        return candidate
    from slimship.errors import SlimshipError
    from slimship.measure.probe import add_probe

    try:
        return add_probe(candidate, workload)
    except SlimshipError as err:
        return candidate.with_info(probe_error=str(err)).save()
