"""The `nsync` command: node, broker, demo, and the client commands.

Client commands exit 0 on success, 1 on a failed reply (message on stderr), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from nsync_mqtt.errors import ConfigError, NSyncError

CLIENT_COMMANDS = (
    "play",
    "pause",
    "forward",
    "backward",
    "stop",
    "status",
    "load",
    "enqueue",
    "volume",
    "seek",
    "clear",
    "remove",
    "move",
    "replace",
    "announce",
)


def _node_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("node", help="run one NSync node (a speaker; the master when elected)")
    p.add_argument("--config", help="YAML file; its keys mirror these flags")
    p.add_argument("--id", help="this node's id ([a-z0-9_-]+; default: the host name)")
    p.add_argument("--peers", help="every node id of the cluster, this one included: a,b,c")
    p.add_argument("--cluster", help="cluster name (default home)")
    p.add_argument(
        "--broker",
        action="append",
        help="mqtt://[user:pass@]host:port (repeat for failover; default: $NSYNC_BROKER, "
        "comma-separated, then the config file; keep passwords off the command line)",
    )
    p.add_argument(
        "--ca-file",
        metavar="FILE",
        help="for mqtts://: trust only the CA certificates (PEM) in FILE, e.g. a private CA",
    )
    p.add_argument("--embed-broker", metavar="HOST:PORT", help="also run an embedded broker here")
    p.add_argument(
        "--embed-broker-password-file",
        metavar="FILE",
        help="user:argon2-hash lines for the embedded broker (see nsync_mqtt.broker_embed)",
    )
    p.add_argument(
        "--embed-broker-acl-file",
        metavar="FILE",
        help="who may use which topic on the embedded broker (Mosquitto acl_file format; "
        "default: node ids may do anything, other users send commands and read state)",
    )
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help="the cluster key (nsync keygen FILE): internal messages are signed with it",
    )
    p.add_argument("--data-dir", help="where songs and decoded audio are kept")
    p.add_argument(
        "--sink",
        help="auto (default: stream where PortAudio works, else simpleaudio), stream (one "
        "stream kept open, steered sample by sample), simpleaudio, virtual or none",
    )
    p.add_argument("--sink-log", help="JSON-lines log of what the sink played, and when")
    p.add_argument(
        "--audio-device",
        metavar="DEVICE",
        help="the stream sink's output: a PortAudio device number or name (nsync devices)",
    )
    p.add_argument("--clock-offset", type=float, metavar="SECONDS", help="simulate a clock offset")
    p.add_argument("--clock-drift-ppm", type=float, metavar="PPM", help="simulate clock drift")
    p.add_argument(
        "--dac-drift-ppm", type=float, metavar="PPM", help="virtual sink sample-clock drift"
    )
    p.add_argument("--chunk-size-kib", type=int, help="song transfer chunk size (default 256)")
    p.add_argument("--seed", type=int, help="seed for election timeouts (reproducible runs)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsync",
        description="NSync: synchronised multi-room audio over MQTT.",
    )
    parser.add_argument(
        "--broker",
        default=None,
        help="broker URL (default: $NSYNC_BROKER, else mqtt://127.0.0.1:1883; a password belongs "
        "in $NSYNC_BROKER, not on the command line)",
    )
    parser.add_argument(
        "--ca-file",
        metavar="FILE",
        default=None,
        help="for mqtts://: trust only the CA certificates (PEM) in FILE, e.g. a private CA",
    )
    parser.add_argument("--cluster", default=None, help="cluster name (default home)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for a reply")
    parser.add_argument("--json", action="store_true", help="print the reply object as JSON")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _node_parser(sub)
    b = sub.add_parser("broker", help="run an embedded MQTT broker")
    b.add_argument("--listen", default="127.0.0.1:1883", metavar="HOST:PORT")
    b.add_argument("--config", help="YAML file with listen, password_file and acl_file")
    b.add_argument("--password-file", help="user:argon2-hash lines; anonymous clients refused")
    b.add_argument(
        "--acl-file",
        help="who may use which topic (Mosquitto acl_file format; needs --password-file)",
    )
    b.add_argument(
        "--add-user",
        metavar="USER",
        help="add USER (password from the prompt or stdin) to --password-file and exit",
    )
    d = sub.add_parser("demo", help="a 3-node cluster on this machine, with a live table")
    d.add_argument("--speakers", type=int, default=3, help="number of nodes (odd, default 3)")
    d.add_argument("--seconds", type=float, default=None, help="end after this many seconds")
    d.add_argument("--audio", action="store_true", help="play through the sound card")
    sub.add_parser("devices", help="list the audio outputs the stream sink can use")
    kg = sub.add_parser("keygen", help="write a new cluster key (mode 0600) for key_file")
    kg.add_argument("file", help="where to write it, e.g. /etc/nsync/cluster.key")
    kg.add_argument("--force", action="store_true", help="replace an existing file")
    for verb in ("play", "pause", "forward", "backward", "stop", "status"):
        sub.add_parser(verb, help=f"{verb} the cluster")
    ld = sub.add_parser("load", help="send a song file to the cluster")
    ld.add_argument("file")
    ld.add_argument("--bg", action="store_true", help="return once the master holds it")
    eq = sub.add_parser("enqueue", help="add a song (file, hash or exact title) to the playlist")
    eq.add_argument("song")
    where = eq.add_mutually_exclusive_group()
    where.add_argument("--next", action="store_true", help="right after the current song")
    where.add_argument("--play", action="store_true", help="after the current song, and play it")
    sub.add_parser("clear", help="empty the playlist (stops playback)")
    rm = sub.add_parser("remove", help="remove the song at a playlist position (0 = first)")
    rm.add_argument("index", type=int)
    mv = sub.add_parser("move", help="move the song at position FROM to position TO")
    mv.add_argument("src", type=int, metavar="FROM")
    mv.add_argument("dst", type=int, metavar="TO")
    rp = sub.add_parser("replace", help="play a song (file, hash or title) as the only one")
    rp.add_argument("song")
    an = sub.add_parser(
        "announce", help="interrupt with a song (file, hash or title), then resume where it was"
    )
    an.add_argument("song")
    vol = sub.add_parser("volume", help="set the volume: 0-100, +N or -N")
    vol.add_argument("level")
    sk = sub.add_parser("seek", help="jump to a position in the current song")
    sk.add_argument("seconds", type=float)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "node":
            return _cmd_node(args)
        if args.command == "broker":
            return _cmd_broker(args)
        if args.command == "devices":
            from nsync_mqtt.audio import list_output_devices

            print(list_output_devices())
            return 0
        if args.command == "keygen":
            from nsync_mqtt.seal import write_key

            write_key(Path(args.file), force=args.force)
            print(f"wrote a new cluster key to {args.file}: copy it to every node (mode 0600)")
            return 0
        if args.command == "demo":
            from nsync_mqtt.demo import run_demo

            return run_demo(args.speakers, args.seconds, args.audio)
        return _cmd_client(args)
    except ConfigError as err:
        print(f"nsync: config error: {err}", file=sys.stderr)
        return 2
    except NSyncError as err:
        print(f"nsync: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _setup_logging(verbose: bool) -> None:
    verbose = verbose or os.environ.get("NSYNC_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_node(args: argparse.Namespace) -> int:
    from nsync_mqtt.config import broker_from_env, load_node_config
    from nsync_mqtt.node import run_node

    overrides: dict[str, Any] = {
        "id": args.id,
        "peers": args.peers,
        "cluster": args.cluster,
        "broker": args.broker or broker_from_env(),
        "ca_file": args.ca_file,
        "embed_broker": args.embed_broker,
        "embed_broker_password_file": args.embed_broker_password_file,
        "embed_broker_acl_file": args.embed_broker_acl_file,
        "key_file": args.key_file,
        "data_dir": args.data_dir,
        "sink": args.sink,
        "sink_log": args.sink_log,
        "audio_device": args.audio_device,
        "clock_offset": args.clock_offset,
        "clock_drift_ppm": args.clock_drift_ppm,
        "dac_drift_ppm": args.dac_drift_ppm,
        "chunk_size_kib": args.chunk_size_kib,
        "seed": args.seed,
    }
    cfg = load_node_config(args.config, overrides)
    _setup_logging(args.verbose)
    return run_node(cfg)


def _cmd_broker(args: argparse.Namespace) -> int:
    from nsync_mqtt.broker_embed import run_broker
    from nsync_mqtt.config import _load_yaml, check_exposure, parse_host_port

    listen, pw, acl = args.listen, args.password_file, args.acl_file
    if args.config:
        raw = _load_yaml(Path(args.config))
        for key in raw:
            if key not in ("listen", "password_file", "acl_file"):
                raise ConfigError(f"{key}: unknown key in {args.config}")
        listen = raw.get("listen", listen)
        pw = pw or raw.get("password_file")
        acl = acl or raw.get("acl_file")
    if args.add_user:
        return _add_user(args.add_user, pw)
    host, port = parse_host_port("listen", listen)
    check_exposure("listen", host, pw or None)
    if acl and not pw:
        raise ConfigError(
            "acl_file: an ACL needs a password file too: without logins any client may claim "
            "any user name"
        )
    _setup_logging(False)
    return run_broker(host, port, Path(pw) if pw else None, Path(acl) if acl else None)


def _add_user(user: str, password_file: str | None) -> int:
    import getpass

    from nsync_mqtt.broker_embed import hash_password

    if not password_file:
        raise ConfigError("password_file: --add-user needs --password-file FILE")
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ConfigError(f"add_user: a user name without ':' or spaces, got {user!r}")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise ConfigError("add_user: the password is empty")
    path = Path(password_file)
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [ln for ln in lines if not ln.startswith(f"{user}:")]
    lines.append(f"{user}:{hash_password(password)}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    print(f"{user} is in {path}")
    return 0


def _print_progress(done: int, total: int) -> None:
    if total and sys.stderr.isatty():
        print(f"\rsent {done / 1e6:.1f} of {total / 1e6:.1f} MB", end="", file=sys.stderr)
        if done >= total:
            print(file=sys.stderr)


def _cmd_client(args: argparse.Namespace) -> int:
    from nsync_mqtt.client import NSyncClient
    from nsync_mqtt.config import broker_from_env, check_ca_file

    broker = args.broker or (broker_from_env() or "mqtt://127.0.0.1:1883").split(",")[0].strip()
    ca_file = check_ca_file(args.ca_file, [broker])
    cluster = args.cluster or "home"
    with NSyncClient(broker, cluster, timeout=args.timeout, ca_file=ca_file) as client:
        cmd = args.command
        if cmd == "load":
            if not Path(args.file).is_file():
                print(f"nsync: no such file: {args.file}", file=sys.stderr)
                return 2
            reply = client.load_song(args.file, bg=args.bg, progress=_print_progress)
        elif cmd == "enqueue":
            reply = client.enqueue_song(
                args.song, progress=_print_progress, next=args.next, play=args.play
            )
        elif cmd == "replace":
            reply = client.replace(args.song, progress=_print_progress)
        elif cmd == "announce":
            reply = client.announce(args.song, progress=_print_progress)
        elif cmd == "remove":
            reply = client.remove(args.index)
        elif cmd == "move":
            reply = client.move(args.src, args.dst)
        elif cmd == "volume":
            reply = client.volume(args.level)
        elif cmd == "seek":
            reply = client.seek(args.seconds)
        else:
            reply = client.request(cmd)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply.get("success"):
        print(reply.get("msg") or "ok")
    if not reply.get("success"):
        if not args.json:
            print(f"nsync: {cmd} failed: {reply.get('msg')}", file=sys.stderr)
        return 1
    return 0
