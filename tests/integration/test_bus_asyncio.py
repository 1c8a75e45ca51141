"""The bus drives paho from the event loop: no network thread, a loop that never stalls."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from nsync_mqtt.bus import Bus
from nsync_mqtt.errors import BrokerError

pytestmark = pytest.mark.integration

T = TypeVar("T")
WAIT_S = 5.0
Message = tuple[str, bytes, bool]
BrokerFactory = Callable[[str], Any]  # conftest.BrokerProcess: start(), stop(), kill(), url, proc


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def within(awaitable: Awaitable[T], timeout_s: float = WAIT_S) -> T:
    return await asyncio.wait_for(awaitable, timeout_s)


def collector() -> tuple[asyncio.Queue[Message], Callable[[str, bytes, bool], None]]:
    queue: asyncio.Queue[Message] = asyncio.Queue()

    def handler(topic: str, payload: bytes, retain: bool) -> None:
        queue.put_nowait((topic, payload, retain))

    return queue, handler


class LoopWatch:
    """The longest time the event loop went without running a 10 ms ticker."""

    def __init__(self) -> None:
        self.longest_gap_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now

    def __enter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose SYNs go unanswered, like a broker host that is switched off.

    The listener never accepts and its accept queue is full, so Linux drops new SYNs.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        time.sleep(0.05)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
            pytest.skip("this kernel answers SYNs on a full accept queue")
        except TimeoutError:
            pass
        finally:
            probe.close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_runs_without_a_network_thread(broker_url: str, unique_topic: str) -> None:
    async def main() -> None:
        before = set(threading.enumerate())
        got, handler = collector()
        bus = Bus([broker_url], "thread-node")
        bus.subscribe(unique_topic, handler)
        await bus.start()
        try:
            bus.publish(unique_topic, b"x")
            assert (await within(got.get()))[1] == b"x"
            assert set(threading.enumerate()) == before
        finally:
            await bus.close()

    run(main())


def test_publish_from_another_thread(broker_url: str, unique_topic: str) -> None:
    async def main() -> None:
        threads: list[int] = []
        got, collect = collector()

        def handler(topic: str, payload: bytes, retain: bool) -> None:
            threads.append(threading.get_ident())
            collect(topic, payload, retain)

        bus = Bus([broker_url], "offthread-node")
        bus.subscribe(unique_topic, handler)
        await bus.start()
        try:
            await asyncio.to_thread(bus.publish, unique_topic, b"from a worker")
            assert (await within(got.get()))[1] == b"from a worker"
            assert threads == [threading.get_ident()]
        finally:
            await bus.close()
        await asyncio.to_thread(bus.publish, unique_topic, b"after close")  # dropped quietly

    run(main())


def test_received_at_is_stamped_before_the_handler(broker_url: str, unique_topic: str) -> None:
    async def main() -> None:
        stamps: asyncio.Queue[tuple[float, float]] = asyncio.Queue()
        bus = Bus([broker_url], "stamp-node")
        bus.subscribe(
            unique_topic, lambda t, p, r: stamps.put_nowait((bus.received_at, time.monotonic()))
        )
        await bus.start()
        try:
            sent = time.monotonic()
            bus.publish(unique_topic, b"ping")
            received_at, handled = await within(stamps.get())
            assert sent < received_at <= handled
        finally:
            await bus.close()

    run(main())


def test_close_sends_disconnect_and_releases_the_socket(broker_url: str, unique_topic: str) -> None:
    topic = f"{unique_topic}/node/status"

    async def main() -> None:
        got, handler = collector()
        watcher = Bus([broker_url], "close-watcher")
        watcher.subscribe(topic, handler)
        await watcher.start()
        bus = Bus([broker_url], "close-node", will=(topic, b"offline", False))
        await bus.start()
        try:
            sock = bus._client.socket()
            assert sock is not None
            fd = sock.fileno()
            bus.publish(topic, b"bye")
            await bus.close()
            assert not bus.connected
            assert bus._client.socket() is None
            loop = asyncio.get_running_loop()
            assert not loop.remove_reader(fd)  # nothing was left registered for it
            assert not loop.remove_writer(fd)
            assert (await within(got.get()))[1] == b"bye"  # queued messages went out first
            await asyncio.sleep(0.3)
            assert got.empty()  # and no last will
        finally:
            await bus.close()
            await watcher.close()

    run(main())


def test_unanswered_connect_does_not_stall_the_loop(silent_port: int) -> None:
    async def main() -> None:
        bus = Bus([f"mqtt://127.0.0.1:{silent_port}"], "silent-node")
        with LoopWatch() as watch:
            started = time.monotonic()
            with pytest.raises(BrokerError, match=f"127.0.0.1:{silent_port}"):
                await bus.start(timeout_s=0.5)
            assert time.monotonic() - started < 1.5
        assert watch.longest_gap_s < 0.2

    run(main())


def test_a_broker_that_stops_answering_is_dropped_by_keepalive(
    broker_kind: str, broker_factory: BrokerFactory
) -> None:
    broker = broker_factory(broker_kind)
    pid = broker.proc.pid

    async def main() -> None:
        losses: asyncio.Queue[float] = asyncio.Queue()
        bus = Bus(
            [broker.url],
            "keepalive-node",
            keepalive_s=1,
            on_disconnect=lambda: losses.put_nowait(time.monotonic()),
        )
        await bus.start()
        try:
            os.kill(pid, signal.SIGSTOP)
            try:
                frozen = time.monotonic()
                lost = await within(losses.get(), 5.0)
                assert lost - frozen < 4.0
                assert not bus.connected
            finally:
                os.kill(pid, signal.SIGCONT)
        finally:
            await bus.close()

    run(main())


def test_publish_acked_waits_for_the_broker(
    broker_kind: str, broker_factory: BrokerFactory, unique_topic: str
) -> None:
    """True once the broker has the message; False while a hung broker holds back its PUBACK
    (the message stays queued and still arrives, in order, when the broker wakes up)."""
    broker = broker_factory(broker_kind)
    pid = broker.proc.pid

    async def main() -> None:
        got, handler = collector()
        bus = Bus([broker.url], "acked-node", keepalive_s=30)
        bus.subscribe(unique_topic, handler)
        await bus.start()
        try:
            assert await bus.publish_acked(unique_topic, b"first", 5.0) is True
            assert (await within(got.get()))[1] == b"first"
            os.kill(pid, signal.SIGSTOP)
            try:
                assert await bus.publish_acked(unique_topic, b"held", 0.3) is False
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await bus.publish_acked(unique_topic, b"after", 5.0) is True
            assert [(await within(got.get()))[1] for _ in range(2)] == [b"held", b"after"]
        finally:
            await bus.close()
        assert await bus.publish_acked(unique_topic, b"closed", 1.0) is False

    run(main())
