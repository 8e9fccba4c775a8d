"""A complete user factory: `slimship quickstart -w examples/my_model.py:build`.

build() takes no arguments and returns the trained model, example inputs and (optionally)
evaluation data and a metric. Here: a small MLP trained on scikit-learn's real wine data.
"""

import numpy as np
import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from torch import nn


class WineNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, features):  # the argument name is the ONNX input name
        return self.net(features)


def build():
    x, y = load_wine(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    torch.manual_seed(0)
    model = WineNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x_tr)), torch.from_numpy(y_tr)).backward()
        opt.step()
    return {
        "model": model.eval(),
        "example_inputs": {"features": x_te[:4]},      # required: name -> array, batch first
        "eval_inputs": {"features": x_te},             # optional: what evaluate() runs
        "eval_labels": y_te,                           # optional: enables the accuracy metric
        "calibration_inputs": {"features": x_tr},      # optional: for calibrated quantization
        "output_names": ["logits"],                    # optional: default output_0, output_1, ...
    }
