"""The embedded broker stops even when one of its client readers ignores its cancellation (what
asyncio.wait_for does on Python 3.11 when a packet arrives as the reader is cancelled: a node
with the embedded broker then hung on SIGTERM)."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from amqtt.mqtt.protocol import handler as amqtt_handler

from nsync_mqtt.broker_embed import STOP_TIMEOUT_S, EmbeddedBroker
from nsync_mqtt.bus import BrokerURL, new_paho_client

pytestmark = pytest.mark.integration
T = TypeVar("T")


class _StubbornAsyncio:
    """asyncio, but ``wait_for`` swallows every cancellation and goes on waiting."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def wait_for(self, aw: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109
        inner = asyncio.ensure_future(aw)
        while True:
            try:
                return await asyncio.shield(inner)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()


def test_stop_ends_readers_that_ignore_cancellation(
    unused_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(amqtt_handler, "asyncio", _StubbornAsyncio())
    connected = threading.Event()
    client = new_paho_client(
        f"stubborn-{uuid.uuid4().hex[:6]}", BrokerURL("127.0.0.1", unused_port)
    )
    client.on_connect = lambda *_: connected.set()

    async def main() -> None:
        broker = EmbeddedBroker("127.0.0.1", unused_port)
        await broker.start()
        client.connect_async("127.0.0.1", unused_port, keepalive=1)  # pings every second
        client.loop_start()
        await asyncio.to_thread(connected.wait, 5)
        assert connected.is_set()
        await asyncio.sleep(1.5)
        async with asyncio.timeout(STOP_TIMEOUT_S + 5):
            await broker.stop()

    # in a thread of its own: without the fix, the loop never finishes (a stubborn reader
    # outlives even asyncio.run's final cancellation), and the test must fail, not hang
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as err:
            errors.append(err)

    try:
        with caplog.at_level(logging.WARNING, "nsync_mqtt.broker_embed"):
            runner = threading.Thread(target=run, name="broker-stop-test", daemon=True)
            runner.start()
            runner.join(STOP_TIMEOUT_S + 15)
    finally:
        client.loop_stop()
    assert not runner.is_alive(), "the broker's event loop never finished"
    assert errors == []
    assert "did not shut down" not in caplog.text
    assert not client.is_connected()
