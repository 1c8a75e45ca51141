"""Node settings: YAML file + command-line flags -> validated :class:`NodeConfig`.

The YAML keys mirror the flag names (``--clock-offset`` is ``clock_offset``); flags override the
file. Every error is one line naming the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nsync_mqtt.errors import ConfigError
from nsync_mqtt.messages import ID_RE
from nsync_mqtt.timing import Timing

SINKS = ("auto", "stream", "simpleaudio", "virtual", "none")


@dataclass(frozen=True)
class NodeConfig:
    id: str
    peers: tuple[str, ...]
    cluster: str = "home"
    broker: tuple[str, ...] = ("mqtt://127.0.0.1:1883",)
    ca_file: Path | None = None  # mqtts://: trust only these CAs (PEM), not the system's
    embed_broker: str | None = None
    embed_broker_password_file: Path | None = None
    embed_broker_acl_file: Path | None = None  # default: nsync_mqtt.acl.default_acl
    key_file: Path | None = None  # the cluster key: internal messages are signed with it
    data_dir: Path = Path("nsync-data")
    sink: str = "auto"
    sink_log: Path | None = None
    audio_device: str | None = None
    clock_offset: float = 0.0
    clock_drift_ppm: float = 0.0
    dac_drift_ppm: float = 0.0
    chunk_size_kib: int = 256
    store_cap_mb: int = 2048
    max_song_mb: int = 200
    max_song_minutes: int = 120  # longer songs are refused before they are decoded to PCM
    seed: int | None = None
    ha_discovery: bool = True  # the master announces the cluster to Home Assistant's discovery
    ha_discovery_prefix: str = "homeassistant"
    timing: Timing = field(default_factory=Timing)

    @property
    def majority(self) -> int:
        return len(self.peers) // 2 + 1


def default_node_id() -> str:
    name = socket.gethostname().lower().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64]
    return cleaned or "node"


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"config: cannot read {path}: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}".splitlines()[0]) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys to values")
    return data


def _as_float(key: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ConfigError(f"{key}: must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise ConfigError(f"{key}: must be a finite number, got {v!r}")
    return f


def _as_int(key: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ConfigError(f"{key}: must be an integer, got {v!r}")
    try:
        n = int(v)
    except ValueError:
        raise ConfigError(f"{key}: must be an integer, got {v!r}") from None
    if n < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {n}")
    return n


def _as_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = v.strip().lower() if isinstance(v, str) else None
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{key}: must be true or false, got {v!r}")


def _as_topic_prefix(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v or any(c in v for c in "#+\0") or v.strip("/") != v:
        raise ConfigError(f"{key}: must be an MQTT topic without wildcards, got {v!r}")
    return v


def _as_list(key: str, v: Any) -> list[str]:
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return [p.strip() for p in v]
    raise ConfigError(f"{key}: must be a list of strings or a comma-separated string")


def _check_id(key: str, v: Any) -> str:
    if not isinstance(v, str) or not ID_RE.fullmatch(v):
        raise ConfigError(f"{key}: must match [a-z0-9_-]+, got {v!r}")
    return v


def build_timing(raw: Any) -> Timing:
    if raw is None:
        return Timing()
    if not isinstance(raw, dict):
        raise ConfigError("timing: must be a mapping")
    names = {f.name for f in dataclasses.fields(Timing)}
    values: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in names:
            raise ConfigError(f"timing.{k}: unknown key")
        values[k] = _as_float(f"timing.{k}", v)
        if k == "calibration_pings":
            values[k] = _as_int(f"timing.{k}", int(values[k]))
    return Timing(**values).validate()


def load_node_config(config_file: str | None, overrides: dict[str, Any]) -> NodeConfig:
    """Merge the YAML file (if any) with flag overrides (None = not given) and validate."""
    raw: dict[str, Any] = _load_yaml(Path(config_file)) if config_file else {}
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown key in {config_file}")
    for key, value in overrides.items():
        if value is not None:
            raw[key] = value

    node_id = _check_id("id", raw.get("id", default_node_id()))
    peers_raw = raw.get("peers")
    peers = [_check_id("peers", p) for p in _as_list("peers", peers_raw)] if peers_raw else []
    if not peers:
        peers = [node_id]
    if node_id not in peers:
        raise ConfigError(f"peers: must include this node's id {node_id!r}")
    if len(set(peers)) != len(peers):
        raise ConfigError("peers: lists a node twice")
    if len(peers) % 2 == 0:
        raise ConfigError(f"peers: a cluster needs an odd number (2f+1) of nodes, got {len(peers)}")
    brokers = _as_list("broker", raw.get("broker", ["mqtt://127.0.0.1:1883"]))
    if not brokers:
        raise ConfigError("broker: needs at least one URL")
    from nsync_mqtt.bus import parse_broker_url  # local: bus imports paho

    for url in brokers:
        parse_broker_url(url)
    ca_file = check_ca_file(raw.get("ca_file"), brokers)
    embed = raw.get("embed_broker")
    if embed is not None:
        parse_host_port("embed_broker", embed)
    pw_file = raw.get("embed_broker_password_file")
    if pw_file is not None and not isinstance(pw_file, str):
        raise ConfigError(f"embed_broker_password_file: must be a file path, got {pw_file!r}")
    acl_file = raw.get("embed_broker_acl_file")
    if acl_file is not None and not isinstance(acl_file, str):
        raise ConfigError(f"embed_broker_acl_file: must be a file path, got {acl_file!r}")
    if embed is not None:
        check_exposure("embed_broker", parse_host_port("embed_broker", embed)[0], pw_file or None)
        if acl_file and not pw_file:
            raise ConfigError(
                "embed_broker_acl_file: an ACL needs embed_broker_password_file too: without "
                "logins any client may claim any user name"
            )
    key_file = raw.get("key_file")
    if key_file is not None and not isinstance(key_file, str):
        raise ConfigError(f"key_file: must be a file path, got {key_file!r}")
    sink = raw.get("sink", "auto")
    if sink not in SINKS:
        raise ConfigError(f"sink: must be one of {', '.join(SINKS)}, got {sink!r}")
    sink_log = raw.get("sink_log")
    if sink_log is not None and not isinstance(sink_log, str):
        raise ConfigError(f"sink_log: must be a file path, got {sink_log!r}")
    device = raw.get("audio_device")
    if device is not None and not isinstance(device, (str, int)):
        raise ConfigError(f"audio_device: must be a device name or number, got {device!r}")
    seed = raw.get("seed")
    return NodeConfig(
        id=node_id,
        peers=tuple(peers),
        cluster=_check_id("cluster", raw.get("cluster", "home")),
        broker=tuple(brokers),
        ca_file=ca_file,
        embed_broker=embed,
        embed_broker_password_file=Path(pw_file) if pw_file else None,
        embed_broker_acl_file=Path(acl_file) if acl_file else None,
        key_file=Path(os.path.expanduser(key_file)) if key_file else None,
        data_dir=Path(os.path.expanduser(str(raw.get("data_dir", f"nsync-data/{node_id}")))),
        sink=sink,
        sink_log=Path(sink_log) if sink_log else None,
        audio_device=None if device is None else str(device),
        clock_offset=_as_float("clock_offset", raw.get("clock_offset", 0.0)),
        clock_drift_ppm=_as_float("clock_drift_ppm", raw.get("clock_drift_ppm", 0.0)),
        dac_drift_ppm=_as_float("dac_drift_ppm", raw.get("dac_drift_ppm", 0.0)),
        chunk_size_kib=_as_int("chunk_size_kib", raw.get("chunk_size_kib", 256)),
        store_cap_mb=_as_int("store_cap_mb", raw.get("store_cap_mb", 2048)),
        max_song_mb=_as_int("max_song_mb", raw.get("max_song_mb", 200)),
        max_song_minutes=_as_int("max_song_minutes", raw.get("max_song_minutes", 120)),
        seed=None if seed is None else _as_int("seed", seed, minimum=0),
        ha_discovery=_as_bool("ha_discovery", raw.get("ha_discovery", True)),
        ha_discovery_prefix=_as_topic_prefix(
            "ha_discovery_prefix", raw.get("ha_discovery_prefix", "homeassistant")
        ),
        timing=build_timing(raw.get("timing")),
    )


BROKER_ENV = "NSYNC_BROKER"  # broker URL(s) when --broker is not given: no password in `ps`


def broker_from_env() -> str | None:
    """The broker URL list (comma-separated) from ``$NSYNC_BROKER``, or None if unset/empty."""
    return os.environ.get(BROKER_ENV, "").strip() or None


def check_ca_file(value: Any, brokers: Sequence[str]) -> Path | None:
    """``ca_file`` as a path to a readable PEM file of CA certificates, or None if not given;
    ConfigError if it cannot be read or used, or if no broker URL is ``mqtts://``."""
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"ca_file: must be a file path, got {value!r}")
    path = Path(os.path.expanduser(os.fspath(value)))
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as err:  # before OSError: SSLError is one
        raise ConfigError(
            f"ca_file: {path} holds no usable PEM CA certificate ({err.reason or err})"
        ) from err
    except OSError as err:
        raise ConfigError(f"ca_file: cannot read {path}: {err.strerror or err}") from err
    if not any(url.strip().lower().startswith("mqtts://") for url in brokers):
        raise ConfigError(
            "ca_file: given, but no broker URL is mqtts://: the CA is only used for TLS"
        )
    return path


def is_loopback(host: str) -> bool:
    """Does ``host`` (an address or name) only reach this machine?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(key: str, host: str, password_file: Path | str | None) -> None:
    """ConfigError if a broker would listen beyond this machine without a password file."""
    if password_file is None and not is_loopback(host):
        raise ConfigError(
            f"{key}: a broker listening on {host} is open to the whole network; give it a "
            "password file (add users with `nsync broker --password-file FILE --add-user "
            "NAME`), or listen on 127.0.0.1"
        )


def parse_host_port(key: str, value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: must be HOST:PORT, got {value!r}")
    host, _, port_s = value.rpartition(":")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{key}: port must be a number, got {port_s!r}") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"{key}: must be HOST:PORT with a port 1-65535, got {value!r}")
    return host, port
