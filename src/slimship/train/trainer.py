"""One trainer for every pass that has to recover quality: distillation from a teacher, with labels
where the workload has them, and intermediate-feature matching.

Losses (``FinetuneConfig.loss``):

* ``kl`` — classification: ``alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-alpha)·CE(s, y)`` (Hinton et al. 2015);
  without labels it is the KL term alone. ``labels`` trains on labels only (the baseline a distillation is judged against);
* ``cosine`` / ``mse`` — embeddings: ``1 - cos(s, t)`` or the mean squared error to the teacher's output;
  when the student's output width differs from the teacher's, a learned linear projection maps it across;
* ``auto`` — ``kl`` for classification workloads, ``cosine`` otherwise;
* ``feature_map`` (student module → teacher module) adds ``feature_weight·MSE`` between those modules'
  outputs (hidden-state matching, with a learned projection when widths differ).

A fixed slice of the workload's training data (``val_fraction``, at most ``max_val_batches``) is held out;
the student with the best held-out distillation loss is kept (validation after every epoch and every
``eval_every`` steps; early stopping after ``patience`` validations without improvement).
Training stops at ``max_seconds``. Seeds are fixed and batches are drawn in a seeded order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slimship.errors import CompressionError, WorkloadError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimship.workload import Workload
    from slimship.workload.base import Batch


class FinetuneConfig(BaseModel):
    """How a pass recovers quality after it changed the model. Nested in the passes' configs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(
        default=3,
        ge=1,
        description="passes over the training split at most (early stopping may end sooner), ≥ 1",
    )
    max_seconds: float = Field(
        default=600.0,
        gt=0,
        description="wall-clock budget for training; the best student so far is kept when it runs out",
    )
    lr: float | None = Field(
        default=None,
        gt=0,
        description="learning rate; null picks 1e-3 for classification (CNNs) and 5e-5 for embedding models (transformers)",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay, ≥ 0")
    batch_size: int | None = Field(
        default=None, ge=1, description="training batch size; null: 64 for classification, 32 for text"
    )
    loss: Literal["auto", "kl", "labels", "cosine", "mse"] = Field(
        default="auto",
        description="training loss: kl (distil the teacher's softened logits, plus labels when present), labels (labels only), cosine or mse (to the teacher's output); auto: kl for classification, cosine otherwise",
    )
    temperature: float = Field(
        default=4.0, gt=0, description="softmax temperature of the kl distillation loss, > 0, e.g. 4.0"
    )
    alpha: float = Field(
        default=0.7,
        ge=0,
        le=1,
        description="weight of the distillation term against the labels' cross-entropy (classification with labels)",
    )
    feature_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of hidden-state matching (MSE between mapped student and teacher modules) when the pass supplies a feature map; 0 disables it",
    )
    l1_weight: float = Field(
        default=0.0,
        ge=0,
        description="L1 penalty on the weights of Linear/Conv layers (sparse training for unstructured pruning)",
    )
    val_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=0.5,
        description="fraction of the training data held out for validation and early stopping, in (0, 0.5)",
    )
    max_val_batches: int = Field(
        default=20,
        ge=1,
        description="at most this many held-out batches (validation cost stays bounded on big datasets)",
    )
    eval_every: int | None = Field(
        default=None,
        ge=1,
        description="validate every N steps as well as at the end of each epoch (null: per epoch only)",
    )
    patience: int = Field(
        default=2, ge=1, description="stop after this many validations without improvement, ≥ 1"
    )
    max_batches_per_epoch: int | None = Field(
        default=None, ge=1, description="cap on training batches per epoch (null: the whole training split)"
    )
    seed: int = Field(default=0, description="random seed for data order, held-out split and initialisation")
    batchnorm: Literal["train", "frozen", "recalibrate"] = Field(
        default="train",
        description="train: BatchNorm layers update their running statistics during recovery; frozen: they keep the "
        "ones they have (eval mode), for training sets too small or too unlike the original data to re-estimate them "
        "during training; recalibrate: re-estimate them once on the training inputs (no gradient; what a pruned "
        "network's shifted activations need, cf. EagleEye's adaptive BN), then keep them frozen",
    )
    synthetic_samples: int = Field(
        default=0,
        ge=0,
        description="inputs synthesised from the teacher's BatchNorm statistics (ZeroQ / DeepInversion style: random "
        "images optimised until every BatchNorm layer's batch mean/std match its running statistics) used as "
        "training data; 0 = none. Needs a teacher with BatchNorm and a single float input",
    )
    synthetic_use: Literal["add", "only"] = Field(
        default="add",
        description="add: the synthetic inputs join the workload's training batches; only: training uses the synthetic "
        "inputs alone (validation and early stopping stay on the workload's held-out data)",
    )
    synthetic_steps: int = Field(
        default=100, ge=1, description="optimisation steps per batch of synthetic inputs (Adam on the pixels)"
    )
    synthetic_max_seconds: float = Field(
        default=300.0,
        gt=0,
        description="wall-clock budget for the synthesis (separate from max_seconds); fewer samples come back when "
        "it runs out, said in the report",
    )


def _first_output(out: Any) -> torch.Tensor:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return next(iter(out.values()))
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


@dataclass(frozen=True)
class FinetuneReport:
    """What a fine-tuning run did, stored in candidate.json as ``finetune``."""

    loss: str
    lr: float
    batch_size: int
    steps: int
    epochs_run: int
    validations: int
    #: "epochs", "time budget" or "early stopping"
    stopped_by: str
    seconds: float
    val_loss_before: float
    val_loss_best: float
    #: "trained", or "initial (...)" when training never improved the held-out loss
    kept: str
    #: one entry per validation: epoch, step, train_loss, val_loss
    history: list[dict[str, float]] = field(default_factory=list)
    train_batches: int = 0
    val_batches: int = 0
    #: the synthetic-input report (``SyntheticReport.to_json()``) when synthetic_samples > 0
    synthetic: dict[str, Any] | None = None

    @property
    def improved(self) -> bool:
        return self.kept == "trained"

    def to_json(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "epochs_run": self.epochs_run,
            "validations": self.validations,
            "stopped_by": self.stopped_by,
            "seconds": self.seconds,
            "val_loss_before": self.val_loss_before,
            "val_loss_best": self.val_loss_best,
            "kept": self.kept,
            "history": [dict(h) for h in self.history],
            "train_batches": self.train_batches,
            "val_batches": self.val_batches,
            "synthetic": self.synthetic,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinetuneReport:
        """Read the stored dict shape."""
        return cls(
            loss=str(data.get("loss", "")),
            lr=float(data.get("lr", 0.0)),
            batch_size=int(data.get("batch_size", 0)),
            steps=int(data.get("steps", 0)),
            epochs_run=int(data.get("epochs_run", 0)),
            validations=int(data.get("validations", 0)),
            stopped_by=str(data.get("stopped_by", "")),
            seconds=float(data.get("seconds", 0.0)),
            val_loss_before=float(data.get("val_loss_before", float("nan"))),
            val_loss_best=float(data.get("val_loss_best", float("nan"))),
            kept=str(data.get("kept", "")),
            history=[dict(h) for h in data.get("history") or []],
            train_batches=int(data.get("train_batches", 0)),
            val_batches=int(data.get("val_batches", 0)),
            synthetic=data.get("synthetic"),
        )


def to_tensor_out(out: Any) -> torch.Tensor:
    """The tensor a model call returns, whatever it is wrapped in (HF ModelOutput, tuple, dict): its first output."""
    t = _first_output(out)
    return t[0] if isinstance(t, tuple) else t


def training_data(workload: Workload, batch_size: int, seed: int) -> list[tuple[Batch, np.ndarray | None]]:
    """The workload's training batches, materialised once (a pass that needs training data says so here)."""
    try:
        data = list(workload.train_batches(batch_size, seed=seed))
    except WorkloadError as err:
        raise CompressionError(
            f"this pass fine-tunes the model and needs training data, but {err}. Pass `finetune: null` (or "
            "--no-finetune) to skip recovery, or use a workload with training data (e.g. a factory whose "
            "workload implements train_batches)."
        ) from err
    if len(data) < 2:
        raise CompressionError(
            f"workload {workload.name!r} gave {len(data)} training batch(es); fine-tuning needs at least 2"
        )
    return data


class _Collector:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for p in paths:
            try:
                mod = model.get_submodule(p)
            except AttributeError as err:
                raise CompressionError(f"feature_map names a module that doesn't exist: {p!r}") from err
            self.handles.append(mod.register_forward_hook(self._hook(p)))

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(_m: Any, _i: Any, out: Any) -> None:
            self.outputs[path] = to_tensor_out(out)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    workload: Workload,
    cfg: FinetuneConfig,
    *,
    feature_map: Mapping[str, str] | None = None,
    after_step: Callable[[], None] | None = None,
    desc: str = "fine-tune",
) -> FinetuneReport:
    """Train ``student`` in place against ``teacher`` on ``workload``'s training data; return a report.
    ``after_step`` runs after every optimiser step (e.g. to re-apply a pruning mask or shared weights)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from slimship.runtime.torch_backend import call_model

    classification = workload.task == "classification"
    loss_kind = cfg.loss if cfg.loss != "auto" else ("kl" if classification else "cosine")
    if loss_kind in ("kl", "cosine", "mse") and teacher is None:
        raise CompressionError(f"loss {loss_kind!r} distils from a teacher, but none was given")
    lr = cfg.lr or (1e-3 if classification else 5e-5)
    bs = cfg.batch_size or (64 if classification else 32)
    torch.manual_seed(cfg.seed)
    names = [s.name for s in workload.inputs]
    if loss_kind == "labels":  # check on one batch before materialising the whole training set
        try:
            first = next(iter(workload.train_batches(bs, seed=cfg.seed)), None)
        except WorkloadError:
            first = None  # training_data below explains what is missing
        if first is not None and first[1] is None:
            raise CompressionError(f"loss 'labels' needs labelled training data; {workload.name!r} has none")
    data = training_data(workload, bs, cfg.seed)
    n_val = max(1, min(cfg.max_val_batches, round(len(data) * cfg.val_fraction)))
    train, val = data[:-n_val], data[-n_val:]
    train, synthetic = _extra_training_data(student, teacher, train, cfg, bs, names)
    if loss_kind == "labels" and any(t is None for _, t in train):
        raise CompressionError(f"loss 'labels' needs labelled training data; {workload.name!r} has none")

    fmap = dict(feature_map or {})
    s_hooks = _Collector(student, list(fmap)) if fmap and cfg.feature_weight > 0 else None
    t_hooks = _Collector(teacher, list(fmap.values())) if s_hooks and teacher is not None else None
    projections = torch.nn.ModuleDict()

    def project(key: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if s.shape == t.shape:
            return s
        if s.shape[:-1] != t.shape[:-1] and s.ndim == 4:  # conv features: project channels with a 1x1 conv
            k = key.replace(".", "_")
            if k not in projections:
                projections[k] = torch.nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
            return projections[k](s)
        k = key.replace(".", "_")
        if k not in projections:
            projections[k] = torch.nn.Linear(s.shape[-1], t.shape[-1], bias=False)
        return projections[k](s)

    def batch_loss(
        inputs: Batch, targets: np.ndarray | None, train_mode: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        t_out = None
        if (teacher is not None and loss_kind != "labels") or t_hooks is not None:
            assert teacher is not None
            with torch.no_grad():
                t_out = to_tensor_out(call_model(teacher, tensors, names))
        s_out = to_tensor_out(call_model(student, tensors, names))
        y = torch.from_numpy(np.asarray(targets)) if targets is not None else None
        if loss_kind == "labels":
            assert y is not None
            distill = F.cross_entropy(s_out, y)
            total = distill
        elif loss_kind == "kl":
            assert t_out is not None
            temp = cfg.temperature
            distill = (
                F.kl_div(
                    F.log_softmax(s_out / temp, -1),
                    F.log_softmax(t_out / temp, -1),
                    reduction="batchmean",
                    log_target=True,
                )
                * temp
                * temp
            )
            total = (
                cfg.alpha * distill + (1 - cfg.alpha) * F.cross_entropy(s_out, y)
                if y is not None
                else distill
            )
        else:
            assert t_out is not None
            s_p = project("output", s_out, t_out)
            distill = (
                (1 - F.cosine_similarity(s_p, t_out, dim=-1)).mean()
                if loss_kind == "cosine"
                else F.mse_loss(s_p, t_out)
            )
            total = distill
        if s_hooks is not None and t_hooks is not None and train_mode:
            feat = sum(
                F.mse_loss(project(sp, s_hooks.outputs[sp], t_hooks.outputs[tp]), t_hooks.outputs[tp])
                for sp, tp in fmap.items()
            )
            total = total + cfg.feature_weight * feat
        if cfg.l1_weight > 0 and train_mode:
            total = total + cfg.l1_weight * sum(
                m.weight.abs().sum()
                for m in student.modules()
                if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
            )
        return total, distill

    def evaluate() -> float:
        student.eval()
        with torch.no_grad():
            vals = [float(batch_loss(x, y, False)[1]) for x, y in val]
        return float(np.mean(vals))

    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = min(len(train), cfg.max_batches_per_epoch or len(train))
    best = evaluate()
    start_loss = best
    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    opt: torch.optim.Optimizer | None = None
    t0 = time.perf_counter()
    history: list[dict[str, float]] = []
    stale, stopped, steps = 0, "epochs", 0
    running, since = 0.0, 0

    def checkpoint(epoch: int) -> bool:
        """Validate, keep the best student; True when patience ran out."""
        nonlocal best, best_state, stale, running, since
        val_loss = evaluate()
        history.append(
            {"epoch": epoch + 1, "step": steps, "train_loss": running / max(1, since), "val_loss": val_loss}
        )
        running, since = 0.0, 0
        if val_loss < best - 1e-9 or math.isnan(best):
            best, stale = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        else:
            stale += 1
        _train_mode(student, cfg.batchnorm)
        return stale >= cfg.patience

    try:
        with tqdm(
            total=cfg.epochs * steps_per_epoch, desc=desc, unit="batch", leave=False, disable=None
        ) as bar:
            for epoch in range(cfg.epochs):
                _train_mode(student, cfg.batchnorm)
                order = rng.permutation(len(train))[:steps_per_epoch]
                for i in order:
                    x, y = train[int(i)]
                    total, _ = batch_loss(x, y, True)
                    if opt is None:  # after the first forward, so lazily created projections are trained too
                        params = [p for p in student.parameters() if p.requires_grad] + list(
                            projections.parameters()
                        )
                        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                    if after_step is not None:
                        with torch.no_grad():
                            after_step()
                    steps += 1
                    since += 1
                    running += float(total.detach())
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(total.detach()):.4f}")
                    if time.perf_counter() - t0 > cfg.max_seconds:
                        stopped = "time budget"
                        break
                    if cfg.eval_every and steps % cfg.eval_every == 0 and checkpoint(epoch):
                        stopped = "early stopping"
                        break
                if stopped != "epochs":
                    if since:
                        checkpoint(epoch)
                    break
                if since and checkpoint(epoch):
                    stopped = "early stopping"
                    break
    finally:
        for hooks in (s_hooks, t_hooks):
            if hooks is not None:
                hooks.close()
    student.load_state_dict(best_state)
    student.eval()
    return FinetuneReport(
        loss=loss_kind,
        lr=lr,
        batch_size=bs,
        steps=steps,
        epochs_run=int(history[-1]["epoch"]) if history else 0,
        validations=len(history),
        stopped_by=stopped,
        seconds=round(time.perf_counter() - t0, 1),
        val_loss_before=start_loss,
        val_loss_best=best,
        kept="trained" if best < start_loss else "initial (training never improved the held-out loss)",
        history=history,
        train_batches=len(train),
        val_batches=len(val),
        synthetic=synthetic,
    )


def _train_mode(model: nn.Module, batchnorm: str) -> None:
    import torch

    model.train()
    if batchnorm in ("frozen", "recalibrate"):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d | torch.nn.BatchNorm3d):
                m.eval()


def _extra_training_data(
    student: nn.Module,
    teacher: nn.Module | None,
    train: list[tuple[Batch, np.ndarray | None]],
    cfg: FinetuneConfig,
    batch_size: int,
    names: list[str],
) -> tuple[list[tuple[Batch, np.ndarray | None]], dict[str, Any] | None]:
    """The training batches after synthetic inputs are added (or substituted), with the student's BatchNorm
    statistics re-estimated on them when ``batchnorm`` is "recalibrate"; and the synthesis report."""
    synthetic = None
    if cfg.synthetic_samples > 0:
        made, synthetic = synthetic_batches(teacher, train, cfg, batch_size)
        train = made if cfg.synthetic_use == "only" else train + made
    if cfg.batchnorm == "recalibrate":
        recalibrate_batchnorm(student, [x for x, _ in train], names)
    return train, synthetic


def recalibrate_batchnorm(model: nn.Module, inputs: list[Batch], names: list[str]) -> int:
    """Re-estimate every BatchNorm layer's running statistics as the plain average over ``inputs`` (no gradient,
    weights untouched); returns the number of layers."""
    import torch

    from slimship.runtime.torch_backend import call_model

    bns = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d | torch.nn.BatchNorm3d)
    ]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for batch in inputs:
                call_model(model, {k: torch.from_numpy(v) for k, v in batch.items()}, names)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    return len(bns)


def synthetic_batches(
    teacher: nn.Module | None,
    real: list[tuple[Batch, np.ndarray | None]],
    cfg: FinetuneConfig,
    batch_size: int,
) -> tuple[list[tuple[Batch, np.ndarray | None]], dict[str, Any]]:
    """Training batches of inputs synthesised from ``teacher``'s BatchNorm statistics, shaped like ``real``'s."""
    from slimship.train.synthetic import synthesize_bn_inputs

    if teacher is None:
        raise CompressionError(
            "synthetic_samples needs a teacher: its BatchNorm statistics define the inputs"
        )
    first = real[0][0]
    if len(first) != 1 or not np.issubdtype(next(iter(first.values())).dtype, np.floating):
        raise CompressionError(
            f"synthetic_samples needs a model with a single float input; this workload feeds {sorted(first)}"
        )
    ((name, x0),) = first.items()
    x, report = synthesize_bn_inputs(
        teacher,
        tuple(x0.shape[1:]),
        cfg.synthetic_samples,
        steps=cfg.synthetic_steps,
        batch_size=min(batch_size, cfg.synthetic_samples),
        max_seconds=cfg.synthetic_max_seconds,
        seed=cfg.seed,
    )
    made: list[tuple[Batch, np.ndarray | None]] = [
        ({name: np.ascontiguousarray(x[i : i + batch_size])}, None) for i in range(0, len(x), batch_size)
    ]
    return made, report.to_json()


def batches_of(data: list[tuple[Batch, np.ndarray | None]]) -> Iterator[Batch]:
    for x, _ in data:
        yield x
