"""A deterministic cluster simulator's world: simulated time, clocks, an MQTT broker, disks
and fault schedules, for running several NSync nodes' pure code in one process.

The model, FoundationDB / TigerBeetle style:

- :class:`World` owns simulated time (``now``, seconds from 0.0) and an event heap ordered by
  ``(time, sequence)``: nothing runs concurrently, callbacks at the same instant run in the
  order they were scheduled, and time jumps from one event to the next. One integer seed
  determines the whole run: ``World.rng`` and the streams from ``World.fork_rng(name)`` are
  the only randomness; no wall clock, no global ``random``, no iteration over unordered sets.
- :class:`SimClock` is a node's own clock on that time (offset, drift, steps), shaped like
  ``nsync_mqtt.clock.Clock`` with "host" meaning true simulated time.
- :class:`SimBroker` is an MQTT 3.1.1 QoS 1 broker plus one link per client id (latency with
  jitter per direction, per-hop FIFO, duplicates, cuts including one-way, loss of what is in
  flight, retained messages, wills, restarts that lose everything). See ``broker.py``.
- :class:`SimDisk` is a node's files with write / fsync / atomic replace and crash loss,
  including torn appends and unsynced renames. See ``disk.py``.
- :func:`plan` draws a fault schedule from a seed and :class:`FaultRunner` applies it, handing
  node crashes and clock steps to the node adapter. See ``faults.py``.
- :class:`Trace` keeps the last lines of what happened, for a readable dump when a seed fails.

Not modelled: CPU time (node code runs in zero simulated time unless the adapter charges for
it), audio hardware and sinks, bandwidth and packet sizes, QoS 0/2 and persistent MQTT
sessions, the connect handshake's latency, DNS, several brokers, disk space and I/O errors,
memory limits. The node adapter, which wraps the real node code, and the invariants live
elsewhere.
"""

from .broker import BrokerStats, BrokerUnavailable, Conn, Link, SimBroker, Will, topic_matches
from .clock import SimClock
from .disk import SimDisk
from .faults import ALL_KINDS, Fault, FaultRunner, max_crashed, plan
from .world import Timer, Trace, World

__all__ = [
    "ALL_KINDS",
    "BrokerStats",
    "BrokerUnavailable",
    "Conn",
    "Fault",
    "FaultRunner",
    "Link",
    "SimBroker",
    "SimClock",
    "SimDisk",
    "Timer",
    "Trace",
    "Will",
    "World",
    "max_crashed",
    "plan",
    "topic_matches",
]
