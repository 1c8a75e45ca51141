"""Simulated time: one event heap, one seeded RNG, one bounded trace.

Everything that happens in a simulation is a callback run by :class:`World` at a simulated
time. Callbacks at the same time run in the order they were scheduled (the heap is ordered by
``(time, sequence number)``), so a run is a pure function of the seed and of the code.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_TRACE_LINES = 20_000


class Timer:
    """Handle of one scheduled callback; ``cancel()`` makes it a no-op (it stays in the heap
    until its time comes, then is skipped)."""

    __slots__ = ("_entry",)

    def __init__(self, entry: list[Any]) -> None:
        self._entry = entry

    @property
    def time(self) -> float:
        return float(self._entry[0])

    @property
    def active(self) -> bool:
        """True until the callback has run or been cancelled."""
        return self._entry[2] is not None

    def cancel(self) -> None:
        self._entry[2] = None
        self._entry[3] = ()


class Trace:
    """The last ``capacity`` ``(time, node, kind, text)`` records, dumpable as readable text.

    ``node`` is whatever names the actor (a node id, ``"broker"``, ``"faults"``); ``text`` is
    formatted by the caller. ``total`` counts every record ever made, kept or not.
    """

    def __init__(self, capacity: int = DEFAULT_TRACE_LINES, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = 0
        self._ring: deque[tuple[float, object, str, str]] = deque(maxlen=capacity)

    def record(self, t: float, node: object, kind: str, text: str) -> None:
        if self.enabled:
            self.total += 1
            self._ring.append((t, node, kind, text))

    def records(self) -> list[tuple[float, object, str, str]]:
        return list(self._ring)

    def lines(self) -> list[str]:
        return [f"{t:14.6f} {node!s:>8} {kind:<14} {text}" for t, node, kind, text in self._ring]

    def dump(self, path: str | Path) -> None:
        dropped = self.total - len(self._ring)
        with open(path, "w", encoding="utf-8") as f:
            if dropped:
                f.write(f"# {dropped} earlier records dropped (ring of {self._ring.maxlen})\n")
            for line in self.lines():
                f.write(line)
                f.write("\n")

    def __len__(self) -> int:
        return len(self._ring)


class World:
    """Simulated time from 0.0, an event heap, ``rng = random.Random(seed)`` and a trace.

    Nothing here reads the wall clock or the global ``random``. Components that draw random
    numbers should take their own stream from :meth:`fork_rng` so that, say, adding a fault
    does not shift every later network latency.
    """

    def __init__(self, seed: int, trace_capacity: int = DEFAULT_TRACE_LINES) -> None:
        self.seed = seed
        self.now = 0.0
        self.rng = random.Random(seed)
        self.trace = Trace(trace_capacity)
        self.events_run = 0
        self.events_scheduled = 0
        self._heap: list[list[Any]] = []
        self._seq = 0

    # --- scheduling ---------------------------------------------------------------------

    def at(self, t: float, fn: Callable[..., object], *args: Any) -> Timer:
        """Run ``fn(*args)`` at simulated time ``t`` (not before ``now``)."""
        if t < self.now:
            raise ValueError(f"cannot schedule at {t} before now={self.now}")
        entry = [t, self._seq, fn, args]
        self._seq += 1
        self.events_scheduled += 1
        heapq.heappush(self._heap, entry)
        return Timer(entry)

    def after(self, dt: float, fn: Callable[..., object], *args: Any) -> Timer:
        """Run ``fn(*args)`` ``dt`` (>= 0) simulated seconds from now."""
        if dt < 0:
            raise ValueError(f"negative delay {dt}")
        return self.at(self.now + dt, fn, *args)

    def post(self, t: float, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        """Like :meth:`at` without a handle or checks: the hot path for the simulated network.

        ``t`` must be >= ``now``.
        """
        heapq.heappush(self._heap, [t, self._seq, fn, args])
        self._seq += 1
        self.events_scheduled += 1

    # --- running ------------------------------------------------------------------------

    def step(self) -> bool:
        """Run the next live event; False if there is none."""
        heap = self._heap
        while heap:
            entry = heapq.heappop(heap)
            fn = entry[2]
            if fn is None:
                continue
            entry[2] = None  # the handle reads inactive from here on
            self.now = entry[0]
            args = entry[3]
            self.events_run += 1
            fn(*args)
            return True
        return False

    def run_until(self, t: float) -> None:
        """Run every event due at or before ``t``, then set ``now = t``."""
        if t < self.now:
            raise ValueError(f"cannot run back to {t} from now={self.now}")
        heap = self._heap
        pop = heapq.heappop
        run = 0
        try:
            while heap and heap[0][0] <= t:
                entry = pop(heap)
                fn = entry[2]
                if fn is None:
                    continue
                entry[2] = None  # the handle reads inactive from here on
                self.now = entry[0]
                run += 1
                fn(*entry[3])
        finally:
            self.events_run += run
        self.now = t

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def next_time(self) -> float | None:
        """Time of the next live event, or None."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        return float(heap[0][0]) if heap else None

    @property
    def pending(self) -> int:
        """Events in the heap, cancelled ones included until they surface."""
        return len(self._heap)

    # --- randomness and tracing ---------------------------------------------------------

    def fork_rng(self, name: str) -> random.Random:
        """An independent stream for one component, determined by the seed and ``name``."""
        return random.Random(f"{self.seed}/{name}")

    def log(self, node: object, kind: str, text: str) -> None:
        """Record a trace line at the current simulated time."""
        self.trace.record(self.now, node, kind, text)
