"""Connecting to Ray, shared by the search (``tune --executor ray``) and the server (``serve --ray``).

A local instance is always slimship's own (``ray.init(address="local")``: a bare ``ray.init()`` joins any
cluster already running on the machine) and binds to 127.0.0.1; a remote address is probed with a TCP connect
and a timeout first, because ``ray.init`` waits far longer on a dead address.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from slimship.errors import ConfigError, ExecutorError

__all__ = ["CONNECT_TIMEOUT_S", "connect", "parse_address"]

CONNECT_TIMEOUT_S = 5.0


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) to probe, or None for ``auto``; a ConfigError for anything else."""
    if address == "auto":
        return None
    rest, default_port = (
        (address[len("ray://") :], 10001) if address.startswith("ray://") else (address, None)
    )
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, ""
    if not host or ("://" in host) or (port == "" and default_port is None) or (port and not port.isdigit()):
        raise ConfigError(
            f"--address {address!r} is not a Ray address; expected host:port of the head node's GCS "
            "(e.g. 10.0.0.5:6379), ray://host:10001 (Ray Client) or auto"
        )
    return host.strip("[]"), int(port) if port else int(default_port or 0)


def connect(ray: Any, address: str | None, log: Callable[[str], None]) -> bool:
    """Connect this process to Ray (or start a local instance); True when it did (so the search disconnects after)."""
    if address is None and ray.is_initialized():
        log("using this process's existing Ray connection")
        return False
    if address is None:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:  # Ray was imported before import_ray(local=True) could say so
            log(
                "note: Ray was imported with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset, so some of its ports may listen on "
                "every interface; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to keep a local instance on 127.0.0.1"
            )
        log("starting a local Ray instance (127.0.0.1)")
        # address="local": always a new instance (a bare ray.init() would join any cluster already on this machine)
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
        return True
    target = parse_address(address)
    if target is None:  # auto: the address of the cluster this machine runs, if any
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            resolved = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, RuntimeError) as err:
            raise ExecutorError(
                f"--address auto found no running Ray cluster on this machine ({err}); start one with "
                "`ray start --head`, pass the head's host:port, or drop --address to start a local instance"
            ) from err
        target = parse_address(resolved)
        assert target is not None
    host, port = target
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ExecutorError(
            f"can't reach the Ray cluster at {address} ({reason} after ≤ {CONNECT_TIMEOUT_S:g} s); check host and port — "
            "the head node's GCS port (6379 unless `ray start --head --port` said otherwise) or ray://host:10001 for "
            "Ray Client — and that the cluster runs (`ray status` on the head), or drop --address to start a local instance"
        ) from err
    if ray.is_initialized():  # e.g. a notebook or a test that connected already
        log(f"using this process's existing Ray connection (asked for {address})")
        return False
    log(f"connecting to the Ray cluster at {address}")
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ExecutorError(
            f"connecting to the Ray cluster at {address} failed: {err}; is it a Ray {ray.__version__} "
            "head (`ray status` on it) and is this the GCS or Ray Client port?"
        ) from err
    return True
