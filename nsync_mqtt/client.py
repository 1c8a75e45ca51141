"""The client API: the paper's calls (play, pause, forward, backward, load_song, enqueue_song)
plus stop, volume, seek and status.

Every call returns the reply object ``{success, command, params, msg, client_req_id}``; a call that
hears nothing within ``timeout`` seconds returns a failure instead of raising::

    with NSyncClient("mqtt://127.0.0.1:1883") as c:
        c.load_song("song.mp3")
        c.enqueue_song("song.mp3")
        c.play()
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from nsync_mqtt.bus import new_paho_client, parse_broker_url
from nsync_mqtt.errors import BrokerError
from nsync_mqtt.messages import HASH_RE, Topics, encode_chunk, reply_object
from nsync_mqtt.replication import DEFAULT_CHUNK_SIZE, Manifest, chunk_header, sha224_file

Reply = dict[str, Any]
Progress = Callable[[int, int], None]  # (bytes sent, bytes to send)


def failure(command: str, params: Any, msg: str, req_id: Any = None) -> Reply:
    return reply_object(False, command, params, msg, req_id)


class NSyncClient:
    def __init__(
        self,
        broker: str = "mqtt://127.0.0.1:1883",
        cluster: str = "home",
        timeout: float = 3.0,
        client_id: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """``ca_file``: for an ``mqtts://`` broker, trust only the CAs in this PEM file (a
        private CA) instead of the system's."""
        self.url = parse_broker_url(broker)
        self.topics = Topics(cluster)
        self.timeout = timeout
        self.reply_to = client_id or f"cli-{secrets.token_hex(4)}"
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[Any, queue.Queue[tuple[str, Any]]] = {}
        self._xfer: queue.Queue[dict[str, Any]] = queue.Queue()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = new_paho_client(self.reply_to, self.url, ca_file)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # -- connection

    def connect(self) -> NSyncClient:
        try:
            self._client.connect_async(self.url.host, self.url.port, keepalive=30)
        except (OSError, ValueError) as err:
            raise BrokerError(f"cannot reach the broker at {self.url}: {err}") from err
        self._client.loop_start()
        if not self._connected.wait(self.timeout) or self._refused:
            self._client.loop_stop()
            if self._refused:
                raise BrokerError(f"the broker at {self.url} refused us: {self._refused}")
            hint = ""
            if self.url.tls:  # a certificate paho could not verify looks the same from here
                hint = " (or its TLS certificate is not signed by a CA we trust: --ca-file)"
            raise BrokerError(
                f"cannot reach the broker at {self.url} within {self.timeout:g} s{hint}"
            )
        return self

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> NSyncClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if getattr(rc, "is_failure", False):
            self._refused = str(rc)
            self._connected.set()  # a refused login is final: connect() says so at once
            return
        # ready only once the broker confirmed the subscriptions: a reply can then not be missed
        client.subscribe(
            [
                (self.topics.reply(self.reply_to), 1),
                (self.topics.internal(f"xfer/{self.reply_to}"), 1),
            ]
        )

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: Any, rcs: Any, props: Any
    ) -> None:
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if msg.topic.endswith(f"xfer/{self.reply_to}"):
            self._xfer.put(obj)
            return
        with self._lock:
            q = self._waiting.get(obj.get("client_req_id"))
        if q is not None:
            q.put(("reply", obj))

    # -- requests

    def request(
        self, verb: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Reply:
        """Send one command and wait for its reply (or a timeout failure)."""
        req_id = next(self._ids)
        body = dict(params or {})
        body.update(client_req_id=req_id, reply_to=self.reply_to)
        q: queue.Queue[tuple[str, Any]] = queue.Queue()
        with self._lock:
            self._waiting[req_id] = q
        try:
            self._client.publish(self.topics.cmd(verb), json.dumps(body), qos=1)
            wait = self.timeout if timeout is None else timeout
            try:
                _, reply = q.get(timeout=wait)
            except queue.Empty:
                return failure(
                    verb,
                    params or {},
                    f"no reply within {wait:g} s: is an NSync master running on cluster "
                    f"{self.topics.cluster!r} at {self.url}?",
                    req_id,
                )
            return reply
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)

    def play(self) -> Reply:
        return self.request("play")

    def pause(self) -> Reply:
        return self.request("pause")

    def forward(self) -> Reply:
        return self.request("forward")

    def backward(self) -> Reply:
        return self.request("backward")

    def stop(self) -> Reply:
        return self.request("stop")

    def status(self) -> Reply:
        return self.request("status")

    def volume(self, level: int | str) -> Reply:
        return self.request("volume", {"volume": level})

    def seek(self, seconds: float) -> Reply:
        return self.request("seek", {"seconds": seconds})

    def enqueue_song(
        self,
        song: str | os.PathLike[str],
        progress: Progress | None = None,
        next: bool = False,
        play: bool = False,
    ) -> Reply:
        """Enqueue a loaded song by hash or exact title, or a file (loaded first if needed): at
        the end of the playlist, or with ``next`` right after the current song, or with ``play``
        there and playing it now."""
        flags = {k: v for k, v in (("next", next), ("play", play)) if v}
        return self._with_song("enqueue", song, progress, flags)

    def replace(self, song: str | os.PathLike[str], progress: Progress | None = None) -> Reply:
        """Make ``song`` (hash, exact title or file) the whole playlist and play it."""
        return self._with_song("replace", song, progress, {})

    def announce(self, song: str | os.PathLike[str], progress: Progress | None = None) -> Reply:
        """Interrupt playback with ``song`` (hash, exact title or file) on every speaker at
        once, then go back to where playback was (playing on from the same frame)."""
        return self._with_song("announce", song, progress, {})

    def clear(self) -> Reply:
        """Empty the playlist; playback stops."""
        return self.request("clear")

    def remove(self, index: int) -> Reply:
        """Remove the song at playlist position ``index`` (0 is the first song)."""
        return self.request("remove", {"index": index})

    def move(self, src: int, dst: int) -> Reply:
        """Move the song at playlist position ``src`` to position ``dst``."""
        return self.request("move", {"from": src, "to": dst})

    def _with_song(
        self,
        verb: str,
        song: str | os.PathLike[str],
        progress: Progress | None,
        flags: dict[str, Any],
    ) -> Reply:
        text = os.fspath(song)
        path = Path(text)
        if not HASH_RE.fullmatch(text) and path.is_file():
            loaded = self.load_song(path, progress=progress)
            if not loaded["success"]:
                return loaded
            text = loaded["params"]["song"]
        return self.request(verb, {"song": text, **flags})

    def load_song(
        self,
        path: str | os.PathLike[str],
        bg: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
    ) -> Reply:
        """Send a song file to the cluster. The master asks only for the chunks it lacks; the
        reply comes when f+1 nodes hold the song (with ``bg``, when the master holds it)."""
        p = Path(path)
        try:
            song = sha224_file(p)
            manifest = Manifest(song, p.stat().st_size, chunk_size)
        except OSError as err:
            return failure("load", {"path": str(p)}, f"cannot read {p}: {err.strerror}")
        except Exception as err:  # an empty file or a bad chunk size
            return failure("load", {"path": str(p)}, f"cannot load {p}: {err}")
        req_id = next(self._ids)
        params = {**manifest.to_dict(), "bg": bg, "name": p.name}
        body = {**params, "client_req_id": req_id, "reply_to": self.reply_to}
        q: queue.Queue[tuple[str, Any]] = queue.Queue()
        with self._lock:
            self._waiting[req_id] = q
        while not self._xfer.empty():
            self._xfer.get_nowait()
        try:
            self._client.publish(self.topics.cmd("load"), json.dumps(body), qos=1)
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    _, reply = q.get_nowait()
                    return reply
                except queue.Empty:
                    pass
                try:
                    ask = self._xfer.get(timeout=0.01)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        return failure(
                            "load",
                            params,
                            f"no reply within {self.timeout:g} s: is a master up?",
                            req_id,
                        )
                    continue
                if ask.get("song") == song:
                    self._send_chunks(p, manifest, ask.get("missing") or [], progress)
                    break
            # the master now assembles and replicates; allow time in proportion to size
            wait = self.timeout + 15.0 + manifest.size / 2e6
            try:
                _, reply = q.get(timeout=wait)
            except queue.Empty:
                return failure("load", params, f"no reply within {wait:.0f} s", req_id)
            return reply
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)

    def _send_chunks(
        self, p: Path, manifest: Manifest, missing: list[int], progress: Progress | None
    ) -> None:
        topic = self.topics.internal("chunk/all")
        total = sum(manifest.chunk_span(i)[1] for i in missing)
        sent = 0
        infos = []
        with p.open("rb") as f:
            for i in missing:
                offset, length = manifest.chunk_span(i)
                f.seek(offset)
                frame = encode_chunk(chunk_header(manifest, i), f.read(length))
                infos.append(self._client.publish(topic, frame, qos=1))
                sent += length
        done = 0
        for info, i in zip(infos, missing, strict=True):
            info.wait_for_publish(timeout=60)
            done += manifest.chunk_span(i)[1]
            if progress is not None:
                progress(done, total)
        if progress is not None and not infos:
            progress(0, 0)
