"""Topics, the internal message envelope and the binary chunk frame.

Internal messages are JSON objects ``{"v": 1, "t": TYPE, "src": NODE_ID, "term": INT, ...}``
published under ``nsync/<cluster>/internal/``. Song chunks travel as a binary frame:
``b"NSC1" + u32 header length (big endian) + JSON header + raw bytes``. docs/protocol.md
describes every message. A field ``sig`` is reserved for message signing.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from nsync_mqtt.errors import ProtocolError

ENVELOPE_VERSION = 1
ID_RE = re.compile(r"[a-z0-9_-]{1,64}")
HASH_RE = re.compile(r"[0-9a-f]{56}")
CHUNK_MAGIC = b"NSC1"
MAX_WIRE_INT = 2**63 - 1  # no term, index, slot or frame read off the wire is larger
_U32 = struct.Struct(">I")


def is_int(value: object) -> TypeGuard[int]:
    """An integer, and not a boolean (JSON ``true`` decodes to a Python int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_wire_int(value: object) -> TypeGuard[int]:
    """An integer (not a boolean) that fits in 64 signed bits, as every integer NSync stores
    or sends does: a larger one read back from a file or a message is refused."""
    return is_int(value) and -MAX_WIRE_INT - 1 <= value <= MAX_WIRE_INT


def reply_object(
    success: bool, command: str, params: Any, msg: str, client_req_id: Any = None, **extra: Any
) -> dict[str, Any]:
    """The reply to a client command (the NSync paper's): ``success``, ``command``, ``params``,
    ``msg``, ``client_req_id``, and any ``extra`` fields (``status`` adds ``state``)."""
    return {
        "success": success,
        "command": command,
        "params": params,
        "msg": msg,
        "client_req_id": client_req_id,
        **extra,
    }


def check_id(value: object, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ProtocolError(f"{what} must match [a-z0-9_-]+ (1-64 chars), got {value!r}")
    return value


def check_hash(value: object, what: str = "song hash") -> str:
    if not isinstance(value, str) or not HASH_RE.fullmatch(value):
        raise ProtocolError(f"{what} must be 56 lowercase hex digits (sha224), got {value!r}")
    return value


SONG_NAME_MAX = 200


def song_name(value: object) -> str | None:
    """A song's file or URL name as a title: its last path part, without the extension,
    printable, at most SONG_NAME_MAX characters; None if nothing usable is left."""
    if not isinstance(value, str):
        return None
    last = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem = last.rsplit(".", 1)[0] if "." in last.strip(".") else last
    text = "".join(c for c in stem if c.isprintable()).strip()[:SONG_NAME_MAX]
    return text or None


class Topics:
    """Every topic NSync uses, built from the cluster name."""

    def __init__(self, cluster: str) -> None:
        self.cluster = check_id(cluster, "cluster name")
        self.base = f"nsync/{cluster}"
        self.cmd_all = f"{self.base}/cmd/+"
        self.upload = f"{self.base}/upload"
        self.state = f"{self.base}/state"
        self.status = f"{self.base}/status"
        self.library = f"{self.base}/library"

    def cmd(self, verb: str) -> str:
        return f"{self.base}/cmd/{verb}"

    def reply(self, reply_to: str) -> str:
        return f"{self.base}/reply/{reply_to}"

    def state_field(self, name: str) -> str:
        return f"{self.base}/state/{name}"

    def node_status(self, node_id: str) -> str:
        return f"{self.base}/node/{node_id}/status"

    def node_state(self, node_id: str) -> str:
        return f"{self.base}/node/{node_id}/state"

    def internal(self, name: str) -> str:
        return f"{self.base}/internal/{name}"

    def verb_of(self, topic: str) -> str | None:
        prefix = f"{self.base}/cmd/"
        return topic[len(prefix) :] if topic.startswith(prefix) else None


@dataclass(frozen=True)
class Message:
    """A decoded internal message."""

    type: str
    src: str
    term: int
    body: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default)


def encode(type_: str, src: str, term: int, **body: Any) -> bytes:
    obj = {"v": ENVELOPE_VERSION, "t": type_, "src": src, "term": term}
    obj.update(body)
    return json.dumps(obj, separators=(",", ":")).encode()


def decode(payload: bytes) -> Message:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ProtocolError(f"not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ProtocolError("envelope must be a JSON object")
    if obj.get("v") != ENVELOPE_VERSION:
        raise ProtocolError(f"unsupported envelope version {obj.get('v')!r}")
    type_ = obj.pop("t", None)
    if not isinstance(type_, str):
        raise ProtocolError("envelope field 't' must be a string")
    src = check_id(obj.pop("src", None), "envelope field 'src'")
    term = obj.pop("term", None)
    if not is_int(term) or not 0 <= term <= MAX_WIRE_INT:
        raise ProtocolError(
            f"envelope field 'term' must be an integer from 0 to {MAX_WIRE_INT}, got {term!r}"
        )
    obj.pop("v")
    return Message(type_, src, term, obj)


def encode_chunk(header: dict[str, Any], data: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((CHUNK_MAGIC, _U32.pack(len(head)), head, data))


def decode_chunk(payload: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(payload) < 8 or payload[:4] != CHUNK_MAGIC:
        raise ProtocolError("not a chunk frame")
    (n,) = _U32.unpack_from(payload, 4)
    if 8 + n > len(payload):
        raise ProtocolError("chunk header length exceeds frame")
    try:
        header = json.loads(payload[8 : 8 + n])
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ProtocolError(f"chunk header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise ProtocolError("chunk header must be a JSON object")
    return header, memoryview(payload)[8 + n :]
