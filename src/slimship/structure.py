"""Architecture edits of PyTorch candidates, recorded so a changed model can be rebuilt without pickles.

A structural pass (pruning, depth pruning, low-rank factorisation, a distilled student) changes the
shapes or the modules of the workload's model. A PyTorch candidate still stores only a safetensors
state dict; ``candidate.info["structure"]`` lists, in order, the edits that turn the workload's
reference architecture into the candidate's. Loading replays them and then fits every Linear, Conv,
BatchNorm, LayerNorm and Embedding to the shapes in the file. The list is cumulative: a child
candidate copies its parent's edits and appends its own.

Edits (JSON):

* ``{"op": "keep_layers", "module": "backbone.encoder.layer", "keep": [0, 2, 4]}`` — a ModuleList keeps these entries;
* ``{"op": "set_attr", "module": "…attention.self", "attrs": {"num_attention_heads": 6, ...}}`` — plain attributes
  that a forward pass reads (head count, head size, all-head size, attention scaling);
* ``{"op": "factorize", "module": "…intermediate.dense", "rank": 96}`` — a Linear (or 1×1 Conv) becomes two thinner
  layers (see :class:`LowRankLinear`);
* ``{"op": "separable", "module": "3"}`` — a k×k Conv2d becomes a depthwise k×k conv followed by a pointwise 1×1
  conv (see :class:`SeparableConv2d`);
* shape changes need no edit: they are read from the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from slimship.errors import CandidateError

if TYPE_CHECKING:
    import torch
    from torch import nn

Edit = dict[str, Any]


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as err:
        raise CandidateError(f"the model has no module {path!r}: {err}") from err


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path)
    setattr(parent, name, new)


def low_rank_linear_cls() -> type:
    from torch import nn

    class LowRankLinear(nn.Module):
        """``x @ (U V)^T + b`` as two Linear layers: ``down`` (in → rank, no bias) then ``up`` (rank → out)."""

        def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
            super().__init__()
            self.in_features, self.out_features, self.rank = in_features, out_features, rank
            self.down = nn.Linear(in_features, rank, bias=False)
            self.up = nn.Linear(rank, out_features, bias=bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.up(self.down(x))

    return LowRankLinear


def low_rank_conv_cls() -> type:
    from torch import nn

    class LowRankConv1x1(nn.Module):
        """A 1×1 convolution as two thinner 1×1 convolutions."""

        def __init__(self, conv: nn.Conv2d, rank: int) -> None:
            super().__init__()
            self.rank = rank
            self.down = nn.Conv2d(conv.in_channels, rank, 1, stride=conv.stride, bias=False)  # type: ignore[arg-type]
            self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.up(self.down(x))

    return LowRankConv1x1


def separable_conv_cls() -> type:
    from torch import nn

    class SeparableConv2d(nn.Module):
        """A k×k convolution as a depthwise k×k convolution (``depthwise``: one filter per input channel, the
        original stride, padding, dilation and padding mode, no bias) then a pointwise 1×1 convolution
        (``pointwise``: input → output channels, the original bias)."""

        def __init__(self, conv: nn.Conv2d) -> None:
            super().__init__()
            cin = conv.in_channels
            self.depthwise = nn.Conv2d(
                cin,
                cin,
                conv.kernel_size,  # type: ignore[arg-type]
                stride=conv.stride,  # type: ignore[arg-type]
                padding=conv.padding,  # type: ignore[arg-type]
                dilation=conv.dilation,  # type: ignore[arg-type]
                groups=cin,
                bias=False,
                padding_mode=conv.padding_mode,
            )
            self.pointwise = nn.Conv2d(cin, conv.out_channels, 1, bias=conv.bias is not None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pointwise(self.depthwise(x))

    return SeparableConv2d


def _separable_edit(model: nn.Module, path: str) -> None:
    from torch import nn

    mod = get_module(model, path)
    if not (isinstance(mod, nn.Conv2d) and mod.groups == 1):
        raise CandidateError(
            f"separable: {path} is a {type(mod).__name__}"
            + (f" with groups={mod.groups}" if isinstance(mod, nn.Conv2d) else "")
            + "; only a Conv2d with groups=1 becomes depthwise + pointwise"
        )
    set_module(model, path, separable_conv_cls()(mod))


def apply_edits(model: nn.Module, edits: Iterable[Edit]) -> nn.Module:
    """Replay architecture edits on ``model`` (in place) and return it."""
    from torch import nn

    for edit in edits:
        op = edit.get("op")
        if op == "keep_layers":
            ml = get_module(model, edit["module"])
            if not isinstance(ml, nn.ModuleList):
                raise CandidateError(
                    f"keep_layers: {edit['module']} is a {type(ml).__name__}, not a ModuleList"
                )
            keep = [int(i) for i in edit["keep"]]
            if not keep or any(not 0 <= i < len(ml) for i in keep):
                raise CandidateError(
                    f"keep_layers: indices {keep} don't fit {edit['module']} of {len(ml)} layers"
                )
            set_module(model, edit["module"], nn.ModuleList([ml[i] for i in keep]))
        elif op == "set_attr":
            mod = get_module(model, edit["module"])
            for k, v in edit["attrs"].items():
                setattr(mod, k, v)
        elif op == "factorize":
            mod = get_module(model, edit["module"])
            rank = int(edit["rank"])
            if isinstance(mod, nn.Linear):
                set_module(
                    model,
                    edit["module"],
                    low_rank_linear_cls()(mod.in_features, mod.out_features, rank, mod.bias is not None),
                )
            elif isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1:
                set_module(model, edit["module"], low_rank_conv_cls()(mod, rank))
            else:
                raise CandidateError(
                    f"factorize: {edit['module']} is a {type(mod).__name__}; only Linear and 1x1 Conv2d factorise"
                )
        elif op == "separable":
            _separable_edit(model, edit["module"])
        else:
            raise CandidateError(f"unknown architecture edit {edit!r}")
    return model


def _replace_param(mod: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    import torch

    old = getattr(mod, name)
    if old is None or tuple(old.shape) == shape:
        return
    new = torch.empty(shape, dtype=old.dtype)
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, name, torch.nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        mod._buffers[name] = new


def fit_to_shapes(model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> nn.Module:
    """Resize Linear/Conv/BatchNorm/LayerNorm/Embedding modules to the weight shapes of a state dict."""
    from torch import nn

    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        w = shapes.get(prefix + "weight")
        if isinstance(mod, nn.Linear) and w is not None:
            mod.out_features, mod.in_features = int(w[0]), int(w[1])
        elif isinstance(mod, nn.Conv2d | nn.Conv1d) and w is not None:
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            mod.out_channels = int(w[0])
            mod.groups = int(w[0]) if depthwise else mod.groups
            mod.in_channels = int(w[1]) * mod.groups
        elif isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d) and prefix + "running_mean" in shapes:
            mod.num_features = int(shapes[prefix + "running_mean"][0])
        elif isinstance(mod, nn.LayerNorm) and w is not None:
            mod.normalized_shape = tuple(int(d) for d in w)
        elif isinstance(mod, nn.Embedding) and w is not None:
            mod.num_embeddings, mod.embedding_dim = int(w[0]), int(w[1])
        else:
            continue
        for name in list(mod._parameters) + list(mod._buffers):
            key = prefix + name
            if key in shapes:
                _replace_param(mod, name, tuple(int(d) for d in shapes[key]))
    return model


def rebuild(model: nn.Module, edits: Iterable[Edit], shapes: Mapping[str, tuple[int, ...]]) -> nn.Module:
    """The reference ``model`` with ``edits`` replayed and fitted to a state dict's ``shapes`` (not loaded)."""
    apply_edits(model, edits)
    return fit_to_shapes(model, shapes)
