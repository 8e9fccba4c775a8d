"""The registry's metadata in SQL (SQLAlchemy 2): SQLite file by default, PostgreSQL by URL.

    models    name (unique), description, created
    versions  model, number (1, 2, 3… per model, gap-free), digest (sha256 of the manifest), manifest, format,
              stage (none / staging / production / archived), lineage (original model, parent version, recipe,
              run), measurements, tags, created
    events    what happened to a model or version, with its evidence (registered, stage changes, rollout decisions…)
    rollouts  a staged rollout of a candidate version against a baseline: policy, state, current stage — the
              server resumes it from here after a restart

Version numbers are taken inside the inserting transaction while the model's row is locked (PostgreSQL:
``SELECT … FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE`` takes the database's write lock), so concurrent
registrations from many processes get unique, gap-free numbers; versions are never deleted (archived instead).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    """Now in UTC as a naive datetime (how the registry stores timestamps in every SQL backend)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(default=utc_now)


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_version_number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    format: Mapped[str] = mapped_column(String(32))
    artifact: Mapped[str] = mapped_column(String(500))
    stage: Mapped[str] = mapped_column(String(16), default="none")
    original: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), nullable=True)
    candidate: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    run: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    measurements: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[datetime] = mapped_column(default=utc_now)


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(default=utc_now)


class RolloutRow(Base):
    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    served_as: Mapped[str] = mapped_column(String(200))
    candidate_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    baseline_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: running, paused, promoted, rolled_back, aborted
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[int] = mapped_column(Integer, default=0)
    stage_started: Mapped[datetime] = mapped_column(default=utc_now)
    reason: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(default=utc_now)
    updated: Mapped[datetime] = mapped_column(default=utc_now)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: NaN and ±Infinity are not JSON, and PostgreSQL's json
    type refuses them (SQLite would store them), so both databases hold the same standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any) -> str:
    """The registry's JSON serializer (see :func:`_finite`)."""
    return json.dumps(_finite(value), allow_nan=False)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60}, json_serializer=strict_json)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" below open transactions
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql(
                "BEGIN IMMEDIATE"
            )  # take the write lock up front: no read-then-upgrade races

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True, json_serializer=strict_json)
