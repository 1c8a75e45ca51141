"""Song store, chunk planning and assembly, and LRU eviction.

A song is named by the sha224 hex digest of its bytes. It travels in fixed-size chunks (the last
one shorter) from the client to the master and from the master to the speakers; each chunk frame
carries the header built by :func:`chunk_header`. A receiver keeps one :class:`Assembly` per song
being received, so a transfer interrupted by a restart resumes with only the missing chunks.

Layout of a store under ``root``:

- ``songs/<hash>``: complete, verified songs;
- ``partial/<hash>.part``: a song being received, preallocated to its full size, chunks written
  at their offsets;
- ``partial/<hash>.have``: ``NSH1`` + u64 size + u32 chunk size, then one u32 per received chunk
  index, appended as chunks arrive (all big endian);
- ``meta/<hash>.json``: what the library shows (title, artist, duration, ...);
- ``lru.json``: last use of each song, written lazily by :meth:`SongStore.flush`.

Each store has a size cap; :meth:`SongStore.evict` removes the least recently used songs until the
store fits, never touching a protected song (one in the playlist or playing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsync_mqtt.errors import ProtocolError, SongMissing
from nsync_mqtt.messages import HASH_RE, check_hash
from nsync_mqtt.messages import is_int as _is_int

DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 8 * 1024 * 1024
DEFAULT_MAX_SONG_BYTES = 512 * 1024 * 1024

_READ_BLOCK = 1024 * 1024
# transfers open at once; more are refused (their chunks come again when the node asks for the
# song again) rather than dropping an open one: the master sends a recovering node's songs
# chunk by chunk in turn, and dropping would restart them in a circle
MAX_ASSEMBLIES = 64
PARTIAL_IDLE_S = 600.0  # a transfer that got no chunk for this long is dropped, files and all
_HAVE_MAGIC = b"NSH1"
_HAVE_HEADER = struct.Struct(">4sQI")
_HAVE_INDEX = struct.Struct(">I")


def sha224_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha224(data).hexdigest()


def sha224_file(path: Path) -> str:
    """Hash a file by streaming it (constant memory whatever the song's size)."""
    h = hashlib.sha224()
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a load announces: which song, how big, and how it is cut into chunks."""

    song: str
    size: int
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        check_hash(self.song, "manifest field 'song'")
        if not _is_int(self.size) or self.size <= 0:
            raise ProtocolError(
                f"manifest field 'size' must be a positive integer, got {self.size!r}"
            )
        if not _is_int(self.chunk_size) or not (
            MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE
        ):
            raise ProtocolError(
                f"manifest field 'chunk_size' must be an integer from {MIN_CHUNK_SIZE} to "
                f"{MAX_CHUNK_SIZE}, got {self.chunk_size!r}"
            )

    @property
    def n_chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """Return (offset, length) of chunk ``index``; ProtocolError if out of range."""
        if not _is_int(index) or not 0 <= index < self.n_chunks:
            raise ProtocolError(
                f"chunk index must be an integer from 0 to {self.n_chunks - 1}, got {index!r}"
            )
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    @classmethod
    def from_dict(cls, d: object, max_size: int | None = None) -> Manifest:
        """Validate a decoded manifest (or chunk header); extra keys are ignored."""
        if not isinstance(d, Mapping):
            raise ProtocolError(f"manifest must be a JSON object, got {type(d).__name__}")
        for key in ("song", "size", "chunk_size"):
            if key not in d:
                raise ProtocolError(f"manifest field {key!r} is missing")
        size = d["size"]
        if max_size is not None and _is_int(size) and size > max_size:
            raise ProtocolError(
                f"manifest field 'size' is {size} bytes, over the limit of {max_size} bytes"
            )
        return cls(song=d["song"], size=size, chunk_size=d["chunk_size"])

    @classmethod
    def of_file(cls, path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Manifest:
        return cls(sha224_file(path), path.stat().st_size, chunk_size)

    def to_dict(self) -> dict[str, Any]:
        return {"song": self.song, "size": self.size, "chunk_size": self.chunk_size}


def plan_chunks(manifest: Manifest, have: Iterable[int]) -> list[int]:
    """Indices of the chunks still missing, ascending."""
    held = set(have)
    return [i for i in range(manifest.n_chunks) if i not in held]


def chunk_header(manifest: Manifest, index: int) -> dict[str, Any]:
    """The header carried in the frame of chunk ``index``."""
    manifest.chunk_span(index)
    return {**manifest.to_dict(), "index": index}


def read_chunk(path: Path, manifest: Manifest, index: int) -> bytes:
    offset, length = manifest.chunk_span(index)
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise ProtocolError(f"{path} is shorter than its manifest ({manifest.size} bytes)")
    return data


def songs_to_push(
    playlist: Iterable[str],
    master_holds: Collection[str],
    node_holds: Collection[str],
    node_partial: Mapping[str, Collection[int]],
) -> dict[str, list[int] | None]:
    """What a master sends a recovering node that told it which songs it holds: every
    playlist song the master holds and the node lacks, mapped to the chunk indices the node
    still misses (None: all of them, it has none)."""
    out: dict[str, list[int] | None] = {}
    for song in playlist:
        if song in out or song in node_holds or song not in master_holds:
            continue
        missing = node_partial.get(song)
        out[song] = sorted(missing) if missing is not None else None
    return out


def parse_held(songs: object, partial: object) -> tuple[set[str], dict[str, list[int]]]:
    """The `songs` and `partial` fields of a `sync_req`, checked: the songs a node holds and,
    for songs it holds part of, the chunk indices it misses."""
    if not isinstance(songs, list):
        raise ProtocolError("sync_req field 'songs' must be a list of song hashes")
    held = {check_hash(s, "songs entry") for s in songs}
    if partial is None:
        return held, {}
    if not isinstance(partial, dict):
        raise ProtocolError("sync_req field 'partial' must map song hashes to chunk indices")
    out: dict[str, list[int]] = {}
    for song, missing in partial.items():
        check_hash(song, "partial key")
        if not isinstance(missing, list) or not all(_is_int(i) and i >= 0 for i in missing):
            raise ProtocolError("sync_req 'partial' values must be lists of chunk indices")
        out[song] = missing
    return held, out


def stalled_songs(
    now: float,
    needed: Iterable[str],
    progress: Mapping[str, float],
    retry_s: Mapping[str, float],
    default_s: float,
) -> list[str]:
    """The songs a node needs and lacks whose transfer made no progress (no chunk received,
    no request sent) for their retry interval (``retry_s``, else ``default_s``): ask for them
    again (the master that was sending them may be gone)."""
    return [
        s
        for s in dict.fromkeys(needed)
        if now - progress.get(s, -math.inf) >= retry_s.get(s, default_s)
    ]


def choose_source(
    me: str,
    master: str | None,
    holders: Collection[str],
    seen: Mapping[str, float],
    now: float,
    alive_s: float,
) -> str | None:
    """Whom a node lacking a song asks for it: its master when the master holds it (or when no
    live holder is known: the master may hold it unannounced), else a holder heard from within
    ``alive_s`` (the first by name), else nobody. A master lacking a song thus fetches it from
    a speaker that holds it."""
    alive = sorted(n for n in holders if n != me and now - seen.get(n, -math.inf) < alive_s)
    if master is not None and master != me and (master in holders or not alive):
        return master
    return alive[0] if alive else None


def next_retry_s(current_s: float, base_s: float, max_s: float) -> float:
    """The interval before asking again for a song that stalled again: doubled, at most
    ``max_s`` (a song this node cannot store must not be fetched every few seconds)."""
    return min(max(current_s, base_s) * 2, max_s)


class TransferQueue:
    """The chunks a master owes other nodes, pure: merged per (node, song) without
    duplicates, handed out one at a time, taking turns between the songs and nodes owed, so
    two recovering nodes both make progress. The driver sends what ``pop`` returns, paced, in
    the background."""

    def __init__(self) -> None:
        self._owed: dict[tuple[str, str], list[int]] = {}  # insertion order = turn order

    def add(self, node: str, song: str, indices: Iterable[int]) -> None:
        owed = self._owed.setdefault((node, song), [])
        known = set(owed)
        for i in indices:
            if i not in known:
                owed.append(i)
                known.add(i)
        if not owed:
            del self._owed[(node, song)]

    def pop(self) -> tuple[str, str, int] | None:
        """The next (node, song, chunk index) to send, or None when nothing is owed."""
        if not self._owed:
            return None
        key = next(iter(self._owed))
        owed = self._owed.pop(key)
        index = owed.pop(0)
        if owed:
            self._owed[key] = owed  # to the back of the line
        return key[0], key[1], index

    def drop(self, song: str) -> None:
        """Forget every chunk of ``song`` (it is gone from the store)."""
        for key in [k for k in self._owed if k[1] == song]:
            del self._owed[key]

    def drop_node(self, node: str) -> None:
        """Forget every chunk owed to ``node`` (it went quiet)."""
        for key in [k for k in self._owed if k[0] == node]:
            del self._owed[key]

    def __len__(self) -> int:
        return sum(len(v) for v in self._owed.values())


def choose_evictions(
    sizes: Mapping[str, int],
    last_used: Mapping[str, float],
    protected: Collection[str],
    cap_bytes: int,
) -> list[str]:
    """Songs to remove, least recently used first, until the total fits under ``cap_bytes``.

    Protected songs are never chosen, even if the store stays over its cap. A song with no
    recorded use counts as the oldest; ties are broken by hash so the choice is deterministic.
    """
    total = sum(sizes.values())
    candidates = sorted(
        (s for s in sizes if s not in protected),
        key=lambda s: (last_used.get(s, -math.inf), s),
    )
    chosen: list[str] = []
    for song in candidates:
        if total <= cap_bytes:
            break
        chosen.append(song)
        total -= sizes[song]
    return chosen


class Assembly:
    """One partially received song, persisted so that a restart resumes it.

    Chunks are written at their offsets into a preallocated ``.part`` file through a file
    descriptor kept open until :meth:`close`; each received index is appended to the ``.have``
    file (4 bytes per chunk), so nothing is ever rewritten.
    """

    def __init__(self, manifest: Manifest, part_path: Path, have_path: Path) -> None:
        self.manifest = manifest
        self.part_path = part_path
        self.have_path = have_path
        self._have: set[int] = set()
        self._bytes = 0
        resumed = self._load_have()
        self._part_fd = os.open(part_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(self._part_fd).st_size != manifest.size:
                os.ftruncate(self._part_fd, manifest.size)
                resumed = False
            if not resumed:
                self._have.clear()
                self._bytes = 0
                with open(have_path, "wb") as f:
                    f.write(_HAVE_HEADER.pack(_HAVE_MAGIC, manifest.size, manifest.chunk_size))
            self._have_fd = os.open(have_path, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            os.close(self._part_fd)
            raise

    def _load_have(self) -> bool:
        """Read the received indices back from disk; False if there is nothing usable."""
        try:
            raw = self.have_path.read_bytes()
        except FileNotFoundError:
            return False
        if read_have_header(raw) != (self.manifest.size, self.manifest.chunk_size):
            return False
        end = len(raw) - (len(raw) - _HAVE_HEADER.size) % _HAVE_INDEX.size
        n = self.manifest.n_chunks
        for (index,) in _HAVE_INDEX.iter_unpack(raw[_HAVE_HEADER.size : end]):
            if index >= n:
                return False
            if index not in self._have:
                self._have.add(index)
                self._bytes += self.manifest.chunk_span(index)[1]
        if end != len(raw):
            # A record cut short by a crash: drop it so later appends stay aligned.
            os.truncate(self.have_path, end)
        return True

    def add(self, index: int, data: bytes | memoryview) -> bool:
        """Store chunk ``index``; False if it was already held.

        ProtocolError if the index is out of range or the length is not the chunk's length.
        """
        offset, length = self.manifest.chunk_span(index)
        view = memoryview(data).cast("B")
        if view.nbytes != length:
            raise ProtocolError(
                f"chunk {index} of song {self.manifest.song} must be {length} bytes, "
                f"got {view.nbytes}"
            )
        if index in self._have:
            return False
        written = 0
        while written < length:
            written += os.pwrite(self._part_fd, view[written:], offset + written)
        os.write(self._have_fd, _HAVE_INDEX.pack(index))
        self._have.add(index)
        self._bytes += length
        return True

    def missing(self) -> list[int]:
        return plan_chunks(self.manifest, self._have)

    @property
    def have(self) -> frozenset[int]:
        return frozenset(self._have)

    @property
    def received_count(self) -> int:
        return len(self._have)

    @property
    def complete(self) -> bool:
        return len(self._have) == self.manifest.n_chunks

    @property
    def bytes_received(self) -> int:
        return self._bytes

    def close(self) -> None:
        for fd in (self._part_fd, self._have_fd):
            if fd >= 0:
                os.close(fd)
        self._part_fd = self._have_fd = -1


def read_have_header(raw: bytes) -> tuple[int, int] | None:
    """(size, chunk_size) recorded at the start of a ``.have`` file, or None if unreadable."""
    if len(raw) < _HAVE_HEADER.size:
        return None
    magic, size, chunk_size = _HAVE_HEADER.unpack_from(raw)
    return (size, chunk_size) if magic == _HAVE_MAGIC else None


class SongStore:
    """The songs one node holds, the ones it is receiving, and their last use.

    ``now`` values are only compared with each other. When a store is reopened, the recorded
    uses are replaced by their order (negative ranks), so songs used since the restart count as
    more recent whichever clock supplies ``now``, as long as it is non-negative.
    """

    def __init__(
        self, root: Path, cap_bytes: int, max_song_bytes: int = DEFAULT_MAX_SONG_BYTES
    ) -> None:
        self.root = Path(root)
        self.cap_bytes = cap_bytes
        self.max_song_bytes = max_song_bytes
        self._songs_dir = self.root / "songs"
        self._partial_dir = self.root / "partial"
        self._meta_dir = self.root / "meta"
        self._lru_path = self.root / "lru.json"
        for d in (self._songs_dir, self._partial_dir, self._meta_dir):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self._partial_dir.glob("*.tmp"):
            stale.unlink()
        self._sizes: dict[str, int] = {}
        self._meta: dict[str, dict[str, Any]] = {}  # read once from meta/, then kept in memory
        for p in self._songs_dir.iterdir():
            if HASH_RE.fullmatch(p.name) and p.is_file():
                self._sizes[p.name] = p.stat().st_size
        self._last_used = self._load_lru()
        self._lru_dirty = False
        self._assemblies: dict[str, Assembly] = {}
        self._fed: dict[str, float] = {}  # song -> when its transfer last got a chunk

    def _load_lru(self) -> dict[str, float]:
        try:
            recorded = json.loads(self._lru_path.read_text())
        except (FileNotFoundError, ValueError):
            recorded = {}
        if not isinstance(recorded, dict):
            recorded = {}

        def when(song: str) -> float:
            value = recorded.get(song)
            return float(value) if isinstance(value, (int, float)) else -math.inf

        order = sorted(self._sizes, key=lambda s: (when(s), s))
        return {song: float(i - len(order)) for i, song in enumerate(order)}

    # -- complete songs ------------------------------------------------------------------

    def has(self, song: str) -> bool:
        return song in self._sizes

    def path(self, song: str) -> Path:
        return self._songs_dir / check_hash(song)

    def songs(self) -> list[str]:
        return sorted(self._sizes)

    def size_of(self, song: str) -> int:
        try:
            return self._sizes[song]
        except KeyError:
            raise SongMissing(f"no song {song}") from None

    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def touch(self, song: str, now: float) -> None:
        """Mark a song as used at ``now`` (kept in memory, persisted by :meth:`flush`)."""
        if song in self._sizes:
            self._last_used[song] = now
            self._lru_dirty = True

    def last_used(self, song: str) -> float | None:
        return self._last_used.get(song)

    def put_bytes(self, data: bytes | memoryview, expected: str | None, now: float) -> str:
        """Store a whole song at once and return its hash (idempotent)."""
        size = memoryview(data).nbytes
        if size == 0:
            raise ProtocolError("song is empty")
        if size > self.max_song_bytes:
            raise ProtocolError(
                f"song is {size} bytes, over the limit of {self.max_song_bytes} bytes"
            )
        song = sha224_bytes(data)
        if expected is not None and check_hash(expected, "expected song hash") != song:
            raise ProtocolError(f"hash mismatch: expected {expected}, got {song}")
        if not self.has(song):
            tmp = self._partial_dir / f"{song}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
            except OSError:  # a full disk: leave nothing behind that could pass as the song
                tmp.unlink(missing_ok=True)
                raise
            self._discard_partial(song)
            os.replace(tmp, self.path(song))
            self._sizes[song] = size
        self.touch(song, now)
        return song

    def remove(self, song: str) -> None:
        """Forget a song entirely: its file, its metadata and any partial transfer."""
        check_hash(song)
        self._discard_partial(song)
        self.path(song).unlink(missing_ok=True)
        (self._meta_dir / f"{song}.json").unlink(missing_ok=True)
        self._meta.pop(song, None)
        self._sizes.pop(song, None)
        if self._last_used.pop(song, None) is not None:
            self._lru_dirty = True

    def evict(self, protected: Collection[str], now: float) -> list[str]:
        """Remove least recently used unprotected songs while the store is over its cap.

        Protected songs are in use, so they are also marked as used at ``now``.
        """
        for song in protected:
            self.touch(song, now)
        room = max(0, self.cap_bytes - self.partial_bytes())  # transfers in progress count
        victims = choose_evictions(self._sizes, self._last_used, protected, room)
        for song in victims:
            self.remove(song)
        self.flush()
        return victims

    # -- metadata ------------------------------------------------------------------------

    def set_meta(self, song: str, meta: dict[str, Any]) -> None:
        path = self._meta_dir / f"{check_hash(song)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, path)
        self._meta[song] = dict(meta)

    def set_name(self, song: str, name: str) -> None:
        """Remember the file (or URL) name a song was loaded under: its title when it has no
        tag of its own. Kept across the decode that fills in the rest."""
        meta = self.meta(song)
        if meta.get("name") != name:
            self.set_meta(song, {**meta, "name": name})

    def meta(self, song: str) -> dict[str, Any]:
        """The song's metadata (title, artist, duration...); {} if none was set. A copy."""
        cached = self._meta.get(song)
        if cached is None:
            try:
                value = json.loads((self._meta_dir / f"{check_hash(song)}.json").read_text())
            except (FileNotFoundError, ValueError):
                return {}
            if not isinstance(value, dict):
                return {}
            cached = self._meta[song] = value
        return dict(cached)

    # -- chunked transfers ---------------------------------------------------------------

    def assembly(self, manifest: Manifest) -> Assembly:
        """The assembly receiving ``manifest``'s song, resumed from disk or started afresh.

        A manifest that disagrees with the assembly in progress (size or chunk size) restarts it.
        """
        if manifest.size > self.max_song_bytes:
            raise ProtocolError(
                f"manifest field 'size' is {manifest.size} bytes, over the limit of "
                f"{self.max_song_bytes} bytes"
            )
        song = manifest.song
        current = self._assemblies.get(song)
        if current is not None:
            if current.manifest == manifest:
                return current
            self._discard_partial(song)
        if len(self._assemblies) >= MAX_ASSEMBLIES:
            raise ProtocolError(
                f"too many transfers in progress ({len(self._assemblies)}): {song} waits"
            )
        reserved = self.partial_bytes()
        if reserved + manifest.size > self.cap_bytes:
            raise ProtocolError(
                f"no room for a {manifest.size}-byte transfer: {reserved} bytes of transfers "
                f"in progress, store cap {self.cap_bytes} bytes"
            )
        asm = Assembly(
            manifest,
            self._partial_dir / f"{song}.part",
            self._partial_dir / f"{song}.have",
        )
        self._assemblies[song] = asm
        return asm

    def add_chunk(
        self, header: Mapping[str, Any], data: bytes | memoryview, now: float
    ) -> tuple[str, bool]:
        """Add one received chunk; (song, True) when it completed and verified the song.

        Chunks of a song already held are ignored. A complete song whose bytes do not hash to
        its name is discarded with its partial files and raises ProtocolError("hash mismatch").
        """
        manifest = Manifest.from_dict(header, self.max_song_bytes)
        index = header.get("index")
        if not _is_int(index):
            raise ProtocolError(f"chunk header field 'index' must be an integer, got {index!r}")
        song = manifest.song
        if self.has(song):
            return song, False
        asm = self.assembly(manifest)
        self._fed[song] = now
        asm.add(index, data)
        if not asm.complete:
            return song, False
        self._finish(asm, now)
        return song, True

    def _finish(self, asm: Assembly, now: float) -> None:
        song = asm.manifest.song
        asm.close()
        actual = sha224_file(asm.part_path)
        if actual != song:
            self._discard_partial(song)
            raise ProtocolError(f"hash mismatch: song {song} assembled to {actual}")
        os.replace(asm.part_path, self.path(song))
        asm.have_path.unlink(missing_ok=True)
        del self._assemblies[song]
        self._fed.pop(song, None)
        self._sizes[song] = asm.manifest.size
        self.touch(song, now)

    def partial_bytes(self) -> int:
        """Bytes the open transfers take on disk (each is preallocated to its song's size)."""
        return sum(a.manifest.size for a in self._assemblies.values())

    def prune_partials(self, now: float, idle_s: float = PARTIAL_IDLE_S) -> list[str]:
        """Drop the transfers (and their files) that got no chunk for ``idle_s``; a transfer
        opened without a chunk yet starts its idle time at the first call."""
        for song in self._assemblies:
            self._fed.setdefault(song, now)
        idle = [s for s in self._assemblies if now - self._fed[s] >= idle_s]
        for song in idle:
            self._discard_partial(song)
        return idle

    def _discard_partial(self, song: str) -> None:
        self._fed.pop(song, None)
        asm = self._assemblies.pop(song, None)
        if asm is not None:
            asm.close()
        for suffix in (".part", ".have"):
            (self._partial_dir / f"{song}{suffix}").unlink(missing_ok=True)

    def partial_songs(self) -> list[Manifest]:
        """Manifests of the transfers in progress on disk, sorted by song hash."""
        found: list[Manifest] = []
        for have in sorted(self._partial_dir.glob("*.have")):
            song = have.name.removesuffix(".have")
            if not HASH_RE.fullmatch(song):
                continue
            asm = self._assemblies.get(song)
            if asm is not None:
                found.append(asm.manifest)
                continue
            with open(have, "rb") as f:
                recorded = read_have_header(f.read(_HAVE_HEADER.size))
            if recorded is None:
                continue
            try:
                found.append(Manifest(song, recorded[0], recorded[1]))
            except ProtocolError:
                continue
        return found

    # -- lifecycle -----------------------------------------------------------------------

    def flush(self) -> None:
        """Write the last-use marks to disk if they changed."""
        if not self._lru_dirty:
            return
        tmp = self._lru_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._last_used, sort_keys=True))
        os.replace(tmp, self._lru_path)
        self._lru_dirty = False

    def close(self) -> None:
        """Close every open transfer (its files stay, to resume later) and flush."""
        for asm in self._assemblies.values():
            asm.close()
        self._assemblies.clear()
        self.flush()
