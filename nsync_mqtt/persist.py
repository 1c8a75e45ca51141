"""Durable node state: what a node must not forget across a crash.

The election term and vote (a node votes at most once per term, even across a restart), the
player state (playlist, slot, playback, volume, operation index) and the last applied operation
``(term, index)`` that makes a node's log "up to date" in an election, with the wall-clock time
(Unix seconds) at which this node applied it. Written atomically: a
temp file, fsync, rename, fsync of the directory; a crash leaves either the old or the new file,
never a torn one. The node saves before it answers (a vote, an ack), so what it promised
survives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.messages import check_id, is_int
from nsync_mqtt.playlist import PlayerState

log = logging.getLogger(__name__)
FORMAT = 1


@dataclass(frozen=True)
class Durable:
    term: int = 0
    voted_for: str | None = None
    state: PlayerState = field(default_factory=PlayerState)
    last_log: tuple[int, int] = (0, 0)  # (term, index) of the last applied operation
    last_log_at: float | None = None  # when it was applied here, Unix seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "term": self.term,
            "voted_for": self.voted_for,
            "state": self.state.to_dict(),
            "last_log": list(self.last_log),
            "last_log_at": self.last_log_at,
        }

    @classmethod
    def from_dict(cls, d: object) -> Durable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ProtocolError("not a durable-state document of a known format")
        term = d.get("term")
        if not is_int(term) or term < 0:
            raise ProtocolError("term must be a non-negative integer")
        voted_for = d.get("voted_for")
        if voted_for is not None:
            check_id(voted_for, "voted_for")
        last = d.get("last_log")
        if (
            not isinstance(last, list)
            or len(last) != 2
            or not all(is_int(x) and x >= 0 for x in last)
        ):
            raise ProtocolError("last_log must be [term, index]")
        at = d.get("last_log_at")  # absent in files written before it was kept
        if at is not None and (
            not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at)
        ):
            raise ProtocolError("last_log_at must be a time in Unix seconds")
        state = PlayerState.from_dict(d.get("state"), default_term=last[0])
        return cls(term, voted_for, state, (last[0], last[1]), None if at is None else float(at))


class StateFile:
    """One node's durable state on disk (``<data_dir>/state.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._last: Durable | None = None

    def load(self) -> Durable:
        """The saved state, or a fresh one. A corrupt file is kept aside, never trusted."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Durable()
        try:
            durable = Durable.from_dict(json.loads(raw))
        except (ValueError, ProtocolError) as err:
            aside = self.path.with_suffix(".corrupt")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error("durable state %s is unreadable (%s); moved to %s", self.path, err, aside)
            return Durable()
        self._last = durable
        return durable

    def save(self, durable: Durable) -> bool:
        """Write atomically; returns False (nothing written) when nothing changed."""
        if durable == self._last:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps(durable.to_dict(), separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._last = durable
        return True
