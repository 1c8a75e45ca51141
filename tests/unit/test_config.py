"""Node settings: YAML file and flags merged into a validated NodeConfig, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nsync_mqtt.config import NodeConfig, load_node_config, parse_host_port
from nsync_mqtt.errors import ConfigError
from nsync_mqtt.timing import Timing


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return str(path)


def config_error(config_file: str | None, overrides: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_node_config(config_file, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_flags_only() -> None:
    cfg = load_node_config(
        None,
        {
            "id": "kitchen",
            "peers": "kitchen,lounge,attic",
            "cluster": "flat",
            "broker": ["mqtt://10.0.0.2:1884", "mqtts://user:pw@backup:8883"],
            "embed_broker": None,
            "sink": "virtual",
            "sink_log": "/tmp/k.jsonl",
            "audio_device": "hw:1,0",
            "clock_offset": "0.5",
            "clock_drift_ppm": -20,
            "dac_drift_ppm": 12.5,
            "seed": 7,
        },
    )
    assert cfg.id == "kitchen"
    assert cfg.peers == ("kitchen", "lounge", "attic")
    assert cfg.majority == 2
    assert cfg.cluster == "flat"
    assert cfg.broker == ("mqtt://10.0.0.2:1884", "mqtts://user:pw@backup:8883")
    assert cfg.embed_broker is None
    assert cfg.sink == "virtual"
    assert cfg.sink_log == Path("/tmp/k.jsonl")
    assert cfg.audio_device == "hw:1,0"
    assert (cfg.clock_offset, cfg.clock_drift_ppm, cfg.dac_drift_ppm) == (0.5, -20.0, 12.5)
    assert cfg.seed == 7
    assert cfg.data_dir == Path("nsync-data/kitchen")
    assert cfg.timing == Timing()


def test_defaults_for_a_lone_node() -> None:
    cfg = load_node_config(None, {"id": "solo"})
    assert cfg.peers == ("solo",)
    assert cfg.majority == 1
    assert cfg.cluster == "home"
    assert cfg.broker == ("mqtt://127.0.0.1:1883",)
    assert cfg.sink == "auto" and cfg.audio_device is None
    assert cfg.sink_log is None
    assert cfg.seed is None
    assert (cfg.chunk_size_kib, cfg.store_cap_mb, cfg.max_song_mb) == (256, 2048, 200)


def test_yaml_only(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
id: a
peers: [a, b, c, d, e]
cluster: test_1
broker: mqtt://broker.lan:1883
embed_broker: 127.0.0.1:18830
data_dir: /var/lib/nsync
sink: none
clock_offset: 1.25
chunk_size_kib: 64
store_cap_mb: "512"
seed: 0
timing:
  heartbeat_interval_s: 0.05
  election_timeout_min_s: 0.5
  election_timeout_max_s: 1.0
  calibration_pings: 4
""",
    )
    cfg = load_node_config(path, {})
    assert cfg.id == "a"
    assert cfg.peers == ("a", "b", "c", "d", "e")
    assert cfg.majority == 3
    assert cfg.cluster == "test_1"
    assert cfg.broker == ("mqtt://broker.lan:1883",)
    assert cfg.embed_broker == "127.0.0.1:18830"
    assert cfg.data_dir == Path("/var/lib/nsync")
    assert cfg.sink == "none"
    assert cfg.clock_offset == 1.25
    assert (cfg.chunk_size_kib, cfg.store_cap_mb) == (64, 512)
    assert cfg.seed == 0
    assert cfg.timing == Timing(
        heartbeat_interval_s=0.05,
        election_timeout_min_s=0.5,
        election_timeout_max_s=1.0,
        calibration_pings=4,
    )
    assert isinstance(cfg.timing.calibration_pings, int)


def test_flags_override_yaml_and_none_means_not_given(tmp_path: Path) -> None:
    path = write(tmp_path, "id: a\npeers: a,b,c\nsink: virtual\ncluster: flat\nclock_offset: 2\n")
    cfg = load_node_config(path, {"id": "b", "sink": "none", "cluster": None, "seed": None})
    assert cfg.id == "b"
    assert cfg.sink == "none"
    assert cfg.cluster == "flat"
    assert cfg.clock_offset == 2.0
    assert cfg.peers == ("a", "b", "c")


def test_empty_yaml_file_is_no_settings(tmp_path: Path) -> None:
    assert load_node_config(write(tmp_path, ""), {"id": "a"}) == load_node_config(None, {"id": "a"})


@pytest.mark.parametrize(
    "peers", ["a,b,c", " a , b ,c ", "a,b,c,", ["a", "b", "c"], [" a", "b ", "c"]]
)
def test_peers_as_comma_string_or_list(peers: Any) -> None:
    assert load_node_config(None, {"id": "a", "peers": peers}).peers == ("a", "b", "c")


def test_peers_as_yaml_list_and_yaml_string_agree(tmp_path: Path) -> None:
    as_list = load_node_config(write(tmp_path, "id: b\npeers:\n  - a\n  - b\n  - c\n"), {})
    as_text = load_node_config(write(tmp_path, "id: b\npeers: a, b, c\n"), {})
    assert as_list.peers == as_text.peers == ("a", "b", "c")


def test_home_directory_in_data_dir_is_expanded() -> None:
    cfg = load_node_config(None, {"id": "a", "data_dir": "~/nsync"})
    assert "~" not in str(cfg.data_dir)
    assert cfg.data_dir == Path("~/nsync").expanduser()


def test_node_config_is_frozen() -> None:
    cfg = NodeConfig(id="a", peers=("a",))
    with pytest.raises(AttributeError):
        cfg.id = "b"  # type: ignore[misc]


# --- errors: one line, naming the key ---------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("id: a\npeer: [a]\n", "peer"),
        ("id: a\nsinks: none\n", "sinks"),
        ("id: a\npeers: [a, b]\n", "peers"),
        ("id: a\npeers: [a, b, c, d]\n", "peers"),
        ("id: a\npeers: [b, c, d]\n", "peers"),
        ("id: a\npeers: [a, a, b]\n", "peers"),
        ("id: a\npeers: [a, B, c]\n", "peers"),
        ("id: a\npeers: [a, 1, 2]\n", "peers"),
        ("id: a\npeers: 5\n", "peers"),
        ("id: Kitchen\n", "id"),
        ("id: [a]\n", "id"),
        ("id: a\ncluster: My House\n", "cluster"),
        ("id: a\nsink: alsa\n", "sink"),
        ("id: a\nbroker: http://h:1883\n", "broker"),
        ("id: a\nbroker: mqtt://:1883\n", "broker"),
        ("id: a\nbroker: mqtt://h:99999\n", "broker"),
        ("id: a\nbroker: mqtt://h:1883/path\n", "broker"),
        ("id: a\nbroker: []\n", "broker"),
        ("id: a\nbroker: [5]\n", "broker"),
        ("id: a\nembed_broker: localhost\n", "embed_broker"),
        ("id: a\nembed_broker: 'localhost:x'\n", "embed_broker"),
        ("id: a\nembed_broker: ':1883'\n", "embed_broker"),
        ("id: a\nembed_broker: 'h:0'\n", "embed_broker"),
        ("id: a\nclock_offset: soon\n", "clock_offset"),
        ("id: a\nclock_drift_ppm: true\n", "clock_drift_ppm"),
        ("id: a\ndac_drift_ppm: [1]\n", "dac_drift_ppm"),
        ("id: a\nchunk_size_kib: 0\n", "chunk_size_kib"),
        ("id: a\nchunk_size_kib: 1.5\n", "chunk_size_kib"),
        ("id: a\nstore_cap_mb: lots\n", "store_cap_mb"),
        ("id: a\nmax_song_mb: true\n", "max_song_mb"),
        ("id: a\nseed: -1\n", "seed"),
        ("id: a\ntiming: fast\n", "timing"),
        ("id: a\ntiming: {heartbeat_s: 1}\n", "timing.heartbeat_s"),
        ("id: a\ntiming: {ack_timeout_s: quick}\n", "timing.ack_timeout_s"),
        ("id: a\ntiming: {ack_timeout_s: 0}\n", "ack_timeout_s"),
        ("id: a\ntiming: {lead_min_s: -0.1}\n", "lead_min_s"),
        ("id: a\ntiming: {calibration_pings: 0}\n", "timing.calibration_pings"),
        ("id: a\ntiming: {heartbeat_interval_s: 0.5}\n", "heartbeat_interval_s"),
        (
            "id: a\ntiming: {election_timeout_min_s: 2.0, election_timeout_max_s: 2.0}\n",
            "election_timeout_min_s",
        ),
        ("id: a\ntiming: {lead_min_s: 2.0, lead_max_s: 1.0}\n", "lead_min_s"),
    ],
)
def test_bad_yaml_value_is_a_one_line_error_naming_the_key(
    tmp_path: Path, yaml_text: str, key: str
) -> None:
    message = config_error(write(tmp_path, yaml_text), {})
    assert message.split(":", 1)[0] == key


def test_heartbeat_must_be_well_below_the_election_timeout(tmp_path: Path) -> None:
    base = "id: a\ntiming: {election_timeout_min_s: 0.4, election_timeout_max_s: 0.8, "
    ok = load_node_config(write(tmp_path, base + "heartbeat_interval_s: 0.13}\n"), {})
    assert ok.timing.heartbeat_interval_s == 0.13
    message = config_error(write(tmp_path, base + "heartbeat_interval_s: 0.14}\n"), {})
    assert message.startswith("heartbeat_interval_s:")
    assert "election_timeout_min_s" in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"id": "a", "peers": "a,b"}, "peers"),
        ({"id": "z", "peers": "a,b,c"}, "peers"),
        ({"id": "a b"}, "id"),
        ({"id": "a", "sink": "pulse"}, "sink"),
        ({"id": "a", "broker": ["mqtt://ok:1883", "tcp://bad:1883"]}, "broker"),
        ({"id": "a", "clock_offset": "x"}, "clock_offset"),
        ({"id": "a", "seed": "x"}, "seed"),
    ],
)
def test_bad_flag_is_a_one_line_error_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    assert config_error(None, overrides).startswith(f"{key}:")


def test_flag_fixes_a_bad_yaml_value(tmp_path: Path) -> None:
    path = write(tmp_path, "id: a\nsink: alsa\n")
    assert load_node_config(path, {"sink": "virtual"}).sink == "virtual"


def test_broker_error_does_not_show_the_password() -> None:
    message = config_error(None, {"id": "a", "broker": "mqtt://me:hunter2@host:1883/x"})
    assert message.startswith("broker:")
    assert "hunter2" not in message


def test_bad_yaml_is_a_one_line_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "id: a\npeers: [a, b\nsink: none\n")
    message = config_error(path, {})
    assert message.startswith("config:")
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path, {})
    assert message.startswith("config:")
    assert "mapping" in message


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    message = config_error(str(tmp_path / "absent.yaml"), {})
    assert message.startswith("config:")
    assert "absent.yaml" in message


def test_parse_host_port() -> None:
    assert parse_host_port("embed_broker", "0.0.0.0:1883") == ("0.0.0.0", 1883)
    assert parse_host_port("embed_broker", "::1:1883") == ("::1", 1883)
    with pytest.raises(ConfigError, match=r"^listen: port must be a number"):
        parse_host_port("listen", "host:")
    with pytest.raises(ConfigError, match=r"^listen:"):
        parse_host_port("listen", "host:65536")


# --- regressions: defects found and fixed --------------------------------------------------------


def test_sink_log_that_is_not_a_string_is_a_config_error(tmp_path: Path) -> None:
    assert config_error(write(tmp_path, "id: a\nsink_log: 5\n"), {}).startswith("sink_log:")


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_clock_offset_must_be_finite(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"id: a\nclock_offset: {value}\n")
    assert config_error(path, {}).startswith("clock_offset:")


def test_timing_value_must_not_be_nan(tmp_path: Path) -> None:
    path = write(tmp_path, "id: a\ntiming: {ack_timeout_s: .nan}\n")
    assert "ack_timeout_s:" in config_error(path, {})


def test_id_with_a_trailing_newline_is_refused() -> None:
    assert config_error(None, {"id": "a\n"}).startswith("id:")


def test_ha_discovery_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "n.yaml"
    cfg.write_text("id: a\nha_discovery: 'off'\nha_discovery_prefix: ha/discovery\n")
    c = load_node_config(str(cfg), {})
    assert c.ha_discovery is False and c.ha_discovery_prefix == "ha/discovery"
    assert load_node_config(None, {"id": "a"}).ha_discovery is True
    for bad in ("ha_discovery: maybe", "ha_discovery_prefix: 'ha/#'", "ha_discovery_prefix: /x/"):
        cfg.write_text(f"id: a\n{bad}\n")
        with pytest.raises(ConfigError, match="ha_discovery"):
            load_node_config(str(cfg), {})


def test_the_example_config_loads_with_the_defaults() -> None:
    example = Path(__file__).parents[2] / "config" / "nsync-node.yaml.example"
    c = load_node_config(str(example), {})
    assert c.timing == Timing() and c.ha_discovery is True
