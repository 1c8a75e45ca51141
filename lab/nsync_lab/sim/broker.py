"""A model of an MQTT 3.1.1 broker at QoS 1 (clean sessions) on simulated time.

Every client connection has a :class:`Link` named by its client id: an uplink (client →
broker) and a downlink (broker → client), each with a delay model (``base ± jitter``, uniform,
never negative) and a cut flag. A link outlives connections: a node that reconnects with the
same client id gets the same link, cuts and delays included.

What a message goes through:

- ``Conn.publish`` sends it up the uplink; it reaches the broker one uplink delay later. The
  broker updates its retained store (``retain=True`` with an empty payload clears the topic) and
  sends it down each matching subscriber's downlink with ``retain=False`` (a live delivery),
  once per subscriber however many of its filters match.
- ``Conn.subscribe`` also travels up, so a subscription takes effect one uplink delay later and
  in order with the connection's publishes; the broker then sends every matching retained
  message down with ``retain=True``.
- Per link and direction delivery is FIFO: a message never overtakes an earlier one on the same
  hop (its arrival is clamped to the previous arrival). Across links there is no order, so two
  clients' messages can reach a third in either order.
- With probability ``dup_p`` a hop delivers a message twice (QoS 1 redelivery), the copy just
  after the original and before anything later on that hop. A duplicate on the uplink reaches
  every subscriber twice.
- A message in flight on a hop is lost if the connection drops or the hop is cut before it
  arrives; a message sent on a cut hop is lost. ``heal`` brings back no message.
- A SUBSCRIBE or UNSUBSCRIBE is not lost to a cut while its connection lives: it is held and
  reaches the broker once the uplink heals (TCP retransmits it; the real client waits for the
  SUBACK), and is lost only if the connection ends first. A live connection that silently lost
  its subscriptions is not something TCP can produce.
- A publish or subscribe on a connection that is no longer connected is dropped and returns
  False. (paho queues while disconnected only up to a point; the node code is expected to
  republish what matters after reconnecting.)

Connections end four ways: ``Conn.disconnect()`` (clean, no will, no callback); a second
``connect`` with the same client id (takeover: the old connection's will is published, the old
connection is told); ``drop`` or a cut with ``drop_after_s`` (as on a keepalive timeout: will
published, client told); ``restart`` / ``stop`` (the broker process dies: every connection,
every subscription, every retained message and everything in flight is gone; no wills; clients
are told). "Told" means ``Conn.on_disconnect()`` runs one downlink base delay later; after that
the client must ``connect`` again, which raises :class:`BrokerUnavailable` while the broker is
down or the client's link is cut (either way).

Not modelled: QoS 0 and 2, persistent sessions, in-flight windows and backpressure, packet
sizes and bandwidth, CONNECT/CONNACK latency (``connect`` is instant), keepalive timing other
than ``drop_after_s``, ``$SYS`` topics, authentication.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .world import Timer, World

DEFAULT_BASE_S = 0.0003
DEFAULT_JITTER_S = 0.0002

OnMessage = Callable[[str, bytes, bool], object]
OnDisconnect = Callable[[], object]


class BrokerUnavailable(ConnectionError):
    """``connect`` while the broker is down or the client's link is cut."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = False


def check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"invalid topic name {topic!r}")


def check_filter(pattern: str) -> None:
    if not pattern:
        raise ValueError("empty topic filter")
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise ValueError(f"'#' must be the last level in {pattern!r}")
        elif level != "+" and ("+" in level or "#" in level):
            raise ValueError(f"wildcard must be a whole level in {pattern!r}")


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` one level, ``#`` the rest (and the parent level itself);
    wildcards at the first level do not match topics starting with ``$``."""
    if pattern == topic:
        return True
    if "+" not in pattern and "#" not in pattern:
        return False
    if topic[:1] == "$" and pattern[:1] in ("+", "#"):
        return False
    p = pattern.split("/")
    t = topic.split("/")
    n = len(t)
    for i, seg in enumerate(p):
        if seg == "#":
            return True
        if i >= n or (seg != "+" and seg != t[i]):
            return False
    return len(p) == n


class Link:
    """One client id's network path to the broker; survives reconnects."""

    __slots__ = (
        "client_id",
        "down_base",
        "down_cut",
        "down_gen",
        "down_jitter",
        "down_last",
        "drop_timer",
        "up_base",
        "up_cut",
        "up_gen",
        "up_held",
        "up_jitter",
        "up_last",
    )

    def __init__(self, client_id: str, up: tuple[float, float], down: tuple[float, float]):
        self.client_id = client_id
        self.up_base, self.up_jitter = up
        self.down_base, self.down_jitter = down
        self.up_cut = False
        self.down_cut = False
        self.up_gen = 0  # bumped by a cut: what was in flight on the hop is lost
        self.down_gen = 0
        self.up_last = 0.0  # arrival time of the last message scheduled on the hop (FIFO)
        # (un)subscribes waiting for the uplink to heal: (conn, arrive function, pattern)
        self.up_held: list[tuple[Conn, Callable[..., None], str]] = []
        self.down_last = 0.0
        self.drop_timer: Timer | None = None


@dataclass
class BrokerStats:
    published: int = 0  # publishes accepted by a connected client
    routed: int = 0  # messages (incl. wills, uplink duplicates) the broker processed
    delivered: int = 0  # on_message calls
    duplicates: int = 0  # extra copies made by dup_p (either hop)
    lost_cut: int = 0  # sent on, or in flight on, a cut hop
    lost_disconnect: int = 0  # in flight to or from a connection that ended
    dropped_offline: int = 0  # publish/subscribe on a connection no longer connected
    connects: int = 0
    drops: int = 0  # connections ended by anything but Conn.disconnect()
    restarts: int = 0


class Conn:
    """One MQTT connection of one client. Create with :meth:`SimBroker.connect`."""

    __slots__ = (
        "broker",
        "client_id",
        "connected",
        "filters",
        "link",
        "on_disconnect",
        "on_message",
        "serial",
        "will",
    )

    def __init__(
        self,
        broker: SimBroker,
        client_id: str,
        serial: int,
        link: Link,
        on_message: OnMessage,
        on_disconnect: OnDisconnect | None,
        will: Will | None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.serial = serial
        self.link = link
        self.on_message = on_message
        self.on_disconnect = on_disconnect
        self.will = will
        self.connected = True
        self.filters: list[str] = []  # as the broker knows them (after the SUBSCRIBE arrived)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "gone"
        return f"<Conn {self.client_id}#{self.serial} {state}>"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Send a QoS 1 publish; False (and dropped) if this connection has ended."""
        b = self.broker
        if not self.connected:
            b.stats.dropped_offline += 1
            return False
        b.stats.published += 1
        if b.trace_messages:
            b.world.log(self.client_id, "pub", f"{topic} {len(payload)}B{' R' if retain else ''}")
        b._send_up(self, b._arrive_publish, (topic, payload, retain), True)
        return True

    def subscribe(self, pattern: str) -> bool:
        """Subscribe (takes effect when the SUBSCRIBE reaches the broker); False if ended."""
        check_filter(pattern)
        b = self.broker
        if not self.connected:
            b.stats.dropped_offline += 1
            return False
        b._send_control(self, b._arrive_subscribe, pattern)
        return True

    def unsubscribe(self, pattern: str) -> bool:
        b = self.broker
        if not self.connected:
            b.stats.dropped_offline += 1
            return False
        b._send_control(self, b._arrive_unsubscribe, pattern)
        return True

    def disconnect(self) -> None:
        """Clean disconnect: no will, no on_disconnect; whatever is in flight is lost."""
        if self.connected:
            self.broker._end(self, will=False, notify=False, why="disconnect")


class SimBroker:
    """The broker and the links of every client. See the module docstring for the semantics."""

    def __init__(
        self,
        world: World,
        *,
        up_delay: tuple[float, float] = (DEFAULT_BASE_S, DEFAULT_JITTER_S),
        down_delay: tuple[float, float] = (DEFAULT_BASE_S, DEFAULT_JITTER_S),
        dup_p: float = 0.0,
        rng: random.Random | None = None,
        trace_messages: bool = False,
    ) -> None:
        self.world = world
        self.rng = rng if rng is not None else world.fork_rng("broker")
        self.default_up = up_delay
        self.default_down = down_delay
        self.dup_p = dup_p
        self.trace_messages = trace_messages
        self.up = True
        self.links: dict[str, Link] = {}
        self.conns: dict[str, Conn] = {}  # the live connection of each client id
        self.retained: dict[str, bytes] = {}
        self.stats = BrokerStats()
        self._serial = 0
        self._match_cache: dict[str, tuple[Conn, ...]] = {}
        self._restart_timer: Timer | None = None

    # --- clients ------------------------------------------------------------------------

    def link(self, client_id: str) -> Link:
        """The link of ``client_id`` (created with the default delays if new)."""
        link = self.links.get(client_id)
        if link is None:
            link = self.links[client_id] = Link(client_id, self.default_up, self.default_down)
        return link

    def connect(
        self,
        client_id: str,
        on_message: OnMessage,
        on_disconnect: OnDisconnect | None = None,
        will: Will | None = None,
    ) -> Conn:
        """A new clean-session connection; raises BrokerUnavailable if down or cut."""
        if not self.up:
            raise BrokerUnavailable("broker down")
        link = self.link(client_id)
        if link.up_cut or link.down_cut:
            raise BrokerUnavailable(f"link of {client_id} cut")
        if will is not None:
            check_topic(will.topic)
        old = self.conns.get(client_id)
        if old is not None:
            self._end(old, will=True, notify=True, why="takeover")
        self._serial += 1
        conn = Conn(self, client_id, self._serial, link, on_message, on_disconnect, will)
        self.conns[client_id] = conn
        self.stats.connects += 1
        self.world.log(client_id, "connect", f"#{conn.serial}")
        return conn

    def drop(self, client_id: str) -> None:
        """End ``client_id``'s connection as a keepalive timeout would: will, client told."""
        conn = self.conns.get(client_id)
        if conn is not None:
            self._end(conn, will=True, notify=True, why="dropped")

    # --- faults -------------------------------------------------------------------------

    def cut(
        self, client_id: str, up: bool = True, down: bool = True, drop_after_s: float | None = None
    ) -> None:
        """Cut one or both hops of a link: in-flight and later messages on them are lost.

        The connection stays up (a silent black hole) unless ``drop_after_s`` is given: then,
        if the link is still cut that much later, the connection is dropped like a keepalive
        timeout (will published, client told).
        """
        link = self.link(client_id)
        if up:
            link.up_cut = True
            link.up_gen += 1
        if down:
            link.down_cut = True
            link.down_gen += 1
        self.world.log(client_id, "cut", f"up={link.up_cut} down={link.down_cut}")
        if drop_after_s is not None and link.drop_timer is None:
            link.drop_timer = self.world.after(drop_after_s, self._cut_timeout, link)

    def heal(self, client_id: str, up: bool = True, down: bool = True) -> None:
        link = self.link(client_id)
        if up:
            link.up_cut = False
        if down:
            link.down_cut = False
        if not (link.up_cut or link.down_cut) and link.drop_timer is not None:
            link.drop_timer.cancel()
            link.drop_timer = None
        self.world.log(client_id, "heal", f"up={link.up_cut} down={link.down_cut}")
        if not link.up_cut and link.up_held:
            held, link.up_held = link.up_held, []
            for conn, fn, pattern in held:
                if conn.connected:
                    self._send_control(conn, fn, pattern)

    def set_delay(
        self, client_id: str, base_s: float, jitter_s: float, up: bool = True, down: bool = True
    ) -> None:
        link = self.link(client_id)
        if up:
            link.up_base, link.up_jitter = base_s, jitter_s
        if down:
            link.down_base, link.down_jitter = base_s, jitter_s
        self.world.log(client_id, "delay", f"{base_s * 1e3:.3f}±{jitter_s * 1e3:.3f} ms")

    def reset_delay(self, client_id: str) -> None:
        link = self.link(client_id)
        link.up_base, link.up_jitter = self.default_up
        link.down_base, link.down_jitter = self.default_down

    def stop(self) -> None:
        """The broker process dies: connections, subscriptions, retained, in flight: gone."""
        if not self.up:
            return
        self.up = False
        self.stats.restarts += 1
        self.world.log("broker", "stop", f"{len(self.conns)} connections dropped")
        for conn in list(self.conns.values()):
            self._end(conn, will=False, notify=True, why="broker stopped")
        self.retained.clear()
        self._match_cache.clear()

    def start(self) -> None:
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None
        if not self.up:
            self.up = True
            self.world.log("broker", "start", "")

    def restart(self, downtime_s: float) -> None:
        """``stop()`` now and ``start()`` ``downtime_s`` later."""
        self.stop()
        if self._restart_timer is not None:
            self._restart_timer.cancel()
        self._restart_timer = self.world.after(downtime_s, self.start)

    # --- internals ----------------------------------------------------------------------

    def _draw(self, base: float, jitter: float) -> float:
        if jitter:
            d = base + jitter * (2.0 * self.rng.random() - 1.0)
            return d if d > 0.0 else 0.0
        return base

    def _send_up(
        self, conn: Conn, fn: Callable[..., object], args: tuple[object, ...], may_dup: bool
    ) -> None:
        link = conn.link
        if link.up_cut:
            self.stats.lost_cut += 1
            return
        world = self.world
        t = world.now + self._draw(link.up_base, link.up_jitter)
        if t < link.up_last:
            t = link.up_last
        full = (conn, link.up_gen, *args)
        world.post(t, fn, full)
        if may_dup and self.dup_p and self.rng.random() < self.dup_p:
            self.stats.duplicates += 1
            t += self._draw(link.up_base, link.up_jitter)
            world.post(t, fn, full)
        link.up_last = t

    def _send_control(self, conn: Conn, fn: Callable[..., None], pattern: str) -> None:
        """A SUBSCRIBE/UNSUBSCRIBE: up the uplink in order, or held while the uplink is cut."""
        if conn.link.up_cut:
            conn.link.up_held.append((conn, fn, pattern))
        else:
            self._send_up(conn, fn, (pattern,), False)

    def _control_arrived(self, conn: Conn, gen: int, fn: Callable[..., None], pattern: str) -> bool:
        """As _arrived, but a packet a cut caught in flight is sent again (held if still cut)."""
        if conn.connected and conn.link.up_gen != gen:
            self._send_control(conn, fn, pattern)
            return False
        return self._arrived(conn, gen)

    def _arrived(self, conn: Conn, gen: int) -> bool:
        if not conn.connected:
            self.stats.lost_disconnect += 1
            return False
        if conn.link.up_gen != gen:
            self.stats.lost_cut += 1
            return False
        return True

    def _arrive_publish(
        self, conn: Conn, gen: int, topic: str, payload: bytes, retain: bool
    ) -> None:
        if self._arrived(conn, gen):
            self._route(topic, payload, retain)

    def _arrive_subscribe(self, conn: Conn, gen: int, pattern: str) -> None:
        if not self._control_arrived(conn, gen, self._arrive_subscribe, pattern):
            return
        if pattern not in conn.filters:
            conn.filters.append(pattern)
            self._match_cache.clear()
        for topic, payload in list(self.retained.items()):
            if topic_matches(pattern, topic):
                self._send_down(conn, topic, payload, True)

    def _arrive_unsubscribe(self, conn: Conn, gen: int, pattern: str) -> None:
        if self._control_arrived(conn, gen, self._arrive_unsubscribe, pattern) and (
            pattern in conn.filters
        ):
            conn.filters.remove(pattern)
            self._match_cache.clear()

    def _route(self, topic: str, payload: bytes, retain: bool) -> None:
        self.stats.routed += 1
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        subs = self._match_cache.get(topic)
        if subs is None:
            subs = tuple(
                c for c in self.conns.values() if any(topic_matches(f, topic) for f in c.filters)
            )
            self._match_cache[topic] = subs
        send = self._send_down
        for conn in subs:
            send(conn, topic, payload, False)

    def _send_down(self, conn: Conn, topic: str, payload: bytes, retain: bool) -> None:
        link = conn.link
        if link.down_cut:
            self.stats.lost_cut += 1
            return
        world = self.world
        t = world.now + self._draw(link.down_base, link.down_jitter)
        if t < link.down_last:
            t = link.down_last
        args = (conn, link.down_gen, topic, payload, retain)
        world.post(t, self._deliver, args)
        if self.dup_p and self.rng.random() < self.dup_p:
            self.stats.duplicates += 1
            t += self._draw(link.down_base, link.down_jitter)
            world.post(t, self._deliver, args)
        link.down_last = t

    def _deliver(self, conn: Conn, gen: int, topic: str, payload: bytes, retain: bool) -> None:
        if not conn.connected:
            self.stats.lost_disconnect += 1
            return
        if conn.link.down_gen != gen:
            self.stats.lost_cut += 1
            return
        self.stats.delivered += 1
        if self.trace_messages:
            flag = " R" if retain else ""
            self.world.log(conn.client_id, "recv", f"{topic} {len(payload)}B{flag}")
        conn.on_message(topic, payload, retain)

    def _end(self, conn: Conn, *, will: bool, notify: bool, why: str) -> None:
        conn.connected = False
        if self.conns.get(conn.client_id) is conn:
            del self.conns[conn.client_id]
        self._match_cache.clear()
        if why != "disconnect":
            self.stats.drops += 1
        self.world.log(conn.client_id, "conn-end", f"#{conn.serial} {why}")
        if will and conn.will is not None:
            w = conn.will
            self._route(w.topic, w.payload, w.retain)
        if notify and conn.on_disconnect is not None:
            self.world.post(self.world.now + conn.link.down_base, conn.on_disconnect, ())

    def _cut_timeout(self, link: Link) -> None:
        link.drop_timer = None
        if link.up_cut or link.down_cut:
            self.drop(link.client_id)
