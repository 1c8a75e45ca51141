"""What the per-node entities share: one device per node, under the cluster's device, created
when the node first appears on the cluster's topics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from homeassistant.const import EntityCategory
from homeassistant.core import callback
from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.entity import Entity
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from . import NSyncConfigEntry
from .cluster import NSyncCluster
from .const import DOMAIN


class NodeEntity(Entity):
    _attr_has_entity_name = True
    _attr_should_poll = False
    _attr_entity_category = EntityCategory.DIAGNOSTIC

    def __init__(self, cluster: NSyncCluster, node: str, key: str) -> None:
        self.cluster = cluster
        self.node = node
        self._attr_unique_id = f"{cluster.cluster}-{node}-{key}"
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, f"{cluster.cluster}-{node}")},
            name=f"NSync {node}",
            manufacturer="NSync",
            model="Speaker node",
            via_device=(DOMAIN, cluster.cluster),
        )

    @property
    def node_state(self) -> dict[str, Any]:
        return self.cluster.nodes[self.node].state

    @property
    def available(self) -> bool:
        return self.cluster.nodes[self.node].online is True

    async def async_added_to_hass(self) -> None:
        self.async_on_remove(self.cluster.add_node_listener(self._node_changed))

    @callback
    def _node_changed(self, node: str) -> None:
        raise NotImplementedError


def track_nodes(
    entry: NSyncConfigEntry,
    async_add_entities: AddEntitiesCallback,
    make: Callable[[NSyncCluster, str], Sequence[Entity]],
) -> None:
    """Add ``make(cluster, node)``'s entities for every node known now and each one that
    appears later."""
    cluster = entry.runtime_data
    added: set[str] = set()

    @callback
    def add(node: str) -> None:
        if node not in added:
            added.add(node)
            async_add_entities(make(cluster, node))

    for node in list(cluster.nodes):
        add(node)
    entry.async_on_unload(cluster.add_node_listener(add))
