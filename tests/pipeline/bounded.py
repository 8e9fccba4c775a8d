"""Bounded waits for tests: an operation that does not finish in time fails the test with a message saying what
it waited for — instead of an assertion on elapsed time after the fact, a ``sleep`` that hopes the child got
far enough, or a ``for line in proc.stderr`` that blocks for ever when the child hangs without printing."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import pytest

T = TypeVar("T")


def kill_child(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the child — its whole process group when it leads one (``start_new_session=True``) — and reap it."""
    if proc.poll() is None:
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


class ChildOutput:
    """The lines a child writes to one pipe, read on a thread so that a test can wait for one with a deadline."""

    def __init__(self, proc: subprocess.Popen[str], stream: IO[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._queue.put(line)
        finally:
            stream.close()
            self._queue.put(None)  # end of the stream: the child closed it or exited

    def _tail(self) -> str:
        return "".join(self.lines[-5:]).rstrip() or "(nothing)"

    def wait_for(self, wanted: str | Callable[[str], bool], timeout: float, what: str) -> str:
        """The first line containing ``wanted`` (or for which it is true). When none arrives within ``timeout``
        seconds the child is killed and the test fails saying so; likewise when the child ends without one."""
        match = (lambda line: wanted in line) if isinstance(wanted, str) else wanted
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kill_child(self.proc)
                pytest.fail(
                    f"waited {timeout:g} s for {what}; the child "
                    + ("wrote nothing" if not self.lines else f"last wrote:\n{self._tail()}")
                    + "\n(it hangs or is far slower than expected; killed it)"
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(timeout=30)
                pytest.fail(f"the child ended (exit code {code}) before {what}; last lines:\n{self._tail()}")
            self.lines.append(line)
            if match(line):
                return line


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Poll ``condition`` until it holds; past ``timeout`` seconds (or when ``proc`` ends first) fail saying what
    was awaited, killing ``proc``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the child ended (exit code {proc.returncode}) before {what}")
        if time.monotonic() >= deadline:
            if proc is not None:
                kill_child(proc)
            pytest.fail(f"waited {timeout:g} s for {what}")
        time.sleep(0.02)


def call_within(seconds: float, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, failing the test when it has not returned within ``seconds`` (its exception, if it
    raises one in time, propagates). The call runs on a daemon thread, so a hang doesn't block the test run."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name=f"bounded: {what}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{what} did not finish within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
