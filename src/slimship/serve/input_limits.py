"""What values a model's inputs can take, read from its graph, so a request the model would fail on is refused
with a 400 naming the problem *before* it joins a batch (where it would fail every request batched with it).

Two limits are read, both only where the graph says so plainly:

- **vocabulary**: a ``Gather`` (axis 0) whose data is a 2-D initializer (an embedding table, float or quantized)
  and whose indices are a graph input (directly or through a ``Cast``): the input's values must lie in
  ``0 .. rows - 1``. ``EmbedLayerNormalization`` (ORT's fused embedding) counts too.
- **positions**: a ``Gather`` on a 2-D initializer whose indices are computed in the graph from a position-ids
  buffer (a ``Slice`` of an initializer) or a ``Range``, or whose table is named like a position embedding; the
  sequence axis (axis 1) of the inputs sharing the token input's sequence dimension must not exceed the table's rows
  (nor the buffer's length).

Anything else — a graph that can't be read, an embedding computed at run time, a table of another rank — yields
no limit: the server never guesses. A batch that fails anyway is re-run request by request (see the endpoint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimship.serve.protocol import ProtocolError

log = logging.getLogger("slimship.serve")


@dataclass(frozen=True)
class InputLimits:
    """Per input: the vocabulary size (valid ids 0..n-1) and the longest sequence (axis 1)."""

    vocab: dict[str, int] = field(default_factory=dict)
    max_sequence: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"vocab": dict(self.vocab), "max_sequence": dict(self.max_sequence)}

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise a 400 naming the first value or length the model can't take."""
        for name, limit in self.max_sequence.items():
            arr = inputs.get(name)
            if arr is not None and arr.ndim >= 2 and arr.shape[1] > limit:
                raise ProtocolError(
                    f"input {name!r} has a sequence of {arr.shape[1]} tokens; the model takes at most {limit} "
                    f"positions — truncate or split it"
                )
        for name, size in self.vocab.items():
            arr = inputs.get(name)
            if arr is None or arr.size == 0 or arr.dtype.kind not in "iu":
                continue
            bad = (arr < 0) | (arr >= size)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                value = int(arr[where])
                raise ProtocolError(
                    f"token id {value} at {name}[{','.join(map(str, where))}] is outside the vocabulary of "
                    f"{size} (valid 0..{size - 1})"
                )


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _graph_input(name: str, inputs: set[str], producers: dict[str, Any]) -> str | None:
    """The graph input ``name`` is (or is a Cast of), else None."""
    if name in inputs:
        return name
    node = producers.get(name)
    if node is not None and node.op_type == "Cast" and node.input[0] in inputs:
        return str(node.input[0])
    return None


def _position_rows(node: Any, tables: dict[str, list[int]], producers: dict[str, Any]) -> int | None:
    """The position limit a Gather on a 2-D table with in-graph indices sets, or None if it isn't a position one."""
    table = node.input[0]
    src = producers.get(node.input[1])
    rows = tables[table][0]
    if src is not None and src.op_type == "Slice" and src.input[0] in tables:
        buffer = tables[src.input[0]]
        return min(rows, buffer[-1]) if buffer else rows
    if (src is not None and src.op_type == "Range") or "position" in table.lower():
        return rows
    return None


def _seq_dim(inp: Any) -> str | None:
    dims = inp.type.tensor_type.shape.dim
    return dims[1].dim_param or None if len(dims) >= 2 else None


def read_limits(model: Any) -> InputLimits:
    """The limits an ONNX ``ModelProto``'s graph sets on its inputs (empty where it says nothing plainly)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    graph_inputs = {i.name for i in g.input if i.name not in inits}
    tables = {i.name: list(i.dims) for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    vocab: dict[str, int] = {}
    positions: list[int] = []
    for node in g.node:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            dims = tables.get(node.input[0])
            if dims is None or len(dims) != 2 or _attr(node, "axis", 0) != 0:
                continue
            source = _graph_input(node.input[1], graph_inputs, producers)
            if source is not None:
                vocab[source] = min(vocab.get(source, dims[0]), dims[0])
            else:
                rows = _position_rows(node, tables, producers)
                if rows is not None:
                    positions.append(rows)
        elif node.op_type == "EmbedLayerNormalization" and len(node.input) >= 4:
            word, pos = tables.get(node.input[2]), tables.get(node.input[3])
            source = _graph_input(node.input[0], graph_inputs, producers)
            if source is not None and word is not None and len(word) == 2:
                vocab[source] = min(vocab.get(source, word[0]), word[0])
            if pos is not None and len(pos) == 2:
                positions.append(pos[0])
    max_sequence: dict[str, int] = {}
    if positions and vocab:
        limit = min(positions)
        by_name = {i.name: i for i in g.input}
        seq_dims = {_seq_dim(by_name[n]) for n in vocab if n in by_name} - {None}
        for inp in g.input:
            if inp.name in vocab or (seq_dims and _seq_dim(inp) in seq_dims):
                max_sequence[inp.name] = limit
    return InputLimits(vocab, max_sequence)


def read_input_limits(path: str | Path) -> InputLimits:
    """The limits of the ONNX file at ``path``; none when the graph can't be read (logged, never fatal)."""
    try:
        import onnx

        return read_limits(onnx.load(str(path), load_external_data=False))
    except Exception as err:  # a limit is a courtesy: serving goes on without it
        log.warning("can't read input limits from %s (%s); serving without them", path, err)
        return InputLimits()
