"""Small ONNX graph edits the passes need (imports onnx lazily)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from slimship.workload.base import TensorSpec


def op_histogram(model: Any) -> dict[str, int]:
    counts = Counter(
        n.op_type if not n.domain or n.domain == "ai.onnx" else f"{n.domain}.{n.op_type}"
        for n in model.graph.node
    )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _all_value_names(graph: Any) -> set[str]:
    names = (
        {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o.name for o in graph.output}
    )
    for node in graph.node:
        names.update(node.output)
    return names


def rename_value(graph: Any, old: str, new: str) -> None:
    """Rename a value everywhere it appears in the (top-level) graph."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for coll in (graph.input, graph.output, graph.value_info):
        for vi in coll:
            if vi.name == old:
                vi.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def set_io_names_and_dims(
    model: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> list[str]:
    """Give graph outputs the spec's names and dynamic dims their spec names.

    A wanted output name that is already used by an internal value (the dynamo exporter names
    intermediate values after module attributes, so an output called e.g. ``embedding`` collides)
    first has the internal value renamed. Returns a list of the edits made, for the record."""
    graph = model.graph
    edits: list[str] = []
    if len(graph.output) != len(outputs):
        raise ValueError(f"the graph has {len(graph.output)} outputs, the workload names {len(outputs)}")
    for out_vi, spec in zip(list(graph.output), outputs, strict=True):
        if out_vi.name == spec.name:
            continue
        if spec.name in _all_value_names(graph):
            internal = f"{spec.name}__internal"
            k = 0
            while internal in _all_value_names(graph):
                k += 1
                internal = f"{spec.name}__internal{k}"
            rename_value(graph, spec.name, internal)
            edits.append(f"internal value {spec.name!r} renamed to {internal!r} to free the output name")
        old = out_vi.name
        rename_value(graph, old, spec.name)
        edits.append(f"output {old!r} named {spec.name!r}")
    by_name = {s.name: s for s in (*inputs, *outputs)}
    for vi in (*graph.input, *graph.output):
        found = by_name.get(vi.name)
        if found is None or not vi.type.HasField("tensor_type"):
            continue
        spec = found
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            continue
        for dim, want in zip(dims, spec.shape, strict=True):
            if isinstance(want, str) and dim.dim_param != want:
                dim.ClearField("dim_value")
                dim.dim_param = want
    return edits
