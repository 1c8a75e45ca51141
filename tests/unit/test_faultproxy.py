"""FaultProxy relays real loopback TCP and cuts, stalls or slows it on command."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from nsync_lab.faultproxy import FaultProxy
from nsync_lab.testing import free_port, wait_for

TIMEOUT_S = 2.0


class EchoServer:
    """Echoes every connection on 127.0.0.1; ``ended`` gets one item per connection that ended."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.ended: queue.Queue[None] = queue.Queue()
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()
            self.ended.put(None)

    def close(self) -> None:
        for sock in [self.listener, *self._conns]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(TIMEOUT_S)
        self.listener.close()


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nsync-faultproxy")]


@pytest.fixture(autouse=True)
def no_leaked_proxy_thread() -> Iterator[None]:
    yield
    assert proxy_threads() == []


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as p:
        yield p


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def roundtrip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def assert_closed(sock: socket.socket) -> None:
    """The peer closed or reset the connection (within TIMEOUT_S)."""
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def test_relays_bytes_both_ways(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: several chunks each way
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join(TIMEOUT_S)
        assert proxy.connections == 1
        with connect(proxy) as second:
            assert roundtrip(second, b"two") == b"two"
            assert proxy.connections == 2


def test_delay_adds_latency_each_way(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.delay(0.05)
        start = time.monotonic()
        assert roundtrip(sock) == b"ping"
        assert time.monotonic() - start >= 2 * 0.05


def test_delay_keeps_order_when_lowered(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.delay(0.08)
        sock.sendall(b"first")
        proxy.delay(0)
        sock.sendall(b"second")
        assert recv_exactly(sock, 11) == b"firstsecond"


def test_jitter_varies_the_latency_and_keeps_the_order(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.jitter(0.03, seed=1)
        times, got = [], b""
        for i in range(8):
            start = time.monotonic()
            assert roundtrip(sock, b"%d" % i) == b"%d" % i
            times.append(time.monotonic() - start)
            got += b"%d" % i
        assert got == b"01234567"
        assert max(times) - min(times) > 0.005  # two uniform 0-30 ms draws per round trip
        assert max(times) < 2 * 0.03 + 0.5
        with pytest.raises(ValueError):
            proxy.jitter(-1)


def test_cut_closes_connections_and_refuses_new_ones_until_heal(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock) == b"ping"
        proxy.cut()
        assert_closed(sock)
    echo.ended.get(timeout=TIMEOUT_S)  # the broker side saw the close too
    assert proxy.connections == 0

    with connect(proxy) as refused:  # accepted, then closed at once
        assert_closed(refused)
    assert proxy.connections == 0

    proxy.heal()
    with connect(proxy) as sock:
        assert roundtrip(sock) == b"ping"
        assert proxy.connections == 1


def test_blackhole_holds_bytes_and_delivers_them_on_heal(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock) == b"ping"
        proxy.blackhole()
        sock.sendall(b"held")
        sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            sock.recv(4)
        assert proxy.connections == 1  # open, just silent
        proxy.heal()
        sock.settimeout(TIMEOUT_S)
        assert recv_exactly(sock, 4) == b"held"


def test_half_close_is_passed_on(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"bye")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 3) == b"bye"  # still readable after our half-close
        assert sock.recv(1) == b""  # the echo server closed on our EOF
    wait_for(lambda: proxy.connections == 0, TIMEOUT_S, "the half-closed link to be dropped")


def test_reset_drops_only_that_connection(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as keep:
        assert roundtrip(keep) == b"ping"
        reset = connect(proxy)
        assert roundtrip(reset) == b"ping"
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # sends RST
        echo.ended.get(timeout=TIMEOUT_S)
        wait_for(lambda: proxy.connections == 1, TIMEOUT_S, "the reset link to be dropped")
        assert roundtrip(keep, b"still") == b"still"


def test_unreachable_target_closes_the_client() -> None:
    with FaultProxy("127.0.0.1", free_port()) as proxy, connect(proxy) as sock:
        assert_closed(sock)
        assert proxy.connections == 0


def test_stop_closes_everything(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    sock = connect(proxy)
    assert roundtrip(sock) == b"ping"
    proxy.stop()
    assert proxy_threads() == []
    assert proxy.connections == 0
    with sock:
        assert_closed(sock)
    echo.ended.get(timeout=TIMEOUT_S)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT_S).close()


def test_start_on_a_taken_port_raises(proxy: FaultProxy, echo: EchoServer) -> None:
    with pytest.raises(OSError):
        FaultProxy("127.0.0.1", echo.port, listen_port=proxy.port).start()


def test_faults_set_before_start_apply_once_running(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    proxy.cut()
    with proxy, connect(proxy) as sock:
        assert_closed(sock)


def test_negative_delay_is_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.delay(-0.1)
