"""The MQTT discovery document the cluster's master publishes (nsync_mqtt/discovery.py), checked
by Home Assistant's own code: its discovery schemas, then its MQTT integration building the
entities from it, which read and command the cluster's public topics."""

from __future__ import annotations

import importlib
import json

from homeassistant.components.mqtt.schemas import DEVICE_DISCOVERY_SCHEMA, MQTT_ORIGIN_INFO_SCHEMA
from homeassistant.core import HomeAssistant
from nsync_mqtt.discovery import device_config, discovery_topic
from nsync_mqtt.messages import Topics
from pytest_homeassistant_custom_component.common import async_fire_mqtt_message

from conftest import CLUSTER, FakeCluster, push

PEERS = ("kitchen", "living", "bedroom")


def test_the_document_passes_home_assistants_schemas() -> None:
    doc = device_config(Topics(CLUSTER), PEERS)
    DEVICE_DISCOVERY_SCHEMA(doc)
    MQTT_ORIGIN_INFO_SCHEMA(doc["origin"])
    for key, component in doc["components"].items():
        platform = importlib.import_module(f"homeassistant.components.mqtt.{component['platform']}")
        config = {k: v for k, v in component.items() if k != "platform"}
        platform.DISCOVERY_SCHEMA({**config, "device": doc["device"]}), key


async def test_home_assistant_builds_working_entities_from_it(
    hass: HomeAssistant, cluster: FakeCluster
) -> None:
    topic = discovery_topic("homeassistant", CLUSTER)
    assert topic == "homeassistant/device/nsync_home/config"
    doc = device_config(Topics(CLUSTER), PEERS)
    async_fire_mqtt_message(hass, topic, json.dumps(doc), retain=True)
    await hass.async_block_till_done()
    push(hass, "status", "online")
    push(hass, "state/title", "Blue in Green")
    push(hass, "state/volume", "40")
    push(hass, "state/position", "12.25")
    push(hass, "node/kitchen/status", "online")
    push(hass, "node/living/status", "offline")
    await hass.async_block_till_done()

    assert hass.states.get("sensor.nsync_home_title").state == "Blue in Green"
    assert float(hass.states.get("number.nsync_home_volume").state) == 40
    assert hass.states.get("sensor.nsync_home_position").state == "12.25"
    assert hass.states.get("binary_sensor.nsync_home_kitchen_online").state == "on"
    assert hass.states.get("binary_sensor.nsync_home_living_online").state == "off"
    assert hass.states.get("binary_sensor.nsync_home_bedroom_online").state == "unknown"

    await hass.services.async_call(
        "button", "press", {"entity_id": "button.nsync_home_next"}, blocking=True
    )
    await hass.services.async_call(
        "number", "set_value", {"entity_id": "number.nsync_home_volume", "value": 65}, blocking=True
    )
    await hass.async_block_till_done()
    assert cluster.commands == [("forward", {}), ("volume", {"arg": "65"})]

    push(hass, "status", "offline")  # no master: the cluster's entities go unavailable
    await hass.async_block_till_done()
    assert hass.states.get("button.nsync_home_play").state == "unavailable"
    assert hass.states.get("sensor.nsync_home_title").state == "unavailable"
    assert hass.states.get("binary_sensor.nsync_home_kitchen_online").state == "on"
