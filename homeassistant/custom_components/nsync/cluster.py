"""One NSync cluster as Home Assistant sees it: its public MQTT topics, through Home Assistant's
own MQTT client.

Everything here follows the cluster's public contract (docs/protocol.md, "Client commands",
and the README's retained topics): commands go to ``nsync/<cluster>/cmd/<verb>`` with a
``reply_to`` and a ``client_req_id``, replies come back on ``reply/<reply_to>``; the retained
``state``, ``state/playlist``, ``status`` and ``node/<id>/...`` topics push every
change. Songs are sent with the chunked load (``cmd/load`` and ``internal/chunk/all``), which
resumes and skips what the cluster already holds. This module never imports the cluster's own
Python package: Home Assistant pins another paho-mqtt than the nodes use.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from homeassistant.components import mqtt
from homeassistant.components.mqtt.models import ReceiveMessage
from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError

from .const import LOAD_CHUNK_SIZE, LOAD_TIMEOUT_MIN_S, PROBE_RETRY_S, REPLY_TIMEOUT_S

log = logging.getLogger(__name__)

CHUNK_MAGIC = b"NSC1"


class ClusterError(HomeAssistantError):
    """The cluster refused a command or did not answer; the message says which and why."""


def chunk_frame(header: dict[str, Any], data: bytes) -> bytes:
    """A chunk frame: b"NSC1", the JSON header's length (u32, big endian), header, bytes."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return CHUNK_MAGIC + struct.pack(">I", len(head)) + head + data


@dataclass
class Node:
    """What the cluster's retained topics say of one node."""

    online: bool | None = None
    state: dict[str, Any] = field(default_factory=dict)


class NSyncCluster:
    """The retained state of one cluster, kept current by MQTT pushes, and its commands."""

    def __init__(self, hass: HomeAssistant, cluster: str, client_id: str) -> None:
        self.hass = hass
        self.cluster = cluster
        self.base = f"nsync/{cluster}"
        self.reply_to = client_id  # [a-z0-9_-]: this Home Assistant's replies
        self.status: str | None = None
        self.state: dict[str, Any] = {}
        self.playlist: list[str] = []
        self.nodes: dict[str, Node] = {}
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._xfer: dict[str, asyncio.Future[list[int]]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._node_listeners: list[Callable[[str], None]] = []
        self._unsubscribe: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ subscriptions

    async def async_start(self) -> None:
        """Subscribe to the cluster's topics; the retained ones arrive at once."""
        subs: list[tuple[str, Callable[[ReceiveMessage], None]]] = [
            (f"{self.base}/status", self._on_status),
            (f"{self.base}/state", self._on_state),
            (f"{self.base}/state/playlist", self._on_playlist),
            (f"{self.base}/node/+/status", self._on_node_status),
            (f"{self.base}/node/+/state", self._on_node_state),
            (f"{self.base}/reply/{self.reply_to}", self._on_reply),
            (f"{self.base}/internal/xfer/{self.reply_to}", self._on_xfer),
        ]
        for topic, handler in subs:
            self._unsubscribe.append(await mqtt.async_subscribe(self.hass, topic, handler, qos=1))

    async def async_stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        for fut in [*self._replies.values(), *self._xfer.values()]:
            if not fut.done():
                fut.cancel()

    @callback
    def add_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every change of the cluster's state; returns the remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @callback
    def add_node_listener(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(node_id)`` after every change of a node's topics."""
        self._node_listeners.append(listener)
        return lambda: self._node_listeners.remove(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _node_changed(self, node: str) -> None:
        for listener in list(self._node_listeners):
            listener(node)

    @staticmethod
    def _json(msg: ReceiveMessage, kind: type) -> Any:
        try:
            value = json.loads(msg.payload) if msg.payload else None
        except (ValueError, TypeError):
            value = None
        if not isinstance(value, kind):
            log.debug("ignoring %s: not a JSON %s", msg.topic, kind.__name__)
            return None
        return value

    @callback
    def _on_status(self, msg: ReceiveMessage) -> None:
        self.status = str(msg.payload)
        self._changed()

    @callback
    def _on_state(self, msg: ReceiveMessage) -> None:
        doc = self._json(msg, dict)
        if doc is not None:
            self.state = doc
            self._changed()

    @callback
    def _on_playlist(self, msg: ReceiveMessage) -> None:
        songs = self._json(msg, list)
        if songs is not None:
            self.playlist = [s for s in songs if isinstance(s, str)]
            self._changed()

    def _node_of(self, topic: str) -> str | None:
        parts = topic.split("/")  # nsync/<cluster>/node/<id>/<status|state>
        return parts[3] if len(parts) == 5 and parts[3] else None

    @callback
    def _on_node_status(self, msg: ReceiveMessage) -> None:
        node = self._node_of(msg.topic)
        if node is not None:
            self.nodes.setdefault(node, Node()).online = msg.payload == "online"
            self._node_changed(node)

    @callback
    def _on_node_state(self, msg: ReceiveMessage) -> None:
        node, doc = self._node_of(msg.topic), self._json(msg, dict)
        if node is not None and doc is not None:
            self.nodes.setdefault(node, Node()).state = doc
            self._node_changed(node)

    @callback
    def _on_reply(self, msg: ReceiveMessage) -> None:
        reply = self._json(msg, dict)
        if reply is None:
            return
        fut = self._replies.get(reply.get("client_req_id"))  # type: ignore[arg-type]
        if fut is not None and not fut.done():
            fut.set_result(reply)

    @callback
    def _on_xfer(self, msg: ReceiveMessage) -> None:
        ask = self._json(msg, dict)
        if ask is None:
            return
        fut = self._xfer.get(ask.get("song"))  # type: ignore[arg-type]
        missing = ask.get("missing")
        if fut is not None and not fut.done() and isinstance(missing, list):
            fut.set_result([i for i in missing if isinstance(i, int)])

    # ------------------------------------------------------------------ commands

    @property
    def available(self) -> bool:
        return self.status == "online"

    async def command(
        self, verb: str, params: dict[str, Any] | None = None, wait_s: float = REPLY_TIMEOUT_S
    ) -> dict[str, Any]:
        """Send ``cmd/<verb>`` and wait for the reply object; ClusterError on a failed or
        missing reply."""
        req_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = self.hass.loop.create_future()
        self._replies[req_id] = fut
        body = {**(params or {}), "reply_to": self.reply_to, "client_req_id": req_id}
        try:
            await mqtt.async_publish(self.hass, f"{self.base}/cmd/{verb}", json.dumps(body), qos=1)
            async with asyncio.timeout(wait_s):
                reply = await fut
        except TimeoutError:
            raise ClusterError(
                f"NSync cluster {self.cluster!r} did not answer {verb} within {wait_s:g} s"
            ) from None
        finally:
            self._replies.pop(req_id, None)
        if reply.get("success") is not True:
            raise ClusterError(f"NSync {verb} failed: {reply.get('msg')}")
        return reply

    async def load(self, data: bytes, name: str | None) -> str:
        """Send a song to the cluster with the chunked load and return its hash once the
        cluster holds it (f+1 nodes). Chunks the cluster already holds are not sent."""
        if not data:
            raise ClusterError("the media is empty")
        song = hashlib.sha224(data).hexdigest()
        manifest = {"song": song, "size": len(data), "chunk_size": LOAD_CHUNK_SIZE}
        params: dict[str, Any] = {**manifest, "bg": False}
        if name:
            params["name"] = name
        asked: asyncio.Future[list[int]] = self.hass.loop.create_future()
        self._xfer[song] = asked
        wait_s = LOAD_TIMEOUT_MIN_S + len(data) / 1e6
        chunk_topic = f"{self.base}/internal/chunk/all"
        reply_task = asyncio.ensure_future(self.command("load", params, wait_s=wait_s))
        try:
            # the master asks for the chunks it lacks (none if it holds the song already)
            done, _ = await asyncio.wait({reply_task, asked}, return_when=asyncio.FIRST_COMPLETED)
            for index in asked.result() if asked in done else []:
                start = index * LOAD_CHUNK_SIZE
                if 0 <= start < len(data):
                    header = {**manifest, "index": index}
                    frame = chunk_frame(header, data[start : start + LOAD_CHUNK_SIZE])
                    await mqtt.async_publish(self.hass, chunk_topic, frame, qos=1, encoding=None)
            await reply_task
        finally:
            self._xfer.pop(song, None)
            for fut in (asked, reply_task):
                if not fut.done():
                    fut.cancel()
        return song


async def async_probe(hass: HomeAssistant, cluster: str, client_id: str, wait_s: float) -> str:
    """Ask the cluster for its status; returns the reply's message (ClusterError if none).

    Home Assistant sends a new subscription to the broker a little later (it gathers them for
    0.1-0.5 s), so the first request may be answered before the reply topic is subscribed:
    ``status`` changes nothing, and it is asked again every half second until ``wait_s``."""
    probe = NSyncCluster(hass, cluster, client_id)
    await probe.async_start()
    deadline = hass.loop.time() + wait_s
    try:
        while True:
            left = deadline - hass.loop.time()
            try:
                reply = await probe.command("status", wait_s=max(0.01, min(PROBE_RETRY_S, left)))
            except ClusterError:
                if hass.loop.time() >= deadline:
                    raise ClusterError(
                        f"NSync cluster {cluster!r} did not answer within {wait_s:g} s"
                    ) from None
                continue
            return str(reply.get("msg", ""))
    finally:
        await probe.async_stop()
