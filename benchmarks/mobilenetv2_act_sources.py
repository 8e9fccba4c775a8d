"""Experiment (MobileNetV2 INT8, the torch emulation of slimship's static QDQ graph from mobilenetv2_qat_static.py):
which activation grid costs agreement? Every activation quantizer per-tensor (percentile 99.999 or an MSE-optimal
clipping range) or per-channel (min/max per channel: an upper bound for any channel equalization / smoothing, which
ONNX Runtime cannot execute anyway), weights int8 or float, and one kind at a time (ReLU6 outputs, projection
outputs, residual Adds, the pooled features). Agreement on the 332 evaluation crops; no bias correction.

    .venv/bin/python benchmarks/mobilenetv2_act_sources.py
Output: benchmarks/results/mobilenetv2_act_sources-amx.log (2026-12-03, amx / amx_int8; the emulation is float
arithmetic, so the CPU class does not change its figures)."""

import collections
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from mobilenetv2_qat_static import agreement, fake_quant_model

from slimship.workload import resolve_workload

torch.set_num_threads(1)
w = resolve_workload("mobilenetv2")
x_eval, photo = w._eval
ref = w.reference_logits()
calib = np.concatenate([b["pixels"] for b in w.calibration_batches(128, 16)])
qnet = fake_quant_model(w.build_model().eval(), calib[:16], 99.999)  # the modules; ranges are redone below
acts = [(n, m) for n, m in qnet.named_modules() if type(m).__name__ == "ActQ"]
AQ = type(acts[0][1])
# kinds
parents = dict(qnet.named_modules())


def kind(n):
    if n.endswith(".add"):
        return "add"
    if n == "pool":
        return "pool"
    p = parents[n.rsplit(".", 1)[0]]
    return "relu6" if p.relu6 else "proj"


for n, m in acts:
    m.kind = kind(n)
    m.mode = "tensor"
print(collections.Counter(m.kind for _, m in acts))


def fwd(self, x):
    if getattr(self, "recording", False):
        dims = [0, *list(range(2, x.dim()))]
        self.cmin = torch.minimum(self.cmin, x.amin(dim=dims)) if hasattr(self, "cmin") else x.amin(dim=dims)
        self.cmax = torch.maximum(self.cmax, x.amax(dim=dims)) if hasattr(self, "cmax") else x.amax(dim=dims)
        flat = x.detach().flatten()
        idx = torch.randint(
            0, flat.numel(), (200_000,), generator=torch.Generator().manual_seed(len(self.smp))
        )
        self.smp.append(flat[idx])
        return x
    if self.mode == "float":
        return x
    if self.mode == "channel":
        lo = torch.clamp(self.cmin, max=0.0)
        hi = torch.clamp(self.cmax, min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=1e-8)
        zp = torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale.float(), zp, 1, 0, 255)
    lo, hi = self.rng[self.mode]
    scale = max((hi - lo) / 255.0, 1e-8)
    zp = int(min(255, max(0, round(-lo / scale))))
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)


AQ.forward = fwd
for _, m in acts:
    m.recording = True
    m.smp = []
with torch.no_grad():
    for i in range(0, len(calib), 16):
        qnet(torch.from_numpy(calib[i : i + 16]))


def mse_range(s, lo0, hi0):
    best = None
    for f in np.linspace(0.2, 1.0, 33):
        lo, hi = lo0 * f, hi0 * f
        scale = max((hi - lo) / 255.0, 1e-8)
        zp = round(-lo / scale)
        q = (torch.clamp(torch.round(s / scale) + zp, 0, 255) - zp) * scale
        e = float(((q - s) ** 2).mean())
        if best is None or e < best[0]:
            best = (e, lo, hi)
    return best[1], best[2]


for _, m in acts:
    s = torch.cat(m.smp)
    m.recording = False
    lo = float(min(torch.quantile(s, 1 - 0.99999), 0.0)) if s.min() < 0 else 0.0
    hi = float(max(torch.quantile(s, 0.99999), 0.0))
    m.rng = {"tensor": (lo, hi), "mse": mse_range(s, float(min(s.min(), 0)), float(max(s.max(), 0)))}
    m.spread = float(
        (m.cmax - torch.clamp(m.cmin, max=0)).max()
        / (m.cmax - torch.clamp(m.cmin, max=0)).clamp(min=1e-6).median()
    )
for n, m in acts:
    print(
        n,
        m.kind,
        "range",
        [round(v, 2) for v in m.rng["tensor"]],
        "mse",
        [round(v, 2) for v in m.rng["mse"]],
        f"max/median ch range {m.spread:.1f}",
    )


def run(net, x):
    with torch.inference_mode():
        return torch.cat([net(torch.from_numpy(x[i : i + 32])) for i in range(0, len(x), 32)]).numpy()


def setw(on):
    for mod in qnet.modules():
        if type(mod).__name__ == "QConvBN":
            mod.quant_weight = on if mod is not qnet.features[0] else False


def exp(label, wq, modes):
    setw(wq)
    for _, m in acts:
        m.mode = modes.get(m.kind, "float") if isinstance(modes, dict) else modes
    q = agreement(run(qnet, x_eval), ref, photo)
    print(f"{label:60s} {q['top1_agreement']:.1f} {q['top1_agreement_confident']:.1f}", flush=True)


K = ("relu6", "proj", "add", "pool")
exp("float everything", False, "float")
exp("weights only", True, "float")
exp("all acts per-tensor (pct)", True, "tensor")
exp("all acts per-tensor, weights float", False, "tensor")
exp("all acts per-tensor MSE ranges", True, "mse")
exp("all acts per-channel", True, "channel")
for k in K:
    exp(f"only {k} per-tensor, weights float", False, {k: "tensor"})
exp(
    "stream (proj+add) per-channel, relu6 per-tensor",
    True,
    {"relu6": "tensor", "proj": "channel", "add": "channel", "pool": "tensor"},
)
exp(
    "relu6 per-channel, stream per-tensor",
    True,
    {"relu6": "channel", "proj": "tensor", "add": "tensor", "pool": "tensor"},
)
exp("stream mse, relu6 pct", True, {"relu6": "tensor", "proj": "mse", "add": "mse", "pool": "mse"})
