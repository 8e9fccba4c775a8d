"""The one exception tree of slimship.

Every error a user can cause is one of these; each message says what was wrong, what was
expected and, where it helps, an example of a valid value.

    SlimshipError                      root: catch this to catch everything slimship raises on purpose
    ├── ConfigError                    a pass config, recipe or CLI option has an invalid value
    ├── WorkloadError                  a workload can't be resolved or built (unknown name, bad factory,
    │                                  unreadable file, missing data)
    ├── CompressionError               a compression pass could not produce a candidate
    ├── ExportError                    PyTorch → ONNX export failed with every exporter tried
    │   └── VerificationError          an artifact was produced but its outputs disagree with its parent
    ├── InferenceError                 a runtime could not be created or failed to run a batch
    │   ├── InputSpecError             a batch has wrong input names, dtypes or shapes
    │   └── RuntimeUnavailableError    a runtime's package is missing, or its compile crashes on this host
    ├── CandidateError                 a candidate directory is missing, unreadable or inconsistent
    ├── RegistryError                  the model registry refused an operation
    │   └── RolloutConflictError       a model already has an active rollout (started here or by another server)
    ├── ExecutorError                  a search executor can't run: its extra isn't installed, its cluster
    │                                  can't be reached, or the cluster can't place one trial's resources
    └── ServingError                   the server refused a request or a configuration

Built-in `ValueError`/`RuntimeError` from dependencies are caught at the boundary where they can be
explained and re-raised as one of these, with the original chained (`raise ... from err`).
"""

from __future__ import annotations

__all__ = [
    "CandidateError",
    "CompressionError",
    "ConfigError",
    "ExecutorError",
    "ExportError",
    "InferenceError",
    "InputSpecError",
    "RegistryError",
    "RolloutConflictError",
    "RuntimeUnavailableError",
    "ServingError",
    "SlimshipError",
    "VerificationError",
    "WorkloadError",
]


class SlimshipError(Exception):
    """Root of every error slimship raises on purpose."""


class ConfigError(SlimshipError):
    """A config, recipe or option value is invalid. Raised before any work starts."""


class WorkloadError(SlimshipError):
    """A workload can't be resolved or built: unknown name, unreadable model file,
    a user factory that raises or returns the wrong thing, missing data."""


class CompressionError(SlimshipError):
    """A compression pass could not produce a candidate from its input."""


class ExportError(SlimshipError):
    """Exporting a PyTorch model to ONNX failed with every exporter tried.

    ``attempts`` maps each exporter tried to the reason it failed."""

    def __init__(self, message: str, attempts: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.attempts = dict(attempts or {})


class VerificationError(ExportError):
    """An artifact was written but its outputs disagree with its parent's on real inputs.

    ``report`` holds the measured numbers (max abs error, cosine, agreement)."""

    def __init__(
        self, message: str, report: dict | None = None, attempts: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, attempts)
        self.report = dict(report or {})


class InferenceError(SlimshipError):
    """A runtime could not be created for a candidate, or failed while running a batch."""


class InputSpecError(InferenceError):
    """A batch handed to a runtime does not match the model's input spec (names, dtypes, shapes)."""


class RuntimeUnavailableError(InferenceError):
    """A runtime can't be used here: its package isn't installed (the message names the extra), or a probe
    subprocess saw its compile crash on this host (nothing else in the process is affected)."""


class CandidateError(SlimshipError):
    """A candidate directory is missing, unreadable, or its metadata is inconsistent."""


class RegistryError(SlimshipError):
    """The model registry refused an operation (unknown model/version, hash mismatch, bad stage)."""


class RolloutConflictError(RegistryError):
    """A rollout can't start: the model already has an active one (``rollout_id``, in ``state``), maybe started by
    another server on the same registry. Abort it first."""

    def __init__(self, message: str, rollout_id: int, state: str) -> None:
        super().__init__(message)
        self.rollout_id = rollout_id
        self.state = state


class ExecutorError(SlimshipError):
    """A search executor can't run trials: Ray isn't installed, the cluster address can't be reached, the
    search directory isn't visible to the workers, or no node can hold one trial's resources. Raised before
    the first trial starts."""


class ServingError(SlimshipError):
    """The server refused a request or a serving configuration."""
