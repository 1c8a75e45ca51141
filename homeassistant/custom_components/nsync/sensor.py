"""Per node, diagnostic sensors: its role, its clock offset to the master, and how far its
output is from the schedule (the skew it measures on its own DAC)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import UnitOfTime
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from . import NSyncConfigEntry
from .cluster import NSyncCluster
from .entity import NodeEntity, track_nodes


def _ms(value: Any) -> float | None:
    return round(value * 1e3, 3) if isinstance(value, (int, float)) else None


@dataclass(frozen=True, kw_only=True)
class NodeSensorDescription(SensorEntityDescription):
    value: Callable[[dict[str, Any]], Any]


SENSORS = (
    NodeSensorDescription(
        key="role",
        name="Role",
        device_class=SensorDeviceClass.ENUM,
        options=["master", "follower", "precandidate", "candidate"],
        value=lambda st: st.get("role"),
    ),
    NodeSensorDescription(
        key="clock_offset",
        name="Clock offset",
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=3,
        # the master's clock is the cluster's reference: its offset is 0 by definition
        value=lambda st: (
            0.0 if st.get("role") == "master" else _ms((st.get("clock") or {}).get("offset_s"))
        ),
    ),
    NodeSensorDescription(
        key="sync_error",
        name="Sync error",
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=3,
        value=lambda st: (st.get("sink") or {}).get("error_ms"),
    ),
)


async def async_setup_entry(
    hass: HomeAssistant, entry: NSyncConfigEntry, async_add_entities: AddEntitiesCallback
) -> None:
    def make(cluster: NSyncCluster, node: str) -> list[NodeSensor]:
        return [NodeSensor(cluster, node, d) for d in SENSORS]

    track_nodes(entry, async_add_entities, make)


class NodeSensor(NodeEntity, SensorEntity):
    entity_description: NodeSensorDescription

    def __init__(self, cluster: NSyncCluster, node: str, desc: NodeSensorDescription) -> None:
        super().__init__(cluster, node, desc.key)
        self.entity_description = desc

    @property
    def native_value(self) -> Any:
        return self.entity_description.value(self.node_state)

    @callback
    def _node_changed(self, node: str) -> None:
        if node == self.node:
            self.async_write_ha_state()
