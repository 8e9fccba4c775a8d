"""INT8 / INT4 quantization of minilm against PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime's own
``quantize_dynamic`` with default settings — quality on all 2,225 BBC articles, fidelity to the original,
size, and latency at batch 1 and 32 (seq 128) timed interleaved in one run.

    .venv/bin/python benchmarks/quantize_minilm.py     # ≈ 10 min on 2 cores; writes benchmarks/results/minilm_int8-<cpu class>.{json,md}
    .venv/bin/python benchmarks/quantize_minilm.py --render-only   # rewrite the .md from the committed .json

Run it on an otherwise idle machine. Uses the fp32 candidates of benchmarks/fp32_runtimes.py if present.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def targets_section(result: dict) -> str:
    """The issue's acceptance targets, each with the measured figure and whether it holds."""
    rows = {r["label"]: r for r in result["rows"]}
    best = rows["int8-smooth-all"]
    sp = best["speedup_vs_pytorch_p50"]
    vs = best["speed_vs_ort_default_p50"]

    def k(d: dict, b: int) -> float:
        return d.get(b, d.get(str(b)))  # JSON turns int keys into strings

    checks = [
        (
            "file ≥ 3.5x smaller than the fp32 ONNX file",
            f"{best['size_ratio_vs_fp32_onnx']:.2f}x",
            best["size_ratio_vs_fp32_onnx"] >= 3.5,
        ),
        (
            "≥ 3x faster than PyTorch fp32 at batch 1 and 32",
            f"{k(sp, 1):.2f}x / {k(sp, 32):.2f}x",
            min(k(sp, 1), k(sp, 32)) >= 3.0,
        ),
        (
            "no slower than ORT quantize_dynamic defaults (b1 / b32)",
            f"{k(vs, 1):.2f}x / {k(vs, 32):.2f}x",
            min(k(vs, 1), k(vs, 32)) >= 0.99,
        ),
        (
            "cosine to fp32 mean ≥ 0.995 and min ≥ 0.99",
            f"{best['cosine_mean']:.4f} / {best['cosine_min']:.4f}",
            best["cosine_mean"] >= 0.995 and best["cosine_min"] >= 0.99,
        ),
        (
            "retrieval top-1 within 1 point of fp32",
            f"{-best['retrieval_top1_drop']:+.2f}",
            best["retrieval_top1_drop"] <= 1.0,
        ),
    ]
    lines = [
        "## Targets (INT8 row: `int8-smooth-all`, dynamic per-channel + smoothing of every MatMul group, α 0.7)",
        "",
        "| target | measured | holds |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in checks]
    lines += [
        "",
        "What was tried for speed: per-channel (ours) vs per-tensor (ORT defaults), signed int8 weights with uint8",
        "activations (u8s8, the fast path; s8s8 MatMulInteger measured 25x slower in gemm_ceiling), static QDQ (0.94x PyTorch: Q/DQ around unfused ops), FFN-out as 8-bit",
        "MatMulNBits (fidelity 0.9993 but as slow as fp32), INT4 MatMulNBits (slower than fp32 here), graph fusion before",
        "quantizing (SkipLayerNorm/BiasGelu fused; Attention not fused). The int8 MatMuls run at ~25% of this CPU's u8s8",
        "ceiling while PyTorch fp32 on this AMX CPU is as fast as ORT fp32, so the 3x target is missed: the remaining time",
        "is in non-GEMM ops (DynamicQuantizeLinear, fp32 attention, softmax, layer norms). Next: fused Attention, folding",
        "smoothing scales into preceding weights.",
        "",
    ]
    return "\n".join(lines)


def _stem() -> str:
    """Results are per CPU class (int8 speed and even int8 results differ between them): another class's files stay."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from slimship.machine import cpu_class

    return f"minilm_int8-{cpu_class()}"


def main() -> None:
    stem = _stem()
    if "--render-only" in sys.argv:  # re-render the Markdown from the committed JSON (no re-timing)
        out = HERE / "results"
        result = json.loads((out / f"{stem}.json").read_text())
        md = (out / f"{stem}.md").read_text()
        head, sep, rest = md.partition("## Targets")
        if sep:
            rest = rest[rest.index("## Latency") :]
            md = head + rest
        md = md.replace("## Latency", targets_section(result) + "\n## Latency", 1)
        (out / f"{stem}.md").write_text(md)
        print(targets_section(result))
        return
    import onnx
    from gemm_ceiling import measure as gemm_measure
    from onnxruntime.quantization import quantize_dynamic

    from slimship._util import sha256_file
    from slimship.candidate import Candidate, load_candidate, original_candidate
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate
    from slimship.passes import export, optimize_graph, run_pass
    from slimship.pipeline.accuracy_aware import quantize_accuracy_aware
    from slimship.report.summary import bench_table, eval_table, fmt_bytes, machine_line
    from slimship.workload import resolve_workload

    say = lambda m: print(f"· {m}", file=sys.stderr)  # noqa: E731
    w = resolve_workload("minilm")
    run = HERE / "runs" / "minilm_int8"
    fp32_dir = HERE / "runs" / "minilm_fp32"
    if (fp32_dir / "optimized" / "candidate.json").exists():
        original, optimized = load_candidate(fp32_dir / "original"), load_candidate(fp32_dir / "optimized")
    else:
        original = original_candidate(w, run / "original")
        optimized = optimize_graph(
            export(original, w, out_dir=run / "exported"), w, out_dir=run / "optimized"
        )

    say("ONNX Runtime quantize_dynamic, default settings (the anchor)")
    (run / "ort-default").mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(optimized.artifact_path),
        str(run / "ort-default" / "model.onnx"),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    p = run / "ort-default" / "model.onnx"
    ort_default = Candidate(
        path=p.parent,
        id="ort-default",
        name="ort-default",
        format="onnx",
        artifact=p.name,
        workload=w.ref,
        artifact_sha256=sha256_file(p),
    )

    say("slimship dynamic INT8 per-channel")
    plain = run_pass("quantize-dynamic", optimized, w, {}, run / "int8-per-channel")
    say("slimship dynamic INT8 + FFN-out smoothing")
    smooth = run_pass(
        "quantize-dynamic", optimized, w, {"smooth": "ffn_out", "smooth_alpha": 0.75}, run / "int8-smooth"
    )
    say("slimship dynamic INT8 + smoothing of every MatMul group (QKV, attention out, FFN in/out)")
    smooth_all = run_pass(
        "quantize-dynamic", optimized, w, {"smooth": "all", "smooth_alpha": 0.7}, run / "int8-smooth-all"
    )
    smooth_all_pt = run_pass(
        "quantize-dynamic",
        optimized,
        w,
        {"smooth": "all", "smooth_alpha": 0.7, "activation_scales": "per-row"},
        run / "int8-smooth-all-per-row",
    )
    say(
        "slimship accuracy-aware: smoothing all + revert worst nodes until cosine min ≥ 0.99 on all texts and top-1 drop ≤ 1"
    )
    aa = quantize_accuracy_aware(
        optimized,
        w,
        run / "int8-accuracy-aware",
        {"smooth": "all", "smooth_alpha": 0.7},
        min_fidelity=0.99,
        fidelity_metric="cosine_min",
        fidelity_source="evaluation",
        max_quality_drop=1.0,
        max_steps=6,
        log=say,
    )
    aware = load_candidate(aa["chosen"]["candidate"])
    say("INT4 weight-only")
    int4 = run_pass("quantize-int4", optimized, w, {}, run / "int4-weight-only")

    variants = {
        "ort-fp32-optimized": optimized,
        "ort-quantize_dynamic-default": ort_default,
        "int8-per-channel": plain,
        "int8-smooth-ffn-out": smooth,
        "int8-smooth-all": smooth_all,
        "int8-smooth-all-per-row": smooth_all_pt,
        "int8-accuracy-aware": aware,
        "int4-weight-only": int4,
    }
    evaluations = {"pytorch-fp32": evaluate(original, w, "torch")}
    for label, cand in variants.items():
        say(f"evaluating {label}")
        evaluations[label] = evaluate(cand, w)
    say("timing everything interleaved")
    targets = [BenchTarget("pytorch-fp32", original, "torch")] + [
        BenchTarget(k, v, "onnxruntime") for k, v in variants.items()
    ]
    timing = bench(targets, w, batch_sizes=(1, 32), seq_len=128, runs=30, memory=False)
    say("GEMM ceilings")
    gemm = gemm_measure()

    # MiniLM MACs per sequence of 128 tokens: 6 layers × (4·384² + 2·384·1536 per token + 2·128·384 attention per token)
    macs_per_seq = 6 * 128 * (4 * 384 * 384 + 2 * 384 * 1536 + 2 * 128 * 384)
    fp32_ceiling = gemm["ceilings"]["fp32 MatMul"]["gops_per_s"]
    int8_ceiling = gemm["ceilings"]["int8 u8s8 MatMulInteger"]["gops_per_s"]
    rows = []
    base_size = optimized.size_bytes
    for c in timing["candidates"]:
        ev = evaluations[c["label"]]
        b32 = next(r for r in c["results"] if r["batch_size"] == 32)
        gops = 2 * macs_per_seq * 32 / (b32["latency_ms"]["p50"] / 1000) / 1e9
        ceiling = int8_ceiling if "int8" in c["label"] or "quantize_dynamic" in c["label"] else fp32_ceiling
        rows.append(
            {
                "label": c["label"],
                "file_size_bytes": c["file_size_bytes"],
                "size_ratio_vs_fp32_onnx": base_size / c["file_size_bytes"],
                "speedup_vs_pytorch_p50": {
                    r["batch_size"]: r["speedup_vs_baseline_p50"] for r in c["results"]
                },
                "retrieval_top1": ev["quality"]["retrieval_top1"],
                "retrieval_top1_drop": evaluations["pytorch-fp32"]["quality"]["retrieval_top1"]
                - ev["quality"]["retrieval_top1"],
                "topic_accuracy": ev["quality"].get("topic_accuracy"),
                "cosine_mean": ev["fidelity"]["cosine_mean"],
                "cosine_min": ev["fidelity"]["cosine_min"],
                "achieved_gops_b32": gops,
                "share_of_matmul_ceiling_b32": gops / ceiling,
                "ceiling_used": "int8 u8s8" if ceiling == int8_ceiling else "fp32",
            }
        )
    anchor = next(r for r in rows if r["label"] == "ort-quantize_dynamic-default")
    for r in rows:
        r["speed_vs_ort_default_p50"] = {
            b: r["speedup_vs_pytorch_p50"][b] / anchor["speedup_vs_pytorch_p50"][b] for b in (1, 32)
        }
    result = {
        "schema": "slimship.bench.quantize-minilm/1",
        "rows": rows,
        "accuracy_aware": aa,
        "evaluations": evaluations,
        "bench": timing,
        "gemm": gemm,
        "candidate_info": {
            k: {
                kk: v.info.get(kk)
                for kk in ("excluded_nodes", "smoothing", "warnings", "size_ratio_vs_parent")
            }
            for k, v in variants.items()
            if v.info
        },
        "command": "python benchmarks/quantize_minilm.py",
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        f"# minilm: INT8 / INT4 quantization on {stem.removeprefix('minilm_int8-')} — {timing['machine']['cpu_model']} (one interleaved run)",
        "",
        "INT8 rows use ORT's per-tensor activation scales (the default) unless labelled per-row (batch-invariant), "
        "and the deployment settings slimship records for this CPU class (runtime.settings).",
        "",
        "| variant | file | × smaller than fp32 ONNX | × PyTorch b1 | × PyTorch b32 | vs ORT default b1 / b32 | retrieval top-1 (drop) | cosine mean / min | GOP/s b32 (share of ceiling) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {fmt_bytes(r['file_size_bytes'])} | {r['size_ratio_vs_fp32_onnx']:.2f} | {r['speedup_vs_pytorch_p50'][1]:.2f} | "
            f"{r['speedup_vs_pytorch_p50'][32]:.2f} | {r['speed_vs_ort_default_p50'][1]:.2f} / {r['speed_vs_ort_default_p50'][32]:.2f} | "
            f"{r['retrieval_top1']:.2f} ({r['retrieval_top1_drop']:+.2f}) | {r['cosine_mean']:.4f} / {r['cosine_min']:.4f} | "
            f"{r['achieved_gops_b32']:.0f} ({r['share_of_matmul_ceiling_b32'] * 100:.0f}% of {r['ceiling_used']}) |"
        )
    lines += [
        "",
        f"Accuracy-aware: {aa['message']}; reverted: {aa['reverted_nodes']}.",
        "",
        "GEMM ceilings (ONNX Runtime, M=4096 K=384 N=1536): "
        + ", ".join(f"{k} {v['gops_per_s']:.0f} GOP/s" for k, v in gemm["ceilings"].items()),
        "",
        targets_section(result),
        "## Latency",
        "",
        bench_table(timing),
        "",
        "## Quality and fidelity (all 2,225 articles)",
        "",
        eval_table(evaluations),
        "",
        "## Machine",
        "",
        machine_line(timing["machine"]),
        "",
        "Reproduce: `python benchmarks/quantize_minilm.py`",
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
