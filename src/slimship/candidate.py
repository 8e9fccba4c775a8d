"""Candidates: immutable records of one model artifact, where it came from and what was measured.

A candidate lives in its own directory::

    <dir>/candidate.json    metadata: id, format, artifact, workload ref, parent, pass + config, info
    <dir>/model.onnx        or model.safetensors for PyTorch candidates, or model.xml + model.bin (OpenVINO IR),
                            or model.pte (an ExecuTorch program)

Passes never mutate their input: each writes a new directory. PyTorch artifacts are safetensors
state dicts loaded into the workload's architecture (never a pickle).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slimship._util import sha256_file, sha256_text, stable_json, write_json_atomic
from slimship.errors import CandidateError

if TYPE_CHECKING:
    import torch

    from slimship.workload import Workload

SCHEMA = "slimship.candidate/1"
Format = Literal["torch", "onnx", "openvino", "executorch"]


@dataclass(frozen=True)
class Candidate:
    path: Path
    id: str
    name: str
    format: Format
    artifact: str
    workload: dict[str, Any]
    artifact_sha256: str
    parent_id: str | None = None
    parent_path: str | None = None
    pass_name: str | None = None
    pass_config: dict[str, Any] | None = None
    created: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact_path(self) -> Path:
        return self.path / self.artifact

    @property
    def size_bytes(self) -> int:
        """Bytes of the artifact plus any ONNX external-data files next to it."""
        total = self.artifact_path.stat().st_size
        for ext in self.info.get("external_data_files", []):
            total += (self.path / ext).stat().st_size
        return total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return {"schema": SCHEMA, **d}

    def save(self) -> Candidate:
        write_json_atomic(self.path / "candidate.json", self.to_dict())
        return self

    def with_info(self, **updates: Any) -> Candidate:
        """A copy with ``info`` extended (the directory's metadata is rewritten by ``save``)."""
        return replace(self, info={**self.info, **updates})

    def lineage(self) -> list[Candidate]:
        """This candidate and its ancestors, newest first, as far as their directories exist."""
        chain: list[Candidate] = [self]
        seen = {self.id}
        cur = self
        while cur.parent_path:
            parent_dir = Path(cur.parent_path)
            if not (parent_dir / "candidate.json").exists():
                break
            cur = load_candidate(parent_dir)
            if cur.id in seen:
                raise CandidateError(f"candidate lineage loops at {cur.id} ({parent_dir})")
            seen.add(cur.id)
            chain.append(cur)
        return chain

    def verify_artifact(self) -> None:
        """The artifact's bytes (and its companion files', e.g. an OpenVINO IR's .bin) are the recorded ones."""
        recorded = {self.artifact: self.artifact_sha256, **self.info.get("companion_sha256", {})}
        for rel, sha in recorded.items():
            path = self.path / rel
            if not path.is_file():
                raise CandidateError(f"candidate {self.id}: {path} is missing")
            actual = sha256_file(path)
            if actual != sha:
                raise CandidateError(
                    f"artifact {path} has sha256 {actual[:16]}… but candidate.json records "
                    f"{sha[:16]}…: the file was changed or corrupted after it was written"
                )


def new_candidate(
    out_dir: Path,
    *,
    name: str,
    format: Format,
    artifact: str,
    workload: Workload,
    parent: Candidate | None = None,
    pass_name: str | None = None,
    pass_config: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Candidate:
    """Record an artifact already written in ``out_dir`` as a candidate and save its metadata."""
    artifact_sha = sha256_file(out_dir / artifact)
    # companion files (an OpenVINO IR's weights) are part of the identity; candidates without them keep their ids
    companions = [stable_json(info["companion_sha256"])] if info and "companion_sha256" in info else []
    cid = sha256_text(artifact_sha, stable_json(pass_config or {}), parent.id if parent else "", *companions)[
        :12
    ]
    cand = Candidate(
        path=out_dir.resolve(),
        id=f"{name}-{cid}",
        name=name,
        format=format,
        artifact=artifact,
        workload=dict(workload.ref),
        artifact_sha256=artifact_sha,
        parent_id=parent.id if parent else None,
        parent_path=str(parent.path) if parent else None,
        pass_name=pass_name,
        pass_config=pass_config,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        info=dict(info or {}),
    )
    return cand.save()


def load_candidate(path: str | Path) -> Candidate:
    """Load a candidate from its directory (or from its candidate.json)."""
    p = Path(path)
    meta = p / "candidate.json" if p.is_dir() else p
    if not meta.exists():
        raise CandidateError(
            f"{p} is not a candidate: no candidate.json there. A candidate directory is what "
            "`slimship export` or a pass writes (e.g. runs/quickstart-minilm/exported)."
        )
    try:
        data = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CandidateError(f"can't read candidate metadata {meta}: {err}") from err
    if data.get("schema") != SCHEMA:
        raise CandidateError(f"{meta} has schema {data.get('schema')!r}; this slimship reads {SCHEMA!r}")
    data.pop("schema")
    try:
        cand = Candidate(path=meta.parent.resolve(), **data)
    except TypeError as err:
        raise CandidateError(f"{meta} is not valid candidate metadata: {err}") from err
    if not cand.artifact_path.exists():
        raise CandidateError(f"candidate {cand.id}: artifact {cand.artifact_path} is missing")
    return cand


def original_candidate(workload: Workload, out_dir: str | Path) -> Candidate:
    """The unmodified model as a candidate: a safetensors state dict (PyTorch) or a copy of the ONNX file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if workload.has_torch_model:
        from safetensors.torch import save_model

        model = workload.build_model()
        tmp = out / ".model.safetensors.tmp"
        save_model(model, str(tmp))
        tmp.replace(out / "model.safetensors")
        n_params = sum(p.numel() for p in model.parameters())
        return new_candidate(
            out,
            name="original",
            format="torch",
            artifact="model.safetensors",
            workload=workload,
            info={"parameters": n_params, "note": "the unmodified reference model"},
        )
    src = workload.original_onnx()
    if src is None:  # pragma: no cover - a workload has one or the other
        raise CandidateError(f"workload {workload.name} has neither a PyTorch model nor an ONNX file")
    from slimship.workload.onnx_import import import_onnx_file

    shutil.copyfile(src, out / "model.onnx")
    imported = import_onnx_file(out / "model.onnx")
    return new_candidate(
        out,
        name="original",
        format="onnx",
        artifact="model.onnx",
        workload=workload,
        info={"import": imported} if imported else None,
    )


def load_torch_model(candidate: Candidate, workload: Workload) -> torch.nn.Module:
    """Rebuild a PyTorch candidate: the workload's architecture, with the architecture edits recorded in
    ``info["structure"]`` replayed (pruning, depth pruning, factorisation), loaded with the candidate's weights."""
    if candidate.format != "torch":
        raise CandidateError(f"candidate {candidate.id} is {candidate.format}, not a PyTorch model")
    from safetensors import safe_open
    from safetensors.torch import load_model

    from slimship.structure import rebuild

    path = str(candidate.artifact_path)
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        model = rebuild(workload.build_model(), candidate.info.get("structure", []), shapes)
        missing, unexpected = load_model(model, path, strict=False)
    except CandidateError as err:
        raise CandidateError(f"can't load {path} into {workload.name}'s model: {err}") from err
    except Exception as err:
        raise CandidateError(f"can't load weights {path} into {workload.name}'s model: {err}") from err
    if missing or unexpected:
        raise CandidateError(
            f"weights {path} don't fit {workload.name}'s model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()


def save_torch_candidate(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    name: str,
    workload: Workload,
    parent: Candidate,
    pass_name: str,
    pass_config: dict[str, Any],
    edits: list[dict[str, Any]] | None = None,
    info: dict[str, Any] | None = None,
) -> Candidate:
    """Write a (possibly restructured) PyTorch model as a candidate: safetensors weights plus the parent's
    architecture edits followed by ``edits``. The model is reloaded from the file and compared, so a
    candidate that can't be rebuilt is never written."""
    import torch
    from safetensors.torch import save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".model.safetensors.tmp"
    save_model(model, str(tmp))
    tmp.replace(out_dir / "model.safetensors")
    structure = list(parent.info.get("structure", [])) + list(edits or [])
    n_params = sum(p.numel() for p in model.parameters())
    cand = new_candidate(
        out_dir,
        name=name,
        format="torch",
        artifact="model.safetensors",
        workload=workload,
        parent=parent,
        pass_name=pass_name,
        pass_config=pass_config,
        info={**(info or {}), "parameters": n_params, "structure": structure},
    )
    rebuilt = load_torch_model(cand, workload)
    with torch.no_grad():
        for (k, a), (_, b) in zip(
            sorted(model.state_dict().items()), sorted(rebuilt.state_dict().items()), strict=True
        ):
            if a.shape != b.shape or not torch.equal(a, b):
                raise CandidateError(
                    f"rebuilt model differs from the saved one at {k}: the architecture edits are incomplete"
                )
    return cand
