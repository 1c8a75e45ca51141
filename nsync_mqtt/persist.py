"""Durable node state: what a node must not forget across a crash.

The election term and vote (a node votes at most once per term, even across a restart), the
player state (playlist, slot, playback, volume, operation index) and the last applied operation
``(term, index)`` that makes a node's log "up to date" in an election, with the wall-clock time
(Unix seconds) at which this node applied it. The node saves before it answers (a vote, an ack),
so what it promised survives it.

On disk (:class:`StateFile`), in the node's data directory:

- ``state.json``, the *snapshot*: the whole :class:`Durable` and the token ``log`` of the log
  that continues it. Written atomically: a temp file, fsync, rename, fsync of the directory; a
  crash leaves either the old or the new file, never a torn one.
- ``oplog.jsonl``, the *log*: what changed since the snapshot, one JSON object per line. The
  first line is ``{"k":"log","log":TOKEN}``; a log whose token is not the snapshot's predates
  it (a crash between writing a snapshot and starting its log) and is ignored. Each record is
  appended and fsynced before the call that writes it returns:

  - ``{"k":"vote","term":T,"voted_for":V}``: the term or vote changed, nothing else;
  - ``{"k":"op","op":OP,"at":AT}``: the operation ``OP`` (as sent, see ``playlist.Operation``)
    was applied, at ``AT`` (Unix seconds); replayed through ``playlist.apply_op``;
  - ``{"k":"state","term":T,"voted_for":V,"last_log":[t,i],"last_log_at":AT,"state":S}``: any
    other change that leaves the playlist's start as it was: ``S`` is the player state with
    ``"add"`` (songs appended to the playlist) and ``"plist"`` (the playlist hash after) in
    place of ``"playlist"``.

  Loading replays the records onto the snapshot. Bytes after the last newline, or a last line
  that is not JSON, are a write torn by a crash (never acknowledged): ignored. Any other bad
  line, or a record that does not replay, is corruption: both files are set aside
  (``state.corrupt``, ``oplog.corrupt``), logged, never trusted, and the node starts fresh (as
  it does for a corrupt snapshot).

A change costs one small record, whatever the playlist's length; the whole state is rewritten
only when the change cannot be told as a record (a playlist that is not the last one plus songs
at the end: a sync from a master that held another one), and when the log reaches
``compact_records`` records or ``compact_bytes`` bytes (the next write is then a snapshot, which
starts an empty log). After an append that failed (the error is raised), after a torn tail, or
beside a log that is not the snapshot's, the next write is a snapshot too: nothing is ever
appended after bytes that might not be a whole record. Snapshots of format 1 (written before
the log existed) still load.

The node calls:

- ``load() -> Durable`` once, at start;
- ``append(durable, op) -> bool`` after applying ``op`` (a speaker's :func:`playlist.apply_op`,
  or the master's own operation), ``durable`` being its new durable state: writes an op record
  (and a vote record first if the term or vote changed). When ``durable`` is not what ``op``
  makes of the last saved state it falls back to ``save(durable)``;
- ``save(durable) -> bool`` for anything else (a vote, a new term, a sync, any change): a vote
  record, a state record or a snapshot, whichever tells the change. ``False``: nothing changed,
  nothing written. ``save`` alone is enough (an operation then makes a state record); ``append``
  writes the operation itself.

``read() -> Durable`` gives the saved state to a reader beside a running node (tools, tests)
without setting anything aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.messages import check_hash, check_id, is_wire_int
from nsync_mqtt.playlist import Operation, PlayerState, apply_op, playlist_hash

log = logging.getLogger(__name__)
FORMAT = 2  # 2: the snapshot names the log that continues it
FORMATS = (1, 2)
LOG_NAME = "oplog.jsonl"
COMPACT_RECORDS = 1000
COMPACT_BYTES = 1 << 20


def _check_vote(d: dict[str, Any]) -> tuple[int, str | None]:
    term = d.get("term")
    if not is_wire_int(term) or term < 0:
        raise ProtocolError("term must be a non-negative integer")
    voted_for = d.get("voted_for")
    if voted_for is not None:
        check_id(voted_for, "voted_for")
    return term, voted_for


def _check_head(d: dict[str, Any]) -> tuple[int, str | None, tuple[int, int], float | None]:
    """Term, vote, last operation and its time, checked."""
    term, voted_for = _check_vote(d)
    last = d.get("last_log")
    if (
        not isinstance(last, list)
        or len(last) != 2
        or not all(is_wire_int(x) and x >= 0 for x in last)
    ):
        raise ProtocolError("last_log must be [term, index]")
    at = _check_at(d.get("last_log_at"))  # absent in files written before it was kept
    return term, voted_for, (last[0], last[1]), at


def _check_at(at: object) -> float | None:
    if at is not None and (
        not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at)
    ):
        raise ProtocolError("last_log_at must be a time in Unix seconds")
    return None if at is None else float(at)


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
        if not isinstance(d, dict) or d.get("format") not in FORMATS:
            raise ProtocolError("not a durable-state document of a known format")
        term, voted_for, last, at = _check_head(d)
        state = PlayerState.from_dict(d.get("state"), default_term=last[0])
        return cls(term, voted_for, state, last, at)


def same_state(a: PlayerState, b: PlayerState) -> bool:
    """``a == b`` without comparing the playlists song by song (their hashes stand in)."""
    return a is b or (
        (a.index, a.term, a.volume, a.playback) == (b.index, b.term, b.volume, b.playback)
        and len(a.playlist) == len(b.playlist)
        and a.hash == b.hash
    )


def same_durable(a: Durable, b: Durable) -> bool:
    """``a == b``, in time independent of the playlist's length."""
    return (a.term, a.voted_for, a.last_log, a.last_log_at) == (
        b.term,
        b.voted_for,
        b.last_log,
        b.last_log_at,
    ) and same_state(a.state, b.state)


class _Corrupt(Exception):
    pass


class StateFile:
    """One node's durable state on disk: ``<dir>/state.json`` (the snapshot, ``path``) and
    ``<dir>/oplog.jsonl`` (the log after it). See the module's documentation."""

    def __init__(
        self,
        path: Path,
        compact_records: int = COMPACT_RECORDS,
        compact_bytes: int = COMPACT_BYTES,
    ) -> None:
        self.path = Path(path)
        self.log_path = self.path.with_name(LOG_NAME)
        self.compact_records = compact_records
        self.compact_bytes = compact_bytes
        self._last: Durable | None = None  # what the files hold
        self._token: str | None = None  # the snapshot's log token; None: the next write snapshots
        self._records = 0  # records in the log since the snapshot
        self._bytes = 0
        self.snapshots_written = 0  # counted for tests and statistics
        self.records_written = 0

    # ------------------------------------------------------------------ load

    def load(self) -> Durable:
        """The saved state, or a fresh one. Corrupt files are set aside, never trusted. Only
        the node that owns the files loads them (it writes after)."""
        self._last, self._token, self._records, self._bytes = None, None, 0, 0
        try:
            found = self._read()
        except (ValueError, ProtocolError, _Corrupt) as err:
            self._set_aside(err)
            return Durable()
        if found is None:
            return Durable()
        durable, token, self._records, self._bytes = found
        self._last = durable
        self._token = token  # a log to go on with, or None: a snapshot first
        return durable

    def read(self) -> Durable:
        """The saved state as :meth:`load` finds it, for a reader beside a running node (tools,
        tests): nothing is set aside or written; ProtocolError if the files are corrupt."""
        try:
            found = self._read()
        except (ValueError, _Corrupt) as err:
            raise ProtocolError(f"durable state {self.path} is unreadable: {err}") from None
        return Durable() if found is None else found[0]

    def _read(self) -> tuple[Durable, str | None, int, int] | None:
        """Snapshot and log replayed: the state, the token of a log to go on appending to (None
        if the next write must be a snapshot), its records and bytes; None: no snapshot."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            if self.log_path.exists():
                log.warning("%s has no snapshot beside it: ignored", self.log_path)
            return None
        doc = json.loads(raw)
        durable = Durable.from_dict(doc)
        token = doc.get("log") if doc.get("format") == 2 else None
        if token is not None and not isinstance(token, str):
            raise ProtocolError("log must be a string")
        return self._replay(durable, token)

    def _replay(self, durable: Durable, token: str | None) -> tuple[Durable, str | None, int, int]:
        """``durable`` with the log's records replayed (see :meth:`_read`)."""
        try:
            raw = self.log_path.read_bytes()
        except FileNotFoundError:
            return durable, None, 0, 0
        *lines, tail = raw.split(b"\n")
        torn = bool(tail)  # a write cut short after its last newline
        records: list[dict[str, Any]] = []
        for n, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError as err:
                if n == len(lines) - 1 and not torn:
                    torn = True  # the last line: a write cut short
                    break
                raise _Corrupt(f"{self.log_path} line {n + 1} is not JSON ({err})") from None
            if n == 0 and not (
                isinstance(rec, dict)
                and rec.get("k") == "log"
                and token is not None
                and rec.get("log") == token
            ):
                log.info(
                    "%s is not the log of the snapshot (it predates it): ignored", self.log_path
                )
                return durable, None, 0, 0
            if not isinstance(rec, dict):
                raise _Corrupt(f"{self.log_path} line {n + 1} is not an object")
            records.append(rec)
        if not records:
            return durable, None, 0, 0  # nothing written yet, or the header itself was cut short
        for n, rec in enumerate(records[1:], start=2):
            try:
                durable = _apply_record(durable, rec)
            except ProtocolError as err:
                raise _Corrupt(f"{self.log_path} line {n}: {err}") from None
        if torn:
            log.warning("%s ends in a write cut short by a crash: ignored", self.log_path)
            return durable, None, 0, 0  # not appended to: the next write starts a new log
        return durable, token, len(records) - 1, len(raw)

    def _set_aside(self, err: Exception) -> None:
        aside = self.path.with_suffix(".corrupt")
        log_aside = self.log_path.with_suffix(".corrupt")
        with contextlib.suppress(OSError):
            os.replace(self.path, aside)
        with contextlib.suppress(OSError):
            os.replace(self.log_path, log_aside)
        log.error(
            "durable state %s is unreadable (%s); moved to %s and %s",
            self.path,
            err,
            aside,
            log_aside,
        )

    # ------------------------------------------------------------------ save

    def save(self, durable: Durable) -> bool:
        """Make ``durable`` what the files hold; False (nothing written) when it already is.
        A term or vote change alone, or a change that keeps the playlist's start, is one
        record appended to the log; anything else, or a full log, a new snapshot."""
        last = self._last
        if last is not None and same_durable(durable, last):
            return False
        record = None if last is None or self._full() else _change_record(last, durable)
        try:
            if record is not None:
                self._append([record])
        except FileNotFoundError:  # the log went away under us: start again from a snapshot
            record = None
        if record is None:
            self._snapshot(durable)
        self._last = durable
        return True

    def append(self, durable: Durable, op: Mapping[str, Any] | Operation) -> bool:
        """The node applied ``op`` and ``durable`` is its new durable state: log the op (and
        the term and vote first, if they changed). Falls back to :meth:`save` when ``durable``
        is not what ``op`` makes of the last saved state (checked in time independent of the
        playlist's length), or when a snapshot is due."""
        last = self._last
        if last is None or self._full():
            return self.save(durable)
        try:
            o = op if isinstance(op, Operation) else Operation.from_dict(op)
            expected = apply_op(last.state, o)
        except ProtocolError:
            return self.save(durable)
        if (
            expected is last.state  # held already: nothing for the log
            or durable.last_log != durable.state.last
            or not same_state(expected, durable.state)
        ):
            return self.save(durable)
        records: list[dict[str, Any]] = []
        if (durable.term, durable.voted_for) != (last.term, last.voted_for):
            records.append(_vote_record(durable))
        records.append({"k": "op", "op": o.to_dict(), "at": durable.last_log_at})
        try:
            self._append(records)
        except FileNotFoundError:
            return self.save(durable)
        self._last = durable
        return True

    def _full(self) -> bool:
        return (
            self._token is None
            or self._records >= self.compact_records
            or self._bytes >= self.compact_bytes
        )

    def _append(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(_line(r) for r in records)
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
            try:
                _write_all(fd, data)
                _sync_data(fd)
            finally:
                os.close(fd)
        except OSError:
            # the log may now end in part of a record, or in data the disk did not keep:
            # appending after it would bury that; the next write is a snapshot and a new log
            self._token = None
            raise
        self._records += len(records)
        self._bytes += len(data)
        self.records_written += len(records)

    def _snapshot(self, durable: Durable) -> None:
        """The snapshot (atomically), then an empty log after it (atomically): a crash between
        the two leaves the old log beside the new snapshot, and its token tells it apart."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = os.urandom(8).hex()
        doc = {**durable.to_dict(), "log": token}
        _write_atomically(self.path, json.dumps(doc, separators=(",", ":")).encode())
        header = _line({"k": "log", "log": token})
        _write_atomically(self.log_path, header)
        self._token, self._records, self._bytes = token, 0, len(header)
        self.snapshots_written += 1


# --- records --------------------------------------------------------------------------------


def _vote_record(d: Durable) -> dict[str, Any]:
    return {"k": "vote", "term": d.term, "voted_for": d.voted_for}


def _change_record(last: Durable, new: Durable) -> dict[str, Any] | None:
    """The record that turns ``last`` into ``new``, or None if it takes a snapshot (the
    playlist is not ``last``'s plus songs at the end). O(songs added)."""
    if same_state(last.state, new.state) and (new.last_log, new.last_log_at) == (
        last.last_log,
        last.last_log_at,
    ):
        return _vote_record(new)
    before, after = last.state.playlist, new.state.playlist
    if len(after) < len(before):
        return None
    added = after[len(before) :]
    if after is not before and playlist_hash(added, last.state.hash) != new.state.hash:
        return None
    s = _state_doc(new.state)
    s["add"] = list(added)
    s["plist"] = new.state.hash
    return {
        "k": "state",
        "term": new.term,
        "voted_for": new.voted_for,
        "last_log": list(new.last_log),
        "last_log_at": new.last_log_at,
        "state": s,
    }


def _state_doc(state: PlayerState) -> dict[str, Any]:
    return {
        "playback": state.playback.to_dict(),
        "volume": state.volume,
        "index": state.index,
        "term": state.term,
    }


def _apply_record(d: Durable, rec: dict[str, Any]) -> Durable:
    """``d`` with one log record replayed; ProtocolError if it does not replay."""
    kind = rec.get("k")
    if kind == "vote":
        term, voted_for = _check_vote(rec)
        return Durable(term, voted_for, d.state, d.last_log, d.last_log_at)
    if kind == "op":
        state = apply_op(d.state, Operation.from_dict(rec.get("op")))
        return Durable(d.term, d.voted_for, state, state.last, _check_at(rec.get("at")))
    if kind == "state":
        term, voted_for, last, at = _check_head(rec)
        s = rec.get("state")
        if not isinstance(s, dict) or not isinstance(s.get("add"), list):
            raise ProtocolError("state record: state.add must be a list")
        added = [check_hash(x, "state.add entry") for x in s["add"]]
        part = PlayerState.from_dict({**s, "playlist": []})
        state = d.state.with_songs(
            added, playback=part.playback, volume=part.volume, index=part.index, term=part.term
        )
        if state.hash != s.get("plist"):
            raise ProtocolError("state record: the playlist does not hash to its plist")
        return Durable(term, voted_for, state, last, at)
    raise ProtocolError(f"unknown record kind {str(kind)[:20]!r}")


# --- files ----------------------------------------------------------------------------------


def _line(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sync_data(fd: int) -> None:
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS
        os.fsync(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
