"""What machine a measurement was taken on: CPU, cores, the ISA features that decide int8 speed,
library versions and thread settings. Every result slimship writes embeds this."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

#: CPU flags that decide which int8/bf16 kernels ONNX Runtime and PyTorch can use.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")

#: Packages whose versions change the numbers slimship measures.
TRACKED_PACKAGES = (
    "slimship",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "transformers",
    "tokenizers",
    "numpy",
    "scikit-learn",
    "torch-pruning",
    "optuna",
    "openvino",
    "executorch",
)


def _cpuinfo() -> tuple[str, set[str]]:
    model: str = platform.processor() or platform.machine()
    flags: set[str] = set()
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return model, flags


def cpu_flags() -> set[str]:
    """This CPU's ISA flags as ``/proc/cpuinfo`` lists them (empty where it doesn't exist)."""
    return set(_cpuinfo()[1])


def physical_cores() -> int:
    """Physical cores (what :func:`default_threads` gives unless told otherwise); falls back to logical CPUs."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


#: threads every inference session (and timing, evaluation, verification) uses where nothing sets them
THREADS_ENV = "SLIMSHIP_THREADS"


def default_threads() -> int:
    """The thread count of a session whose settings leave threads open: ``SLIMSHIP_THREADS`` when set (several
    processes sharing a host, each with its share of the cores), else the physical cores."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return physical_cores()
    from slimship.errors import ConfigError

    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{THREADS_ENV} must be a whole number ≥ 1 (threads per session), got {raw!r}")
    return int(raw)


def int8_kernel_summary(flags: set[str]) -> str:
    if "amx_int8" in flags:
        return "AMX (amx_int8) + VNNI: int8 matmuls have hardware support"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "VNNI: int8 dot products have hardware support (u8s8)"
    if "avx2" in flags:
        return "AVX2 without VNNI: int8 gains are small; measure before choosing int8"
    return "no x86 int8 dot-product support detected"


def cpu_class(flags: set[str] | None = None, arch: str | None = None) -> str:
    """The CPU class that decides int8 kernels and even int8 *results*: ``amx``, ``avx512-vnni``, ``avx-vnni``,
    ``avx512`` (no VNNI), ``avx2`` (no VNNI), ``x86-64`` (older), or the architecture's name elsewhere."""
    f = cpu_flags() if flags is None else set(flags)
    arch = arch or platform.machine()
    if arch not in ("x86_64", "AMD64", "amd64", "i686", "x86"):
        return arch.lower()
    if "amx_int8" in f:
        return "amx"
    if "avx512_vnni" in f:
        return "avx512-vnni"
    if "avx_vnni" in f:
        return "avx-vnni"
    if "avx512f" in f:
        return "avx512"
    if "avx2" in f:
        return "avx2"
    return "x86-64"


def has_int8_dot_product(cls: str) -> bool:
    """Whether ORT's int8 kernels on this CPU class accumulate without 16-bit saturation (VNNI/AMX, or not x86)."""
    return cls in ("amx", "avx512-vnni", "avx-vnni") or not (cls.startswith("avx") or cls == "x86-64")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """A JSON-ready description of this machine, for every result file."""
    import psutil

    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "isa": {flag: flag in flags for flag in INT8_FLAGS},
        "int8_kernels": int8_kernel_summary(flags),
        "cpu_class": cpu_class(flags),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "threads": {
            "runtime_threads": threads,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            THREADS_ENV: os.environ.get(THREADS_ENV),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        },
    }
