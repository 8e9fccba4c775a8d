"""Structural compression of the mnist CNN — the issue's three acceptance experiments, measured in one run:

1. 50% channel pruning + distillation: accuracy against the original, and the measured latency speed-up at
   batch 256 (ONNX Runtime and PyTorch, interleaved against the original in the same run) beside the MACs ratio.
2. Deep Compression: prune (50% channels) → sparsify (75% of the remaining weights, 3 gradual steps) → share
   (5-bit k-means codebooks, centroid fine-tuning) → encode (bit-packed + Huffman/xz): shipped file size against
   the fp32 file, and accuracy.
3. Hinton et al. (2015): a half-width student trained from scratch on labels alone vs distilled from the
   teacher (KL at T=4 + labels), same architecture, epochs and seeds; three seeds each.

    .venv/bin/python benchmarks/structural_mnist.py     # ≈ 8 min on 2 idle cores
Writes benchmarks/results/mnist_structural.{json,md}.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)


def main() -> None:
    from slimship.candidate import original_candidate
    from slimship.machine import physical_cores
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate
    from slimship.passes import export, optimize_graph, run_pass
    from slimship.report.summary import machine_line
    from slimship.workload import resolve_workload

    say = lambda m: print(f"· {m}", file=sys.stderr)  # noqa: E731
    w = resolve_workload("mnist")
    run = HERE / "runs" / "mnist_structural"
    shutil.rmtree(run, ignore_errors=True)
    original = original_candidate(w, run / "original")
    acc = lambda c: evaluate(c, w, progress=False)["quality"]["accuracy"]  # noqa: E731
    base_acc = acc(original)

    say("1. prune 50% of channels + distil")
    pruned = run_pass(
        "prune", original, w, {"channel_ratio": 0.5, "finetune": {"epochs": 8, "patience": 3}}, run / "pruned"
    )
    pruned_acc = acc(pruned)
    onnx = {}
    for label, cand in (("original", original), ("pruned", pruned)):
        onnx[label] = optimize_graph(
            export(cand, w, out_dir=run / label / "exported"), w, out_dir=run / label / "optimized"
        )
    targets = [
        BenchTarget("original@ort", onnx["original"], "onnxruntime"),
        BenchTarget("pruned@ort", onnx["pruned"], "onnxruntime"),
        BenchTarget("original@torch", original, "torch"),
        BenchTarget("pruned@torch", pruned, "torch"),
    ]
    say("timing at batch 256 and 1 (interleaved)")
    timing = bench(
        targets, w, batch_sizes=(256, 1), seq_len=None, runs=40, memory=False, baseline="original@ort"
    )
    p50 = {
        c["label"]: {r["batch_size"]: r["latency_ms"]["p50"] for r in c["results"]}
        for c in timing["candidates"]
    }
    macs_ratio = pruned.info["complexity"]["macs_ratio"]
    speed = {rt: p50[f"original@{rt}"][256] / p50[f"pruned@{rt}"][256] for rt in ("ort", "torch")}
    speed_b1 = {rt: p50[f"original@{rt}"][1] / p50[f"pruned@{rt}"][1] for rt in ("ort", "torch")}

    say("2. prune → sparsify → share → encode")
    sparse = run_pass(
        "sparsify", pruned, w, {"sparsity": 0.75, "steps": 3, "finetune": {"epochs": 2}}, run / "sparse"
    )
    shared = run_pass("share", sparse, w, {"bits": 5, "finetune": {"epochs": 2}}, run / "shared")
    from slimship.passes.share import SHIPPED, load_shared

    restored = load_shared(shared.path / SHIPPED, w)  # the shipped file alone, decoded, is what we score
    import numpy as np

    from slimship.runtime.torch_backend import TorchRuntime

    rt = TorchRuntime(restored, w.inputs, [o.name for o in w.outputs], physical_cores())
    logits = np.concatenate([rt.predict(b)["logits"] for _, b in w.eval_batches()])
    shipped_acc = w.quality({"logits": logits})["accuracy"]
    dc = {
        "fp32_file_bytes": original.size_bytes,
        "fp32_onnx_bytes": onnx["original"].size_bytes,
        "pruned_bytes": pruned.size_bytes,
        "sparse_xz_bytes": sparse.info["compressed_bytes"],
        "shipped_bytes": shared.info["shipped_bytes"],
        "ratio_vs_fp32_file": original.size_bytes / shared.info["shipped_bytes"],
        "ratio_vs_fp32_onnx": onnx["original"].size_bytes / shared.info["shipped_bytes"],
        "accuracy_pruned": pruned_acc,
        "accuracy_sparse": acc(sparse),
        "accuracy_shipped": shipped_acc,
        "sparsity_of_pruned_model": sparse.info["sparsity"],
        "codec": shared.info["codec"].get("codings", None),
        "header_bytes": shared.info["codec"].get("header_bytes"),
    }

    say("3. half-width student: labels only vs distilled (3 seeds each)")
    students: dict[str, list[float]] = {"labels": [], "distilled": []}
    for seed in SEEDS:
        for label, loss in (("labels", "labels"), ("distilled", "kl")):
            cfg = {
                "student": {"width": 0.5, "init": "random"},
                "finetune": {
                    "loss": loss,
                    "epochs": 12,
                    "patience": 12,
                    "seed": seed,
                    "temperature": 4.0,
                    "alpha": 0.7,
                },
            }
            c = run_pass("distill", original, w, cfg, run / f"student-{label}-{seed}")
            students[label].append(acc(c))
            say(f"  seed {seed} {label}: {students[label][-1]:.1f}")

    result = {
        "machine": timing["machine"],
        "original_accuracy": base_acc,
        "pruning": {
            "accuracy": pruned_acc,
            "accuracy_drop": base_acc - pruned_acc,
            "macs_ratio": macs_ratio,
            "params_ratio": pruned.info["complexity"]["params_ratio"],
            "latency_ms_p50": p50,
            "speedup_b256": speed,
            "speedup_b1": speed_b1,
            "speedup_over_macs_b256": {k: v / macs_ratio for k, v in speed.items()},
            "finetune": pruned.info["finetune"],
        },
        "deep_compression": dc,
        "students": {k: {"accuracies": v, "mean": statistics.mean(v)} for k, v in students.items()},
        "student_params": c.info["complexity"]["params_after"],
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "mnist_structural.json").write_text(json.dumps(result, indent=1, default=str))
    md = render(result, machine_line(timing["machine"]))
    (out / "mnist_structural.md").write_text(md)
    print(md)


def render(r: dict, machine: str) -> str:
    p, dc, st = r["pruning"], r["deep_compression"], r["students"]
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    lines = [
        "# mnist: structured pruning, Deep Compression and distillation",
        "",
        machine,
        "",
        f"Original CNN: accuracy {r['original_accuracy']:.1f}% on the 1,000 held-out digits.",
        "",
        "## Targets",
        "",
        "| target | measured | holds |",
        "|---|---|---|",
        f"| 50% channel pruning + distillation: accuracy within 0.5 points | {p['accuracy']:.1f}% ({-p['accuracy_drop']:+.1f}) | {ok(p['accuracy_drop'] <= 0.5)} |",
        f"| speed-up at batch 256 ≥ 0.75 × MACs ratio ({p['macs_ratio']:.2f}x → ≥ {0.75 * p['macs_ratio']:.2f}x), ONNX Runtime | "
        f"{p['speedup_b256']['ort']:.2f}x ({p['speedup_over_macs_b256']['ort']:.2f} of the MACs ratio) | {ok(p['speedup_b256']['ort'] >= 0.75 * p['macs_ratio'])} |",
        f"| prune → share (5 bits) → encode: shipped file ≥ 30x smaller than fp32 | {dc['ratio_vs_fp32_file']:.1f}x "
        f"({dc['shipped_bytes'] / 1e3:.1f} kB vs {dc['fp32_file_bytes'] / 1e3:.0f} kB) | {ok(dc['ratio_vs_fp32_file'] >= 30)} |",
        f"| … with accuracy within 0.5 points (scored from the decoded shipped file) | {dc['accuracy_shipped']:.1f}% | "
        f"{ok(r['original_accuracy'] - dc['accuracy_shipped'] <= 0.5)} |",
        f"| half-width student: distilled beats labels-only (mean of {len(st['labels']['accuracies'])} seeds) | "
        f"{st['distilled']['mean']:.2f}% vs {st['labels']['mean']:.2f}% | {ok(st['distilled']['mean'] > st['labels']['mean'])} |",
        "",
        "## Pruning: MACs beside measured latency",
        "",
        "| runtime | original b256 ms | pruned b256 ms | speed-up b256 | speed-up b1 |",
        "|---|---|---|---|---|",
    ]
    k = lambda d, b: d.get(b, d.get(str(b)))  # noqa: E731 - JSON turns int keys into strings
    for rt in ("ort", "torch"):
        name = "ONNX Runtime (optimised)" if rt == "ort" else "PyTorch eager"
        lines.append(
            f"| {name} | {k(p['latency_ms_p50'][f'original@{rt}'], 256):.2f} | {k(p['latency_ms_p50'][f'pruned@{rt}'], 256):.2f} | "
            f"{p['speedup_b256'][rt]:.2f}x | {p['speedup_b1'][rt]:.2f}x |"
        )
    lines += [
        "",
        f"MACs {p['macs_ratio']:.2f}x fewer, parameters {p['params_ratio']:.2f}x fewer. Latency: p50 of ≥40 interleaved runs, 2 threads.",
        "",
        "## Deep Compression: bytes at each stage",
        "",
        "| stage | bytes | accuracy |",
        "|---|---|---|",
        f"| fp32 safetensors (original) | {dc['fp32_file_bytes']:,} | {r['original_accuracy']:.1f} |",
        f"| fp32 ONNX (original) | {dc['fp32_onnx_bytes']:,} | |",
        f"| 50% channels pruned (fp32) | {dc['pruned_bytes']:,} | {dc['accuracy_pruned']:.1f} |",
        f"| + 75% sparse, xz-compressed safetensors | {dc['sparse_xz_bytes']:,} | {dc['accuracy_sparse']:.1f} |",
        f"| + 5-bit sharing, encoded (`model.slimw`, the shipped file) | {dc['shipped_bytes']:,} | {dc['accuracy_shipped']:.1f} |",
        "",
        f"The shipped file's header (names, shapes, codings, sha256) is {dc['header_bytes']:,} bytes of it. "
        "The runtime form expands the codebooks back to float32, so it runs exactly as fast as the pruned model.",
        "",
        "## Distillation into a half-width student (from scratch)",
        "",
        "| training | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean |",
        "|---|" + "---|" * (len(SEEDS) + 1),
    ]
    for k in ("labels", "distilled"):
        lines.append(
            f"| {k} | " + " | ".join(f"{a:.1f}" for a in st[k]["accuracies"]) + f" | {st[k]['mean']:.2f} |"
        )
    lines += [
        "",
        "Reproduce: `.venv/bin/python benchmarks/structural_mnist.py` (≈ 8 min on an idle machine).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
