"""Per node, diagnostic entities: online, role, clock offset and sync error, created when the
node first shows up on the cluster's topics."""

from __future__ import annotations

from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.common import MockConfigEntry

from conftest import push

NODE_STATE = {
    "role": "follower",
    "term": 3,
    "master": "kitchen",
    "clock": {"offset_s": -0.0123456, "rate_ppm": 12.5, "calibrated": True},
    "sink": {"kind": "stream", "error_ms": 0.042, "dac_drift_ppm": -3.1, "resyncs": 0},
    "songs": [],
}


async def test_node_entities_appear_and_follow_the_node(
    hass: HomeAssistant, entry: MockConfigEntry
) -> None:
    assert hass.states.get("binary_sensor.nsync_bedroom_online") is None
    push(hass, "node/bedroom/status", "online")
    push(hass, "node/bedroom/state", NODE_STATE)
    await hass.async_block_till_done()

    assert hass.states.get("binary_sensor.nsync_bedroom_online").state == "on"
    assert hass.states.get("sensor.nsync_bedroom_role").state == "follower"
    offset = hass.states.get("sensor.nsync_bedroom_clock_offset")
    assert float(offset.state) == -12.346 and offset.attributes["unit_of_measurement"] == "ms"
    assert float(hass.states.get("sensor.nsync_bedroom_sync_error").state) == 0.042

    entities = er.async_get(hass)
    for entity_id in ("binary_sensor.nsync_bedroom_online", "sensor.nsync_bedroom_role"):
        assert entities.async_get(entity_id).entity_category == "diagnostic"
    devices = dr.async_get(hass)
    node = devices.async_get_device(identifiers={("nsync", "home-bedroom")})
    cluster = devices.async_get_device(identifiers={("nsync", "home")})
    assert node is not None and cluster is not None and node.via_device_id == cluster.id

    push(hass, "node/bedroom/state", {**NODE_STATE, "role": "master", "clock": {}})
    await hass.async_block_till_done()
    assert hass.states.get("sensor.nsync_bedroom_role").state == "master"
    assert float(hass.states.get("sensor.nsync_bedroom_clock_offset").state) == 0.0

    push(hass, "node/bedroom/status", "offline")  # its last will
    await hass.async_block_till_done()
    assert hass.states.get("binary_sensor.nsync_bedroom_online").state == "off"
    assert hass.states.get("sensor.nsync_bedroom_role").state == STATE_UNAVAILABLE


async def test_junk_on_the_node_topics_is_ignored(
    hass: HomeAssistant, entry: MockConfigEntry
) -> None:
    push(hass, "node/kitchen/status", "online")
    push(hass, "node/kitchen/state", "{not json")
    push(hass, "node/kitchen/state", [1, 2])
    push(hass, "state", "null")
    await hass.async_block_till_done()
    assert hass.states.get("binary_sensor.nsync_kitchen_online").state == "on"
    assert hass.states.get("sensor.nsync_kitchen_role").state == "unknown"
    assert hass.states.get("media_player.nsync_home").state == "playing"  # the state stands
