"""Structured pruning that physically removes channels, neurons, attention heads and layers, so dense
kernels get faster; followed by distillation from the unpruned model to recover quality.

Coupled channels (a conv's filters, the BatchNorm after it, the next layer's inputs) are found by
Torch-Pruning's dependency graph (Fang et al., DepGraph, CVPR 2023). What the library leaves to its
user is done here: for BERT-family models the attention modules' head count, head size and all-head
size are updated after head pruning (the precomputed ``scaling`` keeps the value the weights were
trained with), the classifier that produces the model's output is left alone, and the architecture
edits are recorded so the candidate can be rebuilt from its safetensors file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from slimship.errors import CompressionError, ConfigError
from slimship.passes.base import Pass, StructuralPassConfig
from slimship.train import FinetuneConfig

if TYPE_CHECKING:
    from torch import nn

    from slimship.candidate import Candidate
    from slimship.workload import Workload


class StructuredPruneConfig(StructuralPassConfig):
    channel_ratio: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="fraction of prunable channels removed: conv filters and hidden Linear neurons of CNNs/MLPs, FFN neurons of transformers",
    )
    head_ratio: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of attention heads removed in each transformer layer (BERT family)",
    )
    head_dim_ratio: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of each head's dimensions removed, the same in every head (BERT family; not with head_ratio)",
    )
    importance: Literal["l1", "l2", "taylor", "bn_scale", "activation"] = Field(
        default="l2",
        description="how channels are ranked: weight magnitude (l1, l2), Taylor (|gradient × weight|, needs labels), "
        "BatchNorm scale, or activation: the output energy a channel carries into the next layer (its variance on "
        "calibration data × the squared weights reading it; data-aware, best with reconstruct least-squares)",
    )
    reconstruct: Literal["none", "least-squares"] = Field(
        default="least-squares",
        description="after removing channels, refit each 1×1 conv / Linear that reads them by least squares on "
        "calibration data so it reproduces the unpruned model's output from the channels left (intercept into its "
        "bias or the BatchNorm after it); none leaves the remaining weights as they were",
    )
    reconstruct_samples: int = Field(
        default=256,
        ge=8,
        description="calibration samples for the activation importance and the least-squares refit (more fit better: "
        "MobileNetV2 at 30 %: 128 → 9 %, 512 → 20 % top-1 agreement before recovery, where l2 without refit gives 0 %)",
    )
    channel_scope: Literal["all", "expansion"] = Field(
        default="all",
        description="which conv channels channel_ratio applies to: all (every prunable layer), or expansion: only the "
        "hidden channels of inverted-residual / depthwise-separable blocks (a 1×1 conv's outputs that pass through a "
        "depthwise conv into the next conv's inputs, e.g. MobileNetV2's expansion convs); block outputs, which residual "
        "adds couple across blocks, stay whole",
    )
    scope: Literal["uniform", "global"] = Field(
        default="uniform",
        description="uniform: every layer loses channel_ratio; global: channels ranked across layers (layers end up uneven)",
    )
    layer_ratios: dict[str, float] = Field(
        default_factory=dict, description='per-layer ratios that override channel_ratio, e.g. {"0": 0.25}'
    )
    round_to: int | None = Field(
        default=None,
        ge=1,
        description="keep channel counts multiples of this (SIMD-friendly: 8 or 16); null keeps exact counts",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="layers left whole (the classifier producing the output is always left alone)",
    )
    taylor_batches: int = Field(default=8, ge=1, description="batches used to estimate Taylor importance")
    finetune: FinetuneConfig | None = Field(
        default=FinetuneConfig(), description="recovery by distillation from the unpruned model; null to skip"
    )

    @model_validator(mode="after")
    def _check(self) -> StructuredPruneConfig:
        if (
            self.channel_ratio == 0
            and self.head_ratio == 0
            and self.head_dim_ratio == 0
            and not self.layer_ratios
        ):
            raise ValueError(
                "nothing to prune: set channel_ratio (e.g. 0.5), head_ratio, head_dim_ratio or layer_ratios"
            )
        if self.head_ratio > 0 and self.head_dim_ratio > 0:
            raise ValueError(
                "prune whole heads (head_ratio) or dimensions inside every head (head_dim_ratio), not both in one pass"
            )
        for k, v in self.layer_ratios.items():
            if not 0 < v < 1:
                raise ValueError(f"layer_ratios[{k!r}] = {v}: a ratio must be in (0, 1), e.g. 0.5")
        return self


class DepthPruneConfig(StructuralPassConfig):
    keep_layers: int = Field(default=3, ge=1, description="how many transformer layers to keep")
    criterion: Literal["alternate", "first", "last", "fidelity"] = Field(
        default="alternate",
        description="which to keep: evenly spaced, the first k, the last k, or greedily the ones whose removal hurts fidelity least",
    )
    layers_module: str | None = Field(
        default=None,
        description="the ModuleList holding the layers; null finds the longest ModuleList (e.g. backbone.encoder.layer)",
    )
    fidelity_samples: int = Field(
        default=64, ge=4, description="calibration samples used by the fidelity criterion"
    )
    feature_weight: float = Field(
        default=1.0,
        ge=0,
        description="weight of hidden-state matching (kept layer i ↔ its original layer) during recovery",
    )
    finetune: FinetuneConfig | None = Field(
        default=FinetuneConfig(),
        description="recovery fine-tuning by distillation from the input model after the change (see FinetuneConfig); null to skip, e.g. {epochs: 3}",
    )


def _bert_attention(model: nn.Module) -> list[tuple[str, Any]]:
    from torch import nn

    return [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "num_attention_heads")
        and all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value"))
    ]


def _untraceable(model: nn.Module, workload: Workload) -> str | None:
    """Name the first module whose output carries no autograd history (where the dependency graph stops);
    None when autograd follows the whole forward pass."""
    import torch

    from slimship.runtime.torch_backend import call_model

    found: list[str] = []

    def hook(name: str) -> Any:
        def f(mod: nn.Module, inputs: Any, out: Any) -> None:
            tensors = [
                t for t in (out if isinstance(out, tuple | list) else [out]) if isinstance(t, torch.Tensor)
            ]
            ins = [
                t for t in (inputs if isinstance(inputs, tuple) else [inputs]) if isinstance(t, torch.Tensor)
            ]
            if (
                not found
                and tensors
                and any(t.requires_grad for t in ins)
                and not any(t.requires_grad for t in tensors)
            ):
                found.append(f"{name or '(model)'} ({type(mod).__name__})")

        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        batch = workload.example_inputs(2, seq_len=16)
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
        for t in tensors.values():
            if t.is_floating_point():
                t.requires_grad_(True)
        call_model(model, tensors, [s.name for s in workload.inputs])
    except Exception as err:
        return f"the forward pass fails: {type(err).__name__}: {err}"
    finally:
        for h in handles:
            h.remove()
    if found:
        return f"module {found[0]} returns a tensor without autograd history (e.g. a NumPy round trip, .detach() or an integer op)"
    return None


def expansion_convs(model: nn.Module, example: dict[str, Any], input_names: list[str]) -> list[str]:
    """Paths of the 1×1 dense convolutions whose output channels pass through a depthwise convolution into
    another layer's inputs and nowhere else (the expansion convs of inverted-residual blocks): pruning one
    removes hidden channels inside its block only. Found with Torch-Pruning's dependency graph."""
    import torch
    import torch_pruning as tp

    from slimship.runtime.torch_backend import call_model

    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example, forward_fn=lambda m, x: call_model(m, x, input_names)
    )
    found = []
    for path, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Conv2d) and mod.groups == 1 and mod.kernel_size == (1, 1)):
            continue
        group = graph.get_pruning_group(mod, tp.prune_conv_out_channels, idxs=[0])
        convs = [d.target.module for d, _ in group if isinstance(d.target.module, torch.nn.Conv2d)]
        depthwise = [c for c in convs if c.groups > 1 and c.groups == c.in_channels == c.out_channels]
        dense_out = [
            d.target.module
            for d, _ in group
            if isinstance(d.target.module, torch.nn.Conv2d | torch.nn.Linear)
            and d.target.module not in depthwise
            and d.handler == tp.prune_conv_out_channels
        ]
        if depthwise and dense_out == [mod]:
            found.append(path)
    return found


def _importance(cfg: StructuredPruneConfig, model: nn.Module, workload: Workload) -> Any:
    import torch
    import torch_pruning as tp

    if cfg.importance == "activation":
        from slimship.passes._reconstruct import ActivationImportance, consumer_input_stats

        names = [s.name for s in workload.inputs]
        return ActivationImportance(consumer_input_stats(model, reconstruction_batches(workload, cfg), names))
    if cfg.importance in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if cfg.importance == "l1" else 2)
    if cfg.importance == "bn_scale":
        if not any(isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d) for m in model.modules()):
            raise ConfigError(
                "importance 'bn_scale' ranks channels by BatchNorm scale, but this model has no BatchNorm; use 'l2'"
            )
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def reconstruction_batches(workload: Workload, cfg: StructuredPruneConfig) -> list[Any]:
    """The calibration batches the activation importance and the least-squares refit read."""
    batches = list(workload.calibration_batches(cfg.reconstruct_samples, 32))
    if not batches:
        raise ConfigError(
            f"importance 'activation' and reconstruct 'least-squares' read calibration data, and {workload.name!r} "
            "has none; give the workload calibration data or set importance 'l2' and reconstruct 'none'"
        )
    return batches


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    workload: Workload,
    cfg: StructuredPruneConfig,
    changed: dict[str, Any],
) -> dict[str, Any] | None:
    """Refit, in execution order, the pointwise layers whose inputs lost channels (``changed``: parameter →
    [before, after] shapes); None when none did or ``cfg.reconstruct`` is 'none'."""
    from slimship.passes._common import executed_layers
    from slimship.passes._reconstruct import refit_consumers

    if cfg.reconstruct == "none":
        return None
    narrowed = {  # inputs narrowed, outputs whole: the teacher's outputs are the target
        n[: -len(".weight")]
        for n, (b, a) in changed.items()
        if n.endswith(".weight") and len(b) > 1 and b[1] != a[1] and b[0] == a[0]
    }
    order = [p for p in executed_layers(student, workload) if p in narrowed]
    if not order:
        return None
    names = [s.name for s in workload.inputs]
    return refit_consumers(student, teacher, order, reconstruction_batches(workload, cfg), names)


def _taylor_gradients(model: nn.Module, workload: Workload, batches: int) -> None:
    import numpy as np
    import torch

    from slimship.runtime.torch_backend import call_model
    from slimship.train import to_tensor_out, training_data

    data = training_data(workload, 32, 0)[:batches]
    if any(y is None for _, y in data):
        raise ConfigError(
            f"Taylor importance needs a labelled loss (gradient × weight), and {workload.name!r} has no labels; use importance 'l2'"
        )
    model.zero_grad()
    names = [s.name for s in workload.inputs]
    for x, y in data:
        out = to_tensor_out(call_model(model, {k: torch.from_numpy(v) for k, v in x.items()}, names))
        torch.nn.functional.cross_entropy(out, torch.from_numpy(np.asarray(y))).backward()


def _cnn_targets(
    model: nn.Module,
    workload: Workload,
    cfg: StructuredPruneConfig,
    names: list[str],
    ignored: list[Any],
    ratio_dict: dict[Any, float],
) -> float:
    """CNNs and MLPs: the classifier / output projection keeps its outputs (added to ``ignored``); with
    channel_scope "expansion" only the expansion convs are pruned (``ratio_dict``). Returns the default ratio."""
    from slimship.passes._common import executed_layers

    order = executed_layers(model, workload)
    if order:
        ignored.append(model.get_submodule(order[-1]))
    if cfg.channel_scope == "expansion":
        ratio_dict.update(_expansion_ratios(model, workload, cfg, names))
        return 0.0
    return cfg.channel_ratio


def _expansion_ratios(
    model: nn.Module, workload: Workload, cfg: StructuredPruneConfig, names: list[str]
) -> dict[Any, float]:
    import torch

    example = {k: torch.from_numpy(v) for k, v in workload.example_inputs(2, seq_len=16).items()}
    paths = expansion_convs(model, example, names)
    if not paths:
        raise ConfigError(
            "channel_scope 'expansion' prunes the hidden channels of inverted-residual blocks (1×1 conv → depthwise "
            "conv → conv), and this model has none; use channel_scope 'all'"
        )
    return {model.get_submodule(p): cfg.channel_ratio for p in paths}


def structured_prune(
    model: nn.Module, workload: Workload, cfg: StructuredPruneConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prune ``model`` in place. Returns the architecture edits to record and a summary of what changed."""
    import torch

    try:
        import torch_pruning as tp
    except ImportError as err:  # a core dependency; only a broken install gets here
        raise CompressionError(
            f"structured pruning needs the torch-pruning package ({err}); pip install -c constraints.txt torch-pruning"
        ) from err

    from slimship.passes._common import resolve_layers
    from slimship.runtime.torch_backend import call_model

    names = [s.name for s in workload.inputs]
    ignored = resolve_layers(model, cfg.ignore, "ignore")
    overrides = dict(
        zip(resolve_layers(model, cfg.layer_ratios, "layer_ratios"), cfg.layer_ratios.values(), strict=True)
    )
    attn = _bert_attention(model)
    ratio_dict: dict[Any, float] = {}
    num_heads: dict[Any, int] = {}
    pruning_ratio = cfg.channel_ratio
    if attn:  # transformer: FFN neurons and heads only; the residual width stays
        pruning_ratio = 0.0
        emb = [m for n, m in model.named_modules() if n.endswith("embeddings")]
        ignored += emb
        for _, mod in attn:
            for lin in (mod.query, mod.key, mod.value):
                num_heads[lin] = int(mod.num_attention_heads)
            if cfg.head_ratio > 0 or cfg.head_dim_ratio > 0:
                ratio_dict[mod.query] = cfg.head_ratio or cfg.head_dim_ratio
        if cfg.channel_ratio > 0:
            ffn = [m for n, m in model.named_modules() if n.endswith("intermediate.dense")]
            if not ffn:
                raise CompressionError(
                    "found attention layers but no FFN 'intermediate.dense' layers; FFN pruning supports the BERT family"
                )
            ratio_dict.update({m: cfg.channel_ratio for m in ffn})
    elif cfg.head_ratio > 0 or cfg.head_dim_ratio > 0:
        raise ConfigError(
            "head_ratio / head_dim_ratio apply to BERT-family attention; this model has no attention layers with query/key/value"
        )
    else:
        pruning_ratio = _cnn_targets(model, workload, cfg, names, ignored, ratio_dict)
    ratio_dict.update(overrides)
    if cfg.importance == "taylor":
        _taylor_gradients(model, workload, cfg.taylor_batches)
    broken = _untraceable(model, workload)
    if broken is not None:
        raise CompressionError(
            f"Torch-Pruning's dependency graph can't trace this model: {broken}. Structured pruning follows autograd "
            "from inputs to outputs to find coupled channels; make that operation a torch op, or list the layers around it in `ignore`."
        )
    example = {k: torch.from_numpy(v) for k, v in workload.example_inputs(2, seq_len=16).items()}
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example,
            importance=_importance(cfg, model, workload),
            global_pruning=cfg.scope == "global",
            pruning_ratio=pruning_ratio,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=ignored,
            round_to=cfg.round_to,
            num_heads=num_heads,
            prune_num_heads=bool(attn) and cfg.head_ratio > 0,
            prune_head_dims=bool(attn) and cfg.head_dim_ratio > 0,
            head_pruning_ratio=cfg.head_ratio,
            forward_fn=lambda m, x: call_model(m, x, names),
        )
    except ConfigError:
        raise
    except Exception as err:
        raise CompressionError(
            f"Torch-Pruning's dependency graph can't trace this model ({type(err).__name__}: {err}); "
            f"{_untraceable(model, workload) or 'the failing operation is in the forward function itself'}. "
            "Structured pruning needs a forward pass that autograd can follow."
        ) from err
    try:
        pruner.step()
    except Exception as err:
        raise CompressionError(
            f"pruning failed while removing channels: {type(err).__name__}: {err}"
        ) from err
    model.zero_grad(set_to_none=True)
    edits: list[dict[str, Any]] = []
    heads: dict[str, int] = {}
    head_sizes = 0
    for path, mod in attn:
        q, k, v = mod.query.out_features, mod.key.out_features, mod.value.out_features
        unit = mod.num_attention_heads if cfg.head_dim_ratio > 0 else mod.attention_head_size
        if not q == k == v or q % unit:
            raise CompressionError(
                f"{path}: query/key/value widths {q}/{k}/{v} don't split into equal heads ({unit})"
            )
        if (
            cfg.head_dim_ratio > 0
        ):  # same heads, each narrower; the trained scaling 1/sqrt(original head size) is kept
            attrs = {
                "num_attention_heads": mod.num_attention_heads,
                "all_head_size": q,
                "attention_head_size": q // mod.num_attention_heads,
            }
        else:
            attrs = {
                "num_attention_heads": q // mod.attention_head_size,
                "all_head_size": q,
                "attention_head_size": mod.attention_head_size,
            }
        if hasattr(mod, "scaling"):
            attrs["scaling"] = float(mod.scaling)
        for key, val in attrs.items():
            setattr(mod, key, val)
        heads[path] = attrs["num_attention_heads"]
        head_sizes = attrs["attention_head_size"]
        edits.append({"op": "set_attr", "module": path, "attrs": attrs})
    changed = {
        n: [list(before[n]), list(p.shape)]
        for n, p in model.named_parameters()
        if n in before and tuple(p.shape) != before[n]
    }
    if not changed:
        raise CompressionError(
            "nothing was pruned: every prunable layer is ignored or the ratios round to zero channels"
        )
    return edits, {
        "changed_shapes": changed,
        "heads_per_layer": heads or None,
        "head_size": head_sizes if attn else None,
    }


def layer_list(model: nn.Module, path: str | None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer layers at ``path`` (None: the longest ModuleList) and its path."""
    from torch import nn

    from slimship.passes._common import resolve_layers

    if path is not None:
        mod = resolve_layers(model, [path], "layers_module")[0]
        if not isinstance(mod, nn.ModuleList):
            raise ConfigError(f"layers_module {path!r} is a {type(mod).__name__}, not a ModuleList of layers")
        return path, mod
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise ConfigError(
            "depth pruning needs a model whose layers sit in a ModuleList (e.g. a transformer encoder); none found. "
            "For a CNN, prune channels instead (method structured, e.g. channel_ratio 0.5)"
        )
    return max(lists, key=lambda nm: len(nm[1]))


def choose_layers(
    model: nn.Module, workload: Workload, cfg: DepthPruneConfig, path: str, n: int
) -> tuple[list[int], list[dict[str, Any]]]:
    """Indices of the layers to keep (ascending) and, for 'fidelity', the greedy trace."""
    import copy

    import numpy as np

    k = cfg.keep_layers
    if cfg.criterion == "first":
        return list(range(k)), []
    if cfg.criterion == "last":
        return list(range(n - k, n)), []
    if cfg.criterion == "alternate":
        return sorted({round(float(x)) for x in np.linspace(0, n - 1, k)}), []
    import torch

    from slimship.runtime.torch_backend import call_model
    from slimship.structure import apply_edits
    from slimship.workload.base import rowwise_cosine

    names = [s.name for s in workload.inputs]
    batches = list(workload.calibration_batches(cfg.fidelity_samples, 16))

    def outputs(m: nn.Module) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate(
                [
                    np.asarray(call_model(m, {kk: torch.from_numpy(v) for kk, v in b.items()}, names))
                    for b in batches
                ]
            )

    ref = outputs(model)
    keep = list(range(n))
    trace = []
    while len(keep) > k:
        scores = []
        for drop in keep:
            trial = [i for i in keep if i != drop]
            m = apply_edits(copy.deepcopy(model), [{"op": "keep_layers", "module": path, "keep": trial}])
            scores.append((float(rowwise_cosine(outputs(m), ref).mean()), drop))
        best_cos, drop = max(scores)
        keep.remove(drop)
        trace.append({"dropped": drop, "cosine_mean_after": best_cos})
    return keep, trace


class StructuredPrunePass(Pass[StructuredPruneConfig]):
    name: ClassVar[str] = "prune"
    summary: ClassVar[str] = (
        "structured pruning (channels, FFN neurons, heads) with Torch-Pruning, then distillation"
    )
    config_cls = StructuredPruneConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "torch"

    def run(
        self, candidate: Candidate, workload: Workload, config: StructuredPruneConfig, out_dir: Path
    ) -> Candidate:
        from slimship.passes._common import structural_result, teacher_and_student

        teacher, student = teacher_and_student(candidate, workload)
        edits, summary = structured_prune(student, workload, config)
        summary["reconstruction"] = reconstruct(student, teacher, workload, config, summary["changed_shapes"])
        return structural_result(
            candidate,
            workload,
            config,
            out_dir,
            pass_name=self.name,
            teacher=teacher,
            student=student,
            name="pruned",
            edits=edits,
            info={"pruning": summary},
            finetune=config.finetune,
        )


class DepthPrunePass(Pass[DepthPruneConfig]):
    name: ClassVar[str] = "depth-prune"
    summary: ClassVar[str] = (
        "keep k of n transformer layers (alternate / first / last / least fidelity loss), then distillation"
    )
    config_cls = DepthPruneConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "torch"

    def run(
        self, candidate: Candidate, workload: Workload, config: DepthPruneConfig, out_dir: Path
    ) -> Candidate:
        from slimship.passes._common import structural_result, teacher_and_student
        from slimship.structure import apply_edits

        teacher, student = teacher_and_student(candidate, workload)
        path, layers = layer_list(student, config.layers_module)
        n = len(layers)
        if config.keep_layers >= n:
            raise ConfigError(
                f"keep_layers={config.keep_layers} but {path} has only {n} layers; keep fewer (e.g. {max(1, n // 2)})"
            )
        keep, trace = choose_layers(student, workload, config, path, n)
        edit = {"op": "keep_layers", "module": path, "keep": keep}
        apply_edits(student, [edit])
        fmap = (
            {f"{path}.{i}": f"{path}.{orig}" for i, orig in enumerate(keep)}
            if config.feature_weight > 0
            else None
        )
        cfg = config.finetune
        if cfg is not None and fmap:
            cfg = cfg.model_copy(update={"feature_weight": cfg.feature_weight or config.feature_weight})
        return structural_result(
            candidate,
            workload,
            config,
            out_dir,
            pass_name=self.name,
            teacher=teacher,
            student=student,
            name=f"depth{len(keep)}",
            edits=[edit],
            info={"layers_kept": keep, "layers_before": n, "fidelity_trace": trace},
            finetune=cfg,
            feature_map=fmap,
        )
