"""What replicated ingresses share (``slimship serve --ray --ingress-replicas N``): one owner, every replica asks it.

    ingress replica 1 ─┐  answered(ids, version)       ┌─ A/B: which version answered which id, outcomes, tallies
    ingress replica 2 ─┼─ window_add / agreement ─────►│  IngressState   rollouts: published record + epoch, windows
           …           │  claim(window) · publish      │  (one Ray actor, ├─ traffic policies (with a generation)
                       └─ policies() · rollouts() ◄────┘  serial calls)  └─ shadow comparison counts

A replica routes, validates, runs and measures requests itself, exactly as a single server does; what must not
diverge lives in :class:`IngressState` alone:

- **A/B**: every answered request is reported (awaited, before the client gets its answer, so feedback sent to any
  replica finds its id) — the tallies and outcomes are the clients' own counts, not a sum of estimates;
- **rollouts**: observations of a stage go to one window per ``(rollout, epoch)``; each replica judges the merged
  window, and a decision is taken by the one replica whose :meth:`IngressState.claim` wins — it writes the registry
  and publishes the new record; the others adopt it (traffic follows the record's stage) on their next sync.
  Promotion and rollback therefore happen once, whichever replica judged first. Once claimed, a window is frozen;
  late observations of it are dropped;
- **traffic policies** set through the admin API carry a generation; a replica adopts a newer one on its next sync
  (every rollout tick, 0.25 s by default). Sticky routing hashes the key, so equal policies route a key alike;
- **shadow comparisons** are counted here too;
- **versions loaded and unloaded at run time** (admin load / unload): a log of changes every replica applies on its
  next sync (a load deploys the model application once, from the replica that got the request; the others attach
  to it). One replica at a time may load or unload a (model, version) (:meth:`IngressState.reserve_version`), and
  an unloaded version's application is deleted only once every replica has applied the unload (:meth:`applied`),
  so no replica sends requests to an application that is gone.

Per replica (each sees its share of the traffic; a scrape reaches one replica): /metrics, the statistics extension,
live dashboard figures, drift monitors, the compare-runs-in-flight cap.
"""

from __future__ import annotations

import math
from typing import Any

from slimship.serve.abtest import FeedbackStore
from slimship.serve.compare import Agreement, ShadowStats
from slimship.serve.gates import Window
from slimship.serve.protocol import ProtocolError

#: a rollout window's key: (rollout id, epoch); the epoch changes whenever the window starts afresh
WindowKey = tuple[int, int]


class IngressState:
    """The shared state itself: plain Python whose methods run one at a time (the body of one Ray actor)."""

    def __init__(self, max_ids: int = 200_000) -> None:
        self.feedback = FeedbackStore(max_ids=max_ids)
        self._policies: dict[str, tuple[int, dict[str, Any]]] = {}
        self._generation = 0
        self._rollouts: dict[str, dict[str, Any]] = {}  # model → {"record": …, "epoch": …, "seq": …}
        self._seq = 0  # every published change; an epoch is the sequence number of the change that opened it
        self._windows: dict[WindowKey, Window] = {}
        self._claimed: set[Any] = set()
        self._shadow: dict[tuple[str, str], ShadowStats] = {}
        #: run-time version changes, in order: (sequence number, "load" | "unload", model, version, load spec)
        self._changes: list[tuple[int, str, str, str, dict[str, Any] | None]] = []
        self._change_seq = 0
        self._busy: set[tuple[str, str]] = set()  # being loaded or unloaded by a replica
        self._loaded: set[tuple[str, str]] = set()  # loaded at run time (and not unloaded since)
        self._applied: dict[str, int] = {}  # replica → the last version change it applied

    # ---- A/B ---------------------------------------------------------------------------------
    def answered(self, model: str, version: str, ids: list[str]) -> None:
        self.feedback.count(model, version)
        for i in ids:
            self.feedback.remember(model, i, version)

    def record(self, model: str, request_id: str, outcome: Any, metric: str) -> tuple[Any, ...]:
        """("ok", version), or ("error", status, message) for the caller to raise (kept out of Ray's wrapping)."""
        try:
            return ("ok", self.feedback.record(model, request_id, outcome, metric))
        except ProtocolError as err:
            return ("error", err.status, str(err))

    def summary(self, model: str, control: str | None, alpha: float, min_samples: int) -> dict[str, Any]:
        return self.feedback.summary(model, control, alpha, min_samples)

    def tallies(self, model: str) -> dict[str, int]:
        return self.feedback.tallies(model)

    # ---- traffic -----------------------------------------------------------------------------
    def set_policy(self, model: str, policy: dict[str, Any]) -> int:
        self._generation += 1
        self._policies[model] = (self._generation, policy)
        return self._generation

    def policies(self) -> dict[str, tuple[int, dict[str, Any]]]:
        return dict(self._policies)

    # ---- rollouts ----------------------------------------------------------------------------
    def publish(self, model: str, record: dict[str, Any], fresh_window: bool) -> tuple[int, int]:
        """A replica changed a rollout (started, advanced, paused, ended …): store its record; ``fresh_window``
        starts a new window (a new epoch). Returns (epoch, sequence number of this change)."""
        current = self._rollouts.get(model)
        self._seq += 1
        if fresh_window or current is None or current["record"]["id"] != record["id"]:
            epoch = self._seq
            if current is not None:  # the window it replaces is judged already (or abandoned)
                self._windows.pop((int(current["record"]["id"]), int(current["epoch"])), None)
            self._windows[(int(record["id"]), epoch)] = Window()
        else:
            epoch = int(current["epoch"])
        self._rollouts[model] = {"record": record, "epoch": epoch, "seq": self._seq}
        return epoch, self._seq

    def rollouts(self) -> dict[str, dict[str, Any]]:
        return dict(self._rollouts)

    def _window(self, key: WindowKey) -> Window | None:
        return None if key in self._claimed else self._windows.get(key)

    def window_add(self, key: WindowKey, side: str, ok: bool, ms: float | None, live: bool) -> None:
        w = self._window(key)
        if w is not None:
            getattr(w, side).add(ok, ms, live)

    def window_shed(self, key: WindowKey, side: str) -> None:
        w = self._window(key)
        if w is not None:
            getattr(w, side).shed += 1

    def window_agreement(self, key: WindowKey, value: float, judge: str) -> None:
        w = self._window(key)
        if w is not None:
            w.add_agreement(Agreement(value, judge))

    def window(self, key: WindowKey) -> Window | None:
        return self._windows.get(key)

    def claim(self, key: Any) -> bool:
        """True for the first caller only: that replica takes the decision (a window's, or any one-off action)."""
        if key in self._claimed:
            return False
        self._claimed.add(key)
        return True

    # ---- versions loaded / unloaded at run time ----------------------------------------------
    def reserve_version(self, op: str, model: str, version: str) -> bool:
        """True for the one replica that may ``op`` ("load" / "unload") (model, version) now: False while another
        replica loads or unloads it, and for a load of a version loaded at run time already (through any replica)."""
        key = (model, version)
        if key in self._busy or (op == "load" and key in self._loaded):
            return False
        self._busy.add(key)
        return True

    def release_version(self, model: str, version: str) -> None:
        """A load or unload is over (done or failed): (model, version) is free for the next one."""
        self._busy.discard((model, version))

    def version_change(self, op: str, model: str, version: str, spec: dict[str, Any] | None) -> int:
        """Record a load (``spec``: how to attach to it) or an unload done by a replica; returns its sequence number."""
        (self._loaded.add if op == "load" else self._loaded.discard)((model, version))
        self._change_seq += 1
        self._changes.append((self._change_seq, op, model, version, spec))
        return self._change_seq

    def version_changes(self, after: int) -> list[tuple[int, str, str, str, dict[str, Any] | None]]:
        """The version changes after sequence number ``after``, in order."""
        return [c for c in self._changes if c[0] > after]

    def applied(self, replica: str, seq: int) -> None:
        """``replica`` has applied every version change up to ``seq``."""
        self._applied[replica] = max(seq, self._applied.get(replica, 0))

    def replicas_applied(self, seq: int) -> int:
        """How many replicas have applied the version changes up to ``seq``."""
        return sum(1 for s in self._applied.values() if s >= seq)

    # ---- shadow ------------------------------------------------------------------------------
    def shadow_add(self, model: str, version: str, value: float | None, judge: str = "") -> None:
        stats = self._shadow.setdefault((model, version), ShadowStats())
        if value is None or not math.isfinite(value):
            stats.errors += 1
        else:
            stats.add(Agreement(value, judge))

    def shadow_stats(self, model: str) -> dict[str, dict[str, Any]]:
        return {v: s.as_dict() for (m, v), s in sorted(self._shadow.items()) if m == model}


class SharedState:
    """A replica's view of :class:`IngressState` through an actor handle: ``await call(name, …)`` for what the
    replica must know the answer of, ``send(name, …)`` for reports it need not wait for (Ray keeps one caller's
    calls in order)."""

    def __init__(self, handle: Any, replica: str, replicas: int = 2) -> None:
        #: ``replicas``: how many ingress replicas the deployment has (an unload waits for all of them)
        self.handle, self.replica, self.replicas = handle, replica, replicas

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)

    def send(self, method: str, *args: Any) -> None:
        getattr(self.handle, method).remote(*args)
