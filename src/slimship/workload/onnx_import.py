"""ONNX files as other frameworks write them, made into graphs slimship's tools can read.

Some exporters store every weight as a ``Constant`` node instead of an initializer. ONNX Runtime runs both
alike, but tools that look for weights (parameter counts, the quantizers' "node with a constant weight")
only see initializers: such a graph reads as "0 weight parameters" and "nothing to quantize". Folding the
constants into initializers changes no value (the same tensors, under the same names), so it is done once,
when the file becomes the original candidate, and recorded there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["fold_constant_nodes", "import_onnx_file"]

_VALUE_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def fold_constant_nodes(model: Any) -> dict[str, Any]:
    """Turn the main graph's ``Constant`` nodes (tensor or scalar/list values) into initializers of the same
    name, in place. Returns what was done: how many nodes, how many of them weights (≥ 2-D), their elements."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    kept, folded, weights, elements = [], 0, 0, 0
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if (
            node.domain not in ("", "ai.onnx")
            or attr is None
            or attr.name not in _VALUE_ATTRS
            or node.output[0] in outputs
        ):
            kept.append(node)
            continue
        value = helper.get_attribute_value(attr)
        array = (
            numpy_helper.to_array(value)
            if attr.name == "value"
            else np.asarray(value, np.float32 if "float" in attr.name else np.int64)
        )
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        if model.ir_version < 4:  # before IR 4 an initializer must also be a graph input
            graph.input.append(helper.make_tensor_value_info(node.output[0], _elem_type(array), array.shape))
        folded += 1
        if array.ndim >= 2:
            weights += 1
            elements += int(array.size)
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
    return {"constant_nodes_folded": folded, "weight_tensors": weights, "weight_parameters": elements}


def _elem_type(array: Any) -> int:
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(array.dtype))


def import_onnx_file(path: Path) -> dict[str, Any]:
    """Normalise the ONNX file at ``path`` in place (see the module docstring). Returns the record of what
    changed (empty when nothing needed to), for the original candidate's ``info["import"]``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if not any(n.op_type == "Constant" for n in model.graph.node):
        return {}
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return {}  # a model with external data is re-saved by no one but its owner: left as it is
    record = fold_constant_nodes(model)
    if not record["constant_nodes_folded"]:
        return {}
    tmp = path.with_name(f".{path.name}.import")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return {
        **record,
        "note": f"{record['constant_nodes_folded']} Constant node(s) folded into initializers (same values, same names) "
        "so weights are counted and quantizable",
    }
