"""The model registry: versions of models with lineage, stages and measurements, artifacts stored by content.

    reg = Registry("~/.local/share/slimship/registry")            # SQLite file inside the root
    reg = Registry(root, url="postgresql://user@127.0.0.1:5432/db") # metadata in PostgreSQL
    v = reg.register("runs/minilm-fast/steps/02-quantize-dynamic-…", "minilm", recipe=..., run=...)
    reg.set_stage("minilm", v.number, "production")               # the previous production version is archived
    cand = reg.fetch("minilm", "production")                       # a verified checkout, as a Candidate

A registration copies the candidate's files into the store first (blobs named by sha256, fsynced) and then
inserts the version and its event in one transaction: a writer killed at any point leaves either no new
version or a complete one whose files are all in the store. ``fetch`` re-hashes what it hands out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimship.errors import RegistryError, RolloutConflictError
from slimship.registry.store import ArtifactStore, crash_test_pause, manifest_digest

STAGES = ("none", "staging", "production", "archived")
ROLLOUT_ACTIVE = ("running", "paused")
ROLLOUT_STATES = (*ROLLOUT_ACTIVE, "promoted", "rolled_back", "aborted")


def default_root() -> Path:
    return Path(
        os.environ.get("SLIMSHIP_REGISTRY", Path.home() / ".local" / "share" / "slimship" / "registry")
    )


@dataclass(frozen=True)
class Version:
    model: str
    number: int
    digest: str
    format: str
    artifact: str
    stage: str
    created: str
    original: dict[str, Any]
    parent: int | None
    recipe: dict[str, Any] | None
    run: dict[str, Any] | None
    measurements: dict[str, Any]
    tags: dict[str, Any]
    files: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.model} v{self.number}"

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Registry:
    def __init__(self, root: str | os.PathLike[str] | None = None, url: str | None = None) -> None:
        from sqlalchemy.orm import sessionmaker

        from slimship.registry.db import Base, make_engine

        self.root = Path(root).expanduser() if root is not None else default_root()
        self.store = ArtifactStore(self.root)
        self.url = url or os.environ.get("SLIMSHIP_REGISTRY_URL") or f"sqlite:///{self.root / 'registry.db'}"
        try:
            self.engine = make_engine(self.url)
            from sqlalchemy import text

            with self.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE serialises this already
                if conn.dialect.name == "postgresql":
                    # processes opening a new database at once would race creating the tables
                    conn.execute(text("SELECT pg_advisory_xact_lock(7265717)"))
                Base.metadata.create_all(conn)
        except ModuleNotFoundError as err:
            raise RegistryError(
                f"the registry URL {self._safe_url()} needs a driver that isn't installed ({err.name}); "
                "for PostgreSQL: pip install 'slimship[postgres]'"
            ) from err
        except Exception as err:
            if type(err).__module__.startswith("sqlalchemy"):
                reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
                raise RegistryError(f"can't open the registry database {self._safe_url()}: {reason}") from err
            raise
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def _safe_url(self) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "(unparseable URL)"

    def close(self) -> None:
        self.engine.dispose()

    # ---- writing -------------------------------------------------------------------------------
    def register(
        self,
        candidate_dir: str | os.PathLike[str],
        model: str,
        *,
        parent: int | None = None,
        recipe: dict[str, Any] | None = None,
        run: dict[str, Any] | None = None,
        measurements: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
        stage: str = "none",
        description: str = "",
    ) -> Version:
        """Store a candidate directory as the next version of ``model`` (created on first use)."""
        import re

        from sqlalchemy import func, select
        from sqlalchemy.exc import IntegrityError, OperationalError

        from slimship.candidate import load_candidate
        from slimship.errors import SlimshipError
        from slimship.registry.db import EventRow, ModelRow, VersionRow

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}", model):
            raise RegistryError(
                f"model name {model!r} must be letters, digits, '_', '.', '-' (e.g. minilm-int8)"
            )
        if stage not in STAGES:
            raise RegistryError(f"stage {stage!r} is not one of {list(STAGES)}")
        src = Path(candidate_dir)
        try:
            cand = load_candidate(src)
            cand.verify_artifact()
        except SlimshipError as err:
            raise RegistryError(f"can't register {src}: {err}") from err
        manifest = self.store.put_dir(src)
        digest = manifest_digest(manifest)
        crash_test_pause("after_blobs")
        original = dict(cand.workload)
        root = cand.lineage()[-1]
        original.update({"original_candidate_id": root.id, "candidate_id": cand.id, "pass": cand.pass_name})
        for attempt in range(20):
            try:
                with self._session.begin() as s:
                    m = s.execute(
                        select(ModelRow).where(ModelRow.name == model).with_for_update()
                    ).scalar_one_or_none()
                    if m is None:
                        m = ModelRow(name=model, description=description)
                        s.add(m)
                        s.flush()
                    number = (
                        s.execute(
                            select(func.max(VersionRow.number)).where(VersionRow.model_id == m.id)
                        ).scalar()
                        or 0
                    ) + 1
                    parent_id = None
                    if parent is not None:
                        pv = self._row(s, m.id, parent)
                        if pv is None:
                            raise RegistryError(
                                f"parent version {parent} of {model!r} does not exist (latest: {number - 1})"
                            )
                        parent_id = pv.id
                    if stage == "production":
                        self._archive_production(s, m.id)
                    row = VersionRow(
                        model_id=m.id,
                        number=number,
                        digest=digest,
                        manifest=manifest,
                        format=cand.format,
                        artifact=cand.artifact,
                        stage=stage,
                        original=original,
                        parent_version_id=parent_id,
                        candidate=json.loads((src / "candidate.json").read_text()),
                        recipe=recipe,
                        run=run,
                        measurements=measurements or {},
                        tags=tags or {},
                    )
                    s.add(row)
                    s.flush()
                    s.add(
                        EventRow(
                            model_id=m.id,
                            version_id=row.id,
                            kind="registered",
                            detail={"digest": digest, "stage": stage, "source": str(src.resolve())},
                        )
                    )
                    probe = cand.info.get("probe")
                    if isinstance(probe, dict) and probe.get(
                        "cpu_class"
                    ):  # the host its probe figures come from
                        s.add(
                            EventRow(
                                model_id=m.id,
                                version_id=row.id,
                                kind="verified",
                                detail={
                                    "cpu_class": probe["cpu_class"],
                                    "where": "recorded when the candidate was made",
                                },
                            )
                        )
                    crash_test_pause("before_commit")
                return self.get(model, number)
            except IntegrityError:  # two first registrations of a new model raced on its name: go again
                if attempt == 19:
                    raise
            except (
                OperationalError
            ) as err:  # SQLite busy beyond its timeout, PostgreSQL serialization: go again
                if attempt == 19:
                    raise RegistryError(f"registering {model!r} kept failing on the database: {err}") from err
        raise AssertionError("unreachable")

    @staticmethod
    def _archive_production(s: Any, model_id: int) -> list[int]:
        from sqlalchemy import select

        from slimship.registry.db import EventRow, VersionRow

        prod = (
            s.execute(
                select(VersionRow).where(VersionRow.model_id == model_id, VersionRow.stage == "production")
            )
            .scalars()
            .all()
        )
        for v in prod:
            v.stage = "archived"
            s.add(
                EventRow(
                    model_id=model_id,
                    version_id=v.id,
                    kind="stage",
                    detail={
                        "from": "production",
                        "to": "archived",
                        "reason": "another version became production",
                    },
                )
            )
        return [v.number for v in prod]

    def set_stage(
        self, model: str, number: int, stage: str, *, reason: str = "", evidence: dict[str, Any] | None = None
    ) -> Version:
        """Move a version to a stage; making one production archives the current production version."""
        from sqlalchemy import select

        from slimship.registry.db import EventRow, ModelRow

        if stage not in STAGES:
            raise RegistryError(f"stage {stage!r} is not one of {list(STAGES)}")
        with self._session.begin() as s:
            m = s.execute(
                select(ModelRow).where(ModelRow.name == model).with_for_update()
            ).scalar_one_or_none()
            if m is None:
                raise RegistryError(self._unknown_model(s, model))
            v = self._existing_row(s, m.id, model, number)
            before = v.stage
            if stage == "production" and before != "production":
                self._archive_production(s, m.id)
            v.stage = stage
            s.add(
                EventRow(
                    model_id=m.id,
                    version_id=v.id,
                    kind="stage",
                    detail={
                        "from": before,
                        "to": stage,
                        "reason": reason,
                        **({"evidence": evidence} if evidence else {}),
                    },
                )
            )
        return self.get(model, number)

    def archive(self, model: str, number: int, reason: str = "") -> Version:
        return self.set_stage(model, number, "archived", reason=reason)

    def record_event(self, model: str, number: int | None, kind: str, detail: dict[str, Any]) -> None:
        """Append an event (e.g. a rollout decision with its evidence) to a model's history."""
        from sqlalchemy import select

        from slimship.registry.db import EventRow, ModelRow

        with self._session.begin() as s:
            m = s.execute(select(ModelRow).where(ModelRow.name == model)).scalar_one_or_none()
            if m is None:
                raise RegistryError(self._unknown_model(s, model))
            vid = None
            if number is not None:
                vid = self._existing_row(s, m.id, model, number).id
            s.add(EventRow(model_id=m.id, version_id=vid, kind=kind, detail=detail))

    # ---- rollouts ------------------------------------------------------------------------------
    def start_rollout(
        self,
        model: str,
        candidate: int,
        baseline: int,
        policy: dict[str, Any],
        *,
        served_as: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a new rollout of ``candidate`` against ``baseline`` (one active rollout per model)."""
        from sqlalchemy import select

        from slimship.registry.db import EventRow, ModelRow, RolloutRow

        with self._session.begin() as s:
            m = s.execute(
                select(ModelRow).where(ModelRow.name == model).with_for_update()
            ).scalar_one_or_none()
            if m is None:
                raise RegistryError(self._unknown_model(s, model))
            active = (
                s.execute(
                    select(RolloutRow).where(
                        RolloutRow.model_id == m.id, RolloutRow.state.in_(ROLLOUT_ACTIVE)
                    )
                )
                .scalars()
                .first()
            )
            if active is not None:
                raise RolloutConflictError(
                    f"{model!r} already has a {active.state} rollout (#{active.id}); abort it first "
                    f"(`slimship rollout abort {active.served_as}`)",
                    active.id,
                    active.state,
                )
            cand = self._existing_row(s, m.id, model, candidate)
            base = self._existing_row(s, m.id, model, baseline)
            if cand.id == base.id:
                raise RegistryError(
                    f"the candidate and the baseline are the same version ({model} v{candidate})"
                )
            row = RolloutRow(
                model_id=m.id,
                served_as=served_as or model,
                candidate_version_id=cand.id,
                baseline_version_id=base.id,
                policy=policy,
                state="running",
                stage=0,
            )
            s.add(row)
            s.flush()
            s.add(
                EventRow(
                    model_id=m.id,
                    version_id=cand.id,
                    kind="rollout.started",
                    detail={
                        "rollout": row.id,
                        "candidate": candidate,
                        "baseline": baseline,
                        "policy": policy,
                        **(detail or {}),
                    },
                )
            )
            rid = row.id
        return self.rollout(rid)

    def update_rollout(
        self,
        rollout_id: int,
        kind: str,
        evidence: dict[str, Any],
        *,
        state: str | None = None,
        stage: int | None = None,
        reason: str = "",
        expect_state: tuple[str, ...] = ROLLOUT_ACTIVE,
    ) -> dict[str, Any]:
        """Move a rollout (new stage and/or state) and store the decision with its evidence as one transaction."""
        from sqlalchemy import select

        from slimship.registry.db import EventRow, RolloutRow, utc_now

        if state is not None and state not in ROLLOUT_STATES:
            raise RegistryError(f"rollout state {state!r} is not one of {list(ROLLOUT_STATES)}")
        with self._session.begin() as s:
            row = s.execute(
                select(RolloutRow).where(RolloutRow.id == rollout_id).with_for_update()
            ).scalar_one_or_none()
            if row is None:
                raise RegistryError(f"no rollout #{rollout_id}")
            if row.state not in expect_state:
                raise RegistryError(
                    f"rollout #{rollout_id} is {row.state}; this needs it to be one of {list(expect_state)}"
                )
            if state is not None:
                row.state = state
            if stage is not None and stage != row.stage:
                row.stage = stage
                row.stage_started = utc_now()
            if reason:
                row.reason = reason
            row.updated = utc_now()
            s.add(
                EventRow(
                    model_id=row.model_id,
                    version_id=row.candidate_version_id,
                    kind=kind,
                    detail={
                        "rollout": row.id,
                        "stage": row.stage,
                        "state": row.state,
                        "reason": reason,
                        **evidence,
                    },
                )
            )
        return self.rollout(rollout_id)

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        from sqlalchemy import select

        from slimship.registry.db import RolloutRow

        with self._session() as s:
            row = s.execute(select(RolloutRow).where(RolloutRow.id == rollout_id)).scalar_one_or_none()
            if row is None:
                raise RegistryError(f"no rollout #{rollout_id}")
            return self._rollout_dict(s, row)

    def rollouts(self, model: str, active_only: bool = False) -> list[dict[str, Any]]:
        """A model's rollouts, newest first."""
        from sqlalchemy import select

        from slimship.registry.db import ModelRow, RolloutRow

        with self._session() as s:
            m = s.execute(select(ModelRow).where(ModelRow.name == model)).scalar_one_or_none()
            if m is None:
                raise RegistryError(self._unknown_model(s, model))
            q = select(RolloutRow).where(RolloutRow.model_id == m.id).order_by(RolloutRow.id.desc())
            if active_only:
                q = q.where(RolloutRow.state.in_(ROLLOUT_ACTIVE))
            return [self._rollout_dict(s, r) for r in s.execute(q).scalars()]

    @staticmethod
    def _rollout_dict(s: Any, row: Any) -> dict[str, Any]:
        from sqlalchemy import select

        from slimship.registry.db import ModelRow, VersionRow

        num = lambda vid: s.execute(select(VersionRow.number).where(VersionRow.id == vid)).scalar()  # noqa: E731
        return {
            "id": row.id,
            "model": s.execute(select(ModelRow.name).where(ModelRow.id == row.model_id)).scalar(),
            "served_as": row.served_as,
            "candidate": num(row.candidate_version_id),
            "baseline": num(row.baseline_version_id),
            "policy": row.policy,
            "state": row.state,
            "stage": row.stage,
            "stage_started": row.stage_started.isoformat(timespec="milliseconds"),
            "reason": row.reason,
            "created": row.created.isoformat(timespec="seconds"),
            "updated": row.updated.isoformat(timespec="seconds"),
        }

    # ---- reading -------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        from sqlalchemy import func, select

        from slimship.registry.db import ModelRow, VersionRow

        with self._session() as s:
            rows = s.execute(
                select(ModelRow, func.count(VersionRow.id), func.max(VersionRow.number))
                .join(VersionRow, VersionRow.model_id == ModelRow.id, isouter=True)
                .group_by(ModelRow.id)
                .order_by(ModelRow.name)
            ).all()
            out = []
            for m, count, latest in rows:
                prod = s.execute(
                    select(VersionRow.number).where(
                        VersionRow.model_id == m.id, VersionRow.stage == "production"
                    )
                ).scalar()
                out.append(
                    {
                        "name": m.name,
                        "versions": count,
                        "latest": latest,
                        "production": prod,
                        "description": m.description,
                        "created": m.created.isoformat(timespec="seconds"),
                    }
                )
            return out

    def versions(self, model: str) -> list[Version]:
        from sqlalchemy import select

        from slimship.registry.db import ModelRow, VersionRow

        with self._session() as s:
            m = s.execute(select(ModelRow).where(ModelRow.name == model)).scalar_one_or_none()
            if m is None:
                raise RegistryError(self._unknown_model(s, model))
            rows = (
                s.execute(select(VersionRow).where(VersionRow.model_id == m.id).order_by(VersionRow.number))
                .scalars()
                .all()
            )
            return [self._version(s, model, r) for r in rows]

    def get(self, model: str, ref: int | str = "latest") -> Version:
        """A version by number, or by stage (``production``, ``staging``) or ``latest``."""
        from sqlalchemy import select

        from slimship.registry.db import ModelRow, VersionRow

        with self._session() as s:
            m = s.execute(select(ModelRow).where(ModelRow.name == model)).scalar_one_or_none()
            if m is None:
                raise RegistryError(self._unknown_model(s, model))
            q = select(VersionRow).where(VersionRow.model_id == m.id)
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                row = s.execute(q.where(VersionRow.number == int(ref))).scalar_one_or_none()
                missing = f"{model!r} has no version {ref}; versions: {self._numbers(s, m.id)}"
            elif ref == "latest":
                row = s.execute(q.order_by(VersionRow.number.desc()).limit(1)).scalar_one_or_none()
                missing = f"{model!r} has no versions yet"
            elif ref in ("production", "staging"):
                row = s.execute(
                    q.where(VersionRow.stage == ref).order_by(VersionRow.number.desc()).limit(1)
                ).scalar_one_or_none()
                missing = f"{model!r} has no {ref} version; stages: " + ", ".join(
                    f"v{v.number} {v.stage}" for v in s.execute(q.order_by(VersionRow.number)).scalars()
                )
            else:
                raise RegistryError(
                    f"version reference {ref!r}: give a number, 'latest', 'production' or 'staging'"
                )
            if row is None:
                raise RegistryError(missing)
            return self._version(s, model, row)

    def events(
        self, model: str, number: int | None = None, prefix: str | None = None
    ) -> list[dict[str, Any]]:
        """A model's history, oldest first (``prefix``: only kinds starting with it, e.g. ``rollout.``)."""
        from sqlalchemy import select

        from slimship.registry.db import EventRow, ModelRow, VersionRow

        with self._session() as s:
            m = s.execute(select(ModelRow).where(ModelRow.name == model)).scalar_one_or_none()
            if m is None:
                raise RegistryError(self._unknown_model(s, model))
            q = (
                select(EventRow, VersionRow.number)
                .join(VersionRow, EventRow.version_id == VersionRow.id, isouter=True)
                .where(EventRow.model_id == m.id)
                .order_by(EventRow.id)
            )
            if number is not None:
                q = q.where(VersionRow.number == number)
            if prefix:
                q = q.where(EventRow.kind.startswith(prefix))
            return [
                {"at": e.at.isoformat(timespec="seconds"), "version": n, "kind": e.kind, "detail": e.detail}
                for e, n in s.execute(q).all()
            ]

    def verified_on(self, model: str, number: int) -> list[str]:
        """The CPU classes a version's probe has held on: where it was made, and every serving host that verified it."""
        return sorted(
            {
                str(e["detail"].get("cpu_class"))
                for e in self.events(model, number)
                if e["kind"] == "verified" and e["detail"].get("cpu_class")
            }
        )

    def fetch(self, model: str, ref: int | str = "production") -> Any:
        """The version's candidate from a verified checkout (every file re-hashed); refuses any mismatch."""
        from slimship.candidate import load_candidate

        v = self.get(model, ref)
        path = self.store.checkout({"files": v.files}, v.label)
        return load_candidate(path)

    def gc(self, grace_seconds: float = 3600.0) -> dict[str, int]:
        """Delete blobs and checkouts no version references (and leftovers of killed writers)."""
        from sqlalchemy import select

        from slimship.registry.db import VersionRow

        with self._session() as s:
            manifests = s.execute(select(VersionRow.manifest, VersionRow.digest)).all()
        keep = {f["sha256"] for man, _ in manifests for f in man["files"].values()}
        out = self.store.gc(keep, grace_seconds)
        out["checkouts_removed"] = self.store.drop_checkouts({d for _, d in manifests})
        return out

    # ---- helpers -------------------------------------------------------------------------------
    def _version(self, s: Any, model: str, r: Any) -> Version:
        from sqlalchemy import select

        from slimship.registry.db import VersionRow

        parent = (
            s.execute(select(VersionRow.number).where(VersionRow.id == r.parent_version_id)).scalar()
            if r.parent_version_id
            else None
        )
        return Version(
            model=model,
            number=r.number,
            digest=r.digest,
            format=r.format,
            artifact=r.artifact,
            stage=r.stage,
            created=r.created.isoformat(timespec="seconds"),
            original=r.original,
            parent=parent,
            recipe=r.recipe,
            run=r.run,
            measurements=r.measurements,
            tags=r.tags,
            files=r.manifest["files"],
        )

    @staticmethod
    def _row(s: Any, model_id: int, number: int) -> Any:
        from sqlalchemy import select

        from slimship.registry.db import VersionRow

        return s.execute(
            select(VersionRow).where(VersionRow.model_id == model_id, VersionRow.number == number)
        ).scalar_one_or_none()

    def _existing_row(self, s: Any, model_id: int, model: str, number: int) -> Any:
        row = self._row(s, model_id, number)
        if row is None:
            raise RegistryError(f"{model!r} has no version {number}; versions: {self._numbers(s, model_id)}")
        return row

    @staticmethod
    def _numbers(s: Any, model_id: int) -> list[int]:
        from sqlalchemy import select

        from slimship.registry.db import VersionRow

        return list(
            s.execute(
                select(VersionRow.number).where(VersionRow.model_id == model_id).order_by(VersionRow.number)
            ).scalars()
        )

    @staticmethod
    def _unknown_model(s: Any, model: str) -> str:
        import difflib

        from sqlalchemy import select

        from slimship.registry.db import ModelRow

        names = list(s.execute(select(ModelRow.name)).scalars())
        close = difflib.get_close_matches(model, names, n=3)
        return f"no model {model!r} in the registry" + (
            f"; did you mean {close}?" if close else f"; models: {sorted(names)}"
        )
