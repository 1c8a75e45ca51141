"""NSync multi-room audio in Home Assistant: one media player per cluster, and per node a few
diagnostic entities, all over Home Assistant's own MQTT connection (no extra library)."""

from __future__ import annotations

from homeassistant.components import mqtt
from homeassistant.config_entries import ConfigEntry
from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ConfigEntryNotReady

from .cluster import NSyncCluster
from .const import CONF_CLUSTER

PLATFORMS = [Platform.MEDIA_PLAYER, Platform.SENSOR, Platform.BINARY_SENSOR]

type NSyncConfigEntry = ConfigEntry[NSyncCluster]


def client_id(entry_id: str) -> str:
    """The reply topic id of this Home Assistant for one entry ([a-z0-9_-])."""
    return "ha-" + "".join(c for c in entry_id.lower() if c.isalnum())[:32]


async def async_setup_entry(hass: HomeAssistant, entry: NSyncConfigEntry) -> bool:
    if not await mqtt.async_wait_for_mqtt_client(hass):
        raise ConfigEntryNotReady("MQTT is not available")
    cluster = NSyncCluster(hass, entry.data[CONF_CLUSTER], client_id(entry.entry_id))
    await cluster.async_start()
    entry.runtime_data = cluster
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    return True


async def async_unload_entry(hass: HomeAssistant, entry: NSyncConfigEntry) -> bool:
    unloaded = await hass.config_entries.async_unload_platforms(entry, PLATFORMS)
    if unloaded:
        await entry.runtime_data.async_stop()
    return unloaded
