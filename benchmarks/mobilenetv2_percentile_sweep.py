"""MobileNetV2 static INT8 percentile sweep on THIS CPU: top-1 agreement with fp32 on the 332 evaluation crops and
the held-out score ``auto`` would see (64 crops of the calibration photos), per percentile and calibration size.

    .venv/bin/python benchmarks/mobilenetv2_percentile_sweep.py 99.9,99.95,99.98,99.99,99.995 128   # ≈ 1 min per row
    .venv/bin/python benchmarks/mobilenetv2_percentile_sweep.py 99.98,99.99,99.995 496

Prints one line per row (2026-12-03 figures on amx: benchmarks/results/mobilenetv2_int8_limits-amx.md, notes)."""

import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from slimship.candidate import original_candidate
from slimship.passes import export as export_pass
from slimship.passes.export import ExportConfig
from slimship.passes.quantize import StaticQuantConfig, StaticQuantPass
from slimship.runtime import create_runtime
from slimship.workload import resolve_workload
from slimship.workload.imagenet import image_quality

W = Path(__file__).resolve().parents[1] / "runs" / "bench-mobilenetv2-sweep"
shutil.rmtree(W, ignore_errors=True)
w = resolve_workload("mobilenetv2")
x = w._eval[0]
orig = original_candidate(w, W / "original")
exp = export_pass(orig, w, ExportConfig(), W / "exported")
for n in map(int, sys.argv[2].split(",")):
    for p in map(float, sys.argv[1].split(",")):
        t0 = time.time()
        extra = {"calibration_samples": n, "holdout_samples": 64} if n != 128 else {}
        c = StaticQuantPass()(
            exp,
            w,
            StaticQuantConfig(calibration="percentile", percentile=p, bias_correction=True, **extra),
            W / f"p{p}-{n}",
        )
        rt = create_runtime(c, w, threads=2, spin=False)
        out = np.concatenate([rt.predict({"pixels": x[i : i + 32]})["logits"] for i in range(0, len(x), 32)])
        q = image_quality(out, w.reference_logits(), w._eval[1])
        from slimship.passes.quantize import _calibration_batches, _holdout_error

        cfg = StaticQuantConfig(calibration="percentile", percentile=p, **extra)
        _, held = _calibration_batches(exp, w, cfg)
        h = _holdout_error(exp.artifact_path, c.artifact_path, held)
        print(
            f"p={p} n={n}: eval {q['top1_agreement']:.1f} / {q['top1_agreement_confident']:.1f} known {q['known_class_accuracy']:.1f} | held-out top1 {h.get('top1_agreement')} cos_mean {h.get('cosine_mean'):.4f} {time.time() - t0:.0f}s",
            flush=True,
        )
