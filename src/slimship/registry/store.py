"""Content-addressed artifact store: every file is a blob named by its sha256.

    <root>/objects/ab/abcdef…      blobs (immutable, shared by every version that holds the same bytes)
    <root>/tmp/                    files being written (renamed into objects/ only when complete)
    <root>/checkout/<digest>/      verified copies of versions, materialised for runtimes to open

A candidate directory becomes a *manifest* — ``{relative path: {"sha256", "size"}}`` — whose own sha256 is the
version's digest. A blob lands under its final name only after its bytes are written, flushed, fsynced and
hashed, so a writer killed at any moment leaves at most a stray file in tmp/ (``gc`` removes it) and never a
blob whose name lies about its content. Reading verifies: a checkout is re-hashed before it is handed out and
any mismatch is refused with a :class:`~slimship.errors.RegistryError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from slimship.errors import RegistryError

_CHUNK = 1 << 20
#: files of a candidate directory that are not part of the model (caches written after the fact)
_SKIP_PREFIXES = ("evaluation", ".")


def manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.checkouts = self.root / "checkout"
        for d in (self.objects, self.tmp, self.checkouts):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha: str) -> Path:
        return self.objects / sha[:2] / sha

    def put_file(self, src: Path) -> tuple[str, int]:
        """Copy one file in; returns (sha256, size). Idempotent: known content is not written twice."""
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                    crash_test_pause("mid_blob")
                out.flush()
                os.fsync(out.fileno())
            sha = h.hexdigest()
            dest = self.blob_path(sha)
            if dest.exists():
                tmp.unlink()
                os.utime(
                    dest
                )  # fresh again: a concurrent gc's grace period protects it until our row commits
            else:
                dest.parent.mkdir(exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, dest)
            return sha, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_dir(self, src: Path) -> dict[str, Any]:
        """Every model file of a candidate directory, as a manifest (evaluation caches are left out)."""
        files: dict[str, Any] = {}
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src).as_posix()
            if rel.split("/")[0].startswith(_SKIP_PREFIXES) or rel.endswith(".tmp"):
                continue
            sha, size = self.put_file(path)
            files[rel] = {"sha256": sha, "size": size}
        if not files:
            raise RegistryError(f"{src} holds no files to register")
        return {"files": files}

    def missing(self, manifest: dict[str, Any]) -> list[str]:
        return [rel for rel, f in manifest["files"].items() if not self.blob_path(f["sha256"]).exists()]

    def checkout(self, manifest: dict[str, Any], label: str) -> Path:
        """A verified directory holding the manifest's files (built once, re-verified on every call)."""
        digest = manifest_digest(manifest)
        dest = self.checkouts / digest
        if dest.exists():
            self.verify_dir(dest, manifest, label)
            return dest
        staging = Path(tempfile.mkdtemp(dir=self.tmp, prefix="checkout-"))
        try:
            for rel, f in manifest["files"].items():
                blob = self.blob_path(f["sha256"])
                if not blob.exists():
                    raise RegistryError(
                        f"{label}: the blob of {rel} ({f['sha256'][:12]}…) is missing from {self.objects}; "
                        "the store was pruned or damaged outside slimship — re-register the model"
                    )
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(blob, target)
            self.verify_dir(staging, manifest, label)
            try:
                os.replace(staging, dest)
            except OSError:  # another process checked it out first: theirs is as good
                shutil.rmtree(staging, ignore_errors=True)
                self.verify_dir(dest, manifest, label)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest

    def verify_dir(self, path: Path, manifest: dict[str, Any], label: str) -> None:
        for rel, f in manifest["files"].items():
            p = path / rel
            if not p.is_file():
                raise RegistryError(
                    f"{label}: {rel} is missing from {path}; refusing to serve an incomplete artifact"
                )
            sha, size = _hash_file(p)
            if sha != f["sha256"] or size != f["size"]:
                raise RegistryError(
                    f"{label}: {p} does not match the registered sha256 (expected {f['sha256'][:16]}…, {f['size']} bytes; "
                    f"found {sha[:16]}…, {size} bytes); refusing to serve it. The file was changed after registration: "
                    f"delete {path} to check it out again from the store, or re-register the model"
                )

    def gc(self, keep: set[str], grace_seconds: float = 3600.0) -> dict[str, int]:
        """Remove blobs no version references (``keep``: their sha256s) and leftovers in tmp/ of killed writers.
        Only files older than ``grace_seconds`` go, so a registration in flight (blobs written, row not yet
        committed) is never robbed."""
        import time

        cutoff = time.time() - grace_seconds
        removed = freed = 0
        for d in self.objects.iterdir():
            for blob in d.iterdir():
                st = blob.stat()
                if blob.name not in keep and st.st_mtime <= cutoff:
                    freed += st.st_size
                    blob.unlink()
                    removed += 1
        stale = 0
        for t in self.tmp.iterdir():
            if t.stat().st_mtime <= cutoff:
                shutil.rmtree(t, ignore_errors=True) if t.is_dir() else t.unlink(missing_ok=True)
                stale += 1
        return {"blobs_removed": removed, "bytes_freed": freed, "tmp_removed": stale}

    def drop_checkouts(self, keep_digests: set[str]) -> int:
        n = 0
        for d in self.checkouts.iterdir():
            if d.name not in keep_digests:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n


def crash_test_pause(point: str) -> None:
    """A seam for the crash tests: with SLIMSHIP_REGISTRY_PAUSE=<point>, say so on stderr and wait to be killed."""
    if os.environ.get("SLIMSHIP_REGISTRY_PAUSE") == point:
        import sys
        import time

        print(f"paused at {point}", file=sys.stderr, flush=True)
        time.sleep(3600)
