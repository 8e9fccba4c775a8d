"""Structural compression of minilm: FFN pruning, layer dropping (6 → 3) and low-rank FFN factorisation at two
ranks, each recovered by embedding distillation on BBC text (unlabelled article tails, never evaluated) within a
time budget; then every result is exported, verified, graph-optimised and dynamically quantized to INT8.

Reported per variant: fidelity to the original (cosine over all 4,450 BBC texts), retrieval top-1, MACs,
parameters, and ONNX Runtime latency at batch 1 and 32 (seq 128) timed interleaved against the original's
optimised fp32 export in one run — so the MACs ratio and the measured speed-up sit side by side.

    .venv/bin/python benchmarks/structural_minilm.py                 # ≈ 45 min on 2 idle cores
    .venv/bin/python benchmarks/structural_minilm.py --stage train   # only build/distil the candidates (cached)
    .venv/bin/python benchmarks/structural_minilm.py --stage measure # only evaluate + time (needs an idle machine)

Writes benchmarks/results/minilm_structural.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET_S = 600.0  # the 10-minute distillation budget per variant
FT = {"epochs": 30, "max_seconds": BUDGET_S, "lr": 1e-4, "loss": "cosine", "patience": 3, "eval_every": 100}

VARIANTS = {
    "ffn50": ("prune", {"channel_ratio": 0.5, "finetune": FT}),
    "depth3": (
        "depth-prune",
        {"keep_layers": 3, "criterion": "alternate", "feature_weight": 1.0, "finetune": FT},
    ),
    "lowrank-r192": (
        "lowrank",
        {
            "ranks": {},
            "layers": ["*.intermediate.dense", "*.output.dense"],
            "energy": None,
            "param_ratio": None,
            "min_speedup": 0.0,
            "finetune": {**FT, "max_seconds": BUDGET_S / 2},
        },
    ),
    "lowrank-r96": (
        "lowrank",
        {
            "ranks": {},
            "layers": ["*.intermediate.dense", "*.output.dense"],
            "energy": None,
            "param_ratio": None,
            "min_speedup": 0.0,
            "finetune": {**FT, "max_seconds": BUDGET_S / 2},
        },
    ),
}


def _ffn_ranks(w, rank: int) -> dict[str, int]:
    names = [
        f"backbone.encoder.layer.{i}.{p}" for i in range(6) for p in ("intermediate.dense", "output.dense")
    ]
    return dict.fromkeys(names, rank)


def train(w, original) -> dict:
    from slimship.candidate import load_candidate
    from slimship.passes import run_pass

    run = HERE / "runs" / "minilm_structural"
    out = {}
    for label, (pass_name, cfg) in VARIANTS.items():
        cfg = dict(cfg)
        if label.startswith("lowrank"):
            cfg["ranks"] = _ffn_ranks(w, int(label.split("-r")[1]))
            cfg["layers"] = []
        d = run / label
        if (d / "candidate.json").exists():  # delete benchmarks/runs/minilm_structural/<label> to rebuild
            out[label] = load_candidate(d)
            print(f"· {label}: cached", file=sys.stderr)
            continue
        print(f"· {label}: {pass_name}", file=sys.stderr)
        out[label] = run_pass(pass_name, original, w, cfg, d)
    return out


def main() -> None:
    stage = sys.argv[sys.argv.index("--stage") + 1] if "--stage" in sys.argv else "all"
    from slimship.candidate import load_candidate, original_candidate
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate
    from slimship.passes import export, optimize_graph, run_pass
    from slimship.report.summary import machine_line
    from slimship.workload import resolve_workload

    say = lambda m: print(f"· {m}", file=sys.stderr)  # noqa: E731
    w = resolve_workload("minilm")
    run = HERE / "runs" / "minilm_structural"
    odir = run / "original"
    original = load_candidate(odir) if (odir / "candidate.json").exists() else original_candidate(w, odir)
    variants = train(w, original)
    if stage == "train":
        return
    chains = {}
    for label, cand in {"original": original, **variants}.items():
        d = run / label
        say(f"{label}: export → optimise → INT8")
        exp = export(cand, w, out_dir=d / "exported")
        opt = optimize_graph(exp, w, out_dir=d / "optimized")
        q = run_pass("quantize-dynamic", opt, w, {"smooth": "all", "smooth_alpha": 0.7}, d / "int8")
        chains[label] = {"torch": cand, "fp32": opt, "int8": q}
    evaluations = {}
    for label, c in chains.items():
        for form in ("fp32", "int8"):
            say(f"evaluating {label} {form}")
            evaluations[f"{label}/{form}"] = evaluate(c[form], w, progress=False)
    say("timing (ONNX Runtime, interleaved)")
    targets = [
        BenchTarget(f"{label}/{form}", c[form], "onnxruntime")
        for label, c in chains.items()
        for form in ("fp32", "int8")
    ]
    timing = bench(
        targets, w, batch_sizes=(1, 32), seq_len=128, runs=30, memory=False, baseline="original/fp32"
    )
    rows = []
    for c in timing["candidates"]:
        label, form = c["label"].split("/")
        ev = evaluations[c["label"]]
        info = chains[label]["torch"].info
        cx = info.get("complexity") or {}
        ft = info.get("finetune") or {}
        rows.append(
            {
                "label": c["label"],
                "variant": label,
                "form": form,
                "file_size_bytes": c["file_size_bytes"],
                "params": info.get("parameters"),
                "macs_ratio": cx.get("macs_ratio", 1.0),
                "latency_ms_p50": {r["batch_size"]: r["latency_ms"]["p50"] for r in c["results"]},
                "speedup_vs_original_fp32": {
                    r["batch_size"]: r["speedup_vs_baseline_p50"] for r in c["results"]
                },
                "cosine_mean": ev["fidelity"]["cosine_mean"],
                "cosine_min": ev["fidelity"]["cosine_min"],
                "retrieval_top1": ev["quality"]["retrieval_top1"],
                "mrr": ev["quality"].get("retrieval_mrr"),
                "topic_accuracy": ev["quality"].get("topic_accuracy"),
                "distill_seconds": ft.get("seconds"),
                "distill_steps": ft.get("steps"),
                "stopped_by": ft.get("stopped_by"),
                "val_loss": [ft.get("val_loss_before"), ft.get("val_loss_best")],
            }
        )
    result = {
        "machine": timing["machine"],
        "budget_seconds": BUDGET_S,
        "finetune": FT,
        "rows": rows,
        "variants": {
            k: {
                "pass": v.pass_name,
                "config": v.pass_config,
                "info": {kk: vv for kk, vv in v.info.items() if kk != "structure"},
            }
            for k, v in variants.items()
        },
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "minilm_structural.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "minilm_structural.md").write_text(render(result, machine_line(timing["machine"])))
    print(render(result, ""))


def render(result: dict, machine: str) -> str:
    def k(d: dict, b: int) -> float:
        return d.get(b, d.get(str(b)))

    lines = [
        "# minilm: structural compression + distillation (BBC News, all 4,450 texts)",
        "",
        f"{machine}",
        "",
        f"Each variant is distilled from the original on ~38k unlabelled windows and sentences of BBC article text past "
        f"the evaluated first 128 tokens (cosine loss, lr {FT['lr']}, "
        f"budget {result['budget_seconds']:.0f} s; low-rank {result['budget_seconds'] / 2:.0f} s), then exported (verified), "
        "graph-optimised and INT8-quantized (dynamic, per-channel, smoothing α 0.7). Latency: ONNX Runtime, 2 threads, seq 128, "
        "p50 of ≥30 interleaved runs; speed-up against the original's optimised fp32 export in the same run. "
        "MACs ratio = Linear work of the original / the variant (PyTorch model, same input).",
        "",
        "| variant | form | params | MACs ratio | MB | b1 ms | b32 ms | speed-up b1 / b32 | cosine mean / min | top-1 | distil s (stop) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['form']} | {(r['params'] or 0) / 1e6:.1f} M | {r['macs_ratio']:.2f}x | {r['file_size_bytes'] / 1e6:.1f} | "
            f"{k(r['latency_ms_p50'], 1):.1f} | {k(r['latency_ms_p50'], 32):.0f} | "
            f"{k(r['speedup_vs_original_fp32'], 1):.2f}x / {k(r['speedup_vs_original_fp32'], 32):.2f}x | "
            f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f} | {r['retrieval_top1']:.2f} | "
            f"{r['distill_seconds'] or '—'} ({r['stopped_by'] or '—'}) |"
        )
    lines += [
        "",
        "Reproduce: `.venv/bin/python benchmarks/structural_minilm.py` (≈ 45 min: 30 min of distillation, then export, INT8, evaluation and timing; run on an otherwise idle machine).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
