"""ExecuTorch runtime: a ``.pte`` program (XNNPACK delegate) run by ExecuTorch's C++ runtime through its Python
bindings, on this x86 host, with the same predict contract as the other backends.

This is how a mobile candidate is *verified* and measured here; on a phone the same ``.pte`` runs under ExecuTorch's
Android/iOS runtime, whose speed this host says nothing about. The program's memory is planned for the upper bound
of every dynamic axis, recorded with the candidate (``info["executorch"]["dim_max"]``): a batch larger than the batch
bound runs in chunks of the bound (the predict contract takes any batch); any other axis beyond its bound is an
:class:`~slimship.errors.InputSpecError` that names the bound, never a resize failure inside the runtime.

Threads: XNNPACK's thread pool is process-wide, so the runtime sets it to its thread count before each call (like
:class:`~slimship.runtime.torch_backend.TorchRuntime` does with ``torch.set_num_threads``), under one lock shared by
every ExecuTorch runtime in the process.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import InferenceError, InputSpecError, RuntimeUnavailableError
from slimship.runtime.base import Runtime
from slimship.runtime.settings import DeploymentSettings, decide_executorch_settings
from slimship.workload.base import Batch, TensorSpec

__all__ = ["INSTALL_HINT", "ExecuTorchRuntime", "import_executorch_runtime"]

INSTALL_HINT = "pip install 'slimship[executorch]'"

#: XNNPACK's thread pool and a loaded method's planned buffers are shared state: one call at a time
_CALL_LOCK = threading.Lock()

#: ExecuTorch's ScalarType codes (c10) for the dtypes a .pte input may have
_SCALAR_TYPES = {
    0: "uint8",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "int64",
    5: "float16",
    6: "float32",
    7: "float64",
    11: "bool",
}


def import_executorch_runtime() -> tuple[Any, Any]:
    """ExecuTorch's ``Runtime`` singleton and its bindings module (``portable_lib``), or a
    :class:`RuntimeUnavailableError` naming the extra to install."""
    try:
        with warnings.catch_warnings():
            # executorch.runtime warns on import that its API is experimental (it is; slimship pins the version)
            warnings.simplefilter("ignore")
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime as ETRuntime
    except (ImportError, OSError) as err:
        raise RuntimeUnavailableError(
            f"the ExecuTorch runtime is not installed ({err}); install it with `{INSTALL_HINT}` "
            "(or run the candidate's PyTorch parent on runtime 'torch')"
        ) from err
    return ETRuntime.get(), portable_lib


class ExecuTorchRuntime(Runtime):
    backend = "executorch"

    def __init__(
        self,
        path: str | Path,
        threads: int,
        *,
        inputs: Sequence[TensorSpec] | None = None,
        output_names: Sequence[str] = (),
        dim_max: Mapping[str, int] | None = None,
        settings: DeploymentSettings | None = None,
    ) -> None:
        """``inputs``: the program's inputs in its argument order, dynamic axes named (the candidate records them);
        without them every input is taken as fixed at the size the program was planned for. ``dim_max``: the
        largest size each named dynamic axis may take (the memory plan). ``settings``: the candidate's deployment
        settings (``threads`` given here overrides their thread count)."""
        et, self._lib = import_executorch_runtime()
        self.path = Path(path)
        if self.path.suffix != ".pte" or not self.path.is_file():
            raise InferenceError(f"{self.path} is not an ExecuTorch program (.pte)")
        settings = (settings or decide_executorch_settings()).with_overrides(threads=threads)
        if settings.runtime != "executorch":
            raise InferenceError(f"{self.path}: got {settings.runtime} settings for the ExecuTorch runtime")
        self.settings = settings
        try:
            program = et.load_program(self.path)
            self._method = program.load_method("forward")
        except Exception as err:
            raise InferenceError(f"ExecuTorch can't load {self.path}: {err}") from err
        if self._method is None:
            raise InferenceError(f"{self.path} has no 'forward' method")
        meta = self._method.metadata
        planned = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        specs = tuple(inputs) if inputs is not None else self._fixed_specs(meta)
        if len(specs) != len(planned):
            raise InferenceError(
                f"{self.path} takes {len(planned)} inputs but {len(specs)} were described ({[s.name for s in specs]})"
            )
        self.dim_max = dict(dim_max or {})
        n_out = meta.num_outputs()
        names = list(output_names) or [f"output{i}" for i in range(n_out)]
        if len(names) != n_out:
            raise InferenceError(f"{self.path} returns {n_out} outputs, expected {names}")
        super().__init__(specs, names, threads)

    @staticmethod
    def _fixed_specs(meta: Any) -> tuple[TensorSpec, ...]:
        specs = []
        for i in range(meta.num_inputs()):
            info = meta.input_tensor_meta(i)
            dtype = _SCALAR_TYPES.get(int(info.dtype()))
            if dtype is None:
                raise InferenceError(f"input {i} of the program has ExecuTorch dtype code {info.dtype()}")
            specs.append(TensorSpec(f"input{i}", dtype, tuple(int(d) for d in info.sizes())))
        return tuple(specs)

    def _check_bounds(self, batch: Batch) -> None:
        for spec in self.inputs:
            for axis, dim in enumerate(spec.shape):
                limit = self.dim_max.get(dim) if isinstance(dim, str) else None
                got = batch[spec.name].shape[axis]
                if limit is not None and got > limit:
                    raise InputSpecError(
                        f"input {spec.name!r} has {dim} {got} at axis {axis}, but this ExecuTorch program was "
                        f"planned for {dim} ≤ {limit}; shorten it, or convert again with a larger bound "
                        f"(convert-executorch's max_sequence)"
                    )

    def _run(self, batch: Batch) -> dict[str, np.ndarray]:
        first = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else None
        limit = self.dim_max.get(first) if isinstance(first, str) else None
        n = batch[self.inputs[0].name].shape[0] if self.inputs else 0
        if limit is None or n <= limit:
            return self._run_planned(batch)
        # a batch beyond the planned bound runs in chunks of the bound: the predict contract takes any batch
        batched = [s.name for s in self.inputs if s.shape and s.shape[0] == first]
        parts = [
            self._run_planned({k: (v[i : i + limit] if k in batched else v) for k, v in batch.items()})
            for i in range(0, n, limit)
        ]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}

    def _run_planned(self, batch: Batch) -> dict[str, np.ndarray]:
        import torch

        self._check_bounds(batch)
        args = [torch.from_numpy(np.ascontiguousarray(batch[s.name])) for s in self.inputs]
        try:
            with _CALL_LOCK:
                if self._lib._threadpool_get_thread_count() != self.threads:
                    self._lib._unsafe_reset_threadpool(self.threads)
                out = self._method.execute(args)
        except Exception as err:
            shapes = {k: list(v.shape) for k, v in batch.items()}
            raise InferenceError(f"ExecuTorch failed on a batch of shapes {shapes}: {err}") from err
        if len(out) != len(self.output_names):
            raise InferenceError(
                f"the program returned {len(out)} outputs, expected {list(self.output_names)}"
            )
        return {name: t.numpy().copy() for name, t in zip(self.output_names, out, strict=True)}

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "deployment": self.settings.to_json(), "dim_max": dict(self.dim_max)}
