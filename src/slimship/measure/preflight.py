"""Preflight: "will quantization be faster here?" — answered from the machine and the graph, before
quantizing. Reports the int8 kernels this CPU has, the weight/activation type pair that is fast on it,
what each quantization mode would quantize and what stays float, and known slow patterns, each with
its reason."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

#: op types each mode quantizes by default (see slimship.passes.quantize)
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "Gather")
STATIC_OPS = ("Conv", "MatMul", "Gemm")
INT4_OPS = ("MatMul",)


def _isa() -> dict[str, bool]:
    from slimship.machine import machine_info

    return machine_info()["isa"]


def preflight(onnx_path: str | Path, isa: dict[str, bool] | None = None) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    isa = isa if isa is not None else _isa()
    inits = {i.name for i in model.graph.initializer}
    weighted = [
        n
        for n in model.graph.node
        if any(i in inits for i in (n.input if n.op_type == "Gather" else n.input[1:]))
    ]
    ops = Counter(n.op_type for n in model.graph.node)

    def coverage(op_types: tuple[str, ...]) -> dict[str, int]:
        c = Counter(n.op_type for n in weighted if n.op_type in op_types)
        return dict(sorted(c.items()))

    vnni = bool(isa.get("avx512_vnni") or isa.get("avx_vnni"))
    amx = bool(isa.get("amx_int8"))
    kernels = "AMX + VNNI" if amx else "VNNI" if vnni else "AVX2 (no VNNI)" if isa.get("avx2") else "none"
    warnings: list[dict[str, Any]] = []

    def warn(code: str, message: str, modes: tuple[str, ...] = ("dynamic", "static", "int4")) -> None:
        warnings.append({"code": code, "message": message, "modes": list(modes)})

    if not vnni and not amx:
        warn(
            "no-int8-dot-product",
            "this CPU has no VNNI/AMX: int8 matmuls use AVX2 emulation and may not beat fp32; measure before shipping int8",
            ("dynamic", "static"),
        )
    conv = coverage(("Conv",))
    if conv:
        warn(
            "dynamic-conv",
            f"{sum(conv.values())} Conv node(s): dynamic quantization turns them into ConvInteger, which ONNX Runtime runs "
            "slower than float convolution on CPU; use static (QDQ) quantization for convolutions",
            ("dynamic",),
        )
    weight_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) >= 2)
    if weight_params < 1_000_000:
        warn(
            "small-model",
            f"the model is small ({weight_params:,} weight parameters): quantize/dequantize overhead can outweigh faster "
            "int8 GEMMs (measured: static INT8 of the mnist CNN ran at ~0.5x of fp32 here); quantize for size, time it for speed",
            ("dynamic", "static"),
        )
    fused = {k: v for k, v in ops.items() if k in ("FusedConv", "FusedGemm")}
    if fused:
        warn(
            "fused-before-quantize",
            f"{fused} were fused by graph optimisation at level 'extended' and can't be quantized; quantize the exported graph "
            "(or optimise at level 'basic'), ONNX Runtime fuses the quantized graph at load time",
        )
    qdq = ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)
    if qdq:
        warn(
            "already-quantized", f"the graph already holds {qdq} Q/DQ nodes; quantizing again compounds error"
        )
    gelu_fed = 0
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if (
            n.op_type in ("MatMul", "Gemm")
            and n.input
            and n.input[0] in producer
            and producer[n.input[0]].op_type in ("Gelu", "BiasGelu", "FastGelu")
        ):
            gelu_fed += 1
    if gelu_fed:
        warn(
            "post-gelu-outliers",
            f"{gelu_fed} MatMul(s) take a GELU output (transformer FFN output projections): post-GELU activation outliers make "
            "dynamic/static int8 lose most fidelity there; use smooth='all' (SmoothQuant-style, free in size; measured best on "
            "minilm) or keep_float='ffn_out' (costs size), and compare",
            ("dynamic", "static"),
        )
    everything = set(DYNAMIC_OPS) | set(STATIC_OPS)
    stays_float = {
        k: v
        for k, v in sorted(ops.items())
        if k not in everything
        and k
        not in (
            "Constant",
            "Shape",
            "Reshape",
            "Transpose",
            "Unsqueeze",
            "Squeeze",
            "Concat",
            "Slice",
            "Gather",
            "Cast",
        )
    }
    if not coverage(DYNAMIC_OPS) and not coverage(STATIC_OPS):
        warn(
            "nothing-to-quantize",
            "no MatMul/Gemm/Conv/Gather with constant weights: quantization would change nothing",
        )
    from slimship.machine import cpu_class, has_int8_dot_product

    cls = cpu_class({k for k, v in isa.items() if v})
    int8_settings = (
        f"none needed ({cls}: int8 dot products in hardware)"
        if has_int8_dot_product(cls)
        else f"session.x64quantprecision=1 ({cls} has no VNNI/AMX: ONNX Runtime's u8s8 kernels would sum in 16 bits and "
        "can saturate; slimship records and applies it for every int8 candidate on this CPU)"
    )
    return {
        "model": str(onnx_path),
        "int8_kernels": kernels,
        "cpu_class": cls,
        "int8_runtime_settings": int8_settings,
        "isa": isa,
        "recommended_types": {
            "dynamic": "weights int8 (signed): u8s8 is the fast path on VNNI/AMX; unsigned weights measured ~1.6x slower on a VNNI CPU",
            "static": "activations uint8 asymmetric, weights int8 symmetric per-channel (u8s8)",
        }
        if vnni or amx
        else {
            "dynamic": "weights int8 with reduce_range=True (avoids u8s8 saturation without VNNI)",
            "static": "uint8 activations, int8 weights, reduce_range",
        },
        "would_quantize": {
            "dynamic": coverage(DYNAMIC_OPS),
            "static": coverage(STATIC_OPS),
            "int4": coverage(INT4_OPS),
        },
        "stays_float": stays_float,
        "warnings": warnings,
    }


def format_preflight(report: dict[str, Any], mode: str | None = None) -> str:
    """Readable preflight; with ``mode``, only that mode's coverage and warnings."""
    lines = [f"int8 kernels on this CPU: {report['int8_kernels']}"]
    if report.get("int8_runtime_settings"):
        lines.append(f"runtime settings an INT8 result gets here: {report['int8_runtime_settings']}")
    for kind, text in report["recommended_types"].items():
        lines.append(f"  {kind}: {text}")
    for m, cov in report["would_quantize"].items():
        if mode in (None, m):
            lines.append(
                f"{m:8s} would quantize: {', '.join(f'{k}×{v}' for k, v in cov.items()) or 'nothing'}"
            )
    lines.append("stays float: " + (", ".join(f"{k}×{v}" for k, v in report["stays_float"].items()) or "—"))
    for w in report["warnings"]:
        if mode is None or mode in w["modes"]:
            lines.append(f"WARNING [{w['code']}] {w['message']}")
    return "\n".join(lines)
