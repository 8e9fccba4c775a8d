"""Low-rank factorisation: a Linear layer (or 1×1 convolution) ``W`` becomes ``U_r·V_r`` from its truncated
SVD — two thinner layers, ``r·(in + out)`` weights instead of ``in·out``.

Rank per layer: the smallest keeping ``energy`` of the squared singular values, a global parameter
budget (``param_ratio``, ranks allocated greedily to the largest singular values across layers), the
layer's measured ``sensitivity`` (smallest rank that alone keeps the output's cosine above a floor), or
explicit ``ranks``. Ranks are rounded up to ``round_to``. A factorised layer is only faster when
``r < in·out/(in+out)`` by a margin that depends on the kernels, so the pass times each distinct shape
on ONNX Runtime (dense MatMul against the two thin MatMuls, interleaved) and keeps a layer dense when
the factorised form is not at least ``min_speedup`` faster. Distillation from the unfactorised model
then recovers quality.
"""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from slimship.errors import CompressionError, ConfigError
from slimship.passes.base import Pass, StructuralPassConfig
from slimship.train import FinetuneConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimship.candidate import Candidate
    from slimship.workload import Workload


class LowRankConfig(StructuralPassConfig):
    energy: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="fraction of squared singular values each factorised layer keeps, in (0, 1]; the default rule (0.9) when neither energy nor param_ratio is set",
    )
    param_ratio: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="global budget: factorised layers together keep at most this fraction of their parameters, in (0, 1)",
    )
    sensitivity: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="per-layer sensitivity: the smallest rank (multiple of round_to) that, factorised alone, keeps the model's output cosine to the unfactorised model (mean over calibration samples) at least this, e.g. 0.99",
    )
    sensitivity_samples: int = Field(
        default=32, ge=4, description="calibration samples for the sensitivity search"
    )
    ranks: dict[str, int] = Field(
        default_factory=dict,
        description="explicit ranks per layer name (override energy / param_ratio / sensitivity for those layers)",
    )
    layers: list[str] = Field(
        default_factory=list,
        description='which layers to consider, as glob patterns over layer names; empty = every Linear and 1x1 Conv except the output layer, or only the layers in ranks when ranks are given and no rule (energy / param_ratio / sensitivity) is set; e.g. ["*.intermediate.dense"]',
    )
    round_to: int = Field(
        default=8,
        ge=1,
        description="ranks are rounded to a multiple of this (SIMD-friendly widths, e.g. 8 or 16); rounded up for energy / sensitivity, down for param_ratio",
    )
    min_speedup: float = Field(
        default=1.05,
        ge=0.0,
        description="keep a layer dense unless the factorised shape measures at least this much faster on ONNX Runtime; 0 disables the check",
    )
    timing_rows: int | None = Field(
        default=None,
        ge=1,
        description="rows (batch × tokens) of the timed matmuls; null: 256 for classification, 8×128 for text",
    )
    finetune: FinetuneConfig | None = Field(
        default=FinetuneConfig(),
        description="recovery fine-tuning by distillation from the input model after the change (see FinetuneConfig); null to skip, e.g. {epochs: 3}",
    )

    @model_validator(mode="after")
    def _check(self) -> LowRankConfig:
        if sum(x is not None for x in (self.energy, self.param_ratio, self.sensitivity)) > 1:
            raise ValueError("set one of energy, param_ratio or sensitivity, not several")
        for k, r in self.ranks.items():
            if r < 1:
                raise ValueError(f"ranks[{k!r}] = {r}: a rank is a positive integer")
        return self


def _matrix(mod: Any) -> torch.Tensor:
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1)


def candidate_layers(model: nn.Module, workload: Workload, cfg: LowRankConfig) -> dict[str, nn.Module]:
    import torch

    from slimship.passes._common import executed_layers, resolve_layers

    resolve_layers(model, cfg.ranks, "ranks")
    order = executed_layers(model, workload)
    output_layer = order[-1] if order else None
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        ok = isinstance(mod, torch.nn.Linear) or (
            isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1
        )
        if not ok or name not in order:
            continue
        only_ranked = (
            not cfg.layers
            and cfg.ranks
            and cfg.energy is None
            and cfg.param_ratio is None
            and cfg.sensitivity is None
        )
        chosen = name in cfg.ranks or (cfg.layers and any(fnmatch.fnmatch(name, p) for p in cfg.layers))
        if chosen or (not cfg.layers and not only_ranked and name != output_layer):
            found[name] = mod
    if cfg.layers and not found:
        raise ConfigError(
            f"layers {cfg.layers} match no Linear / 1x1 Conv layer; names look like {order[:4]}"
        )
    return found


def _round_up(r: int, to: int, cap: int) -> int:
    return int(min(cap, max(to, -(-r // to) * to)))


def sensitivity_ranks(
    model: nn.Module, workload: Workload, layers: dict[str, nn.Module], cfg: LowRankConfig
) -> dict[str, int]:
    """Per layer, binary-search the smallest rank whose factorisation alone keeps output cosine ≥ cfg.sensitivity."""
    import copy

    import torch

    from slimship.runtime.torch_backend import call_model
    from slimship.train import to_tensor_out
    from slimship.workload.base import rowwise_cosine

    names = [s.name for s in workload.inputs]
    batches = [
        {k: torch.from_numpy(v) for k, v in b.items()}
        for b in workload.calibration_batches(cfg.sensitivity_samples, 16)
    ]

    def outputs(m: nn.Module) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([to_tensor_out(call_model(m, b, names)).numpy() for b in batches])

    ref = outputs(model)
    ranks = {}
    for name, mod in layers.items():
        full = min(_matrix(mod).shape)
        grid = list(range(cfg.round_to, full, cfg.round_to)) or [full]
        lo, hi = 0, len(grid) - 1
        best = full
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = copy.deepcopy(model)
            factorize(trial, name, grid[mid])
            if float(rowwise_cosine(outputs(trial), ref).mean()) >= (cfg.sensitivity or 0.0):
                best, hi = grid[mid], mid - 1
            else:
                lo = mid + 1
        ranks[name] = best
    return ranks


def choose_ranks(
    layers: dict[str, nn.Module], cfg: LowRankConfig, sensitive: dict[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """Rank per layer with the singular-value evidence behind it."""
    import torch

    out: dict[str, dict[str, Any]] = {}
    svals = {n: torch.linalg.svdvals(_matrix(m).double()).numpy() for n, m in layers.items()}
    budget_ranks: dict[str, int] = {}
    if (
        cfg.param_ratio is not None
    ):  # greedy: take the globally largest normalised singular values until the budget is spent
        cost = {n: sum(_matrix(m).shape) for n, m in layers.items()}
        total = sum(_matrix(m).numel() for m in layers.values())
        items = sorted(
            ((float(s[i] ** 2 / (s**2).sum()) / cost[n], n) for n, s in svals.items() for i in range(len(s))),
            reverse=True,
        )
        spent, budget_ranks = 0, dict.fromkeys(layers, 0)
        for _, n in items:
            if spent + cost[n] > cfg.param_ratio * total:
                continue
            budget_ranks[n] += 1
            spent += cost[n]
    for n, m in layers.items():
        s = svals[n]
        out_f, in_f = _matrix(m).shape
        full = min(out_f, in_f)
        if n in cfg.ranks:
            r, why = cfg.ranks[n], "explicit"
        elif cfg.param_ratio is not None:
            r, why = budget_ranks[n], f"param_ratio {cfg.param_ratio}"
        elif sensitive is not None:
            r, why = sensitive[n], f"sensitivity {cfg.sensitivity}"
        else:
            energy = cfg.energy if cfg.energy is not None else 0.9
            cum = np.cumsum(s**2) / (s**2).sum()
            r, why = int(np.searchsorted(cum, energy - 1e-12) + 1), f"energy {energy}"
        if n in cfg.ranks:  # explicit ranks are taken as given
            r = min(max(r, 1), full)
        elif cfg.param_ratio is not None:  # round down so the budget holds
            r = max(min(cfg.round_to, full), (r // cfg.round_to) * cfg.round_to)
        else:  # round up so the energy / sensitivity floor holds
            r = _round_up(max(r, 1), cfg.round_to, full)
        cum = np.cumsum(s**2) / (s**2).sum()
        out[n] = {
            "rank": r,
            "full_rank": full,
            "in": in_f,
            "out": out_f,
            "why": why,
            "energy_kept": float(cum[r - 1]),
            "params_ratio": r * (in_f + out_f) / (in_f * out_f),
        }
    return out


def ort_break_even(
    rows: int, in_f: int, out_f: int, rank: int, threads: int, rounds: int = 40
) -> dict[str, float]:
    """Median ONNX Runtime time of ``x·Wᵀ`` against ``(x·Vᵀ)·Uᵀ`` for these shapes, interleaved."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slimship.runtime.ort_backend import session_options

    rng = np.random.default_rng(0)

    def session(mats: list[np.ndarray]) -> ort.InferenceSession:
        nodes, inits, prev = [], [], "x"
        for i, m in enumerate(mats):
            inits.append(numpy_helper.from_array(m.astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
            prev = f"y{i}"
        graph = helper.make_graph(
            nodes,
            "mm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, in_f])],
            [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [rows, out_f])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        return ort.InferenceSession(
            model.SerializeToString(),
            session_options(threads, spin=False),
            providers=["CPUExecutionProvider"],
        )

    dense = session([rng.standard_normal((in_f, out_f))])
    thin = session([rng.standard_normal((in_f, rank)), rng.standard_normal((rank, out_f))])
    x = rng.standard_normal((rows, in_f)).astype(np.float32)
    times: dict[str, list[float]] = {"dense": [], "factorised": []}
    for s in (dense, thin):
        s.run(None, {"x": x})
    for i in range(rounds):
        pair = [("dense", dense), ("factorised", thin)]
        for key, s in pair if i % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            s.run(None, {"x": x})
            times[key].append(time.perf_counter() - t0)
    d, f = float(np.median(times["dense"])), float(np.median(times["factorised"]))
    _ = onnx  # imported for helper's protobuf types
    return {"dense_ms": d * 1e3, "factorised_ms": f * 1e3, "speedup": d / f}


def factorize(model: nn.Module, name: str, rank: int) -> None:
    """Replace layer ``name`` (in place) by its rank-``rank`` SVD factorisation."""
    import torch

    from slimship.structure import apply_edits, get_module

    mod: Any = get_module(model, name)
    w = _matrix(mod).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    down = (root[:, None] * vh[:rank]).float()
    up = (u[:, :rank] * root[None, :]).float()
    bias = mod.bias.detach().clone() if mod.bias is not None else None
    apply_edits(model, [{"op": "factorize", "module": name, "rank": rank}])
    new: Any = get_module(model, name)
    with torch.no_grad():
        new.down.weight.copy_(down.reshape(new.down.weight.shape))
        new.up.weight.copy_(up.reshape(new.up.weight.shape))
        if bias is not None:
            new.up.bias.copy_(bias)


class LowRankPass(Pass[LowRankConfig]):
    name: ClassVar[str] = "lowrank"
    summary: ClassVar[str] = (
        "SVD factorisation of Linear / 1x1 Conv layers where measured faster, then distillation"
    )
    config_cls = LowRankConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "torch"

    def run(
        self, candidate: Candidate, workload: Workload, config: LowRankConfig, out_dir: Path
    ) -> Candidate:
        from slimship.machine import default_threads
        from slimship.passes._common import structural_result, teacher_and_student

        teacher, student = teacher_and_student(candidate, workload)
        layers = candidate_layers(student, workload, config)
        todo = {n: m for n, m in layers.items() if n not in config.ranks}
        sensitive = (
            sensitivity_ranks(student, workload, todo, config) if config.sensitivity is not None else None
        )
        plan = choose_ranks(layers, config, sensitive)
        threads = default_threads()
        rows = config.timing_rows or (256 if workload.task == "classification" else 8 * 128)
        timings: dict[tuple[int, int, int], dict[str, float]] = {}
        edits, decisions = [], {}
        for name, p in plan.items():
            d = dict(p)
            if p["rank"] >= p["full_rank"] or p["params_ratio"] >= 1.0:
                d["decision"] = "dense: the rank saves no parameters"
            elif config.min_speedup > 0 and name not in config.ranks:
                key = (p["in"], p["out"], p["rank"])
                if key not in timings:
                    timings[key] = ort_break_even(rows, p["in"], p["out"], p["rank"], threads)
                d["ort_timing"] = timings[key]
                if timings[key]["speedup"] < config.min_speedup:
                    d["decision"] = (
                        f"dense: factorised measured {timings[key]['speedup']:.2f}x (< {config.min_speedup}x)"
                    )
            d.setdefault("decision", "factorised")
            decisions[name] = d
            if d["decision"] == "factorised":
                factorize(student, name, p["rank"])
                edits.append({"op": "factorize", "module": name, "rank": p["rank"]})
        if not edits:
            raise CompressionError(
                "no layer was factorised: at these ranks none is measurably faster or smaller "
                f"({ {n: d['decision'] for n, d in list(decisions.items())[:4]} }); lower energy / param_ratio or set min_speedup 0"
            )
        factorised = [d for d in decisions.values() if d["decision"] == "factorised"]
        return structural_result(
            candidate,
            workload,
            config,
            out_dir,
            pass_name=self.name,
            teacher=teacher,
            student=student,
            name="lowrank",
            edits=edits,
            info={
                "layers": decisions,
                "factorised": len(edits),
                "params_kept_in_factorised_layers": sum(d["rank"] * (d["in"] + d["out"]) for d in factorised)
                / max(1, sum(d["in"] * d["out"] for d in factorised)),
                "timing_rows": rows,
            },
            finetune=config.finetune,
            threads=threads,
        )
