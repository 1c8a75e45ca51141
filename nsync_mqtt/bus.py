"""The node's MQTT connection: paho-mqtt in its own thread, handlers run in the asyncio loop.

- Protocol MQTT 3.1.1 only (the embedded amqtt broker has no MQTT 5), clean sessions.
- TCP_NODELAY is set on every (re)connect: paho never sets it, and without it every
  receive-then-publish exchange (acks, replies) waits ~40 ms for the peer's delayed ACK.
- Subscriptions are remembered and restored after every reconnect (a restarted broker forgets
  them); the ``on_connect`` callback runs once they are acknowledged, so the node can republish
  its retained state.
- Messages reach only the handler of the filter they match; anything else is dropped (amqtt
  re-sends retained messages matching other clients' subscriptions).
- Several broker URLs form a failover list: when the current broker has been unreachable for
  ``failover_after_s``, the next one is tried, round robin. All URLs of one list must agree on
  TLS (``mqtt://`` or ``mqtts://``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from nsync_mqtt.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MAX_INFLIGHT_MESSAGES = 64
CONNECT_TIMEOUT_S = 2.0
RECONNECT_MIN_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 2.0
FAILOVER_AFTER_S = 3.0

Handler = Callable[[str, bytes, bool], None]


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
        raise ConfigError(f"broker: bad URL {_redact(url)!r}: {err}") from err
    shown = _redact(url)
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


def _redact(url: str) -> str:
    """The URL with any password replaced by ``***``, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (unix transport, websocket wrapper)
        pass


def new_paho_client(client_id: str, url: BrokerURL) -> mqtt.Client:
    """A paho client set up the NSync way: MQTT 3.1.1, TCP_NODELAY, deep queues, credentials."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    if url.username is not None:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set()
    client.max_inflight_messages_set(MAX_INFLIGHT_MESSAGES)
    client.max_queued_messages_set(0)  # unlimited
    client.connect_timeout = CONNECT_TIMEOUT_S
    client.on_socket_open = _set_nodelay
    return client


class Bus:
    """One node's connection to the MQTT broker (or to the first reachable of several)."""

    def __init__(
        self,
        urls: Sequence[str],
        client_id: str,
        *,
        will: tuple[str, bytes, bool] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        keepalive_s: int = 5,
        failover_after_s: float = FAILOVER_AFTER_S,
    ) -> None:
        if not urls:
            raise ConfigError("broker: at least one broker URL is required")
        self._urls = [parse_broker_url(u) for u in urls]
        if len({u.tls for u in self._urls}) > 1:
            raise ConfigError("broker: cannot mix mqtt:// and mqtts:// URLs in one failover list")
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._keepalive_s = keepalive_s
        self._failover_after_s = failover_after_s

        self._lock = threading.Lock()
        self._subs: dict[str, int] = {}  # topic filter -> qos
        self._connected = False
        self._closing = False
        # host monotonic time at which the message being handled was read off the socket (set
        # before each handler runs, in the loop thread): clock sync stamps with it, so the
        # hand-over from the network thread to the loop does not count as network delay
        self.received_at = 0.0
        self._restore_mid: int | None = None
        self._url_index = 0
        self._down_since = time.monotonic()
        self._last_error = "no answer"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._started = False

        client = new_paho_client(client_id, self._urls[0])
        client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)  # type: ignore[arg-type]
        if will is not None:
            topic, payload, retain = will
            client.will_set(topic, payload, qos=1, retain=retain)
        client.on_pre_connect = self._paho_pre_connect
        client.on_connect = self._paho_connect
        client.on_connect_fail = self._paho_connect_fail
        client.on_disconnect = self._paho_disconnect
        client.on_subscribe = self._paho_subscribe
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def url(self) -> BrokerURL:
        """The broker currently used (or being tried)."""
        return self._urls[self._url_index]

    async def start(self, timeout_s: float = 10.0) -> None:
        """Connect in the background and wait until connected; BrokerError after timeout_s."""
        if self._started:
            raise BrokerError("bus already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        client = self._client
        first = self._urls[0]
        self._down_since = time.monotonic()
        client.connect_async(first.host, first.port, self._keepalive_s)
        client.loop_start()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            await self.close()
            tried = f" (tried {', '.join(map(str, self._urls))})" if len(self._urls) > 1 else ""
            raise BrokerError(
                f"could not connect to the MQTT broker within {timeout_s:g} s{tried}: "
                f"{self._last_error}"
            ) from None

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call handler(topic, payload, retain) in the loop thread for each matching message.

        May be called before start(); the subscription then goes out with the first connect.
        """
        self._client.message_callback_add(topic_filter, self._make_callback(handler))
        with self._lock:
            self._subs[topic_filter] = qos
            if self._connected:
                self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._subs.pop(topic_filter, None) is not None
            if known and self._connected:
                self._client.unsubscribe(topic_filter)
        self._client.message_callback_remove(topic_filter)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; never blocks. Queued QoS 1 messages go out after a reconnect."""
        if self._closing:
            log.debug("bus closed, dropping message on %s", topic)
            return
        self._client.publish(topic, payload, qos, retain)

    async def close(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        if self._closing:
            return
        self._closing = True
        if not self._started:
            return
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._connected = False

    # --- internals: paho thread -------------------------------------------------------------

    def _make_callback(
        self, handler: Handler
    ) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        # paho decodes payloads with struct.unpack, so they are always bytes at run time.
        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            loop = self._loop
            if loop is None:
                return
            received = time.monotonic()
            try:
                loop.call_soon_threadsafe(
                    self._run_handler,
                    handler,
                    msg.topic,
                    cast(bytes, msg.payload),
                    msg.retain,
                    received,
                )
            except RuntimeError:  # loop closed while shutting down
                pass

        return on_message

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or self._closing:
            return
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # loop closed while shutting down
            pass

    def _paho_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        now = time.monotonic()
        if len(self._urls) > 1 and now - self._down_since >= self._failover_after_s:
            self._url_index = (self._url_index + 1) % len(self._urls)
            self._down_since = now
            log.warning("broker unreachable, trying %s", self.url)
        url = self.url
        # paho's host/port setters refuse changes while a reconnect is in progress; paho 2.x
        # keeps them in these attributes and reads them right after this callback.
        client._host = url.host
        client._port = url.port
        client.username_pw_set(url.username, url.password)

    def _paho_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            error = f"{self.url} refused the connection: {reason}"
            if error != self._last_error:
                log.warning("%s", error)
            self._last_error = error
            return
        with self._lock:
            self._connected = True
            subs = list(self._subs.items())
        log.info("connected to %s", self.url)
        if subs:
            _, mid = client.subscribe(subs)
            self._restore_mid = mid
        else:
            self._call_in_loop(self._on_ready)

    def _paho_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.warning("broker %s refused a subscription: %s", self.url, reason)
        if mid == self._restore_mid:
            self._restore_mid = None
            self._call_in_loop(self._on_ready)

    def _paho_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._last_error = f"{self.url} is unreachable"

    def _paho_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
        if not was_connected:
            return
        self._down_since = time.monotonic()
        self._restore_mid = None
        if not self._closing:
            log.warning("lost the connection to %s (%s), reconnecting", self.url, reason)
            self._call_in_loop(self._on_lost)

    # --- internals: loop thread -------------------------------------------------------------

    def _on_ready(self) -> None:
        if self._closing or not self._connected:
            return
        if self._ready is not None:
            self._ready.set()
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("on_connect callback failed")

    def _on_lost(self) -> None:
        if self._on_disconnect_cb is not None:
            try:
                self._on_disconnect_cb()
            except Exception:
                log.exception("on_disconnect callback failed")

    def _run_handler(
        self, handler: Handler, topic: str, payload: bytes, retain: bool, received: float
    ) -> None:
        if self._closing:
            return
        self.received_at = received
        try:
            handler(topic, payload, retain)
        except Exception:
            log.exception("handler for %s failed", topic)
