"""Adding a cluster: by name from the UI (checked by asking the cluster for its status), or
offered by MQTT discovery when a cluster's retained ``nsync/<cluster>/status`` appears."""

from __future__ import annotations

import secrets
from typing import Any

import voluptuous as vol
from homeassistant.config_entries import ConfigFlow, ConfigFlowResult
from homeassistant.helpers.service_info.mqtt import MqttServiceInfo

from .cluster import ClusterError, async_probe
from .const import CLUSTER_RE, CONF_CLUSTER, DEFAULT_CLUSTER, DOMAIN, PROBE_TIMEOUT_S


class NSyncConfigFlow(ConfigFlow, domain=DOMAIN):
    VERSION = 1

    def __init__(self) -> None:
        self._cluster: str | None = None

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        errors: dict[str, str] = {}
        if user_input is not None:
            cluster = str(user_input[CONF_CLUSTER]).strip()
            if not CLUSTER_RE.fullmatch(cluster):
                errors[CONF_CLUSTER] = "invalid_cluster"
            else:
                # typed in while the same cluster waits under "Discovered": this flow wins
                await self.async_set_unique_id(cluster, raise_on_progress=False)
                self._abort_if_unique_id_configured()
                try:
                    await async_probe(
                        self.hass, cluster, f"ha-setup-{secrets.token_hex(4)}", PROBE_TIMEOUT_S
                    )
                except ClusterError:
                    errors["base"] = "cannot_connect"
                else:
                    return self.async_create_entry(
                        title=f"NSync {cluster}", data={CONF_CLUSTER: cluster}
                    )
        schema = vol.Schema({vol.Required(CONF_CLUSTER, default=DEFAULT_CLUSTER): str})
        return self.async_show_form(step_id="user", data_schema=schema, errors=errors)

    async def async_step_mqtt(self, discovery_info: MqttServiceInfo) -> ConfigFlowResult:
        """A retained ``nsync/<cluster>/status`` was seen on the broker."""
        parts = discovery_info.topic.split("/")
        if len(parts) != 3 or parts[0] != "nsync" or not CLUSTER_RE.fullmatch(parts[1]):
            return self.async_abort(reason="invalid_discovery_info")
        cluster = parts[1]
        await self.async_set_unique_id(cluster)
        self._abort_if_unique_id_configured()
        self._cluster = cluster
        self.context["title_placeholders"] = {"cluster": cluster}
        return await self.async_step_confirm()

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        assert self._cluster is not None
        if user_input is not None:
            return self.async_create_entry(
                title=f"NSync {self._cluster}", data={CONF_CLUSTER: self._cluster}
            )
        return self.async_show_form(
            step_id="confirm", description_placeholders={"cluster": self._cluster}
        )
