"""Quantization diagnosis: which nodes hurt, by how much, and what to exclude.

For every node a quantization mode would quantize, the output SQNR of quantizing that node alone is
computed by emulating the quantizer in NumPy on real calibration inputs (fast: one graph run captures
every node's input). The worst nodes by SQNR are then measured for real on ONNX Runtime: the fidelity of
the model with only that node quantized, and with everything quantized except that node. The ranked
table ends in an exclusion list that can be pasted into a config (``exclude_nodes``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload


def _sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    noise = float(((ref.astype(np.float64) - approx) ** 2).sum())
    signal = float((ref.astype(np.float64) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)


def _fake_quant_act_u8(x: np.ndarray) -> np.ndarray:
    """ORT DynamicQuantizeLinear: uint8, asymmetric, per tensor, range always includes 0."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def _fake_quant_weight_s8(w: np.ndarray, per_channel: bool, axis: int = 1) -> np.ndarray:
    """Symmetric int8 weights, per output channel (``axis``) or per tensor."""
    if per_channel:
        amax = np.abs(w).max(axis=1 - axis if w.ndim == 2 else None, keepdims=True)
    else:
        amax = np.abs(w).max(keepdims=True)
    scale = np.where(amax == 0, 1.0, amax / 127.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def emulated_sqnr(
    onnx_path: str | Path,
    workload: Workload,
    node_names: list[str],
    per_channel: bool = True,
    samples: int = 32,
) -> dict[str, dict[str, Any]]:
    """Output SQNR (dB) of each node when only it is quantized (dynamic INT8 emulation)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node if n.name in set(node_names)}
    wanted = sorted({n.input[0] for n in nodes.values() if n.op_type in ("MatMul", "Gemm")})
    existing = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    captured: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    for batch in workload.calibration_batches(samples, 8):
        for name, value in zip(wanted, sess.run(wanted, batch), strict=True):
            captured[name].append(value.reshape(-1, value.shape[-1]))
    acts = {k: np.concatenate(v) for k, v in captured.items()}
    out: dict[str, dict[str, Any]] = {}
    for name, node in nodes.items():
        if node.op_type == "Gather":
            w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            out[name] = {
                "op_type": "Gather",
                "sqnr_db": _sqnr_db(w, _fake_quant_weight_s8(w, per_channel, axis=0)),
                "emulated": "weights only",
            }
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            w = w.T
        x = acts[node.input[0]]
        ref = x @ w
        approx = _fake_quant_act_u8(x) @ _fake_quant_weight_s8(w, per_channel)
        out[name] = {
            "op_type": node.op_type,
            "sqnr_db": _sqnr_db(ref, approx),
            "activation_absmax_over_p99": float(np.abs(x).max() / max(np.percentile(np.abs(x), 99), 1e-12)),
            "emulated": "uint8 per-tensor activations × int8 weights",
        }
    return out


_NORM_OPS = {
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
}
_GELU_OPS = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu"}


def node_roles(model: Any) -> dict[str, dict[str, Any]]:
    """Natural groups for transformer graphs, found from structure (names from exporters carry none):
    ``layer`` = how many normalisation nodes precede the node, halved (two per encoder layer); ``role`` =
    ``qkv`` (MatMuls sharing one input three ways), ``ffn_in`` (output feeds a GELU), ``ffn_out`` (input comes
    from a GELU), ``attn_out`` (the other MatMul of the layer). Nodes of other graphs get role ``other``."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weighted = [
        n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits
    ]
    sharing: dict[str, int] = {}
    for n in weighted:
        sharing[n.input[0]] = sharing.get(n.input[0], 0) + 1
    norms_seen = 0
    roles: dict[str, dict[str, Any]] = {}
    for n in model.graph.node:
        if n.op_type in _NORM_OPS:
            norms_seen += 1
            continue
        if n not in weighted:
            continue

        def feeds_gelu(out: str, depth: int = 3) -> bool:
            """A GELU (fused, or decomposed around Erf) within a few steps downstream."""
            for c in consumers.get(out, []):
                if c.op_type in _GELU_OPS or c.op_type == "Erf":
                    return True
                if depth and c.op_type in ("Add", "Div", "Mul") and feeds_gelu(c.output[0], depth - 1):
                    return True
            return False

        def from_gelu(value: str, depth: int = 3) -> bool:
            """A GELU (fused, or decomposed around Erf) within a few steps upstream."""
            src = producer.get(value)
            if src is None:
                return False
            if src.op_type in _GELU_OPS or src.op_type == "Erf":
                return True
            return (
                bool(depth)
                and src.op_type in ("Mul", "Add", "Div")
                and any(from_gelu(i, depth - 1) for i in src.input)
            )

        if from_gelu(n.input[0]):
            role = "ffn_out"
        elif sharing.get(n.input[0], 0) >= 3:
            role = "qkv"
        elif feeds_gelu(n.output[0]):
            role = "ffn_in"
        elif norms_seen:
            role = "attn_out"
        else:
            role = "other"
        roles[n.name] = {"layer": max(0, (norms_seen - 1) // 2), "role": role}
    return roles


def diagnose(
    candidate: Candidate,
    workload: Workload,
    base_config: dict[str, Any] | None = None,
    measure_top: int = 6,
    samples: int = 32,
) -> dict[str, Any]:
    """Rank the nodes dynamic INT8 quantization would touch by the harm each does.

    Real measurements (quantize-only-this / revert-only-this) are made for the ``measure_top`` nodes
    with the lowest emulated SQNR; fidelity is the minimum per-sample cosine (or top-1 agreement for
    classifiers) against the parent on verification inputs."""
    import onnx

    from slimship.passes import run_pass
    from slimship.passes.quantize import DynamicQuantConfig, quantizable_nodes

    base = DynamicQuantConfig.parse(base_config or {})
    assert isinstance(base, DynamicQuantConfig)  # parse returns the class it is called on
    model = onnx.load(str(candidate.artifact_path))
    op_types = base.op_types or ("MatMul", "Gemm", "Attention", "Gather")
    targets = quantizable_nodes(model, op_types)
    sq = emulated_sqnr(candidate.artifact_path, workload, targets, base.per_channel, samples)
    ranked = sorted(sq.items(), key=lambda kv: kv[1]["sqnr_db"])
    roles = node_roles(model)
    rows: list[dict[str, Any]] = [
        {"node": k, **roles.get(k, {"layer": None, "role": "other"}), **v} for k, v in ranked
    ]
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = (
            f"layer {row['layer']} {row['role']}"
            if row["layer"] is not None and row["role"] != "other"
            else row["op_type"]
        )
        g = groups.setdefault(key, {"group": key, "nodes": [], "min_sqnr_db": float("inf")})
        g["nodes"].append(row["node"])
        g["min_sqnr_db"] = min(g["min_sqnr_db"], row["sqnr_db"])

    def fidelity(cand: Candidate) -> float:
        """Min per-sample cosine of the first output (finer-grained than top-1 agreement on a few dozen samples)."""
        from slimship.measure.verify import VerificationReport

        report = VerificationReport.from_json(cand.info["fidelity_to_parent"])
        return float(next(iter(report.outputs.values())).cosine_min)

    with tempfile.TemporaryDirectory(prefix="slimship-diagnose-") as tmp:
        full = run_pass("quantize-dynamic", candidate, workload, base.to_json_dict(), Path(tmp) / "full")
        full_fid = fidelity(full)
        for i, row in enumerate(rows[:measure_top]):
            others = [n for n in targets if n != row["node"]]
            only = run_pass(
                "quantize-dynamic",
                candidate,
                workload,
                {**base.to_json_dict(), "exclude_nodes": others},
                Path(tmp) / f"only{i}",
            )
            revert = run_pass(
                "quantize-dynamic",
                candidate,
                workload,
                {**base.to_json_dict(), "exclude_nodes": sorted({*base.exclude_nodes, row["node"]})},
                Path(tmp) / f"rev{i}",
            )
            row["fidelity_only_this_quantized"] = fidelity(only)
            row["fidelity_all_but_this"] = fidelity(revert)
            row["gain_from_reverting"] = fidelity(revert) - full_fid
    measured = [r for r in rows if "gain_from_reverting" in r]
    worst = sorted(measured, key=lambda r: -r["gain_from_reverting"])
    suggested = [r["node"] for r in worst if r["gain_from_reverting"] > 0][: max(1, len(worst) // 2)]
    return {
        "candidate": candidate.id,
        "mode": "dynamic",
        "config": base.to_json_dict(),
        "fidelity_metric": "min per-sample cosine of outputs to the parent",
        "fully_quantized_fidelity": full_fid,
        "nodes": rows,
        "groups": sorted(groups.values(), key=lambda g: g["min_sqnr_db"]),
        "suggested_exclude_nodes": suggested,
        "paste_into_config": {"exclude_nodes": suggested},
    }


def format_diagnosis(report: dict[str, Any], limit: int = 15) -> str:
    lines = [
        f"mode: {report['mode']} INT8 ({'per-channel' if report['config'].get('per_channel') else 'per-tensor'} weights); "
        f"nodes it quantizes: {len(report['nodes'])}",
        f"fully quantized: {report['fidelity_metric']} = {report['fully_quantized_fidelity']:.5f}",
        f"{'node':32s} {'group':16s} {'op':8s} {'SQNR dB':>8s} {'only-this':>10s} {'all-but-this':>13s} {'gain':>8s}",
    ]
    for r in report["nodes"][:limit]:
        group = (
            f"L{r['layer']} {r['role']}" if r.get("layer") is not None and r.get("role") != "other" else "—"
        )
        lines.append(
            f"{r['node'][:32]:32s} {group:16s} {r['op_type']:8s} {r['sqnr_db']:8.2f} "
            f"{r.get('fidelity_only_this_quantized', float('nan')):10.5f} {r.get('fidelity_all_but_this', float('nan')):13.5f} "
            f"{r.get('gain_from_reverting', float('nan')):+8.5f}"
        )
    worst_groups = ", ".join(
        f"{g['group']} ({g['min_sqnr_db']:.1f} dB)" for g in report.get("groups", [])[:5]
    )
    lines.append(f"worst groups: {worst_groups}")
    lines.append(f"exclude_nodes: {report['suggested_exclude_nodes']}")
    return "\n".join(lines)
