"""This machine's FP32 and INT8 matmul ceilings through ONNX Runtime (single-op graphs, same threads).

    .venv/bin/python benchmarks/gemm_ceiling.py        # writes benchmarks/results/gemm_ceiling.json

FP32: MatMul. INT8: MatMulInteger with uint8 activations × int8 weights (the u8s8 path VNNI/AMX
accelerate) and the same op with int8 × int8 for comparison. Shapes are MiniLM's FFN matmul at
batch 32 × seq 128 (M = 4096 tokens, K = 384, N = 1536). Interleaved, median of ≥ 30 runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _graph(op: str, a_type: int, b: np.ndarray, m: int, k: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    out_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
    g = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", a_type, [m, k])],
        [helper.make_tensor_value_info("y", out_type, [m, b.shape[1]])],
        [numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()


def measure(m: int = 4096, k: int = 384, n: int = 1536, runs: int = 30, threads: int | None = None) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto

    from slimship.machine import machine_info, physical_cores
    from slimship.runtime.ort_backend import session_options

    threads = threads or physical_cores()
    rng = np.random.default_rng(0)
    cases = {
        "fp32 MatMul": (
            _graph("MatMul", TensorProto.FLOAT, rng.normal(size=(k, n)).astype(np.float32), m, k),
            rng.normal(size=(m, k)).astype(np.float32),
        ),
        "int8 u8s8 MatMulInteger": (
            _graph(
                "MatMulInteger", TensorProto.UINT8, rng.integers(-127, 127, size=(k, n)).astype(np.int8), m, k
            ),
            rng.integers(0, 255, size=(m, k)).astype(np.uint8),
        ),
        "int8 s8s8 MatMulInteger": (
            _graph(
                "MatMulInteger", TensorProto.INT8, rng.integers(-127, 127, size=(k, n)).astype(np.int8), m, k
            ),
            rng.integers(-127, 127, size=(m, k)).astype(np.int8),
        ),
    }
    sessions = {
        name: ort.InferenceSession(
            g, session_options(threads, spin=False), providers=["CPUExecutionProvider"]
        )
        for name, (g, _) in cases.items()
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, sess in sessions.items():
        for _ in range(3):
            sess.run(None, {"a": cases[name][1]})
    for _ in range(runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"a": cases[name][1]})
            times[name].append(time.perf_counter() - t0)
    ops = 2.0 * m * k * n
    result = {
        "shape": {"M": m, "K": k, "N": n},
        "threads": threads,
        "runs": runs,
        "ops_per_call": ops,
        "ceilings": {
            name: {"median_ms": float(np.median(t) * 1e3), "gops_per_s": ops / float(np.median(t)) / 1e9}
            for name, t in times.items()
        },
        "machine": machine_info(threads),
    }
    fp = result["ceilings"]["fp32 MatMul"]["gops_per_s"]
    for v in result["ceilings"].values():
        v["ratio_vs_fp32"] = v["gops_per_s"] / fp
    return result


def main() -> None:
    result = measure()
    out = HERE / "results" / "gemm_ceiling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, v in result["ceilings"].items():
        print(
            f"{name:26s} {v['median_ms']:8.2f} ms  {v['gops_per_s']:8.1f} GOP/s  {v['ratio_vs_fp32']:.2f}x fp32"
        )


if __name__ == "__main__":
    main()
