"""A TCP proxy between one NSync node and its MQTT broker that can cut, stall or slow the link.

Chaos tests point a node at the proxy's loopback port instead of at the broker; the proxy
relays bytes both ways and, on command from the test, misbehaves like a bad network:

- ``cut()`` closes every open connection (both the node and the broker see it close) and
  closes any new one right after accepting it, until ``heal()``.
- ``blackhole()`` keeps connections open but holds every byte in both directions, like a hung
  network; ``heal()`` delivers what was held, in order.
- ``delay(seconds)`` delivers every chunk ``seconds`` after it arrived, in order per direction.

The proxy runs its own asyncio loop in a private thread, so synchronous test code can drive it.
Control calls return once the proxy has carried them out. A connection that resets or fails is
logged and dropped; the proxy keeps serving the others. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
CHUNK_BYTES = 65536
CONNECT_TIMEOUT_S = 2.0  # to the broker, per proxied connection
CONTROL_TIMEOUT_S = 5.0  # a control call waits this long for the proxy thread

_Delivery = tuple[float, bytes]  # (loop time at which to deliver, bytes; b"" is end of stream)


class _Link:
    """One proxied connection: node <-> proxy <-> broker, a reader and a writer each way."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._proxy = proxy
        self._writers = (client[1], upstream[1])
        self._tasks: list[asyncio.Task[None]] = []
        self._open_directions = 2
        self.closed = False
        for src, dst in ((client[0], upstream[1]), (upstream[0], client[1])):
            queue: asyncio.Queue[_Delivery] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._read(src, queue)))
            self._tasks.append(asyncio.create_task(self._write(queue, dst)))

    async def _read(self, src: asyncio.StreamReader, queue: asyncio.Queue[_Delivery]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await src.read(CHUNK_BYTES)
                queue.put_nowait((loop.time() + self._proxy.added_delay(), data))
                if not data:
                    return
        except OSError as err:
            log.info("fault proxy %d: connection dropped on read: %r", self._proxy.port, err)
            self.close()

    async def _write(self, queue: asyncio.Queue[_Delivery], dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                deliver_at, data = await queue.get()
                wait_s = deliver_at - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                flowing = self._proxy._flowing
                if flowing is not None:
                    await flowing.wait()
                if not data:
                    break
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()  # pass the half-close on
        except OSError as err:
            log.info("fault proxy %d: connection dropped on write: %r", self._proxy.port, err)
            self.close()
            return
        self._open_directions -= 1
        if self._open_directions == 0:
            self.close()

    def close(self) -> None:
        """Close both sides at once (unsent bytes are discarded) and stop relaying."""
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for writer in self._writers:
            writer.transport.abort()
        self._proxy._links.discard(self)


class FaultProxy:
    """Relays TCP between ``127.0.0.1:port`` and ``target_host:target_port``, with faults on
    demand. Use as a context manager, or call ``start()`` and ``stop()``."""

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = listen_port
        self._cut = False
        self._delay_s = 0.0
        self._jitter_s = 0.0
        self._rng = random.Random(0)
        self._target_down = False  # the last connection to the target failed
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._held = False  # blackholed
        self._flowing: asyncio.Event | None = None  # set while bytes may be delivered

    # -- control, from any thread ---------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen and start relaying in a background thread; raises OSError if the port is
        taken."""
        if self._thread is not None:
            raise RuntimeError("fault proxy already started")
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="nsync-faultproxy", daemon=True
        )
        self._thread.start()
        try:
            self.port = started.result(timeout=CONTROL_TIMEOUT_S)
        except BaseException:
            self._thread.join(timeout=CONTROL_TIMEOUT_S)
            self._thread = None
            raise
        self._thread.name = f"nsync-faultproxy-{self.port}"
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and wait for the thread to end."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop has just finished on its own
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=CONTROL_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"fault proxy on port {self.port} did not stop")
        self._thread = None

    def cut(self) -> None:
        """Drop every open connection now and refuse new ones until ``heal()``."""

        def apply() -> None:
            self._cut = True
            for link in list(self._links):
                link.close()

        self._control(apply)

    def blackhole(self) -> None:
        """Keep connections open but hold all bytes, both ways, until ``heal()``."""

        def apply() -> None:
            self._held = True
            self._sync_flowing()

        self._control(apply)

    def delay(self, seconds: float) -> None:
        """Deliver each chunk ``seconds`` after it arrived, both ways (0: no added latency)."""
        if not seconds >= 0:
            raise ValueError(f"delay must be >= 0 seconds, got {seconds!r}")

        def apply() -> None:
            self._delay_s = float(seconds)

        self._control(apply)

    def jitter(self, seconds: float, seed: int = 0) -> None:
        """Add a further uniform 0..``seconds`` to each chunk's delay, both ways (bytes keep
        their order, as TCP does: a chunk never overtakes the one before it)."""
        if not seconds >= 0:
            raise ValueError(f"jitter must be >= 0 seconds, got {seconds!r}")

        def apply() -> None:
            self._jitter_s = float(seconds)
            self._rng = random.Random(seed)

        self._control(apply)

    def added_delay(self) -> float:
        """The delay of the next chunk (proxy thread only)."""
        if self._jitter_s <= 0:
            return self._delay_s
        return self._delay_s + self._rng.uniform(0.0, self._jitter_s)

    def heal(self) -> None:
        """Accept and relay normally again; bytes held by ``blackhole()`` are delivered."""

        def apply() -> None:
            self._cut = False
            self._held = False
            self._sync_flowing()

        self._control(apply)

    @property
    def connections(self) -> int:
        """Connections currently relayed between a client and the target."""
        return len(self._links)

    def __enter__(self) -> FaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _control(self, apply: Callable[[], None]) -> None:
        """Run ``apply`` in the proxy's thread and wait until its effects are done (directly
        if the proxy is not running)."""
        loop = self._loop
        if loop is None:
            apply()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                apply()
            except BaseException as err:
                done.set_exception(err)
                return
            # scheduled after the callbacks that close aborted sockets
            loop.call_soon(done.set_result, None)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the proxy has just stopped: no connections left to act on
            apply()
            return
        done.result(CONTROL_TIMEOUT_S)

    def _sync_flowing(self) -> None:
        if self._flowing is not None:
            if self._held:
                self._flowing.clear()
            else:
                self._flowing.set()

    # -- the proxy thread -----------------------------------------------------------------

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop, started))
        except BaseException as err:  # a failed bind is reported to start()
            if not started.done():
                started.set_exception(err)
            else:
                log.exception("fault proxy %d: stopped by an error", self.port)
        finally:
            self._loop = None
            loop.close()

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future[int]
    ) -> None:
        self._stopping = asyncio.Event()
        self._flowing = asyncio.Event()
        self._sync_flowing()
        server = await asyncio.start_server(self._accept, LISTEN_HOST, self.port)
        self._loop = loop
        started.set_result(int(server.sockets[0].getsockname()[1]))
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for link in list(self._links):
                link.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await server.wait_closed()
            await asyncio.sleep(0)  # let the aborted sockets close
            self._loop = None
            self._flowing = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as err:
            # once per outage: a client retrying a dead broker would flood the log
            (log.debug if self._target_down else log.warning)(
                "fault proxy %d: cannot reach %s:%d: %r",
                self.port,
                self.target_host,
                self.target_port,
                err,
            )
            self._target_down = True
            writer.transport.abort()
            return
        except BaseException:
            writer.transport.abort()
            raise
        if self._target_down:
            log.info(
                "fault proxy %d: %s:%d reachable again",
                self.port,
                self.target_host,
                self.target_port,
            )
            self._target_down = False
        if self._cut:  # cut while connecting
            writer.transport.abort()
            upstream[1].transport.abort()
            return
        self._links.add(_Link(self, (reader, writer), upstream))
