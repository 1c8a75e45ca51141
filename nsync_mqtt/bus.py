"""The node's MQTT connection: paho-mqtt driven by the asyncio loop, no network thread.

- paho runs inside the event loop: the loop watches the socket (``add_reader``, and
  ``add_writer`` while paho has bytes to send), keepalive pings go out from a once-a-second
  tick, and handlers run straight from paho's message callback. A message therefore costs no
  hand-over between threads on the way in or out.
- Protocol MQTT 3.1.1 only (the embedded amqtt broker has no MQTT 5), clean sessions.
- TCP_NODELAY is set on every (re)connect: paho never sets it, and without it every
  receive-then-publish exchange (acks, replies) waits ~40 ms for the peer's delayed ACK.
- The TCP connection is opened by the loop without blocking it (name lookup, then a
  non-blocking connect bounded by ``CONNECT_TIMEOUT_S``) and handed to paho, so a broker host
  that is switched off does not stall playback control. Only a TLS handshake, once the host
  answered, runs blocking (bounded by the same timeout).
- A lost connection (broker killed, network down, keepalive expired) is reconnected with
  exponential backoff from ``RECONNECT_MIN_DELAY_S`` to ``RECONNECT_MAX_DELAY_S``.
- Subscriptions are remembered and restored after every reconnect (a restarted broker forgets
  them); the ``on_connect`` callback runs once they are acknowledged, so the node can republish
  its retained state.
- Messages reach only the handler of the filter they match; anything else is dropped (amqtt
  re-sends retained messages matching other clients' subscriptions). A handler that raises is
  reported to ``on_handler_error`` (logged, without one) and delivery goes on.
- Several broker URLs form a failover list: when the current broker has been unreachable for
  ``failover_after_s``, the next one is tried, round robin. While on any but the first, the bus
  checks every ``PREFER_CHECK_S`` whether an earlier broker of the list answers an MQTT CONNECT
  again (not merely a TCP connect: a proxy in front of a dead broker accepts those) and moves
  back to it: every node of a cluster, given the same list, converges on the
  first reachable broker. All URLs of one list must agree on TLS (``mqtt://`` or ``mqtts://``).
- ``mqtts://`` checks the broker's certificate and host name against the system's CAs, or
  against ``ca_file`` only (a household's private CA).
- ``close()`` sends DISCONNECT, so the broker does not publish the last will.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from nsync_mqtt.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MAX_INFLIGHT_MESSAGES = 64
CONNECT_TIMEOUT_S = 2.0  # TCP connect (and TLS handshake) per attempt
RECONNECT_MIN_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 2.0
FAILOVER_AFTER_S = 1.0
PREFER_CHECK_S = 2.0  # how often a bus on a later broker looks whether an earlier one is back
TICK_S = 1.0  # keepalive checks; must stay well below the keepalive interval
CLOSE_TIMEOUT_S = 2.0  # close() waits this long for queued messages and the DISCONNECT

WAIT_LOG_S = (5.0, 10.0, 20.0, 40.0, 60.0)  # a bus waiting for its broker says so then ...
WAIT_LOG_EVERY_S = 60.0  # ... and every minute after

Handler = Callable[[str, bytes, bool], None]


def wait_log_times() -> Iterator[float]:
    """The times (seconds since the start) at which a bus still waiting for its broker logs it:
    ``WAIT_LOG_S``, then every ``WAIT_LOG_EVERY_S``, for ever."""
    yield from WAIT_LOG_S
    yield from itertools.count(WAIT_LOG_S[-1] + WAIT_LOG_EVERY_S, WAIT_LOG_EVERY_S)


_C = TypeVar("_C", bound=mqtt.Client)


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = ""
        if self.username is not None:
            user = self.username + (":***" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """Parse ``mqtt://[user:password@]host[:port]`` (``mqtts://`` for TLS)."""
    if not isinstance(url, str):
        raise ConfigError(f"broker: expected a URL string, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        # the parser's message may quote part of a password (a # or / in it ends the host part)
        why = str(err) if "@" not in url else "no valid host:port after the login"
        hint = "" if "@" not in url else " (write # / ? % in a password as %23 %2F %3F %25)"
        raise ConfigError(f"broker: bad URL {redact_url(url)!r}: {why}{hint}") from None
    shown = redact_url(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(f"broker: URL {shown!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"broker: URL {shown!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker: URL {shown!r} must not have a path, query or fragment")
    if port == 0:
        raise ConfigError(f"broker: URL {shown!r} has port 0")
    if parts.username == "":
        raise ConfigError(f"broker: URL {shown!r} has an empty user name")
    return BrokerURL(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "mqtts",
    )


def redact_url(url: str) -> str:
    """The broker URL (or what was meant as one) with any password replaced by ``***``, for
    logs and error messages. Works on malformed URLs too (no scheme, ``@`` in the password)."""
    head, at, hostpart = url.rpartition("@")
    if not at:
        return url
    scheme, sep, userinfo = head.partition("://")
    if not sep:
        scheme, userinfo = "", head
    if ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (unix transport, websocket wrapper)
        pass


def _new_client(
    cls: type[_C], client_id: str, url: BrokerURL, ca_file: str | os.PathLike[str] | None = None
) -> _C:
    client = cls(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    if url.username is not None:
        client.username_pw_set(url.username, url.password)
    if url.tls:  # the system's CAs, or only those of ca_file (a private CA)
        client.tls_set(ca_certs=os.fspath(ca_file) if ca_file is not None else None)
    client.max_inflight_messages_set(MAX_INFLIGHT_MESSAGES)
    client.max_queued_messages_set(0)  # unlimited
    client.connect_timeout = CONNECT_TIMEOUT_S
    client.on_socket_open = _set_nodelay
    return client


def new_paho_client(
    client_id: str, url: BrokerURL, ca_file: str | os.PathLike[str] | None = None
) -> mqtt.Client:
    """A paho client set up the NSync way: MQTT 3.1.1, TCP_NODELAY, deep queues, credentials;
    for ``mqtts://``, TLS that trusts the system's CAs or, given ``ca_file``, only its CAs."""
    return _new_client(mqtt.Client, client_id, url, ca_file)


class _HandOverClient(mqtt.Client):
    """A paho client that adopts a TCP connection the event loop has already opened.

    paho's own connect blocks the calling thread in ``socket.create_connection``; the bus opens
    the connection without blocking the loop and leaves it in ``connected_socket`` for paho's
    next (re)connect to pick up.
    """

    connected_socket: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:
        sock, self.connected_socket = self.connected_socket, None
        if sock is None:
            return super()._create_socket_connection()
        sock.settimeout(self.connect_timeout)  # as paho's own, for a TLS handshake
        return sock


async def _open_tcp(host: str, port: int) -> socket.socket:
    """A connected TCP socket to host:port, opened without blocking the event loop."""
    loop = asyncio.get_running_loop()
    try:  # an IP address needs no lookup (and no executor thread)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as err:
            sock.close()
            error = err
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


def _connect_packet(client_id: str, url: BrokerURL, keepalive_s: int = 5) -> bytes:
    """An MQTT 3.1.1 CONNECT packet (clean session, no will)."""

    def text(v: str) -> bytes:
        raw = v.encode()
        return len(raw).to_bytes(2, "big") + raw

    flags = 0x02
    payload = text(client_id)
    if url.username is not None:
        flags |= 0x80
        payload += text(url.username)
        if url.password is not None:
            flags |= 0x40
            payload += text(url.password)
    body = text("MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big") + payload
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([0x10]) + bytes(encoded) + body


async def _broker_answers(url: BrokerURL, timeout_s: float) -> bool:
    """True if an MQTT broker at `url` accepts a CONNECT (CONNACK, return code 0). A TCP port
    that merely accepts connections (a proxy or port forward to a dead broker) is not enough.
    For TLS URLs only the TCP connection is checked."""
    loop = asyncio.get_running_loop()
    try:
        sock = await asyncio.wait_for(_open_tcp(url.host, url.port), timeout_s)
    except (TimeoutError, OSError):
        return False
    try:
        if url.tls:
            return True
        probe_id = f"nsync-probe-{time.monotonic_ns() % 10**9}"
        await loop.sock_sendall(sock, _connect_packet(probe_id, url))
        reply = b""
        async with asyncio.timeout(timeout_s):
            while len(reply) < 4:
                chunk = await loop.sock_recv(sock, 4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
        ok = reply[0] == 0x20 and reply[3] == 0
        if ok:
            await loop.sock_sendall(sock, b"\xe0\x00")  # DISCONNECT
        return ok
    except (TimeoutError, OSError):
        return False
    finally:
        sock.close()


class Bus:
    """One node's connection to the MQTT broker (or to the first reachable of several).

    Everything but ``publish`` is meant to be called from the thread of the event loop that
    ran ``start()``; ``publish`` may be called from any thread.
    """

    def __init__(
        self,
        urls: Sequence[str],
        client_id: str,
        *,
        will: tuple[str, bytes, bool] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_handler_error: Callable[[str, Exception], object] | None = None,
        keepalive_s: int = 5,
        failover_after_s: float = FAILOVER_AFTER_S,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if not urls:
            raise ConfigError("broker: at least one broker URL is required")
        self._urls = [parse_broker_url(u) for u in urls]
        if len({u.tls for u in self._urls}) > 1:
            raise ConfigError("broker: cannot mix mqtt:// and mqtts:// URLs in one failover list")
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._on_handler_error = on_handler_error
        self._keepalive_s = keepalive_s
        self._failover_after_s = failover_after_s

        self._subs: dict[str, int] = {}  # topic filter -> qos
        self._connected = False
        self._closing = False
        # host monotonic time at which the message being handled was read off the socket (set
        # right before each handler runs): clock sync stamps with it
        self.received_at = 0.0
        self._restore_mid: int | None = None
        self._url_index = 0
        self._down_since = time.monotonic()
        self._next_prefer_check = 0.0
        self._last_error = ""  # why the last connect attempt failed
        self._retry_delay_s = RECONNECT_MIN_DELAY_S
        self._retry_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._ready = asyncio.Event()  # connected and subscriptions restored
        self._wake = asyncio.Event()  # the connection dropped: reconnect
        self._socket_closed = asyncio.Event()
        self._in_read = False  # paho is processing received packets (and calling handlers)
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._acks: dict[int, asyncio.Future[None]] = {}  # mid -> PUBACK awaited

        client = _new_client(_HandOverClient, client_id, self._urls[0], ca_file)
        if will is not None:
            topic, payload, retain = will
            client.will_set(topic, payload, qos=1, retain=retain)
        client.on_socket_open = self._paho_socket_open
        client.on_socket_close = self._paho_socket_close
        client.on_socket_register_write = self._paho_register_write
        client.on_socket_unregister_write = self._paho_unregister_write
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_subscribe = self._paho_subscribe
        client.on_publish = self._paho_publish
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def url(self) -> BrokerURL:
        """The broker currently used (or being tried)."""
        return self._urls[self._url_index]

    async def start(self, timeout_s: float | None = 10.0) -> None:
        """Connect in the background and wait until connected; BrokerError after timeout_s.

        With ``timeout_s=None`` it waits as long as it takes (a box that boots before its
        broker's box, a broker restarting), saying so in the log at growing intervals
        (``WAIT_LOG_S``); cancel the call to give up."""
        if self._started:
            raise BrokerError("bus already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._down_since = time.monotonic()
        self._task = self._loop.create_task(self._maintain(), name="nsync-bus")
        if timeout_s is None:
            await self._wait_ready_forever()
            return
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            await self.close()
            raise BrokerError(
                f"could not connect to the MQTT broker within {timeout_s:g} s{self._tried()}: "
                f"{self._last_error or f'{self.url} did not answer'}"
            ) from None

    def _tried(self) -> str:
        return f" (tried {', '.join(map(str, self._urls))})" if len(self._urls) > 1 else ""

    async def _wait_ready_forever(self) -> None:
        started = time.monotonic()
        for after_s in wait_log_times():
            remaining = started + after_s - time.monotonic()
            try:
                await asyncio.wait_for(self._ready.wait(), max(0.0, remaining))
            except TimeoutError:
                log.warning(
                    "no MQTT broker after %.0f s%s: %s; still trying",
                    time.monotonic() - started,
                    self._tried(),
                    self._last_error or f"{self.url} did not answer",
                )
                continue
            if time.monotonic() - started >= WAIT_LOG_S[0]:
                log.info("connected to the MQTT broker after %.0f s", time.monotonic() - started)
            return

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call handler(topic, payload, retain) in the loop thread for each matching message.

        May be called before start(); the subscription then goes out with the first connect.
        """
        self._client.message_callback_add(topic_filter, self._make_callback(topic_filter, handler))
        self._subs[topic_filter] = qos
        if self._connected:
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        known = self._subs.pop(topic_filter, None) is not None
        if known and self._connected:
            self._client.unsubscribe(topic_filter)
        self._client.message_callback_remove(topic_filter)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; never blocks. Queued QoS 1 messages go out after a reconnect.

        Callable from any thread: off the loop thread, the message is handed to the loop.
        """
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            try:
                loop.call_soon_threadsafe(self._publish, topic, payload, qos, retain)
            except RuntimeError:  # loop closed while shutting down
                log.debug("event loop closed, dropping message on %s", topic)
            return
        self._publish(topic, payload, qos, retain)

    async def publish_acked(self, topic: str, payload: bytes, timeout_s: float) -> bool:
        """Publish (QoS 1) from the loop thread and wait until the broker has the message
        (its PUBACK): a sender that paces itself this way keeps at most a few messages queued
        ahead of everyone else's. False if ``timeout_s`` passed first (the message stays
        queued, and goes out after a reconnect like any other) or the bus is closing."""
        if self._closing:
            return False
        info = self._client.publish(topic, payload, 1)
        if not self._in_read and self._client.want_write():
            self._client.loop_write()
        if info.is_published():
            return True
        fut = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = fut
        try:
            await asyncio.wait_for(fut, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            if self._acks.get(info.mid) is fut:
                del self._acks[info.mid]

    async def close(self) -> None:
        """Disconnect cleanly (queued messages, then DISCONNECT: no last will)."""
        if self._closing:
            return
        self._closing = True
        if not self._started:
            return
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client = self._client
        if client.socket() is not None:
            self._socket_closed.clear()
            client.disconnect()  # paho closes the socket once the DISCONNECT is written
            try:
                await asyncio.wait_for(self._socket_closed.wait(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("%s did not take the DISCONNECT in time, dropping it", self.url)
                client._sock_close()  # paho has no public way to drop a socket
        self._connected = False

    # --- internals: connection upkeep ---------------------------------------------------------

    async def _maintain(self) -> None:
        """Connect, send keepalive pings, and reconnect with backoff whenever the link drops."""
        client = self._client
        while True:
            self._wake.clear()
            try:
                if client.socket() is None and time.monotonic() >= self._retry_at:
                    await self._connect_once()
                if client.socket() is not None:
                    client.loop_misc()  # PINGREQ when due; drops a link that stopped answering
                if self._connected and self._url_index > 0:
                    await self._prefer_earlier_broker()
            except Exception:  # never let one bad attempt end the upkeep
                log.exception("MQTT connection upkeep failed")
                if client.socket() is None:
                    self._schedule_retry()
            wait_s = TICK_S
            if client.socket() is None:
                wait_s = min(TICK_S, max(0.0, self._retry_at - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_s)

    async def _prefer_earlier_broker(self) -> None:
        """Move back to the first broker of the list that accepts a connection again."""
        now = time.monotonic()
        if now < self._next_prefer_check:
            return
        self._next_prefer_check = now + PREFER_CHECK_S
        for index in range(self._url_index):
            url = self._urls[index]
            if not await _broker_answers(url, CONNECT_TIMEOUT_S):
                continue
            if not self._connected or self._closing:
                return
            log.warning("%s is reachable again: moving back to it from %s", url, self.url)
            self._url_index = index
            self._down_since = time.monotonic()
            self._client.disconnect()  # DISCONNECT: no last will; the upkeep reconnects there
            return

    async def _connect_once(self) -> None:
        now = time.monotonic()
        if len(self._urls) > 1 and now - self._down_since >= self._failover_after_s:
            self._url_index = (self._url_index + 1) % len(self._urls)
            self._down_since = now
            log.warning("broker unreachable, trying %s", self.url)
        url = self.url
        try:
            sock = await asyncio.wait_for(_open_tcp(url.host, url.port), CONNECT_TIMEOUT_S)
        except TimeoutError:
            self._connect_failed(f"{url} is unreachable (no answer in {CONNECT_TIMEOUT_S:g} s)")
            return
        except OSError as err:
            self._connect_failed(f"{url} is unreachable ({err.strerror or err})")
            return
        client = self._client
        client.username_pw_set(url.username, url.password)
        client.connect_async(url.host, url.port, self._keepalive_s)
        client.connected_socket = sock
        try:
            client.reconnect()  # adopts sock, registers it with the loop, queues CONNECT
        except (OSError, ValueError) as err:  # TLS handshake or certificate
            sock.close()
            self._connect_failed(f"{url}: {err}")
        finally:
            client.connected_socket = None

    def _connect_failed(self, error: str) -> None:
        if error != self._last_error:
            log.debug("%s", error)
        self._last_error = error
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._retry_delay_s
        self._retry_delay_s = min(2 * self._retry_delay_s, RECONNECT_MAX_DELAY_S)
        self._wake.set()

    def _publish(self, topic: str, payload: bytes | str, qos: int, retain: bool) -> None:
        if self._closing:
            log.debug("bus closed, dropping message on %s", topic)
            return
        client = self._client
        client.publish(topic, payload, qos, retain)
        if not self._in_read and client.want_write():
            client.loop_write()  # send now; handlers' messages go out when the read is done

    # --- internals: paho callbacks, all in the loop thread ------------------------------------

    def _paho_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        _set_nodelay(client, userdata, sock)
        assert self._loop is not None
        self._loop.add_reader(sock, self._on_readable)

    def _paho_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._socket_closed.set()

    def _paho_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, client.loop_write)

    def _paho_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    def _on_readable(self) -> None:
        client = self._client
        self._in_read = True
        try:
            client.loop_read()
            # TLS may hold decrypted bytes the socket no longer signals: read them now
            sock = client.socket()
            while isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
                client.loop_read()
                sock = client.socket()
        finally:
            self._in_read = False
        if client.want_write():
            client.loop_write()  # replies and acks the handlers queued, without another wait

    def _make_callback(
        self, topic_filter: str, handler: Handler
    ) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        # paho decodes payloads with struct.unpack, so they are always bytes at run time.
        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            if self._closing:
                return
            self.received_at = time.monotonic()
            try:
                handler(msg.topic, cast(bytes, msg.payload), msg.retain)
            except Exception as err:
                if self._on_handler_error is None:
                    log.exception("handler for %s failed", msg.topic)
                else:
                    self._on_handler_error(f"handler for {topic_filter}", err)

        return on_message

    def _paho_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            error = f"{self.url} refused the connection: {reason}"
            if error != self._last_error:
                log.warning("%s", error)
            self._last_error = error
            return  # paho drops the connection; _paho_disconnect schedules the retry
        self._connected = True
        self._retry_delay_s = RECONNECT_MIN_DELAY_S
        log.info("connected to %s", self.url)
        if self._subs:
            _, mid = client.subscribe(list(self._subs.items()))
            self._restore_mid = mid
        else:
            self._on_ready()

    def _paho_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.warning("broker %s refused a subscription: %s", self.url, reason)
        if mid == self._restore_mid:
            self._restore_mid = None
            self._on_ready()

    def _paho_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _paho_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was_connected, self._connected = self._connected, False
        self._restore_mid = None
        if self._closing:
            return
        if was_connected:
            self._down_since = time.monotonic()
            log.warning("lost the connection to %s (%s), reconnecting", self.url, reason)
            if self._on_disconnect_cb is not None and self._loop is not None:
                # later, not from inside the publish() whose write found the link gone
                self._loop.call_soon(self._on_lost)
        self._schedule_retry()

    def _on_lost(self) -> None:
        if self._on_disconnect_cb is not None and not self._closing:
            try:
                self._on_disconnect_cb()
            except Exception:
                log.exception("on_disconnect callback failed")

    def _on_ready(self) -> None:
        if self._closing or not self._connected:
            return
        self._ready.set()
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("on_connect callback failed")
