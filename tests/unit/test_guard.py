"""Failures survived and counted, and an event loop blocked long enough to be reported."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.guard import Faults, LoopWatchdog, forever


def test_faults_count_by_where_and_type_and_log_at_powers_of_ten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    faults = Faults(logging.getLogger("test.faults"))
    with caplog.at_level(logging.WARNING, "test.faults"):
        for _ in range(120):
            faults.record("election loop", KeyError("x"))
        faults.record("election loop", ValueError("y"))
        faults.record("bad node state", ProtocolError("clock must be an object"))
    assert faults.snapshot() == {
        "election loop/KeyError": 120,
        "election loop/ValueError": 1,
        "bad node state/ProtocolError": 1,
    }
    lines = [r.getMessage() for r in caplog.records]
    key_errors = [m for m in lines if "KeyError" in m]
    assert len(key_errors) == 3  # the 1st, the 10th and the 100th
    assert "10 times so far" in key_errors[1] and "100 times so far" in key_errors[2]
    # a bug comes with its traceback the first time; refused input is a plain warning
    first = next(r for r in caplog.records if "KeyError" in r.getMessage())
    assert first.levelno == logging.ERROR and first.exc_info is not None
    refused = next(r for r in caplog.records if "clock must be" in r.getMessage())
    assert refused.levelno == logging.WARNING and refused.exc_info is None


def test_a_loop_run_forever_survives_a_failing_turn() -> None:
    faults = Faults()
    turns: list[int] = []

    async def main() -> None:
        six = asyncio.Event()

        async def step() -> None:
            turns.append(len(turns))
            if len(turns) in (2, 3):
                raise RuntimeError("one bad turn")
            if len(turns) >= 6:
                six.set()
            await asyncio.sleep(0)

        task = asyncio.create_task(forever(faults, "ping loop", step, pause_after_error_s=0))
        await asyncio.wait_for(six.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(turns) >= 6
    assert faults.snapshot() == {"ping loop/RuntimeError": 2}


def blocking_call() -> None:
    time.sleep(0.45)


def test_the_watchdog_reports_a_blocked_loop_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> LoopWatchdog:
        dog = LoopWatchdog(report_s=0.2, check_s=0.05)
        dog.start()
        await asyncio.sleep(0.15)  # turning freely: nothing to report
        blocking_call()
        await asyncio.sleep(0.15)
        dog.stop()
        return dog

    with caplog.at_level(logging.WARNING, "nsync.guard"):
        dog = asyncio.run(main())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert dog.stalls == 1, text
    assert "has been blocked" in text and "blocking_call" in text
    assert "was blocked for" in text
    assert 0.3 < dog.longest_s < 1.0
