"""The bounded-wait helpers the pipeline tests use on child processes and slow calls: a child that hangs without
printing fails the test (and is killed) instead of blocking it for ever."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.pipeline.bounded import ChildOutput, call_within, wait_until


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-u", "-c", code],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def test_a_child_that_hangs_without_printing_fails_the_wait_and_is_killed():
    proc = _child("import time; time.sleep(120)")
    assert proc.stderr is not None
    t0 = time.monotonic()
    with pytest.raises(
        pytest.fail.Exception, match=r"waited 1 s for the ready line; the child wrote nothing"
    ):
        ChildOutput(proc, proc.stderr).wait_for("ready", 1.0, "the ready line")
    assert proc.poll() is not None  # killed, not left running
    assert time.monotonic() - t0 < 60  # sanity of the helper itself: it returned instead of blocking for ever


def test_a_child_that_prints_other_lines_then_hangs_fails_naming_its_last_words():
    proc = _child("import sys, time; print('starting', file=sys.stderr); time.sleep(120)")
    assert proc.stderr is not None
    with pytest.raises(pytest.fail.Exception, match=r"(?s)last wrote:\nstarting"):
        ChildOutput(proc, proc.stderr).wait_for("ready", 1.0, "the ready line")
    assert proc.poll() is not None


def test_the_awaited_line_is_returned_and_an_early_exit_is_a_clear_failure():
    proc = _child(
        "import sys, time; print('a', file=sys.stderr); print('ready now', file=sys.stderr); time.sleep(120)"
    )
    assert proc.stderr is not None
    out = ChildOutput(proc, proc.stderr)
    assert out.wait_for("ready", 60, "the ready line") == "ready now\n" and out.lines == [
        "a\n",
        "ready now\n",
    ]
    proc.kill()
    proc.wait()
    gone = _child("import sys; print('bye', file=sys.stderr); sys.exit(3)")
    assert gone.stderr is not None
    with pytest.raises(
        pytest.fail.Exception, match=r"(?s)the child ended \(exit code 3\) before the ready line.*bye"
    ):
        ChildOutput(gone, gone.stderr).wait_for("ready", 60, "the ready line")


def test_wait_until_and_call_within(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="waited 0.2 s for the marker file"):
        wait_until((tmp_path / "marker").exists, 0.2, "the marker file")
    proc = _child("import sys; sys.exit(0)")
    with pytest.raises(
        pytest.fail.Exception, match=r"the child ended \(exit code 0\) before the marker file"
    ):
        wait_until((tmp_path / "marker").exists, 60, "the marker file", proc=proc)
    assert proc.stderr is not None
    proc.stderr.close()
    assert call_within(5, "an addition", lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ValueError, match="bad"):
        call_within(5, "a failing call", lambda: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(pytest.fail.Exception, match=r"a slow call did not finish within 0.2 s"):
        call_within(0.2, "a slow call", time.sleep, 30)
