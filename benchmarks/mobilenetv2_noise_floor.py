"""How sensitive is MobileNetV2's top-1 on the workload's held-out crops to *any* small numerical change — and where
does slimship's static INT8 sit on that curve? Issue 18 asks for ≥ 95 % top-1 agreement with fp32 overall on crops
whose fp32 median top-1 probability is ≈ 0.5 (many near ties). This measures, in PyTorch on the same 332 crops:

- weights rounded to fp16 / bf16 / int8 (symmetric per output channel, on the BatchNorm-folded kernel as ONNX
  Runtime's QLinearConv sees it), activations float;
- every activation that the static INT8 graph quantizes (each conv output after its ReLU6, each projection output,
  each residual Add, the input image, the classifier's input) rounded to fp16 or bf16 (8 significant bits, but a floating exponent:
  relative error ≤ 2^-9 on every value, far finer than an 8-bit per-tensor grid on small values);
- the same activations with Gaussian noise at a fixed signal-to-noise ratio per tensor (per crop), 3 seeds each,
  so agreement can be read against the logits' SQNR;
- slimship's ``quantize-static`` (auto calibration, bias correction) run on ONNX Runtime, for its place on the curve.

    .venv/bin/python benchmarks/mobilenetv2_noise_floor.py            # ≈ 11 min on 2 cores; idle machine please
    .venv/bin/python benchmarks/mobilenetv2_noise_floor.py --render   # rewrite the .md from the .json

Writes benchmarks/results/mobilenetv2_noise_floor-<cpu class>.{json,md}.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "runs" / "bench-mobilenetv2-noise"
THREADS = 2
SQNRS_DB = (50, 45, 40, 35, 30, 25)
SEEDS = (0, 1, 2)


def _sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-noise ratio of the logits, dB, pooled over all crops."""
    ref64, err = ref.astype(np.float64), out.astype(np.float64) - ref.astype(np.float64)
    return float(10 * np.log10((ref64**2).sum() / max((err**2).sum(), 1e-300)))


def _fold_bn_weights(model: Any, fn: Callable[[Any], Any]) -> Any:
    """A copy of ``model`` whose conv kernels are replaced by ``fn`` applied to the BatchNorm-folded kernel, then
    unfolded again (so the BatchNorm stays and the rest of the network is unchanged)."""
    import torch
    from torch import nn

    m = copy.deepcopy(model)
    mods = list(m.modules())
    with torch.no_grad():
        for seq in mods:
            if not isinstance(seq, nn.Sequential):
                continue
            kids = list(seq.children())
            for a, b in itertools.pairwise(kids):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    g = (b.weight / torch.sqrt(b.running_var + b.eps)).view(-1, 1, 1, 1)
                    a.weight.copy_(fn(a.weight * g) / g)
        lin = m.classifier[1]
        lin.weight.copy_(fn(lin.weight))
    return m


def _int8_per_channel(w: Any) -> Any:
    import torch

    flat = w.reshape(w.shape[0], -1)
    scale = (flat.abs().amax(1).clamp_min(1e-12) / 127.0).view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def _act_points(model: Any) -> list[Any]:
    """The modules whose outputs the static INT8 graph quantizes: every conv+BN+ReLU6 block, every projection
    BatchNorm, every residual block (its Add)."""
    from torch import nn

    pts: list[Any] = []
    for mod in model.modules():
        if isinstance(mod, nn.Sequential) and any(isinstance(c, nn.ReLU6) for c in mod.children()):
            pts.append(mod)
        elif type(mod).__name__ == "InvertedResidual":
            kids = list(mod.conv.children())
            pts.append(kids[-1])  # projection BatchNorm
            if mod.use_res_connect:
                pts.append(mod)
    return pts


def main() -> None:
    if "--render" in sys.argv[1:]:  # every CPU class's result file
        for path in sorted((HERE / "results").glob("mobilenetv2_noise_floor-*.json")):
            path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    sys.path.insert(0, str(ROOT / "src"))
    import psutil
    import torch

    from slimship.candidate import original_candidate
    from slimship.machine import cpu_class, machine_info
    from slimship.passes import export as export_pass
    from slimship.passes.export import ExportConfig
    from slimship.passes.quantize import StaticQuantConfig, StaticQuantPass
    from slimship.runtime import create_runtime
    from slimship.workload import resolve_workload
    from slimship.workload.imagenet import image_quality

    torch.set_num_threads(THREADS)
    cls = cpu_class()
    stem = HERE / "results" / f"mobilenetv2_noise_floor-{cls}"
    load = [round(v, 2) for v in psutil.getloadavg()]
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    t_start = time.time()
    w = resolve_workload("mobilenetv2")
    x, photo = w._eval  # type: ignore[attr-defined]
    ref = w.reference_logits()
    base = w.build_model()

    def logits_of(model: Any, act: Callable[[Any, Any], Any] | None = None, seed: int = 0) -> np.ndarray:
        hooks = []
        gen = torch.Generator().manual_seed(seed)
        if act is not None:
            for mod in _act_points(model):
                hooks.append(mod.register_forward_hook(lambda _m, _i, out: act(out, gen)))
            for first in (
                model.features[0],
                model.classifier[1],
            ):  # the network's input, the classifier's input
                hooks.append(first.register_forward_pre_hook(lambda _m, inp: (act(inp[0], gen),)))
        try:
            with torch.inference_mode():
                return np.concatenate(
                    [model(torch.from_numpy(x[i : i + 32])).numpy() for i in range(0, len(x), 32)]
                )
        finally:
            for h in hooks:
                h.remove()

    def noise(db: float) -> Callable[[Any, Any], Any]:
        def f(t: Any, gen: Any) -> Any:
            rms = t.pow(2).mean(dim=tuple(range(1, t.dim())), keepdim=True).sqrt()
            return t + torch.randn(t.shape, generator=gen) * rms * 10 ** (-db / 20)

        return f

    rows: list[dict[str, Any]] = []

    def add(label: str, kind: str, outs: list[np.ndarray], **extra: Any) -> None:
        qs = [image_quality(o, ref, photo) for o in outs]
        row = {
            "label": label,
            "kind": kind,
            "top1_agreement": float(np.mean([q["top1_agreement"] for q in qs])),
            "top1_agreement_min": float(np.min([q["top1_agreement"] for q in qs])),
            "top1_agreement_max": float(np.max([q["top1_agreement"] for q in qs])),
            "top1_agreement_confident": float(np.mean([q["top1_agreement_confident"] for q in qs])),
            "top5_agreement": float(np.mean([q["top5_agreement"] for q in qs])),
            "logit_sqnr_db": float(np.mean([_sqnr_db(o, ref) for o in outs])),
            "runs": len(outs),
            **extra,
        }
        rows.append(row)
        print(
            f"{time.time() - t_start:5.0f}s {label:60s} {row['top1_agreement']:.1f} / "
            f"{row['top1_agreement_confident']:.1f}  SQNR {row['logit_sqnr_db']:.1f} dB",
            flush=True,
        )

    add("fp32 PyTorch, recomputed", "control", [logits_of(base)])
    add("weights fp16", "weights", [logits_of(_fold_bn_weights(base, lambda t: t.half().float()))])
    add("weights bf16", "weights", [logits_of(_fold_bn_weights(base, lambda t: t.bfloat16().float()))])
    add(
        "weights int8 per channel (BN folded), activations float",
        "weights",
        [logits_of(_fold_bn_weights(base, _int8_per_channel))],
    )
    add("activations fp16", "activations", [logits_of(base, lambda t, g: t.half().float())])
    add("activations bf16", "activations", [logits_of(base, lambda t, g: t.bfloat16().float())])
    add(
        "weights bf16 + activations bf16",
        "activations",
        [
            logits_of(
                _fold_bn_weights(base, lambda t: t.bfloat16().float()), lambda t, g: t.bfloat16().float()
            )
        ],
    )
    for db in SQNRS_DB:
        add(
            f"activations + Gaussian noise at {db} dB SQNR per tensor",
            "noise",
            [logits_of(base, noise(db), seed=s) for s in SEEDS],
            activation_sqnr_db=db,
        )

    print("· slimship quantize-static (auto, bias correction) on ONNX Runtime", flush=True)
    orig = original_candidate(w, WORK / "original")
    exported = export_pass(orig, w, ExportConfig(), WORK / "exported")
    q = StaticQuantPass()(exported, w, StaticQuantConfig(bias_correction=True), WORK / "q")
    rt = create_runtime(q, w, threads=THREADS, spin=False)
    q_out = np.concatenate([rt.predict({"pixels": x[i : i + 32]})["logits"] for i in range(0, len(x), 32)])
    add(f"slimship quantize-static ({q.info.get('calibration_method')}) on ONNX Runtime", "int8", [q_out])

    confident = (
        np.exp(ref - ref.max(1, keepdims=True))
        / np.exp(ref - ref.max(1, keepdims=True)).sum(1, keepdims=True)
    ).max(1)
    srt = np.sort(ref, axis=1)
    result = {
        "cpu_class": cls,
        "machine": machine_info(THREADS),
        "date": date,
        "load_avg": load,
        "load_avg_end": [round(v, 2) for v in psutil.getloadavg()],
        "eval_crops": len(x),
        "fp32_median_top1_prob": float(np.median(confident)),
        "fp32_median_top1_top2_logit_gap": float(np.median(srt[:, -1] - srt[:, -2])),
        "crops_with_logit_gap_below_0.25": int(((srt[:, -1] - srt[:, -2]) < 0.25).sum()),
        "rows": rows,
        "seconds": round(time.time() - t_start, 1),
        "command": ".venv/bin/python benchmarks/mobilenetv2_noise_floor.py",
    }
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# MobileNetV2: how much any numerical change moves top-1 on the held-out crops "
        f"({result['cpu_class']}: {m['cpu_model']}, {m['physical_cores']} cores)",
        "",
        f"Run {result['date']} UTC ({result['seconds']:.0f} s), load average at start {result['load_avg']}, at end "
        f"{result['load_avg_end']}; {result['eval_crops']} held-out crops; fp32 median top-1 probability "
        f"{result['fp32_median_top1_prob']:.2f}, median gap between the top two logits "
        f"{result['fp32_median_top1_top2_logit_gap']:.2f}, {result['crops_with_logit_gap_below_0.25']} crops with a "
        "gap below 0.25. PyTorch rows perturb the fp32 model in place (threads "
        f"{THREADS}); noise rows are the mean of {len(SEEDS)} seeds (min–max in brackets).",
        "",
        "| variant | top-1 agr. all | top-1 agr. confident | top-5 agr. | logits SQNR dB |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        spread = f" ({r['top1_agreement_min']:.1f}–{r['top1_agreement_max']:.1f})" if r["runs"] > 1 else ""
        lines.append(
            f"| {r['label']} | {r['top1_agreement']:.1f}{spread} | {r['top1_agreement_confident']:.1f} | "
            f"{r['top5_agreement']:.1f} | {r['logit_sqnr_db']:.1f} |"
        )
    lines += ["", "## How to read it", "", *NOTES, "", "Reproduce: `" + result["command"] + "`", ""]
    return "\n".join(lines)


NOTES = [
    "- The PyTorch rows don't depend on the CPU class (float arithmetic, fixed seeds); only the last row runs ONNX "
    "Runtime's int8 kernels.",
    "- bf16 keeps 8 significant bits with a floating exponent — a relative error of at most 2^-9 on every value, far "
    "finer than an 8-bit per-tensor grid on small values — yet bf16 activations alone change the top-1 of 1.5 % of "
    "the crops and bf16 weights alone of 2.1 %: many crops are near ties (see the logit gaps above).",
    "- Agreement follows the logits' SQNR whatever causes the error: Gaussian noise that leaves the logits at "
    "≈ 18 dB gives ≈ 92.8 %, and slimship's INT8 graph, at 17.7 dB, gives 92.5 % — on the same curve, so no "
    "INT8-specific defect is left to fix; 95 % overall needs the logits at ≈ 22 dB, i.e. every quantized "
    "activation at ≈ 43 dB SQNR (an ideal full-scale uniform 8-bit grid gives ≈ 50 dB; post-ReLU6 activations "
    "with long tails get much less).",
    "- The int8-weights row has no bias correction. With slimship's empirical bias correction the same "
    "per-channel int8 weights with float activations reach 97.6 / 99.5 (benchmarks/mobilenetv2_int8_probes.py, "
    "measured on avx2; results/mobilenetv2_int8_probes-avx2.json), so rounding the weights costs little once its "
    "mean shift is removed; the rest of the loss is the activations' 8-bit grid.",
]


if __name__ == "__main__":
    main()
