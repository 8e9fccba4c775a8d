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

from slimship.measure.sqnr import emulated_sqnr_static, fake_quant_act_u8, sqnr_db

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload


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
    captured: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    if wanted:  # sess.run([]) would return every output: nothing to capture for weight-only (Gather) nodes
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
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
                "sqnr_db": sqnr_db(w, _fake_quant_weight_s8(w, per_channel, axis=0)),
                "emulated": "weights only",
            }
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            w = w.T
        x = acts[node.input[0]]
        ref = x @ w
        approx = fake_quant_act_u8(x) @ _fake_quant_weight_s8(w, per_channel)
        out[name] = {
            "op_type": node.op_type,
            "sqnr_db": sqnr_db(ref, approx),
            "activation_absmax_over_p99": float(np.abs(x).max() / max(np.percentile(np.abs(x), 99), 1e-12)),
            "emulated": "uint8 per-tensor activations × int8 weights",
        }
    return out


def _module_path(node: Any) -> list[str]:
    """The module path an exporter recorded for a node: torch's dynamo exporter in ``pkg.torch.onnx.name_scopes``
    (``['', 'features', '3', 'conv', '0', '0', 'conv2d']``), the TorchScript exporter and others in the node name
    (``/features.3/conv/Conv``). The last element (the op itself) is dropped."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            parts = [p for s in scopes[:-1] for p in str(s).split(".") if p]
            if parts:
                return parts
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return [p for seg in node.name.strip("/").split("/")[:-1] for p in seg.split(".") if p]
    return []


def node_blocks(model: Any, node_names: list[str]) -> dict[str, str]:
    """The block each node belongs to, for CNNs: the module up to its first numbered part (``features.3``, an
    inverted-residual block of MobileNetV2; ``layer1.0`` of a ResNet; ``5`` of a flat Sequential), or the first
    named part (``block0``). Graphs whose nodes carry no module path are cut at their residual Adds (an Add of two
    computed values): ``block 0``, ``block 1``, …"""
    inits = {t.name for t in model.graph.initializer}
    wanted = set(node_names)
    blocks: dict[str, str] = {}
    residual_adds = 0
    for node in model.graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and not set(node.input) & inits:
            residual_adds += 1
        if node.name not in wanted:
            continue
        path = _module_path(node)
        numbered = next((i for i, p in enumerate(path) if p.isdigit()), None)
        if path:
            blocks[node.name] = ".".join(path[: numbered + 1] if numbered is not None else path[:1])
        else:
            blocks[node.name] = f"block {residual_adds}"
    return blocks


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


def parse_diagnosis_config(mode: str, base_config: dict[str, Any] | None) -> tuple[str, Any]:
    """The pass a diagnosis (or accuracy-aware quantization) measures with and its parsed config (static "auto" calibration is pinned to minmax:
    every measurement then uses the same ranges, and each takes one calibration instead of three)."""
    from slimship.errors import ConfigError
    from slimship.passes.quantize import DynamicQuantConfig, StaticQuantConfig

    if mode == "dynamic":
        return "quantize-dynamic", DynamicQuantConfig.parse(base_config or {})
    if mode == "static":
        cfg = dict(base_config or {})
        if cfg.get("calibration", "auto") == "auto":
            cfg["calibration"] = "minmax"
        return "quantize-static", StaticQuantConfig.parse(cfg)
    raise ConfigError(f"a diagnosis measures mode 'dynamic' or 'static', got {mode!r}")


def _first_output_cosine_min(cand: Candidate) -> float:
    """Min per-sample cosine of the first output (finer-grained than top-1 agreement on a few dozen samples)."""
    from slimship.measure.verify import VerificationReport

    report = VerificationReport.from_json(cand.info["fidelity_to_parent"])
    return float(next(iter(report.outputs.values())).cosine_min)


_MEASURED = ("fidelity_only_this_quantized", "fidelity_all_but_this", "gain_from_reverting")


class _Measurer:
    """Runs the real quantization pass with some nodes kept in float and reads its fidelity to the parent."""

    def __init__(
        self,
        pass_name: str,
        base: Any,
        candidate: Candidate,
        workload: Workload,
        targets: list[str],
        tmp: Path,
    ) -> None:
        self.pass_name, self.base, self.candidate, self.workload = pass_name, base, candidate, workload
        self.targets, self.tmp, self.runs = targets, tmp, 0

    def fidelity(self, keep_float: set[str]) -> float:
        """Fidelity with ``keep_float`` (plus the configured exclusions) in float; 1.0 when that leaves nothing
        quantized (the model is then its parent)."""
        from slimship.passes import run_pass

        excluded = sorted({*self.base.exclude_nodes, *keep_float})
        if not [n for n in self.targets if n not in excluded]:
            return 1.0
        self.runs += 1
        cand = run_pass(
            self.pass_name,
            self.candidate,
            self.workload,
            {**self.base.to_json_dict(), "exclude_nodes": excluded},
            self.tmp / f"run{self.runs}",
        )
        return _first_output_cosine_min(cand)

    def only_and_revert(self, row: dict[str, Any], members: list[str], full: float) -> None:
        """quantize-only-these and revert-only-these figures of ``members`` into ``row``."""
        row["fidelity_only_this_quantized"] = self.fidelity({n for n in self.targets if n not in members})
        row["fidelity_all_but_this"] = self.fidelity(set(members))
        row["gain_from_reverting"] = row["fidelity_all_but_this"] - full


def _rank(
    mode: str, candidate: Candidate, workload: Workload, base: Any, samples: int
) -> tuple[Any, list[str], list[dict[str, Any]]]:
    """The graph, the nodes the mode quantizes, and one row per node ranked by emulated SQNR, worst first."""
    import onnx

    from slimship.passes.quantize import quantizable_nodes

    model = onnx.load(str(candidate.artifact_path))
    default_ops = (
        ("MatMul", "Gemm", "Attention", "Gather") if mode == "dynamic" else ("Conv", "MatMul", "Gemm")
    )
    targets = [
        n for n in quantizable_nodes(model, base.op_types or default_ops) if n not in base.exclude_nodes
    ]
    if mode == "dynamic":
        sq = emulated_sqnr(candidate.artifact_path, workload, targets, base.per_channel, samples)
    else:
        sq = emulated_sqnr_static(candidate.artifact_path, workload, targets, base.per_channel, samples)
    roles = node_roles(model)
    blocks = node_blocks(model, targets)
    rows = [
        {"node": k, **roles.get(k, {"layer": None, "role": "other"}), "block": blocks.get(k), **v}
        for k, v in sorted(sq.items(), key=lambda kv: kv[1]["sqnr_db"])
    ]
    return model, targets, rows


def _groups(rows: list[dict[str, Any]], by_block: bool) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        if by_block:
            key = str(row["block"])
        elif row["layer"] is not None and row["role"] != "other":
            key = f"layer {row['layer']} {row['role']}"
        else:
            key = row["op_type"]
        g = groups.setdefault(key, {"group": key, "nodes": [], "min_sqnr_db": float("inf")})
        g["nodes"].append(row["node"])
        g["min_sqnr_db"] = min(g["min_sqnr_db"], row["sqnr_db"])
    return sorted(groups.values(), key=lambda g: g["min_sqnr_db"])


def diagnose(
    candidate: Candidate,
    workload: Workload,
    base_config: dict[str, Any] | None = None,
    measure_top: int = 6,
    samples: int = 32,
    mode: str = "dynamic",
) -> dict[str, Any]:
    """Rank the nodes INT8 quantization (``mode``: dynamic, or static QDQ for CNNs) would touch by the harm each
    does, per node and per group (transformer sub-layer, or CNN block: see :func:`node_blocks`).

    Real measurements (quantize-only-this / revert-only-this) are made for the ``measure_top`` nodes with the
    lowest emulated SQNR and the ``measure_top`` worst groups; fidelity is the minimum per-sample cosine of the
    first output against the parent on verification inputs."""
    from slimship.errors import CompressionError

    pass_name, base = parse_diagnosis_config(mode, base_config)
    model, targets, rows = _rank(mode, candidate, workload, base, samples)
    if not targets:
        raise CompressionError(
            f"nothing to diagnose in {candidate.id}: no node {mode} INT8 would quantize "
            f"(op types in the graph: {sorted({n.op_type for n in model.graph.node})})"
            + ("; for a CNN use mode 'static' (--mode static)" if mode == "dynamic" else "")
        )
    by_block = mode == "static"  # CNN blocks; dynamic mode groups transformer sub-layers (or op types)
    groups = _groups(rows, by_block=by_block)
    with tempfile.TemporaryDirectory(prefix="slimship-diagnose-") as tmp:
        measure = _Measurer(pass_name, base, candidate, workload, targets, Path(tmp))
        full_fid = measure.fidelity(set())
        for row in rows[:measure_top]:
            measure.only_and_revert(row, [row["node"]], full_fid)
        measured_rows = {r["node"]: r for r in rows if "gain_from_reverting" in r}
        for group in groups[:measure_top] if len(groups) > 1 else []:
            alone = measured_rows.get(group["nodes"][0]) if len(group["nodes"]) == 1 else None
            if alone is not None:  # a one-node group: its figures are the node's
                group.update({k: alone[k] for k in _MEASURED})
            else:
                measure.only_and_revert(group, group["nodes"], full_fid)
    measured = [r for r in rows if "gain_from_reverting" in r]
    worst = sorted(measured, key=lambda r: -r["gain_from_reverting"])
    suggested = [r["node"] for r in worst if r["gain_from_reverting"] > 0][: max(1, len(worst) // 2)]
    return {
        "candidate": candidate.id,
        "mode": mode,
        "config": base.to_json_dict(),
        "fidelity_metric": "min per-sample cosine of outputs to the parent",
        "fully_quantized_fidelity": full_fid,
        "quantization_runs": measure.runs,
        "nodes": rows,
        "grouped_by": "block" if by_block else "sub-layer or op type",
        "groups": groups,
        "suggested_exclude_nodes": suggested,
        "paste_into_config": {"exclude_nodes": suggested},
    }


def _figures(r: dict[str, Any]) -> str:
    if "gain_from_reverting" not in r:  # not among the measured ones
        return f"{'—':>10s} {'—':>13s} {'—':>8s}"
    return f"{r['fidelity_only_this_quantized']:10.5f} {r['fidelity_all_but_this']:13.5f} {r['gain_from_reverting']:+8.5f}"


def format_diagnosis(report: dict[str, Any], limit: int = 15) -> str:
    by_block = report.get("grouped_by") == "block"
    lines = [
        f"mode: {report['mode']} INT8 ({'per-channel' if report['config'].get('per_channel') else 'per-tensor'} weights); "
        f"nodes it quantizes: {len(report['nodes'])}",
        f"fully quantized: {report['fidelity_metric']} = {report['fully_quantized_fidelity']:.5f}",
        f"{'node':32s} {'block' if by_block else 'group':16s} {'op':8s} {'SQNR dB':>8s} {'only-this':>10s} {'all-but-this':>13s} {'gain':>8s}",
    ]
    for r in report["nodes"][:limit]:
        if by_block:
            group = str(r.get("block"))
        else:
            group = (
                f"L{r['layer']} {r['role']}"
                if r.get("layer") is not None and r.get("role") != "other"
                else "—"
            )
        lines.append(
            f"{r['node'][:32]:32s} {group[:16]:16s} {r['op_type']:8s} {r['sqnr_db']:8.2f} {_figures(r)}"
        )
    if by_block:
        lines.append(
            f"{'block':32s} {'nodes':>16s} {'':8s} {'min SQNR':>8s} {'only-this':>10s} {'all-but-this':>13s} {'gain':>8s}"
        )
        for g in report.get("groups", [])[:limit]:
            lines.append(
                f"{g['group'][:32]:32s} {len(g['nodes']):16d} {'':8s} {g['min_sqnr_db']:8.2f} {_figures(g)}"
            )
    else:
        worst_groups = ", ".join(
            f"{g['group']} ({g['min_sqnr_db']:.1f} dB)" for g in report.get("groups", [])[:5]
        )
        lines.append(f"worst groups: {worst_groups}")
    lines.append(f"exclude_nodes: {report['suggested_exclude_nodes']}")
    return "\n".join(lines)
