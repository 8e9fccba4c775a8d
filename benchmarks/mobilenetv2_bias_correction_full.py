"""Experiment (MobileNetV2 INT8, torch emulation of the static QDQ graph from mobilenetv2_qat_static.py): does
sequential empirical bias correction help when the mean shift is measured with the activations quantized too, not
only the weights? Agreement with fp32 on the 332 evaluation crops; correction measured on the first N calibration
crops (argv[1], default 64).   .venv/bin/python benchmarks/mobilenetv2_bias_correction_full.py 64
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
qnet = fake_quant_model(w.build_model().eval(), calib, 99.999)
convs = [m for m in qnet.modules() if type(m).__name__ == "QConvBN"]
acts = [m for m in qnet.modules() if type(m).__name__ == "ActQ"]
QC = type(convs[0])
AQ = type(acts[0])
of_c, of_a = QC.forward, AQ.forward
STATE = {"quant": True, "cap": None}


def fwd_a(self, x):
    return of_a(self, x) if STATE["quant"] else x


def fwd_c(self, x):
    bn = self.bn
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    wt = self.conv.weight * k.reshape(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * k + self.delta
    if self.quant_weight and STATE["quant"]:
        amax = wt.abs().reshape(wt.shape[0], -1).amax(1).clamp(min=1e-8)
        sc = amax / 127.5
        wt = torch.fake_quantize_per_channel_affine(
            wt, sc, torch.zeros(wt.shape[0], dtype=torch.int32), 0, -128, 127
        )
    y = self.conv._conv_forward(x, wt, b)
    if STATE["cap"] is self:
        STATE["val"] = y.mean(dim=(0, 2, 3))
    if self.relu6:
        y = torch.clamp(y, 0, 6)
    return self.out(y)


QC.forward = fwd_c
AQ.forward = fwd_a
for c in convs:
    c.delta = torch.zeros(c.conv.out_channels)


def run(x):
    with torch.inference_mode():
        return torch.cat([qnet(torch.from_numpy(x[i : i + 32])) for i in range(0, len(x), 32)])


bcx = calib[: int(sys.argv[1]) if len(sys.argv) > 1 else 64]


def means(quant):
    STATE["quant"] = quant
    out = {}
    for c in convs:
        STATE["cap"] = c
        run(bcx)
        out[c] = STATE["val"].clone()
    STATE["cap"] = None
    return out


t0 = time.time()
STATE["quant"] = False
refm = {}


# one pass capturing all: cheaper — capture every conv in one forward
def capture_all(quant):
    STATE["quant"] = quant
    vals = {c: [] for c in convs}

    def fwd_all(self, x):
        bn = self.bn
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        wt = self.conv.weight * k.reshape(-1, 1, 1, 1)
        b = bn.bias - bn.running_mean * k + self.delta
        if self.quant_weight and STATE["quant"]:
            amax = wt.abs().reshape(wt.shape[0], -1).amax(1).clamp(min=1e-8)
            wt = torch.fake_quantize_per_channel_affine(
                wt, amax / 127.5, torch.zeros(wt.shape[0], dtype=torch.int32), 0, -128, 127
            )
        y = self.conv._conv_forward(x, wt, b)
        vals[self].append(y.mean(dim=(0, 2, 3)) * y.shape[0])
        if self.relu6:
            y = torch.clamp(y, 0, 6)
        return self.out(y)

    QC.forward = fwd_all
    run(bcx)
    QC.forward = fwd_c
    return {c: torch.stack(v).sum(0) / len(bcx) for c, v in vals.items()}


refm = capture_all(False)
STATE["quant"] = True
q = agreement(run(x_eval).numpy(), ref, photo)
print("no BC", q["top1_agreement"], q["top1_agreement_confident"], flush=True)


# weights-only BC (float activations), sequential
def bc(act_quant):
    for c in convs:
        c.delta.zero_()
    for _i, c in enumerate(convs):
        STATE["quant"] = True
        if not act_quant:
            AQ.forward = lambda self, x: x
        m = capture_all(True)[c]
        AQ.forward = fwd_a
        c.delta += refm[c] - m
    STATE["quant"] = True


for mode in (False, True):
    t0 = time.time()
    bc(mode)
    q = agreement(run(x_eval).numpy(), ref, photo)
    print(
        "BC act_quant=",
        mode,
        q["top1_agreement"],
        q["top1_agreement_confident"],
        f"{time.time() - t0:.0f}s",
        flush=True,
    )
