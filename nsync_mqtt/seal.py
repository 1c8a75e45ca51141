"""Signed cluster messages: a MAC over every internal message and chunk, and replay protection.

Pure: no clock of its own, no I/O but :func:`read_key` / :func:`write_key`. The drivers seal
what they publish on ``nsync/<cluster>/internal/...`` and open what they receive before anything
parses it.

A sealed payload is one ASCII header line, then the payload's exact bytes::

    NSS1 <sender> <boot> <seq> <mac>\\n<payload>

- ``sender``: the node id (``[a-z0-9_-]{1,64}``).
- ``boot``: ``<counter>-<tag>``: the sender's boot counter (kept in its data directory, one more
  at every start) and 8 random hex digits; it orders a node's boots without a real-time clock.
- ``seq``: the sender's message counter within this boot (0, 1, 2, ... over all its topics).
- ``mac``: keyed BLAKE2b (16 bytes, 32 hex digits) over the cluster name, the topic, the three
  fields before it and the payload, with the 32-byte cluster key.

A receiver accepts a message only if, in this order, the header has this shape, the sender is a
peer (its own messages it drops quietly), the MAC is right, and the (boot, seq) is new: the
sender's current boot with a sequence number not seen in the last :data:`WINDOW` (duplicates of
a QoS 1 redelivery and replays fail here), or a later boot (the peer restarted). An earlier or
different boot is taken only once the current one has been silent for :data:`REBOOT_SILENCE_S`
(a peer that lost its data directory and whose clock is wrong starts counting lower again).
Everything refused is counted by reason (:attr:`Opener.rejected`), never logged one by one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from nsync_mqtt.errors import ConfigError

MAGIC = b"NSS1 "
KEY_BYTES = 32
MAC_BYTES = 16
WINDOW = 4096  # sequence numbers below the highest seen that are still accepted once
REBOOT_SILENCE_S = 10.0  # an older boot of a peer is believed only after this much silence
MAX_HEADER = 5 + 64 + 1 + 20 + 1 + 8 + 1 + 20 + 1 + 2 * MAC_BYTES + 1
_HEADER_RE = re.compile(
    rb"NSS1 ([a-z0-9_-]{1,64}) ([0-9]{1,20})-([0-9a-f]{8}) ([0-9]{1,20}) ([0-9a-f]{32})"
)
_PERSON = b"nsync-seal-v1"

# reasons a message is refused (keys of Opener.rejected)
UNSIGNED = "unsigned"  # no seal, or a malformed one
NOT_PEER = "not a peer"
BAD_MAC = "bad signature"
REPLAYED = "replayed"  # seen before, or too old for the window
OLD_BOOT = "earlier boot"


def mac(key: bytes, cluster: str, topic: str, head: bytes, payload: bytes) -> str:
    """The hex MAC of a payload on ``topic`` (``head``: b"sender boot seq")."""
    h = hashlib.blake2b(key=key, digest_size=MAC_BYTES, person=_PERSON)
    h.update(cluster.encode())
    h.update(b"\n")
    h.update(topic.encode())
    h.update(b"\n")
    h.update(head)
    h.update(b"\n")
    h.update(payload)
    return h.hexdigest()


@dataclass(frozen=True)
class Boot:
    """One run of a node: ordered by ``counter``; ``tag`` tells apart two runs with the same
    counter (a data directory restored from a backup)."""

    counter: int
    tag: str

    def __str__(self) -> str:
        return f"{self.counter}-{self.tag}"

    @classmethod
    def new(cls, counter: int, tag: str | None = None) -> Boot:
        return cls(counter, tag if tag is not None else secrets.token_hex(4))


class Sealer:
    """Seals what one node publishes: its id, its boot, a counter, the MAC."""

    def __init__(self, key: bytes, cluster: str, sender: str, boot: Boot) -> None:
        self.key = key
        self.cluster = cluster
        self.sender = sender
        self.boot = boot
        self.seq = 0

    def seal(self, topic: str, payload: bytes) -> bytes:
        head = f"{self.sender} {self.boot} {self.seq}".encode()
        self.seq += 1
        tag = mac(self.key, self.cluster, topic, head, payload)
        return b"".join((MAGIC[:4], b" ", head, b" ", tag.encode(), b"\n", payload))


@dataclass
class _PeerWindow:
    boot: Boot
    high: int  # highest sequence number accepted in this boot
    seen: int  # bit i set: high - i was accepted
    last_at: float  # when a message of this boot was last accepted


@dataclass(frozen=True)
class Opened:
    sender: str
    payload: bytes


class Opener:
    """Checks sealed messages for one node; keeps one replay window per peer (bounded by the
    peer list) and counts what it refuses."""

    def __init__(self, key: bytes, cluster: str, own_id: str, peers: frozenset[str] | set[str]):
        self.key = key
        self.cluster = cluster
        self.own_id = own_id
        self.peers = frozenset(peers)
        self.windows: dict[str, _PeerWindow] = {}
        self.rejected: dict[str, int] = {}

    def _refuse(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def open(self, now: float, topic: str, payload: bytes) -> Opened | None:
        """The sender and the inner payload, or None: refused (counted) or this node's own."""
        end = payload.find(b"\n", 0, MAX_HEADER)
        m = _HEADER_RE.fullmatch(payload, 0, end) if end > 0 else None
        if m is None:
            self._refuse(UNSIGNED)
            return None
        sender = m.group(1).decode()
        if sender == self.own_id:
            return None
        if sender not in self.peers:
            self._refuse(NOT_PEER)
            return None
        inner = payload[end + 1 :]
        head = payload[5 : m.start(5) - 1]
        expected = mac(self.key, self.cluster, topic, head, inner)
        if not hmac.compare_digest(expected.encode(), m.group(5)):
            self._refuse(BAD_MAC)
            return None
        boot = Boot(int(m.group(2)), m.group(3).decode())
        reason = self._fresh(now, sender, boot, int(m.group(4)))
        if reason is not None:
            self._refuse(reason)
            return None
        return Opened(sender, inner)

    def _fresh(self, now: float, sender: str, boot: Boot, seq: int) -> str | None:
        """None if (boot, seq) is new from ``sender`` (and record it), else the reason not."""
        w = self.windows.get(sender)
        if w is None or boot.counter > w.boot.counter:
            self.windows[sender] = _PeerWindow(boot, seq, 1, now)
            return None
        if boot != w.boot:
            # an earlier boot, or another run under the same counter: a replay, unless the
            # current run has gone quiet (the peer lost its data directory and counts anew)
            if now - w.last_at < REBOOT_SILENCE_S:
                return OLD_BOOT
            self.windows[sender] = _PeerWindow(boot, seq, 1, now)
            return None
        if seq > w.high:
            shift = seq - w.high
            w.seen = ((w.seen << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            w.high = seq
        else:
            back = w.high - seq
            if back >= WINDOW or w.seen >> back & 1:
                return REPLAYED
            w.seen |= 1 << back
        w.last_at = now
        return None


def read_key(path: Path) -> bytes:
    """The cluster key from ``path``: 64 hex digits (what ``nsync keygen`` writes), readable by
    its owner only. Raises ConfigError with what to do."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"cannot read the cluster key {path}: {err.strerror or err}") from err
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the cluster key {path} is open to other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"the cluster key {path} must hold {2 * KEY_BYTES} hex digits "
            "(write one with: nsync keygen FILE)"
        )
    return key


def write_key(path: Path, force: bool = False) -> None:
    """Write a new random cluster key to ``path``, mode 0600 from the start."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as err:
        raise ConfigError(f"{path} exists; pass --force to replace it") from err
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from err
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(secrets.token_hex(KEY_BYTES) + "\n")


def next_boot(path: Path, wall_s: float) -> Boot:
    """This run's boot: the counter in ``path`` plus one, or the wall clock's whole seconds if
    that is larger; written (and synced) before use.

    The file alone orders a node's runs on a box without a real-time clock; the wall-clock floor
    keeps a node whose data directory was wiped ahead of its earlier runs whenever its clock is
    right (NTP, fake-hwclock), so its peers believe it at once instead of after
    :data:`REBOOT_SILENCE_S`. A clock that is wrong only costs that wait.
    """
    try:
        counter = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        counter = 0
    counter = max(counter + 1, int(wall_s) if 0 < wall_s < 10**19 else 0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(f"{counter}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return Boot.new(counter)
