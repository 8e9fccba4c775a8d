"""What each deployment setting costs and buys on THIS CPU: MiniLM INT8 (smooth all) with ONNX Runtime's
``session.x64quantprecision`` off / on, and with per-tensor (ORT's DynamicQuantizeLinear) vs per-row activation
scales — fidelity to fp32 on real BBC texts, batch invariance (a short text alone vs batched with the longest
texts), latency at batch 1 and 32 and CPU time per inference, all timed interleaved in one run against ORT fp32.

    .venv/bin/python benchmarks/deployment_settings.py          # ≈ 6 min on 2 cores; idle machine please
    .venv/bin/python benchmarks/deployment_settings.py --render-only

Writes benchmarks/results/deployment_settings-<cpu class>.{json,md}; other CPU classes' files are left alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# MiniLM INT8 deployment settings on {result['cpu_class']} ({m['cpu_model']}, {m['physical_cores']} cores)",
        "",
        f"One interleaved run, {result['threads']} threads, ORT spinning off, seq {result['seq_len']}; fidelity on "
        f"{result['fidelity_texts']} BBC texts; batch invariance: {result['invariance_trials']} shortest texts, each "
        "alone vs batched with the 7 longest (cosine of its own embedding).",
        "",
        "| variant | x64quantprecision | activation scales | cosine to fp32 mean / min | alone vs batched median / min | "
        "b1 p50 ms | b32 p50 ms | × fp32 b1 / b32 | CPU ms/inference b32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def at(d: dict, b: int) -> float:
        return float(d.get(b, d.get(str(b))))  # JSON turns int keys into strings

    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['x64quantprecision']} | {r['activation_scales']} | {r['cosine_mean']:.4f} / {r['cosine_min']:.4f} | "
            f"{r['alone_vs_batched_median']:.5f} / {r['alone_vs_batched_min']:.5f} | {at(r['p50_ms'], 1):.1f} | {at(r['p50_ms'], 32):.0f} | "
            f"{at(r['speedup_vs_fp32'], 1):.2f} / {at(r['speedup_vs_fp32'], 32):.2f} | {at(r['cpu_ms_per_inference'], 32):.1f} |"
        )
    lines += ["", "Reproduce: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from slimship.machine import cpu_class, machine_info

    cls = cpu_class()
    out = HERE / "results"
    stem = out / f"deployment_settings-{cls}"
    if "--render-only" in sys.argv:
        stem.with_suffix(".md").write_text(render(json.loads(stem.with_suffix(".json").read_text())))
        return
    import onnxruntime as ort

    from slimship.candidate import original_candidate
    from slimship.passes import export, optimize_graph, run_pass
    from slimship.runtime.settings import DeploymentSettings
    from slimship.workload import resolve_workload

    threads, seq = 2, 128
    w = resolve_workload("minilm")
    run = ROOT / "runs" / "bench-deployment-settings"
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    say("export / optimise / quantize (smooth all)")
    orig = original_candidate(w, run / "original")
    opt = optimize_graph(export(orig, w, out_dir=run / "exported"), w, out_dir=run / "optimized")
    q = run_pass(
        "quantize-dynamic",
        opt,
        w,
        {"smooth": "all", "smooth_alpha": 0.7, "activation_scales": "per-tensor"},
        run / "int8-smooth-all-per-tensor",
    )
    row = run_pass(
        "quantize-dynamic",
        opt,
        w,
        {"smooth": "all", "smooth_alpha": 0.7, "activation_scales": "per-row"},
        run / "int8-smooth-all-per-row",
    )
    row_path = row.artifact_path

    def session(path: Path, x64: bool) -> ort.InferenceSession:
        s = DeploymentSettings(
            intra_op_threads=threads,
            spinning=False,
            session_config={"session.x64quantprecision": "1"} if x64 else {},
        )
        return ort.InferenceSession(str(path), s.session_options(), providers=["CPUExecutionProvider"])

    variants = {
        "ort-fp32-optimized": (opt.artifact_path, False, "—", "—"),
        "int8 per-tensor, x64 off": (q.artifact_path, False, "off", "per tensor (ORT)"),
        "int8 per-tensor, x64 on": (q.artifact_path, True, "on", "per tensor (ORT)"),
        "int8 per-row, x64 off": (row_path, False, "off", "per row"),
        "int8 per-row, x64 on": (row_path, True, "on", "per row"),
    }
    sessions = {k: session(p, x) for k, (p, x, _, _) in variants.items()}
    name = "sentence_embedding"
    batches = [b for _, b in w.eval_batches(limit=300, batch_size=16)]

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    ref = [sessions["ort-fp32-optimized"].run([name], b)[0] for b in batches]
    rows_tok = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            rows_tok.append({k: v[i, :n] for k, v in b.items()})
    rows_tok.sort(key=lambda r: len(r["input_ids"]))
    shortest, longest = rows_tok[:20], rows_tok[-7:]

    def pad(rs: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rs)
        return {k: np.stack([np.pad(r[k], (0, n - len(r[k]))) for r in rs]).astype(np.int64) for k in rs[0]}

    rows = []
    for label, (path, _x64, x64s, scales) in variants.items():
        say(f"fidelity and batch invariance: {label}")
        s = sessions[label]
        c = np.concatenate([cos(s.run([name], b)[0], r) for b, r in zip(batches, ref, strict=True)])
        inv = []
        for r in shortest:
            alone = s.run([name], pad([r]))[0][:1]
            mixed = s.run([name], pad([r, *longest]))[0][:1]
            inv.append(float(cos(alone, mixed)[0]))
        rows.append(
            {
                "label": label,
                "path": str(path),
                "x64quantprecision": x64s,
                "activation_scales": scales,
                "cosine_mean": float(c.mean()),
                "cosine_min": float(c.min()),
                "alone_vs_batched_median": float(np.median(inv)),
                "alone_vs_batched_min": float(min(inv)),
            }
        )
    say("timing, interleaved")
    timing: dict[str, dict[int, list[float]]] = {k: {} for k in variants}
    cpu: dict[str, dict[int, list[float]]] = {k: {} for k in variants}
    for bs, runs in ((1, 60), (32, 12)):
        feed = w.example_inputs(bs, seq_len=seq)
        for s in sessions.values():
            for _ in range(3):
                s.run([name], feed)
        for k in variants:
            timing[k][bs], cpu[k][bs] = [], []
        for i in range(runs):
            order = list(variants)[i % len(variants) :] + list(variants)[: i % len(variants)]
            for k in order:
                c0, t0 = time.process_time(), time.perf_counter()
                sessions[k].run([name], feed)
                timing[k][bs].append(time.perf_counter() - t0)
                cpu[k][bs].append(time.process_time() - c0)
    fp = {bs: float(np.median(timing["ort-fp32-optimized"][bs])) for bs in (1, 32)}
    for r in rows:
        k = r["label"]
        r["p50_ms"] = {bs: 1e3 * float(np.median(timing[k][bs])) for bs in (1, 32)}
        r["speedup_vs_fp32"] = {bs: fp[bs] / float(np.median(timing[k][bs])) for bs in (1, 32)}
        r["cpu_ms_per_inference"] = {
            bs: 1e3 * float(np.sum(cpu[k][bs])) / (len(cpu[k][bs]) * bs) for bs in (1, 32)
        }
    result = {
        "schema": "slimship.bench.deployment-settings/1",
        "cpu_class": cls,
        "machine": machine_info(threads),
        "threads": threads,
        "seq_len": seq,
        "fidelity_texts": int(sum(b["input_ids"].shape[0] for b in batches)),
        "invariance_trials": len(shortest),
        "rows": rows,
        "command": "python benchmarks/deployment_settings.py",
    }
    out.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
