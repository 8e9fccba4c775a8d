"""Weight sharing (Han et al., Deep Compression, 2016): the weights of each Linear/Conv/Embedding layer are clustered
by 1-D k-means into ``k = 2**bits`` shared values, the centroids are fine-tuned (every weight in a cluster
moves together), and the model is stored as codebooks plus bit-packed, entropy-coded indices.

Pruned weights stay exactly zero: when a layer is sparse, zero is its own codebook entry and the other
``k-1`` entries cluster the surviving weights, so prune → share → encode composes.

Two forms are written: ``model.slimw`` — the file a user ships (see :mod:`slimship.passes._codec`) —
and ``model.safetensors``, the runtime form with every weight expanded to float32 (what PyTorch and an
ONNX export run). :func:`load_shared` restores a runnable model from the shipped file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from slimship.errors import CandidateError
from slimship.passes.base import Pass, PassConfig
from slimship.train import FinetuneConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimship.candidate import Candidate
    from slimship.workload import Workload

SHIPPED = "model.slimw"


class WeightShareConfig(PassConfig):
    bits: int = Field(
        default=5, ge=2, le=8, description="index bits per weight: k = 2**bits shared values per layer (2–8)"
    )
    layer_bits: dict[str, int] = Field(
        default_factory=dict,
        description='per-layer bits overriding bits, e.g. {"0": 8} (Deep Compression used 8 for convs, 5 for FC layers)',
    )
    init: Literal["linear", "density"] = Field(
        default="linear",
        description="k-means initialisation: linear (evenly spaced, keeps the rare large weights) or density (quantiles)",
    )
    ignore: list[str] = Field(
        default_factory=list, description="layers whose weights are stored losslessly instead"
    )
    finetune: FinetuneConfig | None = Field(
        default=FinetuneConfig(epochs=2),
        description="centroid fine-tuning by distillation (weights of a cluster move together); null to skip",
    )

    @field_validator("layer_bits")
    @classmethod
    def _bits(cls, v: dict[str, int]) -> dict[str, int]:
        for k, b in v.items():
            if not 2 <= b <= 8:
                raise ValueError(f"layer_bits[{k!r}] = {b}: bits must be 2–8 (k = 4–256 shared values)")
        return v


def _cluster(w: torch.Tensor, bits: int, init: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(codebook, labels with w's shape, has_zero_cluster). Exact zeros get their own entry when present."""
    import numpy as np
    import torch

    from slimship.passes._codec import kmeans_1d

    flat = w.detach().flatten().numpy().astype(np.float64)
    k = 2**bits
    zeros = flat == 0
    sparse = bool(zeros.mean() > 0.01)
    labels = np.zeros(flat.shape, np.int64)
    if sparse:
        cents, lab = kmeans_1d(flat[~zeros], k - 1, init=init)
        codebook = np.concatenate([[0.0], cents]).astype(np.float32)
        labels[~zeros] = lab + 1
    else:
        codebook, labels = kmeans_1d(flat, k, init=init)
        codebook = codebook.astype(np.float32)
    return torch.from_numpy(codebook), torch.from_numpy(labels.reshape(tuple(w.shape))), sparse


def load_shared(path: str | Path, workload: Workload) -> nn.Module:
    """A runnable PyTorch model from a shipped ``model.slimw`` file (codebooks expanded to float32)."""
    import torch

    from slimship.passes._codec import decode
    from slimship.structure import rebuild

    state_np, meta = decode(Path(path).read_bytes())
    if meta.get("workload", {}).get("name") not in (None, workload.name):
        raise CandidateError(
            f"{path} was made for workload {meta['workload'].get('name')!r}, not {workload.name!r}"
        )
    state = {k: torch.from_numpy(v.copy()) for k, v in state_np.items()}
    for alias, source in meta.get("aliases", {}).items():
        state[alias] = state[source]
    model = rebuild(
        workload.build_model(), meta.get("structure", []), {k: tuple(v.shape) for k, v in state.items()}
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CandidateError(
            f"{path} doesn't fit {workload.name}'s model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()


class WeightSharePass(Pass[WeightShareConfig]):
    name: ClassVar[str] = "share"
    summary: ClassVar[str] = (
        "k-means weight sharing with centroid fine-tuning; ships codebook + entropy-coded indices"
    )
    config_cls = WeightShareConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "torch"

    def run(
        self, candidate: Candidate, workload: Workload, config: WeightShareConfig, out_dir: Path
    ) -> Candidate:
        import numpy as np
        import torch

        from slimship.candidate import save_torch_candidate
        from slimship.errors import CompressionError
        from slimship.passes._codec import encode, size_report
        from slimship.passes._common import recover, resolve_layers, teacher_and_student
        from slimship.passes.sparsity import prunable_weights

        teacher, student = teacher_and_student(candidate, workload)
        resolve_layers(student, config.layer_bits, "layer_bits")
        weights = prunable_weights(student, config.ignore)
        skip = {id(m) for m in resolve_layers(student, config.ignore, "ignore")}
        weights.update(
            {
                f"{n}.weight": m.weight
                for n, m in student.named_modules()
                if isinstance(m, torch.nn.Embedding) and id(m) not in skip
            }
        )
        if not weights:
            raise CompressionError("no Linear, Conv or Embedding weights to share after `ignore`")
        # tied weights (e.g. an LM head sharing the embedding matrix) are clustered and stored once
        first: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for key, w in list(weights.items()):
            if id(w) in first:
                aliases[key] = first[id(w)]
                del weights[key]
            else:
                first[id(w)] = key
        plan: dict[str, dict[str, Any]] = {}
        clusters: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        for key, w in weights.items():
            bits = config.layer_bits.get(key.removesuffix(".weight"), config.bits)
            clusters[key] = _cluster(w, bits, config.init)
            with torch.no_grad():
                w.copy_(clusters[key][0][clusters[key][1]])
            plan[key] = {"bits": bits, "clusters": len(clusters[key][0]), "zero_cluster": clusters[key][2]}

        def project() -> None:
            """Centroid update: each shared value becomes the mean of its cluster's weights after the step."""
            for key, w in weights.items():
                book, labels, has_zero = clusters[key]
                flat = labels.flatten()
                sums = torch.zeros_like(book).index_add_(0, flat, w.detach().flatten())
                counts = torch.bincount(flat, minlength=len(book)).clamp(min=1).to(book.dtype)
                new = sums / counts
                if has_zero:
                    new[0] = 0.0
                book.copy_(new)
                w.copy_(book[labels])

        training = recover(
            student, teacher, workload, config.finetune, after_step=project, desc="fine-tune centroids"
        )
        with torch.no_grad():
            project()  # the kept (best) state was projected; make sure codebooks match it exactly
        shared = {k: (clusters[k][0].numpy().astype(np.float32), clusters[k][1].numpy()) for k in weights}
        state = student.state_dict()
        others = {k: v.detach().numpy() for k, v in state.items() if k not in shared and k not in aliases}
        structure = list(candidate.info.get("structure", []))
        blob = encode(
            others, shared, meta={"structure": structure, "workload": dict(workload.ref), "aliases": aliases}
        )
        tmp = out_dir / (SHIPPED + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(out_dir / SHIPPED)
        # the shipped file must rebuild exactly the model we measured
        restored = load_shared(out_dir / SHIPPED, workload)
        for k, v in restored.state_dict().items():
            if not torch.equal(v, state[k]):
                raise CompressionError(
                    f"decoding {SHIPPED} does not reproduce {k}: the weight codec is broken"
                )
        root = candidate.lineage()[-1]
        report = size_report(blob)
        info = {
            "layers": plan,
            "shipped_file": SHIPPED,
            "shipped_bytes": len(blob),
            "original_bytes": root.size_bytes,
            "shipped_ratio_vs_original": root.size_bytes / len(blob),
            "codec": report,
            "finetune": training.to_json() if training is not None else None,
            "note": "model.slimw is the file to ship (codebooks + entropy-coded indices); model.safetensors is the "
            "runtime form with weights expanded to float32, which is what PyTorch and an ONNX export run.",
        }
        cand = save_torch_candidate(
            student,
            out_dir,
            name=f"shared{config.bits}b",
            workload=workload,
            parent=candidate,
            pass_name=self.name,
            pass_config=config.to_json_dict(),
            info=info,
        )
        return cand.with_info(runtime_bytes=cand.size_bytes).save()
