"""Per node, a connectivity sensor: the node's retained status (its MQTT last will)."""

from __future__ import annotations

from homeassistant.components.binary_sensor import BinarySensorDeviceClass, BinarySensorEntity
from homeassistant.const import EntityCategory
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from . import NSyncConfigEntry
from .cluster import NSyncCluster
from .entity import NodeEntity, track_nodes


async def async_setup_entry(
    hass: HomeAssistant, entry: NSyncConfigEntry, async_add_entities: AddEntitiesCallback
) -> None:
    track_nodes(entry, async_add_entities, lambda c, n: [NodeOnline(c, n)])


class NodeOnline(NodeEntity, BinarySensorEntity):
    _attr_device_class = BinarySensorDeviceClass.CONNECTIVITY
    _attr_entity_category = EntityCategory.DIAGNOSTIC
    _attr_name = "Online"

    def __init__(self, cluster: NSyncCluster, node: str) -> None:
        super().__init__(cluster, node, "online")

    @property
    def available(self) -> bool:
        return True  # offline is what this entity reports, not a reason to hide it

    @property
    def is_on(self) -> bool | None:
        return self.cluster.nodes[self.node].online

    @callback
    def _node_changed(self, node: str) -> None:
        if node == self.node:
            self.async_write_ha_state()
