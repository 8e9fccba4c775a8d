"""Input and output drift of a served version against a reference built from its workload's evaluation data.

The reference is the version's own behaviour on evaluation data: the same features computed on its inputs and on
what it answered. Per request the monitor computes cheap per-row features and keeps the latest ``window`` rows:

- token inputs (with an attention mask): sequence length, and the token ids pooled over the valid positions;
- float inputs: per-row mean and standard deviation, and the projections on the reference's first principal axes;
- float outputs: per-row norm, cosine to the reference centroid, the first principal projections (summary statistics
  for embeddings); for classifiers also the predicted-class mix and the top-class confidence.

The request path only keeps a reference to each answered request (the newest ``window``); every few seconds the
server computes the features of the window in bulk (requests of one shape stacked) in a worker thread. Each feature
is compared with the reference by the population stability index over the reference's deciles (PSI;
< 0.1 stable, 0.1–0.25 a moderate shift, > 0.25 a major one) and by the Kolmogorov–Smirnov statistic. PSI of two
samples of one distribution is not 0: it is about (bins − 1)·(1/n_ref + 1/n_live) from sampling alone (0.08 for 512
reference rows and a 150-row window), so a feature only counts when its PSI is also over three times that noise floor.
The version's drift score is its worst counting feature's PSI; at ``alert_psi`` an alert is raised (a log line and
``slimship_drift_alert``), cleared when the score falls back under ``warn_psi``. Features whose reference is constant
are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from slimship.serve.config import DriftConfig

log = logging.getLogger("slimship.serve")

_EPS = 1e-4
_PCS = 3


def psi(ref_probs: np.ndarray, cur_probs: np.ndarray) -> float:
    r = np.maximum(ref_probs, _EPS)
    c = np.maximum(cur_probs, _EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def _hist(values: np.ndarray, edges: np.ndarray, categorical: bool, n_bins: int) -> np.ndarray:
    idx = values.astype(np.int64) if categorical else np.searchsorted(edges, values, side="right")
    counts = np.bincount(np.clip(idx, 0, n_bins - 1), minlength=n_bins).astype(np.float64)
    return counts / max(1.0, counts.sum())


def _row_features(
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    pcs: dict[str, dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-row scalar features, and pooled token ids (features whose samples aren't rows)."""
    rows: dict[str, np.ndarray] = {}
    pooled: dict[str, np.ndarray] = {}
    mask = next((v for k, v in inputs.items() if "mask" in k.lower() and v.ndim == 2), None)
    if mask is not None:
        rows["input.length"] = mask.sum(1).astype(np.float64)
    for name, x in inputs.items():
        if "mask" in name.lower() or x.size == 0:
            continue
        if x.dtype.kind in "iu":
            valid = x[mask.astype(bool)] if mask is not None and mask.shape == x.shape else x.reshape(-1)
            pooled[f"input.{name}.tokens"] = valid.astype(np.float64)
        elif x.dtype.kind == "f":
            flat = x.reshape(x.shape[0], -1).astype(np.float64)
            rows[f"input.{name}.mean"] = flat.mean(1)
            rows[f"input.{name}.std"] = flat.std(1)
            _project(rows, f"input.{name}", flat, pcs)
    for name, y in outputs.items():
        if y.dtype.kind != "f" or y.ndim < 2:
            continue
        flat = y.reshape(y.shape[0], -1).astype(np.float64)
        if (
            y.ndim == 2
            and 1 < flat.shape[1] <= 1000
            and name.lower() in ("logits", "output", "scores", "probabilities")
        ):
            z = flat - flat.max(1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            rows[f"output.{name}.top1"] = flat.argmax(1).astype(np.float64)
            rows[f"output.{name}.confidence"] = p.max(1)
        rows[f"output.{name}.norm"] = np.linalg.norm(flat, axis=1)
        pc = pcs.get(f"output.{name}")
        if pc is not None:
            c = pc["centroid"]
            den = np.linalg.norm(flat, axis=1) * np.linalg.norm(c)
            rows[f"output.{name}.centroid_cos"] = np.where(den > 0, flat @ c / np.maximum(den, 1e-30), 0.0)
        _project(rows, f"output.{name}", flat, pcs)
    return rows, pooled


def _project(
    rows: dict[str, np.ndarray], prefix: str, flat: np.ndarray, pcs: dict[str, dict[str, np.ndarray]]
) -> None:
    pc = pcs.get(prefix)
    if pc is None or pc["components"].shape[1] != flat.shape[1]:
        return
    proj = (flat - pc["mean"]) @ pc["components"].T
    for i in range(proj.shape[1]):
        rows[f"{prefix}.pc{i + 1}"] = proj[:, i]


class Reference:
    """Per feature: bin edges (deciles) and the reference's share per bin, plus a sample for the KS test."""

    def __init__(
        self, features: dict[str, dict[str, Any]], pcs: dict[str, dict[str, np.ndarray]], rows: int
    ) -> None:
        self.features, self.pcs, self.rows = features, pcs, rows

    @classmethod
    def build(
        cls, batches: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]], bins: int
    ) -> Reference:
        # principal axes first (of flattened float inputs up to 4096 values and of float outputs)
        pcs: dict[str, dict[str, np.ndarray]] = {}
        stacks: dict[str, list[np.ndarray]] = {}
        for feeds, outs in batches:
            for kind, d in (("input", feeds), ("output", outs)):
                for name, x in d.items():
                    if x.dtype.kind == "f" and x.ndim >= 2 and x[0].size <= 4096:
                        stacks.setdefault(f"{kind}.{name}", []).append(
                            x.reshape(x.shape[0], -1).astype(np.float64)
                        )
        for key, parts in stacks.items():
            data = np.concatenate(parts)
            mean = data.mean(0)
            _, _, vt = np.linalg.svd(data - mean, full_matrices=False)
            pcs[key] = {"mean": mean, "components": vt[:_PCS], "centroid": mean}
        values: dict[str, list[np.ndarray]] = {}
        n = 0
        for feeds, outs in batches:
            rows, pooled = _row_features(feeds, outs, pcs)
            n += next(iter(feeds.values())).shape[0]
            for k, v in {**rows, **pooled}.items():
                values.setdefault(k, []).append(v)
        feats: dict[str, dict[str, Any]] = {}
        for k, parts in values.items():
            v = np.concatenate(parts)
            if v.size < 20 or np.std(v) <= 1e-5 * max(1.0, float(np.mean(np.abs(v)))):
                continue  # a constant feature (e.g. the norm of normalised embeddings) has only rounding noise to bin
            categorical = k.endswith(".top1")
            if categorical:
                n_bins = int(v.max()) + 1
                edges = np.arange(n_bins, dtype=np.float64)
            else:
                edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
                n_bins = len(edges) + 1
            rng = np.random.default_rng(0)
            sample = v if v.size <= 2000 else rng.choice(v, 2000, replace=False)
            feats[k] = {
                "edges": edges,
                "probs": _hist(v, edges, categorical, n_bins),
                "categorical": categorical,
                "n": int(v.size),
                "n_bins": n_bins,
                "pooled": not k.startswith("input.length") and k.endswith(".tokens"),
                "sample": np.sort(sample),
            }
        return cls(feats, pcs, n)

    # JSON round trip (the reference is cached per artifact and workload)
    def to_json(self) -> str:
        f = {
            k: {
                **v,
                "edges": v["edges"].tolist(),
                "probs": v["probs"].tolist(),
                "sample": v["sample"].tolist(),
            }
            for k, v in self.features.items()
        }
        p = {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in self.pcs.items()}
        return json.dumps({"version": 1, "rows": self.rows, "features": f, "pcs": p})

    @classmethod
    def from_json(cls, text: str) -> Reference:
        d = json.loads(text)
        f = {
            k: {
                **v,
                "edges": np.asarray(v["edges"]),
                "probs": np.asarray(v["probs"]),
                "sample": np.asarray(v["sample"]),
            }
            for k, v in d["features"].items()
        }
        p = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in d["pcs"].items()}
        return cls(f, p, d["rows"])


def build_reference(session: Any, workload: Any, samples: int, bins: int) -> Reference:
    """Run the version on ``samples`` evaluation samples of its workload and describe what it saw and answered."""
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    batches = []
    seen = 0
    limit = samples  # `limit` counts the workload's units (articles give two samples each): spread over the whole set
    if workload.eval_size(limit) > samples:
        limit = max(1, samples * samples // workload.eval_size(limit))
    for _, batch in workload.eval_batches(limit=limit, batch_size=16):
        feeds = {k: v for k, v in batch.items() if k in wanted}
        outs = dict(zip(names, session.run(names, feeds), strict=True))
        batches.append((feeds, outs))
        seen += next(iter(feeds.values())).shape[0]
        if seen >= samples:
            break
    return Reference.build(batches, bins)


def _cache_path(onnx_path: Path, workload: Any, cfg: DriftConfig) -> Path:
    h = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(f"{workload.fingerprint()}:{cfg.samples}:{cfg.bins}:v2".encode())
    root = Path(os.environ.get("SLIMSHIP_CACHE_DIR", Path.home() / ".cache" / "slimship"))
    return root / "drift" / f"{h.hexdigest()[:32]}.json"


class DriftMonitor:
    def __init__(self, model: str, version: str, cfg: DriftConfig, metrics: Any = None) -> None:
        self.model, self.version, self.cfg, self.metrics = model, version, cfg, metrics
        self.reference: Reference | None = None
        self.status = "building"
        self.error: str | None = None
        #: the latest answered requests (each ≥ 1 row, so `window` of them hold at least `window` rows)
        self._recent: deque[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = deque(maxlen=cfg.window)
        self.alert = False
        self._last: dict[str, Any] | None = None

    def build_in_background(self, session: Any, onnx_path: Path, workload_ref: Any) -> None:
        def work() -> None:
            try:
                from slimship.workload import resolve_workload

                wl = resolve_workload(workload_ref)
                path = _cache_path(onnx_path, wl, self.cfg)
                if path.is_file():
                    ref = Reference.from_json(path.read_text())
                else:
                    ref = build_reference(session, wl, self.cfg.samples, self.cfg.bins)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(ref.to_json())
                    os.replace(tmp, path)
                self.reference = ref
                self.status = "ready"
                log.info(
                    json.dumps(
                        {
                            "event": "drift.reference",
                            "model": self.model,
                            "version": self.version,
                            "rows": ref.rows,
                            "features": sorted(ref.features),
                        }
                    )
                )
            except Exception as err:  # drift is a monitor: serving goes on without it
                self.status, self.error = "unavailable", f"{type(err).__name__}: {err}"
                log.warning("no drift reference for %s v%s: %s", self.model, self.version, self.error)

        threading.Thread(target=work, name=f"drift-ref-{self.model}-{self.version}", daemon=True).start()

    def observe(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Keep a reference to an answered request (O(1) on the request path; features are computed in bulk later,
        off the event loop, by :meth:`compute`)."""
        if self.reference is not None:
            self._recent.append((inputs, outputs))

    def take(self) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """The recent requests, newest last (call on the thread that observes; hand the list to :meth:`compute`)."""
        return list(self._recent)

    def snapshot(self) -> dict[str, Any]:
        """The latest computed figures (cheap: the dashboard and tests read this)."""
        if self._last is not None:
            return {**self._last, "status": self.status, "alert": self.alert}
        out: dict[str, Any] = {
            "status": self.status,
            "rows": 0,
            "min_rows": self.cfg.min_rows,
            "warn_psi": self.cfg.warn_psi,
            "alert_psi": self.cfg.alert_psi,
            "alert": self.alert,
            "score": None,
            "worst_feature": None,
            "features": {},
        }
        if self.error:
            out["error"] = self.error
        return out

    def compute(self, items: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]) -> dict[str, Any]:
        """PSI and KS per feature over the newest ``window`` rows of ``items``; updates the alert, metrics and log.
        Runs in a worker thread: requests with the same shapes are stacked so features are computed in few numpy calls."""
        ref = self.reference
        out = self.snapshot() | {"features": {}, "score": None, "worst_feature": None}
        if ref is None:
            return out
        kept, rows = [], 0
        for inputs, outputs in reversed(items):  # newest first, until the window is full
            kept.append((inputs, outputs))
            rows += next(iter(inputs.values())).shape[0] if inputs else 1
            if rows >= self.cfg.window:
                break
        out["rows"] = rows
        if rows < self.cfg.min_rows:
            self._last = out
            return out
        feats = _compare_features(ref, _live_features(ref, kept))
        out["features"] = feats
        if feats:
            self._score(out, feats)
        if self.metrics is not None:
            for k, f in feats.items():
                self.metrics.drift_psi.labels(self.model, self.version, k).set(f["psi"])
            self.metrics.drift_score.labels(self.model, self.version).set(out["score"] or 0.0)
            self.metrics.drift_alert.labels(self.model, self.version).set(1.0 if self.alert else 0.0)
        self._last = out
        return out

    def _score(self, out: dict[str, Any], feats: dict[str, dict[str, float]]) -> None:
        """The worst counting feature's PSI is the score; the alert rises at alert_psi and clears under warn_psi."""
        counted = {k: (v["psi"] if v["psi"] > 3 * v["noise_psi"] else 0.0) for k, v in feats.items()}
        worst = max(counted, key=lambda k: counted[k])
        out["score"], out["worst_feature"] = counted[worst], worst
        was = self.alert
        if out["score"] >= self.cfg.alert_psi:
            self.alert = True
        elif out["score"] < self.cfg.warn_psi:
            self.alert = False
        out["alert"] = self.alert
        if self.alert == was:
            return
        (log.warning if self.alert else log.info)(
            json.dumps(
                {
                    "event": "drift.alert" if self.alert else "drift.cleared",
                    "model": self.model,
                    "version": self.version,
                    "score": out["score"],
                    "feature": worst,
                    "threshold": self.cfg.alert_psi if self.alert else self.cfg.warn_psi,
                }
            )
        )
        if self.alert and self.metrics is not None:
            self.metrics.drift_alerts.labels(self.model, self.version).inc()


def _live_features(
    ref: Reference, kept: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
) -> dict[str, list[np.ndarray]]:
    """The reference's features computed on the kept requests (stacked by input shapes)."""
    groups: dict[tuple[Any, ...], list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]] = {}
    for inputs, outputs in kept:
        key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(inputs.items()))
        groups.setdefault(key, []).append((inputs, outputs))
    values: dict[str, list[np.ndarray]] = {}
    for members in groups.values():
        ins = {k: np.concatenate([m[0][k] for m in members]) for k in members[0][0]}
        outs = {
            k: np.concatenate([m[1][k] for m in members])
            for k in members[0][1]
            if all(k in m[1] and m[1][k].shape[1:] == members[0][1][k].shape[1:] for m in members)
        }
        row_f, pooled_f = _row_features(ins, outs, ref.pcs)
        for k, v in {**row_f, **pooled_f}.items():
            if k in ref.features:
                values.setdefault(k, []).append(v)
    return values


def _compare_features(ref: Reference, values: dict[str, list[np.ndarray]]) -> dict[str, dict[str, float]]:
    """PSI (with its sampling noise floor) and KS of each live feature against the reference."""
    from scipy.stats import ks_2samp

    feats = {}
    for k, f in ref.features.items():
        if k not in values:
            continue
        cur = np.concatenate(values[k]).astype(np.float64)
        value = psi(f["probs"], _hist(cur, f["edges"], f["categorical"], f["n_bins"]))
        ks = ks_2samp(
            f["sample"], cur if cur.size <= 5000 else cur[-5000:], method="asymp"
        )  # exact p: 10x slower
        noise = (f["n_bins"] - 1) * (1 / f.get("n", ref.rows) + 1 / cur.size)
        feats[k] = {
            "psi": round(value, 4),
            "noise_psi": round(noise, 4),
            "ks": round(float(ks.statistic), 4),
            "ks_p": float(ks.pvalue),
        }
    return feats
