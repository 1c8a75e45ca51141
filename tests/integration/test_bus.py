"""The node bus against real brokers (embedded amqtt and Mosquitto) on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from nsync_lab.testing import BrokerProcess
from nsync_mqtt.broker_embed import EmbeddedBroker, hash_password, weak_hash
from nsync_mqtt.bus import Bus, new_paho_client, parse_broker_url
from nsync_mqtt.errors import BrokerError

pytestmark = pytest.mark.integration

T = TypeVar("T")
WAIT_S = 5.0
Message = tuple[str, bytes, bool]
BrokerFactory = Callable[[str], BrokerProcess]


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def within(awaitable: Awaitable[T], timeout_s: float = WAIT_S) -> T:
    return await asyncio.wait_for(awaitable, timeout_s)


def collector() -> tuple[asyncio.Queue[Message], Callable[[str, bytes, bool], None]]:
    queue: asyncio.Queue[Message] = asyncio.Queue()

    def handler(topic: str, payload: bytes, retain: bool) -> None:
        queue.put_nowait((topic, payload, retain))

    return queue, handler


def nodelay(sock: Any) -> int:
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_round_trip_runs_handler_in_loop_thread(broker_url: str, unique_topic: str) -> None:
    async def main() -> None:
        threads: list[int] = []
        got: asyncio.Queue[Message] = asyncio.Queue()

        def handler(topic: str, payload: bytes, retain: bool) -> None:
            threads.append(threading.get_ident())
            got.put_nowait((topic, payload, retain))

        bus = Bus([broker_url], "rt-node")
        await bus.start()
        try:
            assert bus.connected
            bus.subscribe(f"{unique_topic}/+", handler)
            await asyncio.sleep(0.1)  # SUBACK: subscribe does not wait
            bus.publish(f"{unique_topic}/a", b"hello")
            bus.publish(f"{unique_topic}/b", "text")
            assert await within(got.get()) == (f"{unique_topic}/a", b"hello", False)
            assert await within(got.get()) == (f"{unique_topic}/b", b"text", False)
            assert threads == [threading.get_ident()] * 2
        finally:
            await bus.close()
        assert not bus.connected

    run(main())


def test_retained_message_arrives_with_retain_flag(broker_url: str, unique_topic: str) -> None:
    async def main() -> None:
        topic = f"{unique_topic}/state"
        publisher = Bus([broker_url], "ret-pub")
        await publisher.start()
        publisher.publish(topic, b"playing", retain=True)
        await publisher.close()  # the publish goes out before the DISCONNECT

        got, handler = collector()
        reader = Bus([broker_url], "ret-sub")
        reader.subscribe(topic, handler)  # before start: sent with the first connect
        await reader.start()
        try:
            assert await within(got.get()) == (topic, b"playing", True)
            reader.publish(topic, b"paused", retain=True)
            assert await within(got.get()) == (topic, b"paused", False)
            reader.publish(topic, b"", retain=True)  # clear it
        finally:
            await reader.close()

    run(main())


def test_messages_on_other_topics_are_ignored(broker_url: str, unique_topic: str) -> None:
    """amqtt sends a connecting client retained messages matching other clients' filters."""

    async def main() -> None:
        other_topic = f"{unique_topic}/other/x"
        other = Bus([broker_url], "ign-other")
        other.subscribe(f"{unique_topic}/other/#", lambda t, p, r: None)
        await other.start()
        other.publish(other_topic, b"not for you", retain=True)
        await asyncio.sleep(0.1)

        got, handler = collector()
        bus = Bus([broker_url], "ign-node")
        bus.subscribe(f"{unique_topic}/mine/#", handler)
        await bus.start()
        try:
            bus.publish(f"{unique_topic}/mine/marker", b"m")
            assert await within(got.get()) == (f"{unique_topic}/mine/marker", b"m", False)
            assert got.empty()

            bus.subscribe(f"{unique_topic}/gone", handler)
            await asyncio.sleep(0.1)
            bus.unsubscribe(f"{unique_topic}/gone")
            await asyncio.sleep(0.1)
            bus.publish(f"{unique_topic}/gone", b"late")
            bus.publish(f"{unique_topic}/mine/marker", b"m2")
            assert (await within(got.get()))[1] == b"m2"
            assert got.empty()
        finally:
            other.publish(other_topic, b"", retain=True)
            await bus.close()
            await other.close()

    run(main())


def test_handler_errors_are_logged_and_delivery_goes_on(
    broker_url: str, unique_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        got, collect = collector()

        def handler(topic: str, payload: bytes, retain: bool) -> None:
            if payload == b"bad":
                raise ValueError("cannot decode")
            collect(topic, payload, retain)

        bus = Bus([broker_url], "err-node")
        bus.subscribe(unique_topic, handler)
        await bus.start()
        try:
            bus.publish(unique_topic, b"bad")
            bus.publish(unique_topic, b"good")
            assert (await within(got.get()))[1] == b"good"
        finally:
            await bus.close()

    with caplog.at_level(logging.ERROR, logger="nsync_mqtt.bus"):
        run(main())
    failures = [r for r in caplog.records if "handler for" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None


def test_tcp_nodelay_is_set_on_the_socket(broker_url: str) -> None:
    url = parse_broker_url(broker_url)
    ours = new_paho_client("nodelay-ours", url)
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="nodelay-plain")
    results = {}
    for name, client in (("ours", ours), ("plain", plain)):
        connected = threading.Event()
        client.on_connect = lambda *args, ev=connected: ev.set()
        client.connect(url.host, url.port)
        client.loop_start()
        try:
            assert connected.wait(WAIT_S)
            results[name] = nodelay(client.socket())
        finally:
            client.disconnect()
            client.loop_stop()
    assert results["ours"] != 0
    assert results["plain"] == 0  # paho alone leaves Nagle on: the reason for our hook


def test_one_mib_payload_passes(broker_url: str, unique_topic: str) -> None:
    async def main() -> None:
        payload = os.urandom(1024 * 1024)
        got, handler = collector()
        bus = Bus([broker_url], "big-node")
        bus.subscribe(unique_topic, handler)
        await bus.start()
        try:
            bus.publish(unique_topic, payload)
            assert (await within(got.get()))[1] == payload
        finally:
            await bus.close()

    run(main())


WILL_NODE = """
import asyncio, sys
from nsync_mqtt.bus import Bus

async def main():
    url, topic = sys.argv[1], sys.argv[2]
    bus = Bus([url], "will-node", will=(topic, b"offline", True))
    await bus.start()
    bus.publish(topic, b"online", retain=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_last_will_is_published_when_the_node_process_dies(
    broker_url: str, unique_topic: str, tmp_path: Path
) -> None:
    topic = f"{unique_topic}/node/a/status"
    stderr = tmp_path / "node.err"

    async def main(node: subprocess.Popen[bytes]) -> None:
        got, handler = collector()
        watcher = Bus([broker_url], "will-watcher")
        watcher.subscribe(topic, handler)
        await watcher.start()
        try:
            try:
                assert (await within(got.get(), 10.0))[1] == b"online"
            except TimeoutError:
                pytest.fail(f"node never came online: {stderr.read_text()}")
            node.send_signal(signal.SIGKILL)
            await asyncio.to_thread(node.wait, 5)
            assert (await within(got.get()))[1:] == (b"offline", False)
            watcher.publish(topic, b"", retain=True)
        finally:
            await watcher.close()

    with stderr.open("wb") as err:
        node = subprocess.Popen(
            [sys.executable, "-c", WILL_NODE, broker_url, topic],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        run(main(node))
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=5)


def test_reconnects_and_restores_subscriptions_after_broker_restart(
    broker_kind: str, broker_factory: BrokerFactory
) -> None:
    broker = broker_factory(broker_kind)

    async def main() -> None:
        connects: asyncio.Queue[int] = asyncio.Queue()
        losses: asyncio.Queue[int] = asyncio.Queue()
        got, handler = collector()
        bus = Bus(
            [broker.url],
            "restart-node",
            on_connect=lambda: connects.put_nowait(threading.get_ident()),
            on_disconnect=lambda: losses.put_nowait(threading.get_ident()),
        )
        bus.subscribe("restart/t", handler)
        await bus.start()
        other: Bus | None = None
        try:
            assert await within(connects.get()) == threading.get_ident()
            broker.kill()
            assert await within(losses.get()) == threading.get_ident()
            assert not bus.connected
            await asyncio.to_thread(broker.start)
            assert await within(connects.get(), 10.0) == threading.get_ident()
            assert bus.connected
            assert nodelay(bus._client.socket()) != 0  # set again on the new socket

            other = Bus([broker.url], "restart-other")
            await other.start()
            other.publish("restart/t", b"after restart")
            assert await within(got.get()) == ("restart/t", b"after restart", False)
        finally:
            await bus.close()
            if other is not None:
                await other.close()

    run(main(), timeout_s=30.0)


def test_fails_over_to_the_next_broker_url(
    broker_url: str, unique_topic: str, unused_port: int
) -> None:
    dead = f"mqtt://127.0.0.1:{unused_port}"

    async def main() -> None:
        got, handler = collector()
        bus = Bus([dead, broker_url], "failover-node", failover_after_s=0.3)
        bus.subscribe(unique_topic, handler)
        await bus.start(timeout_s=5.0)
        try:
            assert str(bus.url) == broker_url
            bus.publish(unique_topic, b"via second")
            assert (await within(got.get()))[1] == b"via second"
        finally:
            await bus.close()

    run(main())


def test_start_times_out_naming_the_url(unused_port: int) -> None:
    dead = f"mqtt://user:hunter2@127.0.0.1:{unused_port}"

    async def main() -> None:
        bus = Bus([dead], "lonely-node")
        with pytest.raises(BrokerError) as info:
            await bus.start(timeout_s=0.5)
        message = str(info.value)
        assert f"mqtt://user:***@127.0.0.1:{unused_port}" in message
        assert "hunter2" not in message

    run(main())


# --- the embedded broker itself ----------------------------------------------------------------


def test_embedded_broker_password_file(tmp_path: Path, unused_port: int) -> None:
    passwords = tmp_path / "passwords"
    passwords.write_text(f"# NSync users\nalice:{hash_password('s3cret')}\n")
    port = unused_port

    async def main() -> None:
        broker = EmbeddedBroker("127.0.0.1", port, passwords)
        await broker.start()
        try:
            for url, ok in [
                (f"mqtt://127.0.0.1:{port}", False),
                (f"mqtt://alice:wrong@127.0.0.1:{port}", False),
                (f"mqtt://bob:s3cret@127.0.0.1:{port}", False),
                (f"mqtt://alice:s3cret@127.0.0.1:{port}", True),
            ]:
                bus = Bus([url], "pw-node")
                if ok:
                    await bus.start(timeout_s=3.0)
                    assert bus.connected
                    await bus.close()
                else:
                    with pytest.raises(BrokerError, match="refused"):
                        await bus.start(timeout_s=3.0)  # a refusal comes after FAIL_DELAY_S
        finally:
            await broker.stop()

    run(main())


def test_hash_password_meets_owasps_argon2_minimum() -> None:
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    hashed = hash_password("s3cret")
    assert hashed.startswith("$argon2id$")
    assert "$m=19456,t=2,p=1$" in hashed
    assert not weak_hash(hashed)
    assert hashed != hash_password("s3cret")  # salted
    verifier = PasswordHash((Argon2Hasher(),))
    assert verifier.verify("s3cret", hashed)
    assert not verifier.verify("wrong", hashed)
    cheap = Argon2Hasher(time_cost=1, memory_cost=2048, parallelism=1).hash("s3cret")
    assert weak_hash(cheap)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(s: str) -> bytes:
    return len(s).to_bytes(2, "big") + s.encode()


def _connect_packet(client_id: str) -> bytes:
    body = _mqtt_str("MQTT") + bytes([4, 2]) + (60).to_bytes(2, "big") + _mqtt_str(client_id)
    return b"\x10" + _varint(len(body)) + body


def _closed_by_peer(sock: socket.socket, timeout_s: float = 5.0) -> bool:
    """Does the broker close this connection (rather than wait for the bytes announced)?"""
    sock.settimeout(timeout_s)
    try:
        while chunk := sock.recv(4096):
            if not chunk:
                break
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_embedded_broker_closes_a_connection_announcing_an_oversized_packet(
    unused_port: int,
) -> None:
    """A CONNECT over 64 KiB, or a PUBLISH over the largest chunk frame, is refused from its
    header: the broker never reads (or holds) its body; normal-sized ones pass."""
    from nsync_mqtt.broker_embed import MAX_CONNECT_BYTES, MAX_PACKET_BYTES

    port = unused_port
    got: list[int] = []
    done = threading.Event()

    async def main() -> None:
        broker = EmbeddedBroker("127.0.0.1", port)
        await broker.start()
        try:
            await asyncio.to_thread(exercise)
        finally:
            await broker.stop()

    def exercise() -> None:
        # a CONNECT announcing more than MAX_CONNECT_BYTES, before any login
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\x10" + _varint(MAX_CONNECT_BYTES + 1) + b"\x00\x04MQTT")
            assert _closed_by_peer(s), "an oversized CONNECT was waited for"
        # a subscriber, to see what gets through
        sub = new_paho_client("oversize-sub", parse_broker_url(f"mqtt://127.0.0.1:{port}"))
        sub.on_message = lambda c, u, m: (got.append(len(m.payload)), done.set())
        sub.on_connect = lambda c, *a: c.subscribe("big/#", 0)
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        try:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(_connect_packet("oversize-pub"))
                s.settimeout(5)
                assert s.recv(4)[:1] == b"\x20"  # CONNACK
                time.sleep(0.3)  # the subscription is in place
                payload = b"x" * (1 << 20)
                body = _mqtt_str("big/ok") + payload
                s.sendall(b"\x30" + _varint(len(body)) + body)
                assert done.wait(5), "a 1 MiB publish did not get through"
                header = b"\x30" + _varint(MAX_PACKET_BYTES + 1) + _mqtt_str("big/no")
                s.sendall(header + b"x" * 1000)
                assert _closed_by_peer(s), "an oversized PUBLISH was waited for"
        finally:
            sub.loop_stop()
            sub.disconnect()
        assert got == [1 << 20]

    run(main(), timeout_s=40.0)


def test_embedded_broker_refuses_a_taken_port(unused_port: int) -> None:
    async def main() -> None:
        first = EmbeddedBroker("127.0.0.1", unused_port)
        await first.start()
        try:
            second = EmbeddedBroker("127.0.0.1", first.port)
            with pytest.raises(BrokerError, match="already in use"):
                await second.start()
        finally:
            await first.stop()

    run(main())


def test_embedded_broker_process_exits_cleanly_on_sigterm(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory("amqtt")
    proc = broker.proc
    assert proc is not None
    broker.stop()
    assert proc.returncode == 0
