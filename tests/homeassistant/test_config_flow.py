"""Adding a cluster from the UI (checked by asking it for its status) and from MQTT discovery."""

from __future__ import annotations

from unittest.mock import patch

from homeassistant import config_entries
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers.service_info.mqtt import MqttServiceInfo

from conftest import CLUSTER, DOMAIN, FakeCluster, push


async def test_user_flow_adds_a_cluster_that_answers(
    hass: HomeAssistant, cluster: FakeCluster
) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    assert result["type"] is FlowResultType.FORM and result["step_id"] == "user"
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"cluster": CLUSTER})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "NSync home" and result["data"] == {"cluster": CLUSTER}
    assert cluster.verbs() == ["status"]  # the check: a status request with a reply topic
    assert cluster.last("status")["reply_to"].startswith("ha-setup-")


async def test_user_flow_says_when_no_master_answers(
    hass: HomeAssistant, cluster: FakeCluster
) -> None:
    cluster.silent = True
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    with patch("custom_components.nsync.config_flow.PROBE_TIMEOUT_S", 0.05):
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"cluster": CLUSTER}
        )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}
    cluster.silent = False  # the cluster comes up: the same form now succeeds
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"cluster": CLUSTER})
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_user_flow_refuses_a_bad_cluster_name(
    hass: HomeAssistant, cluster: FakeCluster
) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"cluster": "Living Room"}
    )
    assert result["errors"] == {"cluster": "invalid_cluster"}
    assert cluster.commands == []


def _discovered(topic: str = f"nsync/{CLUSTER}/status") -> MqttServiceInfo:
    return MqttServiceInfo(
        topic=topic,
        payload="online",
        qos=0,
        retain=True,
        subscribed_topic="nsync/+/status",
        timestamp=0.0,
    )


async def test_discovery_offers_the_cluster_once(hass: HomeAssistant, cluster: FakeCluster) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_MQTT}, data=_discovered()
    )
    assert result["type"] is FlowResultType.FORM and result["step_id"] == "confirm"
    assert result["description_placeholders"] == {"cluster": CLUSTER}
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == {"cluster": CLUSTER}
    again = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_MQTT}, data=_discovered()
    )
    assert again["type"] is FlowResultType.ABORT and again["reason"] == "already_configured"


async def test_discovery_ignores_topics_that_are_not_a_cluster_status(
    hass: HomeAssistant, cluster: FakeCluster
) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_MQTT},
        data=_discovered("nsync/Bad Name/status"),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "invalid_discovery_info"


async def test_a_retained_status_on_the_broker_starts_discovery(
    hass: HomeAssistant, cluster: FakeCluster
) -> None:
    """The manifest's ``mqtt`` topic: Home Assistant's MQTT integration starts the flow."""
    push(hass, "status", "online", retain=True)
    await hass.async_block_till_done()
    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert [f["context"]["source"] for f in flows] == [config_entries.SOURCE_MQTT]
    assert flows[0]["context"]["unique_id"] == CLUSTER


async def test_the_user_flow_adds_a_cluster_that_also_waits_under_discovered(
    hass: HomeAssistant, cluster: FakeCluster
) -> None:
    found = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_MQTT}, data=_discovered()
    )
    assert found["type"] is FlowResultType.FORM
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"cluster": CLUSTER})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert hass.config_entries.flow.async_progress_by_handler(DOMAIN) == []  # discovery dropped


async def test_the_check_asks_again_when_the_first_reply_is_missed(
    hass: HomeAssistant, cluster: FakeCluster
) -> None:
    """A real broker may answer before it has Home Assistant's new subscription."""
    cluster.unheard = 2
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    with patch("custom_components.nsync.cluster.PROBE_RETRY_S", 0.02):
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"cluster": CLUSTER}
        )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert cluster.verbs() == ["status", "status", "status"]
