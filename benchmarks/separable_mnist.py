"""Depthwise-separable conversion of the mnist CNN, measured in one run: the separable pass (rank-1 SVD init of
each input channel's slice, then distillation), MACs / parameter ratios, accuracy of the original, of the
initialisation and after recovery (1,000 held-out digits), and measured latency at batch 1 and 32 against the
original — ONNX Runtime (exported + graph-optimised) and PyTorch eager, all four timed interleaved in one
``slimship bench`` run, with the machine's load recorded beside it.

    PYTHONPATH=src .venv/bin/python benchmarks/separable_mnist.py     # ≈ 5 min on 2 busy cores
Writes benchmarks/results/separable_mnist-<cpu class>.{json,md}.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCHES = (1, 32)
FINETUNE = {"epochs": 3, "max_seconds": 240, "patience": 2}


def main() -> None:
    from slimship.candidate import original_candidate
    from slimship.machine import cpu_class
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate
    from slimship.passes import export, optimize_graph, run_pass
    from slimship.report.summary import load_lines, machine_line
    from slimship.workload import resolve_workload

    say = lambda m: print(f"· {m}", file=sys.stderr)  # noqa: E731
    w = resolve_workload("mnist")
    run = HERE / "runs" / "separable_mnist"
    shutil.rmtree(run, ignore_errors=True)
    original = original_candidate(w, run / "original")
    say("separable pass + recovery")
    sep = run_pass("separable", original, w, {"eval_limit": None, "finetune": FINETUNE}, run / "separable")
    acc = {
        "original": evaluate(original, w, progress=False)["quality"]["accuracy"],
        "separable": evaluate(sep, w, progress=False)["quality"]["accuracy"],
    }
    onnx = {
        label: optimize_graph(
            export(c, w, out_dir=run / label / "exported"), w, out_dir=run / label / "optimized"
        )
        for label, c in (("original", original), ("separable", sep))
    }
    targets = [
        BenchTarget("original@ort", onnx["original"], "onnxruntime"),
        BenchTarget("separable@ort", onnx["separable"], "onnxruntime"),
        BenchTarget("original@torch", original, "torch"),
        BenchTarget("separable@torch", sep, "torch"),
    ]
    say(f"timing at batch {BATCHES} (interleaved)")
    timing = bench(
        targets, w, batch_sizes=BATCHES, seq_len=None, runs=100, memory=False, baseline="original@ort"
    )
    p50 = {
        c["label"]: {r["batch_size"]: r["latency_ms"]["p50"] for r in c["results"]}
        for c in timing["candidates"]
    }
    speedup = {
        rt: {b: p50[f"original@{rt}"][b] / p50[f"separable@{rt}"][b] for b in BATCHES}
        for rt in ("ort", "torch")
    }
    cx = sep.info["complexity"]
    result = {
        "machine": timing["machine"],
        "cpu_class": cpu_class(),
        "load": timing.get("load"),
        "warnings": timing.get("warnings", []),
        "config": sep.pass_config,
        "layers": sep.info["layers"],
        "macs_ratio": cx["macs_ratio"],
        "params_ratio": cx["params_ratio"],
        "macs_before": cx["macs_before"] // cx["batch_size"],
        "macs_after": cx["macs_after"] // cx["batch_size"],
        "params_before": cx["params_before"],
        "params_after": cx["params_after"],
        "accuracy": {
            "original": acc["original"],
            "after_init": sep.info["quality_after_init"]["accuracy"],
            "after_recovery": acc["separable"],
        },
        "fidelity_after_init": sep.info["fidelity_after_init"],
        "fidelity_after_recovery": sep.info["fidelity_after_recovery"],
        "finetune": {k: v for k, v in sep.info["finetune"].items() if k != "history"},
        "latency_ms_p50": p50,
        "speedup": speedup,
        "onnx_bytes": {k: c.size_bytes for k, c in onnx.items()},
        "export_check": sep.info["export_check"],
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = f"separable_mnist-{result['cpu_class']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    md = render(result, machine_line(timing["machine"]), load_lines(timing))
    (out / f"{stem}.md").write_text(md)
    print(md)


def render(r: dict, machine: str, load: list[str]) -> str:
    k = lambda d, b: d.get(b, d.get(str(b)))  # noqa: E731 - JSON turns int keys into strings
    a, f0, f1 = r["accuracy"], r["fidelity_after_init"], r["fidelity_after_recovery"]
    conv = [(n, d) for n, d in r["layers"].items() if d["decision"] == "separable"]
    lines = [
        f"# mnist: depthwise-separable conversion ({r['cpu_class']})",
        "",
        machine,
        "",
        *load,
        "Each converted k×k conv becomes depthwise k×k + pointwise 1×1, initialised from the rank-1 SVD of each input "
        "channel's Cout × k² slice, then recovered by distillation from the original (KL at T=4 + labels, "
        f"{r['finetune']['epochs_run']} epoch(s), {r['finetune']['steps']} steps, {r['finetune']['seconds']} s, stopped by "
        f"{r['finetune']['stopped_by']}).",
        "",
        "| layer | shape | MACs / output pixel | rank-1 energy kept | relative error of the init |",
        "|---|---|---|---|---|",
    ]
    for n, d in r["layers"].items():
        energy = f"{d['energy_kept']:.3f}" if "energy_kept" in d else "—"
        err = f"{d['relative_error']:.3f}" if "relative_error" in d else "—"
        lines.append(
            f"| `{n}` | {d['in']}→{d['out']}, {d['kernel'][0]}×{d['kernel'][1]} | "
            f"{d['macs_per_pixel_before']:,} → {d['macs_per_pixel_after']:,} ({d['decision']}) | {energy} | {err} |"
        )
    lines += [
        "",
        "| | original | separable | ratio |",
        "|---|---|---|---|",
        f"| MACs per image | {r['macs_before']:,} | {r['macs_after']:,} | {r['macs_ratio']:.2f}x fewer |",
        f"| parameters | {r['params_before']:,} | {r['params_after']:,} | {r['params_ratio']:.2f}x fewer |",
        f"| ONNX file bytes | {r['onnx_bytes']['original']:,} | {r['onnx_bytes']['separable']:,} | "
        f"{r['onnx_bytes']['original'] / r['onnx_bytes']['separable']:.2f}x smaller |",
        f"| accuracy, 1,000 held-out digits | {a['original']:.1f}% | {a['after_recovery']:.1f}% after recovery "
        f"({a['after_init']:.1f}% at the rank-1 init) | {a['after_recovery'] - a['original']:+.1f} points |",
        f"| top-1 agreement with the original | 1 | {f1['top1_agreement']:.3f} ({f0['top1_agreement']:.3f} at init) | |",
        "",
        "Measured latency, p50 of 100 interleaved runs (all four targets in one `bench` run, 2 threads):",
        "",
        "| runtime | batch | original ms | separable ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for rt, name in (("ort", "ONNX Runtime (optimised)"), ("torch", "PyTorch eager")):
        for b in BATCHES:
            lines.append(
                f"| {name} | {b} | {k(r['latency_ms_p50'][f'original@{rt}'], b):.3f} | "
                f"{k(r['latency_ms_p50'][f'separable@{rt}'], b):.3f} | {k(r['speedup'][rt], b):.2f}x |"
            )
    ort32, torch1 = k(r["speedup"]["ort"], 32), k(r["speedup"]["torch"], 1)
    lines += [
        "",
        f"Fewer MACs are not the same speed-up: {r['macs_ratio']:.2f}x fewer MACs measured {ort32:.2f}x on ONNX Runtime at "
        f"batch 32 and {torch1:.2f}x in PyTorch eager at batch 1. "
        + (
            "ONNX Runtime gains more than the MACs ratio; a likely reason, not profiled here: the dense 3×3 conv "
            "it replaces needs the model's largest im2col buffer, which depthwise + 1×1 convs don't build. "
            if ort32 > r["macs_ratio"]
            else ""
        )
        + "PyTorch's CPU depthwise kernels do little arithmetic per byte moved, so its eager gain stays small.",
        "",
        f"Converted: {', '.join(f'`{n}`' for n, _ in conv)}; the first conv (1 input channel) is kept "
        "(`min_in_channels` 8). Exported separable model verified against PyTorch: max |Δ| "
        f"{r['export_check']['max_abs_error']:.1e}.",
        "",
        "Reproduce: `PYTHONPATH=src .venv/bin/python benchmarks/separable_mnist.py` (or by hand: "
        "`slimship separable -w mnist -o runs/sep`, then `slimship bench original=original@torch "
        "separable=runs/sep/separable@torch -w mnist -b 1,32`).",
        "",
    ]
    return "\n".join(lines)


def rerender() -> None:
    """Rewrite the Markdown from the saved JSON (no re-run)."""
    from slimship.machine import cpu_class
    from slimship.report.summary import load_lines, machine_line

    path = HERE / "results" / f"separable_mnist-{cpu_class()}.json"
    r = json.loads(path.read_text())
    md = render(r, machine_line(r["machine"]), load_lines({"load": r["load"], "warnings": r["warnings"]}))
    path.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    rerender() if sys.argv[1:] == ["--render"] else main()
