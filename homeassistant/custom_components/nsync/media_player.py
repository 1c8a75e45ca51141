"""The cluster as one media player: every speaker plays what it shows, at the same instant."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp
from homeassistant.components import media_source
from homeassistant.components.media_player import (
    ATTR_MEDIA_ANNOUNCE,
    ATTR_MEDIA_ENQUEUE,
    BrowseMedia,
    MediaPlayerEnqueue,
    MediaPlayerEntity,
    MediaPlayerEntityFeature,
    MediaPlayerState,
    MediaType,
    async_process_play_media_url,
)
from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.entity_platform import AddEntitiesCallback
from homeassistant.util import dt as dt_util

from . import NSyncConfigEntry
from .cluster import NSyncCluster
from .const import DOMAIN, MAX_MEDIA_BYTES, VOLUME_STEP

FETCH_TIMEOUT_S = 120.0
STATES = {
    "playing": MediaPlayerState.PLAYING,
    "paused": MediaPlayerState.PAUSED,
    "idle": MediaPlayerState.IDLE,
}
ENQUEUE_PARAMS: dict[MediaPlayerEnqueue, tuple[str, dict[str, Any]]] = {
    MediaPlayerEnqueue.ADD: ("enqueue", {}),
    MediaPlayerEnqueue.NEXT: ("enqueue", {"next": True}),
    MediaPlayerEnqueue.PLAY: ("enqueue", {"play": True}),
    MediaPlayerEnqueue.REPLACE: ("replace", {}),
}


async def async_setup_entry(
    hass: HomeAssistant, entry: NSyncConfigEntry, async_add_entities: AddEntitiesCallback
) -> None:
    async_add_entities([NSyncMediaPlayer(entry.runtime_data)])


def cluster_device(cluster: str) -> DeviceInfo:
    return DeviceInfo(
        identifiers={(DOMAIN, cluster)},
        name=f"NSync {cluster}",
        manufacturer="NSync",
        model="Synchronised speaker cluster",
    )


def media_name(url: str) -> str | None:
    """The file name at the end of a URL (the cluster titles untagged songs by it)."""
    name = unquote(urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])
    return name or None


class NSyncMediaPlayer(MediaPlayerEntity):
    _attr_has_entity_name = True
    _attr_name = None  # the device's name: "NSync <cluster>"
    _attr_should_poll = False
    _attr_media_content_type = MediaType.MUSIC
    _attr_supported_features = (
        MediaPlayerEntityFeature.PLAY
        | MediaPlayerEntityFeature.PAUSE
        | MediaPlayerEntityFeature.STOP
        | MediaPlayerEntityFeature.NEXT_TRACK
        | MediaPlayerEntityFeature.PREVIOUS_TRACK
        | MediaPlayerEntityFeature.SEEK
        | MediaPlayerEntityFeature.VOLUME_SET
        | MediaPlayerEntityFeature.VOLUME_STEP
        | MediaPlayerEntityFeature.VOLUME_MUTE
        | MediaPlayerEntityFeature.CLEAR_PLAYLIST
        | MediaPlayerEntityFeature.PLAY_MEDIA
        | MediaPlayerEntityFeature.MEDIA_ENQUEUE
        | MediaPlayerEntityFeature.MEDIA_ANNOUNCE
        | MediaPlayerEntityFeature.BROWSE_MEDIA
    )

    def __init__(self, cluster: NSyncCluster) -> None:
        self.cluster = cluster
        self._attr_unique_id = f"{cluster.cluster}-player"
        self._attr_device_info = cluster_device(cluster.cluster)
        self._volume_before_mute = 50

    async def async_added_to_hass(self) -> None:
        self.async_on_remove(self.cluster.add_listener(self._cluster_changed))

    @callback
    def _cluster_changed(self) -> None:
        self.async_write_ha_state()

    # ------------------------------------------------------------------ state

    @property
    def _doc(self) -> dict[str, Any]:
        return self.cluster.state

    @property
    def available(self) -> bool:
        return self.cluster.available

    @property
    def state(self) -> MediaPlayerState | None:
        return STATES.get(self._doc.get("playback"), MediaPlayerState.IDLE)

    @property
    def volume_level(self) -> float | None:
        volume = self._doc.get("volume")
        return volume / 100 if isinstance(volume, int) else None

    @property
    def is_volume_muted(self) -> bool | None:
        volume = self._doc.get("volume")
        return volume == 0 if isinstance(volume, int) else None

    @property
    def media_content_id(self) -> str | None:
        return self._doc.get("song")

    @property
    def media_title(self) -> str | None:
        return self._doc.get("title") if self._doc.get("song") else None

    @property
    def media_artist(self) -> str | None:
        return self._doc.get("artist") if self._doc.get("song") else None

    @property
    def media_album_name(self) -> str | None:
        return self._doc.get("album") if self._doc.get("song") else None

    @property
    def media_duration(self) -> float | None:
        duration = self._doc.get("duration")
        return duration if isinstance(duration, (int, float)) else None

    @property
    def media_position(self) -> float | None:
        position = self._doc.get("position")
        return position if isinstance(position, (int, float)) and self._doc.get("song") else None

    @property
    def media_position_updated_at(self) -> Any:
        at = self._doc.get("position_at")
        return dt_util.utc_from_timestamp(at) if isinstance(at, (int, float)) else None

    # ------------------------------------------------------------------ controls

    async def async_media_play(self) -> None:
        await self.cluster.command("play")

    async def async_media_pause(self) -> None:
        await self.cluster.command("pause")

    async def async_media_stop(self) -> None:
        await self.cluster.command("stop")

    async def async_media_next_track(self) -> None:
        await self.cluster.command("forward")

    async def async_media_previous_track(self) -> None:
        await self.cluster.command("backward")

    async def async_media_seek(self, position: float) -> None:
        await self.cluster.command("seek", {"seconds": round(float(position), 3)})

    async def async_set_volume_level(self, volume: float) -> None:
        await self.cluster.command("volume", {"volume": round(volume * 100)})

    async def async_volume_up(self) -> None:
        await self.cluster.command("volume", {"volume": f"+{VOLUME_STEP}"})

    async def async_volume_down(self) -> None:
        await self.cluster.command("volume", {"volume": f"-{VOLUME_STEP}"})

    async def async_mute_volume(self, mute: bool) -> None:
        """The cluster has no separate mute: muting sets volume 0 and unmuting restores the
        volume it had (50 if Home Assistant did not see it)."""
        volume = self._doc.get("volume")
        if mute:
            if isinstance(volume, int) and volume > 0:
                self._volume_before_mute = volume
            await self.cluster.command("volume", {"volume": 0})
        else:
            await self.cluster.command("volume", {"volume": self._volume_before_mute})

    async def async_clear_playlist(self) -> None:
        await self.cluster.command("clear")

    # ------------------------------------------------------------------ media

    async def async_play_media(
        self, media_type: MediaType | str, media_id: str, **kwargs: Any
    ) -> None:
        """Fetch the media (a URL, or a media-source item such as TTS) with Home Assistant's
        HTTP client, send it to the cluster with the chunked load, then enqueue it as asked:
        add, next, play (the default) or replace; ``announce`` interrupts what plays and
        resumes it after, on every speaker together."""
        if media_source.is_media_source_id(media_id):
            item = await media_source.async_resolve_media(self.hass, media_id, self.entity_id)
            media_id = item.url
        url = async_process_play_media_url(self.hass, media_id)
        name = media_name(url)
        data = await self._fetch(url)
        song = await self.cluster.load(data, name)
        if kwargs.get(ATTR_MEDIA_ANNOUNCE):
            await self.cluster.command("announce", {"song": song})
            return
        enqueue = kwargs.get(ATTR_MEDIA_ENQUEUE) or MediaPlayerEnqueue.PLAY
        verb, params = ENQUEUE_PARAMS[MediaPlayerEnqueue(enqueue)]
        await self.cluster.command(verb, {"song": song, **params})

    async def _fetch(self, url: str) -> bytes:
        session = async_get_clientsession(self.hass)
        data = bytearray()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT_S), session.get(url) as resp:
                if resp.status != 200:
                    raise HomeAssistantError(f"fetching {url} failed: HTTP {resp.status}")
                if (resp.content_length or 0) > MAX_MEDIA_BYTES:
                    raise HomeAssistantError(f"{url} is larger than {MAX_MEDIA_BYTES >> 20} MB")
                async for chunk in resp.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > MAX_MEDIA_BYTES:
                        raise HomeAssistantError(f"{url} is larger than {MAX_MEDIA_BYTES >> 20} MB")
        except (aiohttp.ClientError, TimeoutError) as err:
            raise HomeAssistantError(f"cannot fetch {url}: {err or 'timed out'}") from err
        return bytes(data)

    async def async_browse_media(
        self, media_content_type: MediaType | str | None = None, media_content_id: str | None = None
    ) -> BrowseMedia:
        return await media_source.async_browse_media(
            self.hass,
            media_content_id,
            content_filter=lambda item: item.media_content_type.startswith("audio/"),
        )
