"""The server's dashboard: one self-contained page (no CDN, no fonts, works offline) at ``/dashboard`` that polls
``/v2/dashboard/state`` every second. Reading is open like ``/metrics``; actions (traffic, rollout pause/resume/abort)
go to the admin API with the bearer token typed into the page (kept in the tab's sessionStorage only)."""

from __future__ import annotations

import asyncio
import time
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimship.serve.server import Server


@cache
def page() -> str:
    return resources.files("slimship.serve").joinpath("static/dashboard.html").read_text(encoding="utf-8")


async def state(server: Server) -> dict[str, Any]:
    from slimship import __version__

    models = []
    for name, group in sorted(server.models.items()):
        versions = []
        for v, share in group.shares().items():
            ep = group.versions[v]
            drift = ep.drift
            versions.append(
                {
                    "version": v,
                    "ready": ep.ready,
                    "stage": ep.source.get("stage"),
                    "registry": ep.source.get("registry"),
                    "registry_version": ep.source.get("version"),
                    "path": ep.source.get("path"),
                    "traffic_percent": round(share, 2),
                    "queue": ep.queue_depth,
                    "live": server.live.snapshot(name, v),
                    "drift": drift.snapshot() if drift is not None else None,
                }
            )
        try:
            rollout = await server.rollouts.status_with_history(name)
        except Exception as err:  # the registry may be unreachable: show that, keep the page alive
            rollout = {**server.rollouts.status(name), "history_error": str(err)}
        models.append(
            {
                "name": name,
                "versions": versions,
                "traffic": group.policy.model_dump(),
                "shadow": await server.shadow_summary(name),
                "rollout": rollout,
                "abtest": (await server.feedback_summary(name))[0],
            }
        )
    await asyncio.sleep(0)
    return {
        "server": {
            "name": "slimship",
            "version": __version__,
            "time": time.time(),
            "uptime_s": round(time.time() - server.created, 1),
            "admin": server.admin_token is not None,
            "registry": server.registry is not None,
        },
        "models": models,
    }
