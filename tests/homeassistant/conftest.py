"""Fixtures of the Home Assistant integration's tests.

Home Assistant's MQTT client is mocked by pytest-homeassistant-custom-component (``mqtt_mock``):
what the integration publishes is delivered back to Home Assistant's own subscribers, as a
broker would. ``FakeCluster`` subscribes there and answers the way an NSync master does by the
public contract (docs/protocol.md "Client commands" and the load sequence): a reply object on
``reply/<reply_to>``, the chunked load's ``internal/xfer`` request, and retained state pushed with
``async_fire_mqtt_message``. The cluster's own behaviour is tested against real nodes in
tests/integration; here only what Home Assistant sends and shows is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from homeassistant.components import mqtt
from homeassistant.components.mqtt.models import ReceiveMessage
from homeassistant.core import HomeAssistant, callback
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_fire_mqtt_message,
)

import custom_components  # ours (pytest.ini's pythonpath), before Home Assistant mounts

DOMAIN = "nsync"
CLUSTER = "home"
BASE = f"nsync/{CLUSTER}"
# Home Assistant imports ``custom_components`` from its config folder (in tests, the plugin's
# testing_config); importing ours first makes that a no-op, so the loader finds nsync here.
assert "homeassistant/custom_components" in custom_components.__file__.replace("\\", "/")

STATE = {
    "playback": "playing",
    "song": "a" * 56,
    "title": "Blue in Green",
    "artist": "Miles Davis",
    "album": "Kind of Blue",
    "duration": 337.5,
    "position": 12.25,
    "position_at": 1_764_950_400.0,
    "queue": ["b" * 56],
    "queue_length": 1,
    "playlist_length": 2,
    "slot": 0,
    "volume": 40,
    "master": "kitchen",
    "term": 3,
    "nodes": ["bedroom", "kitchen", "living"],
}


@pytest.fixture
def expected_lingering_timers() -> bool:
    """The mocked MQTT client leaves its periodic housekeeping timer behind (Home Assistant's
    own MQTT fixtures do, whatever the integration): not a failure of these tests."""
    return True


@pytest.fixture(scope="session", autouse=True)
def resolver_thread() -> None:
    """pycares 5 (under Home Assistant's HTTP client) starts one daemon thread per process with
    its first DNS channel. Start it before any test: the per-test thread check would otherwise
    blame the first test that fetches media."""
    with contextlib.suppress(ImportError, AttributeError):
        import pycares

        pycares.Channel()


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Load the integration from homeassistant/custom_components (pytest.ini's pythonpath)."""


class FakeCluster:
    """An NSync master's public side, answering over the mocked MQTT."""

    def __init__(self, hass: HomeAssistant) -> None:
        self.hass = hass
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.fail: dict[str, str] = {}  # verb -> the failure message to reply with
        self.silent = False  # no master: commands get no reply
        self.unheard = 0  # this many next replies are lost (sent before the reply topic is
        # subscribed at the broker, as happens to Home Assistant's brand-new subscriptions)
        self.loaded: dict[str, bytes] = {}  # song hash -> the bytes assembled from chunks
        self.names: dict[str, str] = {}  # song hash -> the name its load gave
        self.chunks_received = 0
        self._loads: dict[str, tuple[dict[str, Any], dict[int, bytes]]] = {}

    async def start(self) -> None:
        await mqtt.async_subscribe(self.hass, f"{BASE}/cmd/+", self._on_cmd, qos=1)
        await mqtt.async_subscribe(
            self.hass, f"{BASE}/internal/chunk/all", self._on_chunk, qos=1, encoding=None
        )

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.commands]

    def last(self, verb: str) -> dict[str, Any]:
        return next(body for v, body in reversed(self.commands) if v == verb)

    def reply(self, body: dict[str, Any], verb: str, success: bool, msg: str, **extra: Any) -> None:
        if not body.get("reply_to"):
            return
        params = {k: v for k, v in body.items() if k not in ("reply_to", "client_req_id")}
        reply = {
            "success": success,
            "command": verb,
            "params": params,
            "msg": msg,
            "client_req_id": body.get("client_req_id"),
            **extra,
        }
        async_fire_mqtt_message(self.hass, f"{BASE}/reply/{body['reply_to']}", json.dumps(reply))

    @callback
    def _on_cmd(self, msg: ReceiveMessage) -> None:
        verb = msg.topic.rsplit("/", 1)[-1]
        text = str(msg.payload)
        body = json.loads(text) if text.startswith("{") else ({"arg": text} if text else {})
        self.commands.append((verb, body))
        if self.silent:
            return
        if self.unheard:
            self.unheard -= 1
            return
        if verb in self.fail:
            self.reply(body, verb, False, self.fail[verb])
        elif verb == "load":
            n = math.ceil(body["size"] / body["chunk_size"])
            self._loads[body["song"]] = (body, {})
            if body.get("name"):
                self.names[body["song"]] = body["name"]
            xfer = {"song": body["song"], "missing": list(range(n))}
            async_fire_mqtt_message(
                self.hass, f"{BASE}/internal/xfer/{body['reply_to']}", json.dumps(xfer)
            )
        elif verb == "status":
            self.reply(body, verb, True, "idle: nothing at 0.0 s", state=STATE)
        else:
            self.reply(body, verb, True, "ok")

    @callback
    def _on_chunk(self, msg: ReceiveMessage) -> None:
        frame = bytes(msg.payload)  # type: ignore[arg-type]
        assert frame[:4] == b"NSC1", frame[:16]
        (n,) = struct.unpack(">I", frame[4:8])
        header = json.loads(frame[8 : 8 + n])
        song = header["song"]
        self.chunks_received += 1
        body, parts = self._loads[song]
        parts[header["index"]] = frame[8 + n :]
        if sum(len(p) for p in parts.values()) == body["size"]:
            data = b"".join(parts[i] for i in sorted(parts))
            assert hashlib.sha224(data).hexdigest() == song
            self.loaded[song] = data
            self.reply(body, "load", True, f"loaded {song[:12]} on 3 nodes")


@pytest.fixture
async def cluster(hass: HomeAssistant, mqtt_mock: Any) -> AsyncIterator[FakeCluster]:
    fake = FakeCluster(hass)
    await fake.start()
    yield fake
    # unload ours first (its unsubscriptions), then MQTT's, which cancels MQTT's timers
    configs = sorted(hass.config_entries.async_entries(), key=lambda c: c.domain == "mqtt")
    for config in configs:
        await hass.config_entries.async_unload(config.entry_id)
        await hass.async_block_till_done()


def push(hass: HomeAssistant, suffix: str, payload: Any, retain: bool = False) -> None:
    """A message from the cluster on one of its topics, as the broker hands it to a client
    that is already subscribed (without the retain flag, which a broker sets only on what it
    sends on subscribing: ``retain=True`` for that)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    async_fire_mqtt_message(hass, f"{BASE}/{suffix}", text, retain=retain)


@pytest.fixture
async def entry(hass: HomeAssistant, cluster: FakeCluster) -> MockConfigEntry:
    """The integration set up for cluster ``home``, its master online and playing."""
    config = MockConfigEntry(domain=DOMAIN, data={"cluster": CLUSTER}, unique_id=CLUSTER)
    config.add_to_hass(hass)
    assert await hass.config_entries.async_setup(config.entry_id)
    push(hass, "status", "online")
    push(hass, "state", STATE)
    await hass.async_block_till_done()
    return config


@pytest.fixture
async def media_server(socket_enabled: None) -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """A local HTTP server of media files on 127.0.0.1: (base URL, {path: bytes}) to fill in.
    Home Assistant's own HTTP client fetches from it."""
    files: dict[str, bytes] = {}

    async def serve(request: web.Request) -> web.StreamResponse:
        data = files.get(request.path)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="audio/mpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", files
    finally:
        await runner.cleanup()
