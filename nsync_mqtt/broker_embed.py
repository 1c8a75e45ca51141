"""The embedded MQTT broker (amqtt), for households without a broker of their own.

Password file format: one user per line, ``user:hash``, where ``hash`` is an argon2 string as
made by :func:`hash_password` (``$argon2id$v=19$m=19456,t=2,p=1$...``). Blank lines and lines
starting with ``#`` are ignored. Without a password file every client may connect (the broker
then listens on a loopback address only: :func:`check_exposure`); with one, clients must log in
with a listed user and its password. Passwords are checked on a worker thread, two at a time,
with argon2 at OWASP's minimum cost or above (a weaker hash in the file is used, with a
warning); a failed login is answered after :data:`FAIL_DELAY_S`.

A packet over :data:`MAX_PACKET_BYTES` (a CONNECT over :data:`MAX_CONNECT_BYTES`) closes its
connection as soon as its header is read, before its body is.

Who may publish, subscribe to and receive which topic is an ACL in Mosquitto's ``acl_file``
format (nsync_mqtt.acl), checked on every publish, subscription and delivery, and on the
retained messages a new subscription gets. A node's embedded broker with a password file and
no ACL file uses :func:`nsync_mqtt.acl.default_acl`: the cluster's node ids are users with
every right; any other user may send commands and uploads and read what the cluster publishes.

Broker settings and why:
- only our own plugins are loaded (amqtt replaces its defaults when ``plugins`` is given): no
  ``$SYS`` publishing, no packet logging;
- without a password file an "allow everyone" plugin is used instead of amqtt's anonymous
  plugin, because amqtt drops the session of any client it marks anonymous as soon as it
  disconnects, which would break persistent sessions (``clean_session=False``);
- the broker restarts empty: retained messages and sessions do not survive it, so publishers
  republish their retained state when they reconnect;
- a client receives at CONNECT only the retained messages of its own subscriptions. amqtt
  0.12.1 sends it those matching *every* client's subscriptions (``Broker._handle_client_session``
  loops over the broker-wide subscription table), so ``mosquitto_sub -t nsync/home/state/master``
  could print a node's JSON state first; :class:`_Broker` narrows that one step. The fix is
  written against ``AMQTT_VERSION`` and checked by the tests; another amqtt release is used with
  a warning until it is checked again.

amqtt 0.12.1 also forwards a message at the subscriber's QoS rather than at the lower of the
publisher's and the subscriber's (MQTT 3.1.1 §3.8.4). That only ever delivers more reliably than
asked (a QoS 0 publish reaches a QoS 1 subscriber as QoS 1) and NSync's nodes publish at QoS 1
anyway, so it is left as it is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import re
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import amqtt
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from pwdlib.hashers.argon2 import Argon2Hasher

from nsync_mqtt.acl import Acl, default_acl, parse_acl
from nsync_mqtt.config import check_exposure
from nsync_mqtt.errors import BrokerError, ConfigError
from nsync_mqtt.guard import decade
from nsync_mqtt.replication import MAX_CHUNK_SIZE

# argon2id cost of new password hashes: OWASP's Password Storage Cheat Sheet minimum (19 MiB,
# 2 passes, 1 lane). A check takes ~40 ms of one core on a PC and a few hundred on a Raspberry
# Pi, on a worker thread: the broker goes on serving everyone else meanwhile.
HASH_TIME_COST = 2
HASH_MEMORY_COST_KIB = 19456
# OWASP's equivalent minimums (memory KiB, passes); a stored hash below all of them is weak
OWASP_ARGON2_MINIMUMS = ((47104, 1), (19456, 2), (12288, 3), (9216, 4), (7168, 5))
VERIFY_AT_ONCE = 2  # password checks running together (each takes its hash's memory)
FAIL_DELAY_S = 0.5  # a failed login is answered this late: guessing costs time
_ARGON2_RE = re.compile(r"\$argon2(?:id|i|d)\$v=\d+\$m=(\d+),t=(\d+),p=(\d+)\$")

# The largest packet a client may send: a chunk frame of the largest chunk size, with room for
# its topic and frame header. Larger ones close the connection before their bytes are read, so a
# client cannot make the broker hold hundreds of MB. A CONNECT (sent before any login) may be
# far smaller.
MAX_PACKET_BYTES = MAX_CHUNK_SIZE + 64 * 1024
MAX_CONNECT_BYTES = 64 * 1024

_QUIET_LOGGERS = ("amqtt", "transitions")
AMQTT_VERSION = "0.12.1"  # the release _Broker's fix is written against
STOP_TIMEOUT_S = 5.0  # the broker's shutdown, once every connection is closed

log = logging.getLogger(__name__)


def _drop_probe_noise(record: logging.LogRecord) -> bool:
    """amqtt logs an ERROR for every connection closed before it sent a byte: a port probe, a
    health check. Those are not errors."""
    msg = record.getMessage()
    return not (msg.startswith("No data from") or "No data to decode MQTT packet" in msg)


class PacketTooLarge(Exception):
    """A client sent a packet over MAX_PACKET_BYTES: its connection is closed."""


_read_fixed_header = MQTTFixedHeader.from_stream.__func__


async def _bounded_fixed_header(cls: type[MQTTFixedHeader], reader: Any) -> Any:
    """amqtt's fixed-header decoder, refusing a remaining length over the limit before the
    packet's body is read (amqtt 0.12.1 has no limit of its own; every packet the broker reads,
    CONNECT included, starts here)."""
    header = await _read_fixed_header(cls, reader)
    if header is not None:
        limit = MAX_CONNECT_BYTES if header.packet_type == CONNECT else MAX_PACKET_BYTES
        if header.remaining_length > limit:
            _oversize[0] += 1
            if decade(_oversize[0]):
                log.warning(
                    "embedded broker: closed a connection that sent a %d-byte packet (over %d; "
                    "%d so far)",
                    header.remaining_length,
                    limit,
                    _oversize[0],
                )
            # closed here: amqtt lets the connection go without closing it, and Python before
            # 3.11.5 (Debian 12 has 3.11.2) does not close a dropped stream's socket
            transport = getattr(getattr(reader, "_reader", None), "_transport", None)
            if isinstance(transport, asyncio.BaseTransport):
                transport.close()
            raise PacketTooLarge(f"{header.remaining_length} bytes")
    return header


_oversize = [0]  # packets refused for their size, in this process
MQTTFixedHeader.from_stream = classmethod(_bounded_fixed_header)


class _Broker(Broker):
    """amqtt's broker, but a (re)connecting client gets the retained messages of its own
    subscriptions only (a persistent session's; a clean session has none yet), and only those
    the ACL lets it receive."""

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Called for a subscription the client has just made (it is in the table by then) and,
        # at CONNECT, for every filter in the table, whoever subscribed to it.
        topic_filter, qos = subscription
        subscribers = self._subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            # what the client may not receive (the ACL), it does not get retained either
            if not self._matches(topic, topic_filter) or not await self._topic_filtering(
                session, topic, Action.RECEIVE
            ):
                continue
            handler = self._get_handler(session)
            if handler is not None:
                q = min(qos, retained.qos or qos)
                sends.append(
                    asyncio.ensure_future(
                        handler.mqtt_publish(retained.topic, retained.data, q, retain=True)
                    )
                )
        if sends:
            await asyncio.wait(sends)


class AllowAllAuthPlugin(BaseAuthPlugin):
    """Lets every client connect without marking its session anonymous."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


def hash_password(password: str) -> str:
    """Return the argon2 hash of ``password`` for a ``user:hash`` line of the password file."""
    hasher = Argon2Hasher(time_cost=HASH_TIME_COST, memory_cost=HASH_MEMORY_COST_KIB, parallelism=1)
    return hasher.hash(password)


def weak_hash(hashed: str) -> bool:
    """Is this argon2 hash cheaper than every one of OWASP's minimums (or not argon2 at all)?"""
    m = _ARGON2_RE.match(hashed)
    if m is None:
        return True
    memory, passes = int(m.group(1)), int(m.group(2))
    return not any(memory >= mm and passes >= tt for mm, tt in OWASP_ARGON2_MINIMUMS)


def parse_password_file(text: str, source: str) -> dict[str, str]:
    """``user:argon2-hash`` lines to {user: hash}; ConfigError naming the line otherwise."""
    users: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or _ARGON2_RE.match(hashed) is None:
            raise ConfigError(
                f"{source} line {n}: expected user:argon2-hash (add users with "
                f"`nsync broker --password-file {source} --add-user NAME`)"
            )
        users[user] = hashed
    return users


class PasswordAuthPlugin(BaseAuthPlugin):
    """Logins checked against an argon2 password file, on a worker thread (module doc)."""

    @dataclass
    class Config:
        password_file: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        path = Path(self.config.password_file)
        try:
            text = path.read_text()
        except OSError as err:
            raise BrokerError(f"cannot read the password file {path}: {err.strerror}") from err
        self._users = parse_password_file(text, str(path))
        weak = sorted(u for u, h in self._users.items() if weak_hash(h))
        if weak:
            log.warning(
                "%s: the password hashes of %s are cheaper than OWASP's minimum; add those "
                "users again (nsync broker --password-file %s --add-user NAME)",
                path,
                ", ".join(weak),
                path,
            )
        self._hasher = Argon2Hasher()
        # checked against when the user is unknown, so that a login takes as long either way
        self._decoy = hash_password(secrets.token_hex(16))
        self._at_once = asyncio.Semaphore(VERIFY_AT_ONCE)
        self.refused = 0

    def _verify(self, password: str, hashed: str) -> bool:
        try:
            return self._hasher.verify(password, hashed)
        except Exception:  # a corrupt hash: no login
            return False

    async def authenticate(self, *, session: Session) -> bool:
        user, password = session.username or "", session.password or ""
        hashed = self._users.get(user)
        async with self._at_once:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(None, self._verify, password, hashed or self._decoy)
        if ok and hashed is not None:
            return True
        self.refused += 1
        if decade(self.refused):
            log.warning("embedded broker: refused a login as %r (%d so far)", user, self.refused)
        await asyncio.sleep(FAIL_DELAY_S)
        return False


ACTIONS = {Action.PUBLISH: "write", Action.SUBSCRIBE: "subscribe", Action.RECEIVE: "read"}


class AclTopicPlugin(BaseTopicPlugin):
    """Every publish, subscription and delivery checked against an ACL (nsync_mqtt.acl)."""

    @dataclass
    class Config:
        acl_file: str = ""
        cluster: str = ""  # with nodes: the default ACL, when there is no acl_file
        nodes: list[str] = field(default_factory=list)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.acl: Acl
        if self.config.acl_file:
            path = Path(self.config.acl_file)
            try:
                self.acl = parse_acl(path.read_text(), str(path))
            except OSError as err:
                raise BrokerError(f"cannot read the ACL file {path}: {err.strerror}") from err
        else:
            self.acl = default_acl(self.config.cluster, self.config.nodes)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or topic is None or action not in ACTIONS:
            return False
        return self.acl.allows(session.username, session.client_id or "", ACTIONS[action], topic)


def _check_port_free(host: str, port: int) -> None:
    """Raise BrokerError naming the address if something already listens on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise BrokerError(
                    f"cannot listen on {host}:{port}: the port is already in use "
                    "(is another broker running?)"
                ) from err
            raise BrokerError(f"cannot listen on {host}:{port}: {err.strerror}") from err


class EmbeddedBroker:
    """An amqtt broker listening on one TCP address, on an event loop of its own in a thread of
    its own.

    A node that embeds the broker serves every client of the cluster from it, so the broker
    must not wait for the node: the node's own loop saves its durable state with fsync before
    it votes or acknowledges, and on a busy disk (an SD card, a machine still writing out a
    package install) one fsync took up to half a second here. Sharing that loop, the broker
    stalled with it, and clients waiting to connect gave up.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        cluster: str | None = None,
        nodes: Iterable[str] = (),
    ) -> None:
        """``acl_file``: who may use which topic (needs ``password_file``: without logins any
        client could claim any user name). Without one but with a password file and a
        ``cluster``, the default ACL for the cluster's ``nodes`` applies; without either, every
        logged-in user may use every topic."""
        if acl_file is not None and password_file is None:
            raise ConfigError(
                "an ACL file needs a password file: without logins any client may claim any "
                "user name"
            )
        self.host = host
        self.port = port
        self.password_file = password_file
        self.acl_file = acl_file
        self.cluster = cluster
        self.nodes = list(nodes)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        plugins: dict[str, Any]
        if self.password_file is None:
            plugins = {f"{__name__}.AllowAllAuthPlugin": {}}
        else:
            plugins = {f"{__name__}.PasswordAuthPlugin": {"password_file": str(self.password_file)}}
            if self.acl_file is not None:
                plugins[f"{__name__}.AclTopicPlugin"] = {"acl_file": str(self.acl_file)}
            elif self.cluster:
                plugins[f"{__name__}.AclTopicPlugin"] = {
                    "cluster": self.cluster,
                    "nodes": self.nodes,
                }
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{self.port}"}},
            "plugins": plugins,
        }

    async def start(self) -> None:
        """Start listening; returns once the broker accepts connections. BrokerError if it
        cannot (port in use, bad password file, ...)."""
        if self._thread is not None:
            raise BrokerError("the embedded broker is already running")
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("amqtt.broker").addFilter(_drop_probe_noise)
        if self.password_file is not None and not self.password_file.is_file():
            raise BrokerError(f"password file {self.password_file} not found")
        if self.acl_file is not None and not self.acl_file.is_file():
            raise BrokerError(f"ACL file {self.acl_file} not found")
        check_exposure("listen", self.host, self.password_file)
        _check_port_free(self.host, self.port)
        if amqtt.__version__ != AMQTT_VERSION:
            log.warning(
                "amqtt %s is installed; the embedded broker's retained-message fix was checked "
                "against %s only",
                amqtt.__version__,
                AMQTT_VERSION,
            )
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._run, args=(started,), name="nsync-broker", daemon=True
        )
        thread.start()
        try:
            await asyncio.wrap_future(started)
        except BaseException:
            thread.join(STOP_TIMEOUT_S)
            raise
        self._thread = thread

    async def stop(self) -> None:
        """Stop listening, disconnect every client, and shut the broker down (at most
        ``STOP_TIMEOUT_S``; what is left then is logged and dropped)."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        self._thread = None
        if thread is None or loop is None or stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop has ended already
            loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join, STOP_TIMEOUT_S + 2.0)
        if thread.is_alive():
            log.warning("the embedded broker's thread did not end")

    # -- the broker's thread

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop, started))
        except BaseException as err:
            if not started.done():
                started.set_exception(err)
            else:
                log.exception("the embedded broker stopped on an error")
        finally:
            loop.close()

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future[None]
    ) -> None:
        try:
            broker = _Broker(self._config())
        except Exception as err:  # plugin or config failures surface as assorted types
            cause = err.__cause__ or err
            if isinstance(cause, (BrokerError, ConfigError)):
                raise BrokerError(str(cause)) from err
            raise BrokerError(f"cannot configure the embedded broker: {cause}") from err
        try:
            await broker.start()
        except AMQTTError as err:
            raise BrokerError(f"cannot start the embedded broker on {self.url}: {err}") from err
        self._stopping = asyncio.Event()
        self._loop = loop
        started.set_result(None)
        await self._stopping.wait()
        # amqtt stops a client's handler by cancelling its reader task and waiting for it. On
        # Python 3.11 asyncio.wait_for can swallow that cancellation when a packet arrives at
        # the same moment, and the reader then reads on while shutdown() waits for it: a node
        # with the embedded broker hung on SIGTERM about once in ten under load. Closing every
        # connection first ends each reader at once, whatever became of its cancellation.
        _close_connections(broker)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await broker.shutdown()
        except TimeoutError:
            log.warning("the embedded broker did not shut down within %g s", STOP_TIMEOUT_S)


def _close_connections(broker: Broker) -> None:
    """Stop accepting, and close the transport of every connected client."""
    for server in broker._servers.values():
        if isinstance(server.instance, asyncio.Server):
            server.instance.close()
    for _session, handler in list(broker._sessions.values()):
        writer = getattr(getattr(handler, "writer", None), "_writer", None)
        transport = getattr(writer, "transport", None)
        if isinstance(transport, asyncio.BaseTransport):
            transport.close()


async def _serve(host: str, port: int, password_file: Path | None, acl_file: Path | None) -> None:
    broker = EmbeddedBroker(host, port, password_file, acl_file)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the port opens: a stop is never lost
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    print(f"nsync broker: listening on {broker.url}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await broker.stop()


def run_broker(
    host: str, port: int, password_file: Path | None, acl_file: Path | None = None
) -> int:
    """Run the embedded broker until SIGINT or SIGTERM; return the process exit code."""
    try:
        asyncio.run(_serve(host, port, password_file, acl_file))
    except (BrokerError, ConfigError) as err:
        print(f"nsync broker: {err}", file=sys.stderr)
        return 1
    return 0
