"""Rehearse a risky native step (OpenVINO's compile, ExecuTorch's load) in a child process first: a crash there is a
named signal in an error message, never the death of the process that asked (a server, a test run, a search)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

__all__ = ["PROBE_TIMEOUT_S", "run_probe_child", "signal_name"]

#: how long a probe child may take before it counts as failed
PROBE_TIMEOUT_S = 600


def signal_name(code: int) -> str:
    """``-11`` → ``SIGSEGV`` (a negative return code is the signal that ended a child)."""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_probe_child(code: str, args: list[str], env: dict[str, str], runtime: str, what: str) -> str | None:
    """Run ``python -c code *args``; None when it exited 0, else why not, in a sentence naming ``runtime`` and the
    step (``what``: "compile_model", "runtime" …); a crash's sentence contains "crashed"."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={**os.environ, **env},
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"the {runtime} probe did not finish within {PROBE_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"{runtime}'s {what} crashed with {signal_name(done.returncode)} in a probe subprocess"
    tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()][-3:]
    return f"{runtime} failed in a probe subprocess (exit {done.returncode}): {' '.join(tail)[:600]}"
