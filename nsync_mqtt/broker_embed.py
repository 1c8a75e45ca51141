"""The embedded MQTT broker (amqtt), for households without a broker of their own.

Password file format: one user per line, ``user:hash``, where ``hash`` is an argon2 string as
made by :func:`hash_password` (``$argon2id$v=19$m=2048,t=1,p=1$...``). Blank lines and lines
starting with ``#`` are ignored. Without a password file every client may connect; with one,
clients must log in with a listed user and its password.

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
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import amqtt
from amqtt.broker import Broker
from amqtt.errors import AMQTTError
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from pwdlib.hashers.argon2 import Argon2Hasher

from nsync_mqtt.errors import BrokerError

# argon2 cost for password hashes: the broker verifies the hash synchronously on every CONNECT,
# and argon2's default cost (64 MiB, 3 passes) stalls the whole broker ~150 ms per connection.
# 2 MiB and one pass cost about a millisecond on a PC and a few on a Raspberry Pi.
HASH_TIME_COST = 1
HASH_MEMORY_COST_KIB = 2048

_QUIET_LOGGERS = ("amqtt", "transitions")
AMQTT_VERSION = "0.12.1"  # the release _Broker's fix is written against
STOP_TIMEOUT_S = 5.0  # the broker's shutdown, once every connection is closed

log = logging.getLogger(__name__)


def _drop_probe_noise(record: logging.LogRecord) -> bool:
    """amqtt logs an ERROR for every connection closed before it sent a byte: a port probe, a
    health check. Those are not errors."""
    msg = record.getMessage()
    return not (msg.startswith("No data from") or "No data to decode MQTT packet" in msg)


class _Broker(Broker):
    """amqtt's broker, but a (re)connecting client gets the retained messages of its own
    subscriptions only (a persistent session's; a clean session has none yet)."""

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Called for a subscription the client has just made (it is in the table by then) and,
        # at CONNECT, for every filter in the table, whoever subscribed to it.
        subscribers = self._subscriptions.get(subscription[0], ())
        if any(s.client_id == session.client_id for s, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class AllowAllAuthPlugin(BaseAuthPlugin):
    """Lets every client connect without marking its session anonymous."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


def hash_password(password: str) -> str:
    """Return the argon2 hash of ``password`` for a ``user:hash`` line of the password file."""
    hasher = Argon2Hasher(time_cost=HASH_TIME_COST, memory_cost=HASH_MEMORY_COST_KIB, parallelism=1)
    return hasher.hash(password)


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
        self, host: str = "127.0.0.1", port: int = 1883, password_file: Path | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.password_file = password_file
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        auth: dict[str, Any]
        if self.password_file is None:
            auth = {f"{__name__}.AllowAllAuthPlugin": {}}
        else:
            auth = {
                "amqtt.plugins.authentication.FileAuthPlugin": {
                    "password_file": str(self.password_file)
                }
            }
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{self.port}"}},
            "plugins": auth,
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


async def _serve(host: str, port: int, password_file: Path | None) -> None:
    broker = EmbeddedBroker(host, port, password_file)
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


def run_broker(host: str, port: int, password_file: Path | None) -> int:
    """Run the embedded broker until SIGINT or SIGTERM; return the process exit code."""
    try:
        asyncio.run(_serve(host, port, password_file))
    except BrokerError as err:
        print(f"nsync broker: {err}", file=sys.stderr)
        return 1
    return 0
