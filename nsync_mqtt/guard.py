"""Keeping a node alive and telling why it struggles: failure counts and an event-loop watchdog.

- :class:`Faults` counts the exceptions that background loops, sink threads and message
  handlers survive, by where they happened and their type. The first of each kind is logged
  with its traceback; repeats are logged at 10, 100, 1000, ... with the count, never one line
  each and never silently. The counts are part of the node's published state.
- :class:`LoopWatchdog` notices when the event loop stops turning (a blocking call in a
  callback: a slow disk under ``fsync``, a stuck DNS lookup) and logs where it is stuck while it
  still is, from a thread of its own, then how long it was blocked once it turns again. A node
  that runs the embedded broker serves every client from that loop, so a stall there stalls the
  whole cluster.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from nsync_mqtt.errors import NSyncError

log = logging.getLogger("nsync.guard")

STALL_REPORT_S = 0.5  # a loop blocked this long is reported (with its stack)
STALL_CHECK_S = 0.25  # how often the watchdog looks


def decade(n: int) -> bool:
    """1, 10, 100, 1000, ...: the counts at which a repeated failure is logged again."""
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


class Faults:
    """Counts of survived exceptions by ``where/ExceptionType``; thread-safe."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def record(self, where: str, err: BaseException) -> int:
        """Count ``err`` raised in ``where`` and log it if it is the first of its kind or its
        count reached a power of ten. NSync's own errors (bad input refused) are warnings; any
        other exception is a bug, logged as an error with its traceback. Returns the count."""
        kind = f"{where}/{type(err).__name__}"
        with self._lock:
            n = self.counts.get(kind, 0) + 1
            self.counts[kind] = n
        if not decade(n):
            return n
        times = "" if n == 1 else f" ({n} times so far)"
        if isinstance(err, NSyncError):
            self._log.warning("%s: %s%s", where, err, times)
        else:
            self._log.error(
                "%s failed%s, and goes on: %r", where, times, err, exc_info=err if n == 1 else None
            )
        return n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


async def forever(
    faults: Faults,
    where: str,
    step: Callable[[], Any],
    pause_after_error_s: float = 0.1,
) -> None:
    """Await ``step()`` over and over; an exception in one turn is recorded and the loop goes
    on after ``pause_after_error_s`` (no busy loop on a permanent fault)."""
    while True:
        try:
            await step()
        except Exception as err:
            faults.record(where, err)
            await asyncio.sleep(pause_after_error_s)


class LoopWatchdog:
    """Reports an event loop blocked for more than ``report_s``, with the stack it is stuck in.

    ``start()`` from inside the loop; ``stop()`` before the loop closes."""

    def __init__(self, report_s: float = STALL_REPORT_S, check_s: float = STALL_CHECK_S) -> None:
        self.report_s = report_s
        self.check_s = check_s
        self.stalls = 0  # blocks longer than report_s seen so far
        self.longest_s = 0.0
        self._beat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._task = self._loop.create_task(self._beats(), name="nsync-watchdog")
        self._thread = threading.Thread(target=self._watch, name="nsync-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    async def _beats(self) -> None:
        while True:
            now = time.monotonic()
            gap = now - self._beat
            if gap > self.report_s + self.check_s:
                blocked = gap - self.check_s
                self.longest_s = max(self.longest_s, blocked)
                log.warning("the event loop was blocked for %.2f s", blocked)
            self._beat = now
            await asyncio.sleep(self.check_s)

    def _watch(self) -> None:
        reported_beat = None
        while not self._stop.wait(self.check_s):
            beat = self._beat
            blocked = time.monotonic() - beat
            if blocked < self.report_s + self.check_s or reported_beat == beat:
                continue
            reported_beat = beat
            self.stalls += 1
            frame = sys._current_frames().get(self._loop_thread)
            where = "".join(traceback.format_stack(frame)[-8:]) if frame is not None else "?"
            log.warning("the event loop has been blocked for %.2f s; it is in:\n%s", blocked, where)


def log_tasks() -> None:
    """Log every task of the running event loop with where it waits (``kill -USR2`` a node)."""
    out = io.StringIO()
    tasks = asyncio.all_tasks()
    for task in sorted(tasks, key=lambda t: t.get_name()):
        task.print_stack(limit=6, file=out)
    log.warning("%d asyncio tasks:\n%s", len(tasks), out.getvalue())
