"""The Workload: what is being optimised, and how its quality and fidelity are judged.

A workload bundles how to build the reference model, the input/output spec, example inputs,
calibration / training / evaluation data, the task quality metric and the fidelity metric
against the reference model's outputs. Built-in workloads double as the main job's default and
as test fixtures; users bring their own through a factory file, a Hugging Face directory or an
ONNX file with an .npz of inputs (see :mod:`slimship.workload.user`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``shape`` holds ints for fixed dims and names for dynamic ones
    (``("batch", "sequence")``); dims with the same name must agree within a batch.

    The one description of a model's tensors: workloads, runtimes, passes and the server all use it
    (ONNX Runtime types convert with :data:`slimship.tensor_types.ORT_TO_NUMPY`)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


#: what exporters write for "some dynamic size" — placeholders, not names: ``?`` (several frameworks), ``-1``,
#: ``unk__0`` (tf2onnx numbers each unknown dim), ``None``, an empty string
_PLACEHOLDER_DIM = re.compile(r"^(\?|-?\d+|unk__\d+|None|)$")


def dim_of(dim: int | str | None, tensor: str, axis: int) -> int | str:
    """One dimension of a model's input/output as :class:`TensorSpec` holds it.

    A fixed size stays an int; a real name (``batch``, ``sequence``) stays a name, so dims named alike must
    agree. Placeholders (``?``, ``-1``, ``unk__0``, empty, missing, a negative size) mean no more than "dynamic":
    each becomes its own dimension (``x_dim2``), except axis 0, the batch axis every input shares."""
    if isinstance(dim, int) and dim >= 0:
        return dim
    if isinstance(dim, str) and not _PLACEHOLDER_DIM.match(dim.strip()):
        return dim
    return "batch" if axis == 0 else f"{tensor}_dim{axis}"


@dataclass(frozen=True)
class ModelInfo:
    """What graph tools need to know about the model (e.g. ORT's transformer fusions)."""

    family: str = "generic"  # "bert" | "cnn" | "generic"
    num_heads: int | None = None
    hidden_size: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class Workload(ABC):
    """Base class of every workload. Subclasses set the class attributes and implement the methods."""

    #: short identifier, e.g. "minilm"
    name: str = ""
    #: one line for `slimship workloads`
    description: str = ""
    #: "sentence-embedding" | "classification" | "generic"
    task: str = "generic"
    #: the quality metric a recipe's ``max_quality_drop`` refers to
    primary_metric: str = ""
    #: whether higher is better for the primary metric
    higher_is_better: bool = True
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    model_info: ModelInfo = ModelInfo()

    # ---- identity -------------------------------------------------------------------------------
    @property
    def ref(self) -> dict[str, Any]:
        """A JSON-ready reference from which :func:`slimship.workload.resolve_workload` rebuilds this
        workload (stored in every candidate)."""
        return {"name": self.name}

    @abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the reference model or the evaluation data change (cache key)."""

    # ---- model ----------------------------------------------------------------------------------
    @property
    def has_torch_model(self) -> bool:
        return True

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The reference fp32 model in eval mode, with its trained weights."""

    def original_onnx(self) -> Path | None:
        """For ONNX-only workloads, the original ONNX file; ``None`` for PyTorch workloads."""
        return None

    # ---- data -----------------------------------------------------------------------------------
    @abstractmethod
    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> Batch:
        """A batch of real inputs with exactly this batch size (and sequence length, for text)."""

    @abstractmethod
    def eval_size(self, limit: int | None = None) -> int:
        """Number of evaluation samples (after ``limit``)."""

    @abstractmethod
    def eval_batches(
        self, limit: int | None = None, batch_size: int = 32
    ) -> Iterator[tuple[np.ndarray, Batch]]:
        """Yield ``(indices, batch)`` covering evaluation samples ``0..eval_size-1`` exactly once.
        Batches may be grouped (e.g. by text length) for speed; ``indices`` says where each row goes."""

    def fast_eval_batches(self, limit: int | None = None) -> Iterator[tuple[np.ndarray, Batch]]:
        """:meth:`eval_batches` for a model whose answers don't depend on their batch-mates (no dynamic per-tensor
        activation scales): batched however runs fastest here. By default the same batches."""
        return self.eval_batches(limit)

    def prepare_evaluation(self, limit: int | None = None) -> None:  # noqa: B027 - optional hook
        """Make :meth:`eval_batches` ready ahead of use (e.g. tokenize once, off the critical path, while a pass runs);
        nothing by default."""

    def calibration_batches(self, num_samples: int = 128, batch_size: int = 16) -> Iterator[Batch]:
        """Real inputs for calibration, disjoint from the evaluation data where the data allows."""
        from slimship.errors import WorkloadError

        raise WorkloadError(
            f"workload {self.name!r} provides no calibration data; a pass that calibrates needs a workload that has it"
        )

    def train_batches(self, batch_size: int = 32, seed: int = 0) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """One epoch of ``(inputs, targets)`` for passes that fine-tune; targets may be ``None``."""
        from slimship.errors import WorkloadError

        raise WorkloadError(
            f"workload {self.name!r} provides no training data; a pass that fine-tunes needs a workload that has it"
        )

    # ---- metrics --------------------------------------------------------------------------------
    @abstractmethod
    def quality(self, outputs: Mapping[str, np.ndarray], limit: int | None = None) -> dict[str, float]:
        """Task quality from the outputs of all evaluation samples, in order."""

    @abstractmethod
    def fidelity(
        self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """Agreement of a candidate's outputs with the reference model's on the same inputs."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "task": self.task,
            "primary_metric": self.primary_metric,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "model_family": self.model_info.family,
        }


# ---- metric helpers used by several workloads ----------------------------------------------------


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-30)


def embedding_fidelity(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    cos = rowwise_cosine(out, ref)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_error": float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()),
    }


def classification_fidelity(logits: np.ndarray, ref_logits: np.ndarray) -> dict[str, float]:
    cos = rowwise_cosine(logits, ref_logits)
    return {
        "top1_agreement": float((logits.argmax(axis=1) == ref_logits.argmax(axis=1)).mean()),
        "logit_cosine_mean": float(cos.mean()),
        "logit_cosine_min": float(cos.min()),
        "max_abs_error": float(np.abs(logits.astype(np.float64) - ref_logits.astype(np.float64)).max()),
    }


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent (quality metrics are in points, so drops read as "−0.6 points")."""
    return float((logits.argmax(axis=1) == labels).mean() * 100.0)
