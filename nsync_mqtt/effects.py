"""What a node's pure roles ask their driver to do (the ``Ready`` of etcd's raft).

A handler of :mod:`nsync_mqtt.speaker` or :mod:`nsync_mqtt.master` takes ``now`` and an event
and returns an :class:`Effects`. The driver (``node.py``, or the simulator of the test lab)
carries it out in one place and in this order:

1. ``early``: messages that may leave before the durable state is saved (the master's new
   operation: the speakers' round trip overlaps the master's fsync);
2. ``persist``: save the node's durable state (``Speaker.durable()``; with ``op``, the save
   appends that operation to the log instead of rewriting the state); then tell the role
   ``Speaker.persisted(now)`` (the master counts its own copy of an operation only then);
3. ``out``: messages that promise what was saved (an ack, a vote, a reply), in order;
4. ``sink``, ``attach``, ``decode``, ``chunks``, ``remove``, ``evict_keep``: the rest.

So "save before send" is data here, not a comment in a callback. The roles never touch a socket,
a file or a thread, and read no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nsync_mqtt.playlist import Operation
from nsync_mqtt.replication import Manifest

PLAY, STOP, HOLD, RETIME = "play", "stop", "hold", "retime"


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class SinkPlan:
    """What the sink should do, on this node's clock.

    ``play``: play ``song`` from ``frame`` with that frame reaching the DAC at local time ``at``,
    the song advancing ``speed`` seconds per local second (the master's clock rate seen from
    this node's clock);
    ``retime``: the same schedule through a newer clock estimate (the sink steers onto it);
    ``stop``: stop at local time ``at`` (now if None), ``frame`` being the frame reached then;
    ``hold``: change nothing but the volume."""

    action: str
    volume: int
    song: str | None = None
    frame: int = 0
    at: float | None = None
    speed: float = 1.0
    key: float | None = None  # the schedule (its instant on the master's clock): retimes name it


@dataclass(frozen=True)
class SendChunks:
    """Send ``node`` these chunks of ``song`` (every chunk when ``indices`` is None), paced,
    in the background."""

    node: str
    song: str
    indices: tuple[int, ...] | None


@dataclass(frozen=True)
class Decode:
    """Decode ``song`` to PCM (and read its tags) off the event loop, then call
    ``Speaker.decoded``. ``upload_reply``: the master answers the whole-file upload then."""

    song: str
    upload_reply: bool = False


@dataclass
class Effects:
    early: list[Publish] = field(default_factory=list)
    persist: bool = False
    op: Mapping[str, Any] | Operation | None = None  # the operation this save adds, if one
    out: list[Publish] = field(default_factory=list)
    sink: SinkPlan | None = None
    attach: list[str] = field(default_factory=list)  # a decoded song for the sink playing it
    decode: list[Decode] = field(default_factory=list)
    chunks: list[SendChunks] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)  # songs to delete from the store
    names: list[tuple[str, str]] = field(default_factory=list)  # (song, its file or URL name)
    expect: list[Manifest] = field(default_factory=list)  # client uploads under way (chunk/all)
    evict_keep: str | None = None  # keep the store under its cap, sparing this new song
    node_state: bool = False  # publish this node's retained state now
    state_soon: bool = False  # (master) publish the cluster's retained state shortly
    wake: bool = False  # the election's deadline may have moved
    faults: list[tuple[str, Exception]] = field(default_factory=list)  # bad input, counted

    def __bool__(self) -> bool:
        return bool(
            self.early
            or self.persist
            or self.out
            or self.sink
            or self.attach
            or self.decode
            or self.chunks
            or self.remove
            or self.names
            or self.expect
            or self.evict_keep
            or self.node_state
            or self.state_soon
            or self.wake
            or self.faults
        )
