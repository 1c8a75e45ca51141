"""Home Assistant MQTT discovery for users without the custom integration (pure).

The master publishes one retained device-discovery message, ``<prefix>/device/<cluster>/config``
(Home Assistant 2024.11 and later), describing the cluster as a device with buttons (play,
pause, stop, next, previous), a volume number, sensors (playback, title, artist, album,
position) and, per node, a connectivity binary sensor. Every entity talks to the cluster's
public topics directly: buttons publish to ``cmd/<verb>``, the volume number to
``cmd/volume``, the sensors read the retained ``state/<field>`` topics. The cluster's
entities are available while ``nsync/<cluster>/status`` is ``online``; a node's binary sensor
reads the node's retained status (its MQTT last will) and is always available, so it shows the
node off rather than unknown.

This module imports nothing that needs paho: the Home Assistant tests validate its payload
with Home Assistant's own discovery code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from nsync_mqtt import __version__
from nsync_mqtt.messages import Topics

BUTTONS = (
    ("play", "Play", "mdi:play"),
    ("pause", "Pause", "mdi:pause"),
    ("stop", "Stop", "mdi:stop"),
    ("forward", "Next", "mdi:skip-next"),
    ("backward", "Previous", "mdi:skip-previous"),
)
SENSORS = (
    ("playback", "Playback", "mdi:play-pause"),
    ("title", "Title", "mdi:music"),
    ("artist", "Artist", "mdi:account-music"),
    ("album", "Album", "mdi:album"),
)


def discovery_topic(prefix: str, cluster: str) -> str:
    return f"{prefix}/device/nsync_{cluster}/config"


def device_config(topics: Topics, peers: Sequence[str]) -> dict[str, Any]:
    """The device-discovery document of the cluster ``topics`` names, with nodes ``peers``."""
    c = topics.cluster
    uid = f"nsync_{c}"
    cluster_avail = [{"topic": topics.status}]
    cmps: dict[str, dict[str, Any]] = {}
    for verb, name, icon in BUTTONS:
        cmps[f"{uid}_{verb}"] = {
            "platform": "button",
            "name": name,
            "icon": icon,
            "command_topic": topics.cmd(verb),
            "payload_press": "",
            "unique_id": f"{uid}_{verb}",
            "availability": cluster_avail,
        }
    cmps[f"{uid}_volume"] = {
        "platform": "number",
        "name": "Volume",
        "icon": "mdi:volume-high",
        "command_topic": topics.cmd("volume"),
        "command_template": "{{ value | int }}",
        "state_topic": topics.state_field("volume"),
        "min": 0,
        "max": 100,
        "step": 1,
        "mode": "slider",
        "unit_of_measurement": "%",
        "unique_id": f"{uid}_volume",
        "availability": cluster_avail,
    }
    for field, name, icon in SENSORS:
        cmps[f"{uid}_{field}"] = {
            "platform": "sensor",
            "name": name,
            "icon": icon,
            "state_topic": topics.state_field(field),
            "unique_id": f"{uid}_{field}",
            "availability": cluster_avail,
        }
    cmps[f"{uid}_position"] = {
        "platform": "sensor",
        "name": "Position",
        "icon": "mdi:timer-outline",
        "state_topic": topics.state_field("position"),
        "device_class": "duration",
        "unit_of_measurement": "s",
        "unique_id": f"{uid}_position",
        "availability": cluster_avail,
    }
    for node in peers:
        cmps[f"{uid}_{node}_online"] = {
            "platform": "binary_sensor",
            "name": f"{node} online",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": topics.node_status(node),
            "payload_on": "online",
            "payload_off": "offline",
            "unique_id": f"{uid}_{node}_online",
        }
    return {
        "device": {
            "identifiers": [uid],
            "name": f"NSync {c}",
            "manufacturer": "NSync",
            "model": "Synchronised speaker cluster",
            "sw_version": __version__,
        },
        "origin": {"name": "NSync", "sw_version": __version__},
        "components": cmps,
    }


def device_config_payload(topics: Topics, peers: Sequence[str]) -> bytes:
    return json.dumps(device_config(topics, peers), separators=(",", ":")).encode()
