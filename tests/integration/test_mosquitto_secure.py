"""The secure household Mosquitto of config/mosquitto-household.conf and config/mosquitto-nsync.acl,
run as shipped (only paths and ports changed, on loopback): logins from a password file made
with mosquitto_passwd, the shipped ACL, a TLS listener whose certificate a private CA made in
the test signed. Three nodes log in as `nsync-node` over mqtts:// with `ca_file`, their broker
URL (with the password) from $NSYNC_BROKER; Home Assistant's user may command and read, and
what it publishes beyond its rights never reaches anyone."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nsync_lab.testing import (
    MOSQUITTO,
    BrokerProcess,
    NodeCluster,
    RawClient,
    free_port,
    load_and_enqueue,
    ok,
    ready_cluster,
    tone_file,
    unique_cluster_name,
    wait_for,
)
from nsync_mqtt import sinklog
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.errors import BrokerError

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "config" / "mosquitto-household.conf"
ACL = REPO / "config" / "mosquitto-nsync.acl"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
USERS = ("nsync-node", "homeassistant", "nsync-client")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MOSQUITTO.exists(), reason=f"{MOSQUITTO} missing"),
    pytest.mark.skipif(not Path(MOSQUITTO_PASSWD).exists(), reason="mosquitto_passwd missing"),
    pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto_sub missing"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing"),
]


def run(*command: str | Path, cwd: Path, stdin: str | None = None) -> None:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, f"{command}: {done.stderr}"


def make_certs(d: Path) -> Path:
    """A private CA and a server certificate for localhost/127.0.0.1 it signed, made with the
    openssl commands of the conf's comments; returns the CA certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=NSync test CA",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    run("openssl", "req", *ec, "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr", cwd=d)  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n"
    )
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt",
        cwd=d)  # fmt: skip
    return d / "ca.crt"


def render_conf(plain_port: int, tls_port: int, files: dict[str, Path]) -> str:
    """The shipped conf with its listeners on loopback test ports and its files in the test's
    directory (the shipped ACL itself); everything else as shipped."""
    out, seen = [], set()
    for line in CONF.read_text().splitlines():
        key, _, value = line.partition(" ")
        if line.startswith("#") or not line.strip():
            continue
        if key == "listener":
            line = f"listener {({'1883': plain_port, '8883': tls_port})[value]} 127.0.0.1"
        elif key in files:
            line = f"{key} {files[key]}"
        seen.add(key)
        out.append(line)
    needed = {"allow_anonymous", "max_packet_size", "set_tcp_nodelay", "tls_version", *files}
    assert needed <= seen, f"{CONF} lacks {needed - seen}"
    assert "allow_anonymous false" in out and "per_listener_settings false" in out
    out += ["persistence false", "log_dest stderr", "log_type error", "log_type warning"]
    if os.geteuid() == 0:  # else it switches to the mosquitto user, who cannot read tmp_path
        out.append("user root")
    return "\n".join(out) + "\n"


@dataclass
class Household:
    broker: BrokerProcess
    plain_port: int
    tls_port: int
    ca: Path
    passwords: dict[str, str]
    cluster: NodeCluster

    def url(self, user: str | None, password: str | None = None, tls: bool = True) -> str:
        login = ""
        if user is not None:
            login = f"{user}:{password or self.passwords[user]}@"
        if tls:
            return f"mqtts://{login}127.0.0.1:{self.tls_port}"
        return f"mqtt://{login}127.0.0.1:{self.plain_port}"

    def client(
        self, user: str | None, timeout: float = 5.0, password: str | None = None, tls: bool = True
    ) -> NSyncClient:
        url = self.url(user, password, tls)
        return NSyncClient(url, self.cluster.cluster, timeout=timeout, ca_file=self.ca)


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Household]:
    d = tmp_path_factory.mktemp("mosquitto-secure")
    ca = make_certs(d)
    passwd = d / "nsync.passwd"
    passwd.touch(mode=0o600)
    passwords = {user: secrets.token_urlsafe(12) for user in USERS}
    for user, password in passwords.items():  # from stdin, as at the prompt: not in `ps`
        run(MOSQUITTO_PASSWD, passwd, user, stdin=f"{password}\n{password}\n", cwd=d)
    assert not any(p in passwd.read_text() for p in passwords.values())
    plain_port, tls_port = free_port(), free_port()
    while tls_port == plain_port:
        tls_port = free_port()
    files = {
        "password_file": passwd,
        "acl_file": ACL,
        "certfile": d / "server.crt",
        "keyfile": d / "server.key",
        "cafile": ca,
    }
    config = render_conf(plain_port, tls_port, files)
    broker = BrokerProcess("mosquitto", tls_port, d, config=config)
    node_url = f"mqtts://nsync-node:{passwords['nsync-node']}@127.0.0.1:{tls_port}"
    cluster = NodeCluster.of(
        node_url, d / "cluster", cluster=unique_cluster_name(), ca_file=ca, broker_env=True
    )
    try:
        broker.start()
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        with ready_cluster(cluster):
            yield Household(broker, plain_port, tls_port, ca, passwords, cluster)
    finally:
        broker.stop()
    assert cluster.procs == {}


def test_nodes_log_in_over_tls_with_the_private_ca_and_play(
    house: Household, tmp_path: Path
) -> None:
    cluster = house.cluster
    secret = house.passwords["nsync-node"]
    for node, proc in cluster.procs.items():
        assert not any(secret in str(arg) for arg in proc.args), node  # NSYNC_BROKER instead
        log = cluster.node_log(node).read_text()
        assert f"connected to mqtts://nsync-node:***@127.0.0.1:{house.tls_port}" in log, log
        assert secret not in log
    with contextlib.closing(house.client("nsync-client").connect()) as client:
        song = load_and_enqueue(client, tone_file(tmp_path, "Secure", 2.0, 440.0))
        ok(client.play())

        def played() -> bool:
            logs = {n: sinklog.read_log(cluster.sink_log(n)) for n in cluster.specs}
            return all(sinklog.played_ranges(b, song) for b in logs.values())

        wait_for(played, 10.0, "every node to play the song")
        assert ok(client.status())["state"]["playback"] == "playing"


def test_anonymous_wrong_and_untrusted_logins_are_refused(house: Household) -> None:
    for user, password, tls in [
        (None, None, True),
        (None, None, False),
        ("homeassistant", "wrong", True),
        ("homeassistant", "wrong", False),
        ("intruder", "whatever", True),
    ]:
        client = house.client(user, timeout=2.0, password=password, tls=tls)
        with pytest.raises(BrokerError, match="refused"):
            client.connect()
    # the broker's certificate is checked: without the private CA, no connection at all
    untrusted = NSyncClient(house.url("homeassistant"), house.cluster.cluster, timeout=1.5)
    with pytest.raises(BrokerError, match="--ca-file"):
        untrusted.connect()


def mosquitto_sub(
    house: Household, user: str, topics: list[str], seconds: int
) -> subprocess.Popen[bytes]:
    """mosquitto_sub over TLS as ``user``, for ``seconds``; its password from an options file
    ($XDG_CONFIG_HOME/mosquitto_sub), not the command line."""
    home = house.broker.workdir / f"xdg-{user}"
    home.mkdir(exist_ok=True)
    options = home / "mosquitto_sub"
    options.write_text(f"-u {user}\n-P {house.passwords[user]}\n")
    options.chmod(0o600)
    command = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(house.tls_port)]
    command += ["--cafile", str(house.ca), "-v", "-W", str(seconds)]
    for topic in topics:
        command += ["-t", topic]
    env = {**os.environ, "XDG_CONFIG_HOME": str(home)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_home_assistant_commands_and_reads_but_cannot_forge(
    house: Household, tmp_path: Path
) -> None:
    cluster = house.cluster
    base = f"nsync/{cluster.cluster}"
    ha_url = house.url("homeassistant")
    sub = mosquitto_sub(house, "homeassistant", [f"{base}/internal/hb", f"{base}/state"], 4)
    try:
        inside = RawClient(
            house.url("nsync-node"), cluster.cluster, [f"{base}/internal/#"], ca_file=house.ca
        )
        ha = RawClient(ha_url, cluster.cluster, [f"{base}/#", "homeassistant/#"], ca_file=house.ca)
        with inside, ha, cluster.watch() as watcher:
            state = ok(ha.request("status"))["state"]
            master, term = state["master"], state["term"]
            ha.wait(lambda m: m.topic == f"{base}/state" and m.retain, "the retained state")
            discovery = f"homeassistant/device/nsync_{cluster.cluster}/config"
            ha.wait(lambda m: m.topic == discovery, "the cluster's discovery document")
            wait_for(lambda: len(watcher.node_states()) == 3, 5.0, "every node state")
            rejected = {n: s.get("rejected", {}) for n, s in watcher.node_states().items()}

            forged = {"v": 1, "t": "hb", "src": master, "term": term + 1000, "forged": True}
            ha.publish(f"{base}/internal/hb", json.dumps(forged))
            vote = {"v": 1, "t": "vote_req", "src": master, "term": term + 1000, "forged": True}
            ha.publish(f"{base}/internal/vote_req", json.dumps(vote))
            ha.publish(f"{base}/internal/to/{master}", json.dumps({**forged, "t": "ack"}))
            ha.publish(f"{base}/state", b'{"forged": true}', retain=True)
            ha.publish(f"{base}/node/{master}/status", b"forged", retain=True)
            mark = inside.mark()
            inside.wait(lambda m: m.topic.endswith("/internal/hb"), "a real heartbeat", mark)
            ok(ha.request("volume", {"volume": 37}))  # a command round trip after them
            time.sleep(0.5)

            assert not [m for m in inside.since(0) if b"forged" in m.payload]
            assert not [m for m in ha.since(0) if b"forged" in m.payload]
            internal = [m.topic for m in ha.since(0) if m.topic.startswith(f"{base}/internal/")]
            assert internal == []
            after = ok(ha.request("status"))["state"]
            assert (after["master"], after["term"], after["volume"]) == (master, term, 37)
            # the nodes never saw the forgeries (signed nodes would count them as refused)
            now = {n: s.get("rejected", {}) for n, s in watcher.node_states().items()}
            assert now == rejected

        # the Home Assistant user's chunked load: cmd/load, internal/chunk/all, its xfer topic
        with contextlib.closing(house.client("homeassistant").connect()) as client:
            ok(client.load_song(tone_file(tmp_path, "From HA", 1.0, 550.0)))
    finally:
        try:
            out, err = sub.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            sub.kill()
            out, err = sub.communicate()
    lines = out.decode().splitlines()
    assert any(line.startswith(f"{base}/state ") for line in lines), (lines, err)
    assert not [line for line in lines if "/internal/" in line], lines


def test_cli_takes_the_broker_url_from_the_environment(house: Household) -> None:
    secret = house.passwords["nsync-client"]
    env = {**os.environ, "NSYNC_BROKER": house.url("nsync-client")}
    command = [sys.executable, "-m", "nsync_mqtt", "--cluster", house.cluster.cluster]
    done = subprocess.run(
        [*command, "--ca-file", str(house.ca), "--json", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"]["master"]
    # a wrong password: refused, and the message shows the URL without the password
    env["NSYNC_BROKER"] = house.url("nsync-client", password=f"{secret}x")
    done = subprocess.run(
        [*command, "--ca-file", str(house.ca), "--timeout", "2", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "nsync-client:***@" in done.stderr and secret not in done.stderr, done.stderr
