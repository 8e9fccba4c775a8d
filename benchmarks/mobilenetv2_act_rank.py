"""Experiment (MobileNetV2 INT8, torch emulation of the static QDQ graph from mobilenetv2_qat_static.py): which
activation quantizers cost most? Each of the 63 alone (weights quantized, no bias correction), ranked by the KL to
fp32 on 96 mirrored calibration crops (never the evaluation photos), then the K worst kept float; agreement on the 332
evaluation crops.   .venv/bin/python benchmarks/mobilenetv2_act_rank.py
Output: benchmarks/results/mobilenetv2_int8_emulation-avx512-vnni.log (2026-12-02)."""

import sys
import time

import numpy as np
import torch

sys.path.insert(0, "/work/main/src")
sys.path.insert(0, "/work/main/benchmarks")
from mobilenetv2_qat_static import agreement, fake_quant_model

from slimship.workload import resolve_workload

torch.set_num_threads(2)
w = resolve_workload("mobilenetv2")
x_eval, photo = w._eval
ref = w.reference_logits()
calib = np.concatenate([b["pixels"] for b in w.calibration_batches(128, 16)])
teacher = w.build_model().eval()
qnet = fake_quant_model(w.build_model().eval(), calib, 99.999)
acts = [(n, m) for n, m in qnet.named_modules() if type(m).__name__ == "ActQ"]
print(len(acts), "activation quantizers")
# ranking set: 96 calibration crops of held-out-from-eval photos (mirror images of 96 crops)
rk = np.ascontiguousarray(calib[::-1][:96, :, :, ::-1])
with torch.inference_mode():
    t_rk = torch.cat([teacher(torch.from_numpy(rk[i : i + 32])) for i in range(0, len(rk), 32)])


def run(net, x):
    with torch.inference_mode():
        return torch.cat([net(torch.from_numpy(x[i : i + 32])) for i in range(0, len(x), 32)])


def kl(s, t):
    return float(
        torch.nn.functional.kl_div(
            torch.log_softmax(s, 1), torch.log_softmax(t, 1), log_target=True, reduction="batchmean"
        )
    )


for _, m in acts:
    m.enabled = True
orig_forward = type(acts[0][1]).forward


def fwd(self, x):
    if not getattr(self, "enabled", True):
        return x
    return orig_forward(self, x)


type(acts[0][1]).forward = fwd
# weights quantized, no activations
for _, m in acts:
    m.enabled = False
base = kl(run(qnet, rk), t_rk)
print("weights only KL", base, agreement(run(qnet, x_eval).numpy(), ref, photo)["top1_agreement"])
scores = []
t0 = time.time()
for n, m in acts:
    m.enabled = True
    scores.append((kl(run(qnet, rk), t_rk) - base, n))
    m.enabled = False
print("ranked in", time.time() - t0)
scores.sort(reverse=True)
for s, n in scores[:15]:
    print(f"{s:.4f} {n}")
for _, m in acts:
    m.enabled = True
full = run(qnet, x_eval).numpy()
print("all", agreement(full, ref, photo))
names = dict(acts)
for k in (1, 2, 3, 5, 8, 12):
    for _, m in acts:
        m.enabled = True
    for _s, n in scores[:k]:
        names[n].enabled = False
    q = agreement(run(qnet, x_eval).numpy(), ref, photo)
    print(k, "float:", q["top1_agreement"], q["top1_agreement_confident"], flush=True)
