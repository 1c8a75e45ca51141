"""The cluster's media player: its state from the retained topics, every service as the
command the cluster documents, play_media through the chunked load, and announce."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from homeassistant.components.media_player import (
    ATTR_MEDIA_ALBUM_NAME,
    ATTR_MEDIA_ANNOUNCE,
    ATTR_MEDIA_ARTIST,
    ATTR_MEDIA_CONTENT_ID,
    ATTR_MEDIA_CONTENT_TYPE,
    ATTR_MEDIA_DURATION,
    ATTR_MEDIA_ENQUEUE,
    ATTR_MEDIA_POSITION,
    ATTR_MEDIA_POSITION_UPDATED_AT,
    ATTR_MEDIA_SEEK_POSITION,
    ATTR_MEDIA_TITLE,
    ATTR_MEDIA_VOLUME_LEVEL,
    ATTR_MEDIA_VOLUME_MUTED,
    MediaPlayerEntityFeature,
)
from homeassistant.components.media_player import (
    DOMAIN as MP,
)
from homeassistant.const import ATTR_ENTITY_ID, ATTR_SUPPORTED_FEATURES, STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from pytest_homeassistant_custom_component.common import MockConfigEntry

from conftest import STATE, FakeCluster, push

PLAYER = "media_player.nsync_home"


async def call(hass: HomeAssistant, service: str, **data: Any) -> None:
    await hass.services.async_call(MP, service, {ATTR_ENTITY_ID: PLAYER, **data}, blocking=True)


async def play_media(hass: HomeAssistant, url: str, **extra: Any) -> None:
    data = {ATTR_MEDIA_CONTENT_TYPE: "music", ATTR_MEDIA_CONTENT_ID: url, **extra}
    await call(hass, "play_media", **data)


async def test_state_and_attributes_come_from_the_retained_state(
    hass: HomeAssistant, entry: MockConfigEntry
) -> None:
    st = hass.states.get(PLAYER)
    assert st is not None and st.state == "playing"
    a = st.attributes
    assert a[ATTR_MEDIA_TITLE] == "Blue in Green"
    assert a[ATTR_MEDIA_ARTIST] == "Miles Davis"
    assert a[ATTR_MEDIA_ALBUM_NAME] == "Kind of Blue"
    assert a[ATTR_MEDIA_DURATION] == 337.5
    assert a[ATTR_MEDIA_POSITION] == 12.25
    assert a[ATTR_MEDIA_POSITION_UPDATED_AT].timestamp() == STATE["position_at"]
    assert a[ATTR_MEDIA_VOLUME_LEVEL] == 0.4
    assert a[ATTR_MEDIA_VOLUME_MUTED] is False
    assert a[ATTR_MEDIA_CONTENT_ID] == "a" * 56
    features = MediaPlayerEntityFeature(a[ATTR_SUPPORTED_FEATURES])
    for f in ("CLEAR_PLAYLIST", "MEDIA_ENQUEUE", "MEDIA_ANNOUNCE", "SEEK", "VOLUME_MUTE"):
        assert MediaPlayerEntityFeature[f] in features
    assert MediaPlayerEntityFeature.SHUFFLE_SET not in features  # the cluster has none

    push(hass, "state", {**STATE, "playback": "paused", "volume": 0})
    await hass.async_block_till_done()
    st = hass.states.get(PLAYER)
    assert st.state == "paused" and st.attributes[ATTR_MEDIA_VOLUME_MUTED] is True

    push(hass, "state", {**STATE, "playback": "idle", "song": None, "title": None})
    await hass.async_block_till_done()
    st = hass.states.get(PLAYER)
    assert st.state == "idle" and ATTR_MEDIA_TITLE not in st.attributes


async def test_unavailable_while_the_cluster_is_offline(
    hass: HomeAssistant, entry: MockConfigEntry
) -> None:
    push(hass, "status", "offline")
    await hass.async_block_till_done()
    assert hass.states.get(PLAYER).state == STATE_UNAVAILABLE
    push(hass, "status", "online")
    await hass.async_block_till_done()
    assert hass.states.get(PLAYER).state == "playing"


@pytest.mark.parametrize(
    ("service", "data", "verb", "params"),
    [
        ("media_play", {}, "play", {}),
        ("media_pause", {}, "pause", {}),
        ("media_stop", {}, "stop", {}),
        ("media_next_track", {}, "forward", {}),
        ("media_previous_track", {}, "backward", {}),
        ("media_seek", {ATTR_MEDIA_SEEK_POSITION: 42.5}, "seek", {"seconds": 42.5}),
        ("volume_set", {ATTR_MEDIA_VOLUME_LEVEL: 0.65}, "volume", {"volume": 65}),
        ("volume_up", {}, "volume", {"volume": "+5"}),
        ("volume_down", {}, "volume", {"volume": "-5"}),
        ("clear_playlist", {}, "clear", {}),
    ],
)
async def test_each_service_sends_the_documented_command(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    cluster: FakeCluster,
    service: str,
    data: dict[str, Any],
    verb: str,
    params: dict[str, Any],
) -> None:
    await call(hass, service, **data)
    assert cluster.verbs() == [verb]
    body = cluster.last(verb)
    assert {k: v for k, v in body.items() if k not in ("reply_to", "client_req_id")} == params
    assert body["reply_to"].startswith("ha-") and isinstance(body["client_req_id"], int)


async def test_mute_sets_volume_zero_and_unmute_restores_it(
    hass: HomeAssistant, entry: MockConfigEntry, cluster: FakeCluster
) -> None:
    await call(hass, "volume_mute", **{ATTR_MEDIA_VOLUME_MUTED: True})
    assert cluster.last("volume")["volume"] == 0
    push(hass, "state", {**STATE, "volume": 0})
    await hass.async_block_till_done()
    await call(hass, "volume_mute", **{ATTR_MEDIA_VOLUME_MUTED: False})
    assert cluster.last("volume")["volume"] == 40  # the volume before the mute


async def test_a_refused_command_raises_with_the_clusters_message(
    hass: HomeAssistant, entry: MockConfigEntry, cluster: FakeCluster
) -> None:
    cluster.fail["seek"] = "seek to 999 s is past the end of the song (337.5 s)"
    with pytest.raises(HomeAssistantError, match="past the end of the song"):
        await call(hass, "media_seek", **{ATTR_MEDIA_SEEK_POSITION: 999})


SONG = b"ID3" + bytes(range(256)) * 2100  # ~540 KB: three chunks of 256 KiB


@pytest.mark.parametrize(
    ("enqueue", "verb", "flags"),
    [
        (None, "enqueue", {"play": True}),  # Home Assistant's default: play now
        ("play", "enqueue", {"play": True}),
        ("add", "enqueue", {}),
        ("next", "enqueue", {"next": True}),
        ("replace", "replace", {}),
    ],
)
async def test_play_media_fetches_the_url_loads_it_in_chunks_and_enqueues(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    cluster: FakeCluster,
    media_server: tuple[str, dict[str, bytes]],
    enqueue: str | None,
    verb: str,
    flags: dict[str, Any],
) -> None:
    base, files = media_server
    files["/music/Morning%20Birds.mp3"] = SONG
    files["/music/Morning Birds.mp3"] = SONG
    extra = {} if enqueue is None else {ATTR_MEDIA_ENQUEUE: enqueue}
    await play_media(hass, f"{base}/music/Morning%20Birds.mp3", **extra)
    song = hashlib.sha224(SONG).hexdigest()
    assert cluster.verbs() == ["load", verb]
    load = cluster.last("load")
    assert (load["song"], load["size"], load["chunk_size"]) == (song, len(SONG), 256 * 1024)
    assert load["name"] == "Morning Birds.mp3"  # the cluster titles an untagged song by it
    assert cluster.loaded[song] == SONG and cluster.chunks_received == 3
    body = cluster.last(verb)
    assert body["song"] == song
    assert {k: body[k] for k in ("next", "play") if k in body} == flags


async def test_play_media_with_announce_asks_the_cluster_to_announce(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    cluster: FakeCluster,
    media_server: tuple[str, dict[str, bytes]],
) -> None:
    base, files = media_server
    files["/tts/doorbell.mp3"] = b"ID3 a short chime"
    await play_media(hass, f"{base}/tts/doorbell.mp3", **{ATTR_MEDIA_ANNOUNCE: True})
    song = hashlib.sha224(b"ID3 a short chime").hexdigest()
    assert cluster.verbs() == ["load", "announce"]
    assert cluster.last("announce")["song"] == song


async def test_play_media_says_why_a_fetch_failed(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    cluster: FakeCluster,
    media_server: tuple[str, dict[str, bytes]],
) -> None:
    base, _ = media_server
    with pytest.raises(HomeAssistantError, match="HTTP 404"):
        await play_media(hass, f"{base}/missing.mp3")
    assert cluster.commands == []  # nothing was sent to the cluster


async def test_a_load_the_cluster_refuses_is_reported(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    cluster: FakeCluster,
    media_server: tuple[str, dict[str, bytes]],
) -> None:
    base, files = media_server
    files["/notes.txt"] = b"not audio at all"
    cluster.fail["load"] = "not a playable song: not a known audio format"
    with pytest.raises(HomeAssistantError, match="not a playable song"):
        await play_media(hass, f"{base}/notes.txt")
    assert cluster.verbs() == ["load"]
