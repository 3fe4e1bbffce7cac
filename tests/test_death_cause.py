"""How a dead worker is worded (pipeline.executor.death_cause, a pure function of the exit code and the
kernel's OOM-kill counters read before and after): out of memory only when a counter grew."""
from __future__ import annotations

import signal

import pytest

from pipeline.executor import death_cause

KILL = -int(signal.SIGKILL)


@pytest.mark.parametrize("before,after", [
    ({"system": 3}, {"system": 4}),
    ({"system": 3, "cgroup": 0}, {"system": 3, "cgroup": 1}),      # only our cgroup's counter grew
    ({"system": 0, "cgroup": 7}, {"system": 2, "cgroup": 7}),
])
def test_sigkill_with_a_grown_oom_counter_is_the_oom_killer(before, after):
    msg = death_cause(KILL, before, after)
    assert msg.startswith("was killed by SIGKILL (signal 9) by the kernel's out-of-memory killer")
    assert "memory_budget" in msg and "workers" in msg            # what to change


@pytest.mark.parametrize("before,after", [
    ({"system": 3}, {"system": 3}),
    ({"system": 3, "cgroup": 1}, {"system": 3, "cgroup": 1}),
    ({}, {"system": 5}),             # a counter that was unreadable before says nothing about meanwhile
])
def test_sigkill_without_an_oom_kill_is_not_blamed_on_memory(before, after):
    msg = death_cause(KILL, before, after)
    assert msg == ("was killed by SIGKILL (signal 9), not by the out-of-memory killer "
                   "(the kernel counted no OOM kill meanwhile)")
    assert "memory_budget" not in msg


def test_sigkill_without_counters_says_it_cannot_tell():
    msg = death_cause(KILL, {}, {})
    assert msg.startswith("was killed by SIGKILL (signal 9) (this system does not say whether")
    assert "dmesg" in msg and "memory_budget" not in msg


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGSEGV, signal.SIGINT, signal.SIGABRT])
def test_other_signals_are_named_and_never_called_oom(sig):
    # even with a grown OOM counter (another process was the victim): only SIGKILL can be the OOM killer
    msg = death_cause(-int(sig), {"system": 0}, {"system": 1})
    assert msg == f"was killed by {sig.name} (signal {int(sig)})"


def test_a_signal_without_a_name():
    n = next(s for s in range(1, 65) if s not in {int(x) for x in signal.Signals})
    assert death_cause(-n, {}, {}) == f"was killed by signal {n} (signal {n})"


@pytest.mark.parametrize("code,msg", [
    (1, "exited with code 1"),
    (3, "exited with code 3"),
    (0, "exited with code 0 (its start-up failed: see the traceback above)"),
    (None, "stopped responding"),
])
def test_exit_codes(code, msg):
    assert death_cause(code, {"system": 0}, {"system": 1}) == msg    # never OOM, whatever the counters
