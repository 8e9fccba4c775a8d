"""Element types of ONNX Runtime tensors: ONNX Runtime's type strings (``NodeArg.type``, e.g.
``"tensor(float)"``) to numpy dtype names, the one map every module converts with.

Model inputs and outputs are described by :class:`slimship.workload.TensorSpec` (numpy dtype names);
protocol-specific names (the Open Inference Protocol's ``FP32``, ...) are derived from the numpy name.
"""

from __future__ import annotations

__all__ = ["ORT_TO_NUMPY", "numpy_dtype_of"]

#: ONNX Runtime tensor type → numpy dtype name
ORT_TO_NUMPY: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def numpy_dtype_of(ort_type: str, default: str = "float32") -> str:
    """The numpy dtype name of an ONNX Runtime tensor type; ``default`` for a type the map doesn't know."""
    return ORT_TO_NUMPY.get(ort_type, default)
