"""Workloads users bring: a Python factory, or an ONNX file with an .npz of inputs.

Factory contract (``path/to/file.py:build``) — ``build()`` takes no arguments and returns either
``(model, example_inputs)`` or a dict::

    {
        "model": torch.nn.Module,                  # required, the trained fp32 model
        "example_inputs": {"x": array},            # required: name -> array/tensor, batch first
        "eval_inputs": {"x": array},               # optional: evaluation inputs (default: example_inputs)
        "eval_labels": array,                      # optional: class labels -> "accuracy" quality metric
        "metric": fn(outputs, labels) -> dict,     # optional: your quality metric(s), higher is better
        "calibration_inputs": {"x": array},        # optional (default: eval_inputs)
        "train_inputs": {"x": array},              # optional: data for passes that fine-tune / distil
        "train_labels": array,                     # optional: labels for train_inputs (classification)
        "output_names": ["logits"],                # optional (default: output_0, output_1, ...)
        "dynamic_axes": {"x": {0: "batch"}},       # optional (default: axis 0 of every input is "batch")
    }

Arrays are numpy arrays or torch tensors. Every key is checked, and a message names what is missing
or wrong and shows a valid value.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship._util import sha256_file, sha256_text
from slimship.errors import WorkloadError
from slimship.tensor_types import numpy_dtype_of
from slimship.workload.base import (
    Batch,
    TensorSpec,
    Workload,
    accuracy,
    classification_fidelity,
    dim_of,
    embedding_fidelity,
)

if TYPE_CHECKING:
    import torch

_ALLOWED_KEYS = {
    "model",
    "example_inputs",
    "eval_inputs",
    "eval_labels",
    "metric",
    "calibration_inputs",
    "train_inputs",
    "train_labels",
    "output_names",
    "dynamic_axes",
}
_EXAMPLE = 'return {"model": net.eval(), "example_inputs": {"x": np.zeros((1, 3, 32, 32), np.float32)}}'


def _to_numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    raise WorkloadError(f"{what} must be a numpy array or a torch tensor, got {type(value).__name__}")


def _as_input_dict(value: Any, what: str) -> dict[str, np.ndarray]:
    if not isinstance(value, Mapping) or not value:
        raise WorkloadError(
            f"{what} must be a non-empty dict of input name -> array (batch first), got {type(value).__name__}; "
            'example: {"x": np.zeros((1, 3, 32, 32), np.float32)}'
        )
    out = {}
    for name, arr in value.items():
        if not isinstance(name, str):
            raise WorkloadError(f"{what}: input names must be strings, got {name!r}")
        a = _to_numpy(arr, f"{what}[{name!r}]")
        if a.ndim == 0:
            raise WorkloadError(f"{what}[{name!r}] is a scalar; inputs need a leading batch dimension")
        out[name] = np.ascontiguousarray(a)
    sizes = {a.shape[0] for a in out.values()}
    if len(sizes) != 1:
        raise WorkloadError(f"{what}: every input needs the same batch size (axis 0), got {sorted(sizes)}")
    return out


def _batched(inputs: Mapping[str, np.ndarray], n: int, batch_size: int) -> Iterator[tuple[np.ndarray, Batch]]:
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        yield idx, {k: v[idx] for k, v in inputs.items()}


def _take(inputs: Mapping[str, np.ndarray], batch_size: int) -> Batch:
    n = next(iter(inputs.values())).shape[0]
    idx = np.arange(batch_size) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


def _default_quality(outputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> dict[str, float]:
    first = next(iter(outputs.values()))
    if labels is not None and first.ndim == 2 and len(labels) == len(first):
        return {"accuracy": accuracy(first, labels)}
    return {}


def _default_fidelity(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, float]:
    result: dict[str, float] = {}
    for i, (name, ref) in enumerate(reference.items()):
        out = outputs[name]
        fid = (
            classification_fidelity(out, ref)
            if ref.ndim == 2 and ref.shape[1] > 1
            else embedding_fidelity(out, ref)
        )
        result.update(fid if i == 0 else {f"{name}.{k}": v for k, v in fid.items()})
    return result


def load_factory(spec: str) -> Callable[[], Any]:
    path_str, sep, func_name = spec.rpartition(":")
    if not sep or not path_str.endswith(".py") or not func_name.isidentifier():
        raise WorkloadError(
            f"a factory is given as path/to/file.py:function, got {spec!r}; example: models/net.py:build"
        )
    path = Path(path_str)
    if not path.is_file():
        raise WorkloadError(f"factory file {path} does not exist or is not a file")
    try:
        source = path.read_bytes()
    except OSError as err:
        raise WorkloadError(f"factory file {path} can't be read: {err.strerror}") from err
    mod_name = f"slimship_user_{sha256_text(str(path.resolve()), source)[:12]}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:  # pragma: no cover - .py files always have a loader
        raise WorkloadError(f"can't import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[mod_name]
        raise WorkloadError(f"importing factory file {path} raised {type(err).__name__}: {err}") from err
    func = getattr(module, func_name, None)
    if func is None:
        public = sorted(n for n in vars(module) if callable(vars(module)[n]) and not n.startswith("_"))
        raise WorkloadError(f"{path} has no function {func_name!r}; callables it defines: {public or 'none'}")
    if not callable(func):
        raise WorkloadError(f"{path}:{func_name} is a {type(func).__name__}, not a function")
    return func


def _factory_key(spec: str) -> tuple[str, str]:
    """What a factory's result depends on: its file (resolved) and that file's content."""
    path = Path(spec.rpartition(":")[0])
    try:
        return str(path.resolve()), sha256_file(path)
    except OSError:
        return str(path), ""  # load_factory says what is wrong with the path


@functools.lru_cache(maxsize=8)
def _built(spec: str, resolved: str, content_sha: str) -> dict[str, Any]:
    """``build()``'s checked result, once per process for each factory file content: every workload made from the
    same spec in one process (a pipeline resolves its workload several times) shares it. Its model is never handed
    out itself: :meth:`FactoryWorkload.build_model` returns deep copies."""
    return FactoryWorkload._call(spec)


class FactoryWorkload(Workload):
    """A user's PyTorch model built by ``file.py:function``."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.name = f"factory:{spec}"
        self.description = f"user factory {spec}"
        self._bundle = _built(spec, *_factory_key(spec))
        model = self._bundle["model"]
        self._example = _as_input_dict(self._bundle["example_inputs"], "example_inputs")
        self._eval = _as_input_dict(self._bundle.get("eval_inputs", self._example), "eval_inputs")
        self._calib = _as_input_dict(self._bundle.get("calibration_inputs", self._eval), "calibration_inputs")
        train = self._bundle.get("train_inputs")
        self._train = None if train is None else _as_input_dict(train, "train_inputs")
        tl = self._bundle.get("train_labels")
        self._train_labels = None if tl is None else _to_numpy(tl, "train_labels")
        if self._train_labels is not None and (
            self._train is None or len(self._train_labels) != next(iter(self._train.values())).shape[0]
        ):
            raise WorkloadError("train_labels needs train_inputs with the same number of samples")
        labels = self._bundle.get("eval_labels")
        self._labels = None if labels is None else _to_numpy(labels, "eval_labels")
        if self._labels is not None and len(self._labels) != next(iter(self._eval.values())).shape[0]:
            raise WorkloadError(
                f"eval_labels has {len(self._labels)} entries but eval_inputs has "
                f"{next(iter(self._eval.values())).shape[0]} samples; they must match"
            )
        metric = self._bundle.get("metric")
        if metric is not None and not callable(metric):
            raise WorkloadError(
                f"'metric' must be a function (outputs, labels) -> dict of floats, got {type(metric).__name__}"
            )
        self._metric = metric
        ref_out = self._run_torch(model, self._example)
        names = self._bundle.get("output_names") or [f"output_{i}" for i in range(len(ref_out))]
        if len(names) != len(ref_out):
            raise WorkloadError(
                f"output_names has {len(names)} names but the model returns {len(ref_out)} tensors"
            )
        dyn = self._bundle.get("dynamic_axes") or {k: {0: "batch"} for k in self._example}
        self.inputs = tuple(
            TensorSpec(k, str(v.dtype), tuple(dyn.get(k, {}).get(i, d) for i, d in enumerate(v.shape)))
            for k, v in self._example.items()
        )
        self.outputs = tuple(
            TensorSpec(n, str(o.dtype), ("batch", *o.shape[1:])) for n, o in zip(names, ref_out, strict=True)
        )
        self.task = "classification" if self._labels is not None else "generic"
        self.primary_metric = "accuracy" if self._labels is not None and self._metric is None else ""

    @staticmethod
    def _call(spec: str) -> dict[str, Any]:
        factory = load_factory(spec)
        try:
            result = factory()
        except Exception as err:
            raise WorkloadError(f"factory {spec} raised {type(err).__name__}: {err}") from err
        if isinstance(result, tuple) and len(result) == 2:
            result = {"model": result[0], "example_inputs": result[1]}
        if not isinstance(result, dict):
            raise WorkloadError(
                f"factory {spec} returned a {type(result).__name__}; it must return (model, example_inputs) "
                f"or a dict with at least 'model' and 'example_inputs', e.g. {_EXAMPLE}"
            )
        missing = [k for k in ("model", "example_inputs") if k not in result]
        if missing:
            raise WorkloadError(
                f"factory {spec} returned a dict without {', '.join(repr(k) for k in missing)}; "
                f"required keys: 'model', 'example_inputs'. Example: {_EXAMPLE}"
            )
        unknown = sorted(set(result) - _ALLOWED_KEYS)
        if unknown:
            raise WorkloadError(
                f"factory {spec} returned unknown keys {unknown}; allowed: {sorted(_ALLOWED_KEYS)}"
            )
        import torch

        if not isinstance(result["model"], torch.nn.Module):
            raise WorkloadError(
                f"factory {spec}: 'model' must be a torch.nn.Module, got {type(result['model']).__name__}"
            )
        return result

    @staticmethod
    def _run_torch(model: torch.nn.Module, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        try:
            with torch.inference_mode():
                out = model.eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        except Exception as err:
            raise WorkloadError(
                f"the factory's model failed on its own example_inputs ({', '.join(inputs)}): {type(err).__name__}: {err}"
            ) from err
        if isinstance(out, torch.Tensor):
            return [out.numpy()]
        if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            return [o.numpy() for o in out]
        if isinstance(out, Mapping) and all(isinstance(o, torch.Tensor) for o in out.values()):
            return [o.numpy() for o in out.values()]
        raise WorkloadError(
            f"the model must return a tensor, a tuple of tensors or a dict of tensors, got {type(out).__name__}"
        )

    @property
    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "factory": self.spec}

    def fingerprint(self) -> str:
        path = Path(self.spec.rpartition(":")[0])
        return sha256_text(self.spec, sha256_file(path), *(v.tobytes() for v in self._eval.values()))[:16]

    def build_model(self) -> torch.nn.Module:
        """A fresh copy of the model the factory returned (``build()`` runs once per process and file content)."""
        import copy

        return copy.deepcopy(self._bundle["model"]).eval()

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> Batch:
        return _take(self._example, batch_size)

    def eval_size(self, limit: int | None = None) -> int:
        n = next(iter(self._eval.values())).shape[0]
        return n if limit is None else min(n, limit)

    def eval_batches(
        self, limit: int | None = None, batch_size: int = 64
    ) -> Iterator[tuple[np.ndarray, Batch]]:
        return _batched(self._eval, self.eval_size(limit), batch_size)

    def calibration_batches(self, num_samples: int = 128, batch_size: int = 16) -> Iterator[Batch]:
        n = min(num_samples, next(iter(self._calib.values())).shape[0])
        for _, batch in _batched(self._calib, n, batch_size):
            yield batch

    def train_batches(self, batch_size: int = 32, seed: int = 0) -> Iterator[tuple[Batch, np.ndarray | None]]:
        if self._train is None:
            raise WorkloadError(
                f"factory {self.spec} returned no 'train_inputs' (add \"train_inputs\": {{...}} and, for "
                'classification, "train_labels" to the dict build() returns)'
            )
        n = next(iter(self._train.values())).shape[0]
        order = np.random.default_rng(seed).permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield (
                {k: np.ascontiguousarray(v[idx]) for k, v in self._train.items()},
                (None if self._train_labels is None else self._train_labels[idx]),
            )

    def quality(self, outputs: Mapping[str, np.ndarray], limit: int | None = None) -> dict[str, float]:
        labels = None if self._labels is None else self._labels[: self.eval_size(limit)]
        if self._metric is not None:
            try:
                result = self._metric(dict(outputs), labels)
            except Exception as err:
                raise WorkloadError(f"the factory's metric raised {type(err).__name__}: {err}") from err
            if not isinstance(result, Mapping) or not all(
                isinstance(v, (int, float)) for v in result.values()
            ):
                raise WorkloadError(
                    f"the factory's metric must return a dict of name -> float, got {result!r}"
                )
            return {k: float(v) for k, v in result.items()}
        return _default_quality(outputs, labels)

    def fidelity(
        self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        return _default_fidelity(outputs, reference)


class OnnxWorkload(Workload):
    """An ONNX model with its inputs in an .npz (keys = input names; optional ``labels``)."""

    def __init__(self, model_path: str | Path, data_path: str | Path | None) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise WorkloadError(f"ONNX file {self.model_path} does not exist")
        if data_path is None:
            raise WorkloadError(
                "an ONNX workload needs its inputs: pass --data inputs.npz with one array per model input "
                "(batch first) and optionally 'labels'; e.g. np.savez('inputs.npz', x=x, labels=y)"
            )
        self.data_path = Path(data_path)
        self.name = f"onnx:{self.model_path.name}"
        self.description = f"ONNX model {self.model_path} with inputs from {self.data_path}"
        import onnxruntime as ort

        try:
            sess = ort.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
        except Exception as err:
            raise WorkloadError(f"{self.model_path} is not a model ONNX Runtime can load: {err}") from err
        # placeholder dims ("?", "-1", "unk__0", none) are independent dims, not one shared name
        self.inputs = tuple(
            TensorSpec(
                i.name, numpy_dtype_of(i.type), tuple(dim_of(d, i.name, j) for j, d in enumerate(i.shape))
            )
            for i in sess.get_inputs()
        )
        self.outputs = tuple(
            TensorSpec(
                o.name, numpy_dtype_of(o.type), tuple(dim_of(d, o.name, j) for j, d in enumerate(o.shape))
            )
            for o in sess.get_outputs()
        )
        try:
            with np.load(self.data_path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            raise WorkloadError(f"can't read {self.data_path} as an .npz of arrays: {err}") from err
        self._labels = arrays.pop("labels", None)
        missing = [s.name for s in self.inputs if s.name not in arrays]
        if missing:
            raise WorkloadError(
                f"{self.data_path} has arrays {sorted(arrays)} but the model needs inputs {[s.name for s in self.inputs]}; "
                f"missing: {missing}"
            )
        self._eval = _as_input_dict({s.name: arrays[s.name] for s in self.inputs}, str(self.data_path))
        self.task = "classification" if self._labels is not None else "generic"
        self.primary_metric = "accuracy" if self._labels is not None else ""

    @property
    def ref(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "onnx": str(self.model_path.resolve()),
            "data": str(self.data_path.resolve()),
        }

    @property
    def has_torch_model(self) -> bool:
        return False

    def build_model(self) -> torch.nn.Module:
        raise WorkloadError(
            f"{self.name} is an ONNX workload: it has no PyTorch model; use the onnxruntime runtime"
        )

    def original_onnx(self) -> Path:
        return self.model_path

    @cached_property
    def _fp(self) -> str:
        return sha256_text(sha256_file(self.model_path), sha256_file(self.data_path))[:16]

    def fingerprint(self) -> str:
        return self._fp

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> Batch:
        return _take(self._eval, batch_size)

    def eval_size(self, limit: int | None = None) -> int:
        n = next(iter(self._eval.values())).shape[0]
        return n if limit is None else min(n, limit)

    def eval_batches(
        self, limit: int | None = None, batch_size: int = 64
    ) -> Iterator[tuple[np.ndarray, Batch]]:
        return _batched(self._eval, self.eval_size(limit), batch_size)

    def calibration_batches(self, num_samples: int = 128, batch_size: int = 16) -> Iterator[Batch]:
        for _, batch in _batched(self._eval, min(num_samples, self.eval_size()), batch_size):
            yield batch

    def quality(self, outputs: Mapping[str, np.ndarray], limit: int | None = None) -> dict[str, float]:
        labels = None if self._labels is None else self._labels[: self.eval_size(limit)]
        return _default_quality(outputs, labels)

    def fidelity(
        self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        return _default_fidelity(outputs, reference)
