"""Who may publish and read which topics on the embedded broker: Mosquitto's ``acl_file`` format.

Pure: text in, decisions out. The embedded broker (nsync_mqtt.broker_embed) asks it about every
publish, subscription and delivery; the same file works for Mosquitto (``acl_file``), so a
household can move between the two brokers without rewriting it.

The format (a subset of mosquitto.conf(5)'s ``acl_file``)::

    # comment
    topic read nsync/home/state/#       # before any `user` line: anonymous clients
    user homeassistant
    topic write nsync/home/cmd/#
    topic readwrite homeassistant/#
    topic deny nsync/home/internal/#
    pattern readwrite nsync/home/node/%u/#   # %u: the user name, %c: the client id

``topic [read|write|readwrite|deny] TOPIC`` (the access defaults to readwrite) applies to the
user of the last ``user`` line; ``pattern`` lines apply to every client. A ``deny`` that matches
wins over any grant. A client may subscribe to a filter when a read grant covers all of it; what
reaches it is checked again, message by message, against its read grants (so a ``#``
subscription only ever delivers what it may read).

:func:`default_acl` is the embedded broker's ACL when it has a password file but no ACL file:
each node id of the cluster is a user with every right on the cluster's topics; any other user
is a client: it may send commands and uploads and read what the cluster publishes, but neither
publish the cluster's own topics (internal messages, state) nor read its internal messages;
outside ``nsync/<cluster>/`` it may do anything (the broker may serve other devices too).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from nsync_mqtt.errors import ConfigError

READ, WRITE = "read", "write"
ACCESS = {"read": {READ}, "write": {WRITE}, "readwrite": {READ, WRITE}, "deny": set()}
CACHE_MAX = 4096  # decisions remembered (by user, client, action, topic)


def matches(pattern: str, topic: str) -> bool:
    """Does the topic filter ``pattern`` (with ``+`` and ``#``) match the topic name ``topic``?"""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(t):
            return False
        if level == "+":
            if i == 0 and t[0].startswith("$"):
                return False
            continue
        if level != t[i]:
            return False
    return len(p) == len(t)


def covers(pattern: str, sub_filter: str) -> bool:
    """Does ``pattern`` match every topic the subscription filter ``sub_filter`` can match?"""
    p, f = pattern.split("/"), sub_filter.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(f):
            return False
        if f[i] == "#":
            return False  # a narrower pattern cannot cover a multi-level wildcard
        if level == "+":
            continue
        if level != f[i]:
            return False  # also: a literal pattern level never covers a + in the filter
    return len(p) == len(f)


def overlaps(pattern: str, sub_filter: str) -> bool:
    """Could one topic match both ``pattern`` and ``sub_filter``?"""
    p, f = pattern.split("/"), sub_filter.split("/")
    for i in range(max(len(p), len(f))):
        a = p[i] if i < len(p) else None
        b = f[i] if i < len(f) else None
        if a == "#" or b == "#":
            return True
        if a is None or b is None:
            return False
        if a != b and "+" not in (a, b):
            return False
    return True


@dataclass(frozen=True)
class Rule:
    access: frozenset[str]  # READ / WRITE; empty: deny
    topic: str
    pattern: bool = False  # %u and %c are substituted

    def topic_for(self, user: str | None, client_id: str) -> str | None:
        if not self.pattern:
            return self.topic
        if "%u" in self.topic and not user:
            return None
        return self.topic.replace("%u", user or "").replace("%c", client_id)


@dataclass
class Acl:
    users: dict[str | None, list[Rule]] = field(default_factory=dict)  # None: anonymous
    patterns: list[Rule] = field(default_factory=list)
    # default_acl: users in `trusted` may do anything; any other user anything outside `guarded`
    # (a topic prefix such as "nsync/home"), and under it what its rules grant
    trusted: frozenset[str] = frozenset()
    guarded: str | None = None
    _cache: dict[tuple[str | None, str, str, str], bool] = field(default_factory=dict)

    def _rules(self, user: str | None, client_id: str) -> Iterable[tuple[Rule, str]]:
        for rule in (*self.users.get(user, ()), *self.patterns):
            topic = rule.topic_for(user, client_id)
            if topic is not None:
                yield rule, topic

    def allows(self, user: str | None, client_id: str, action: str, topic: str) -> bool:
        """May ``user`` (None: anonymous) publish (``write``) or receive (``read``) on the topic
        name ``topic``, or subscribe (``subscribe``) to the filter ``topic``?"""
        key = (user, client_id, action, topic)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        decision = self._decide(user, client_id, action, topic)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def _decide(self, user: str | None, client_id: str, action: str, topic: str) -> bool:
        if self.guarded is not None:
            if user is not None and user in self.trusted:
                return True
            under = self.guarded + "/#"
            inside = overlaps(under, topic) if action == "subscribe" else matches(under, topic)
            if not inside:
                return True
            if action == "subscribe" and not covers(under, topic):
                return True  # wider than the cluster: deliveries are checked one by one
        if action == "subscribe":
            # refused if a deny could apply to part of it, granted if a read grant covers it
            granted = False
            for rule, pat in self._rules(user, client_id):
                if not rule.access and overlaps(pat, topic) and not _is_wider(topic, pat):
                    return False
                if READ in rule.access and covers(pat, topic):
                    granted = True
            if granted:
                return True
            # a wide filter (such as #) is allowed where a read grant overlaps it: deliveries
            # are checked one by one, so it only ever receives what the user may read
            return any(
                READ in rule.access and overlaps(pat, topic)
                for rule, pat in self._rules(user, client_id)
            )
        want = READ if action == READ else WRITE
        granted = False
        for rule, pat in self._rules(user, client_id):
            if matches(pat, topic):
                if not rule.access:
                    return False
                granted = granted or want in rule.access
        return granted


def _is_wider(sub_filter: str, pattern: str) -> bool:
    """The filter reaches beyond the denied pattern (deliveries are checked one by one)."""
    return not covers(pattern, sub_filter)


def parse_acl(text: str, source: str = "ACL") -> Acl:
    """Parse an ACL file's text; ConfigError naming the line on anything not understood."""
    acl = Acl()
    user: str | None = None
    acl.users[None] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        words = line.split()
        kind = words[0]
        if kind == "user":
            if len(words) != 2:
                raise ConfigError(f"{source} line {n}: `user NAME`, got {line!r}")
            user = words[1]
            acl.users.setdefault(user, [])
            continue
        if kind not in ("topic", "pattern"):
            raise ConfigError(f"{source} line {n}: expected user, topic or pattern, got {kind!r}")
        if len(words) == 2:
            access, topic = "readwrite", words[1]
        elif len(words) == 3 and words[1] in ACCESS:
            access, topic = words[1], words[2]
        else:
            raise ConfigError(
                f"{source} line {n}: `{kind} [read|write|readwrite|deny] TOPIC`, got {line!r}"
            )
        _check_filter(topic, f"{source} line {n}")
        rule = Rule(frozenset(ACCESS[access]), topic, pattern=kind == "pattern")
        if kind == "pattern":
            acl.patterns.append(rule)
        else:
            acl.users[user].append(rule)
    return acl


def _strip_comment(raw: str) -> str:
    line = raw.strip()
    if line.startswith("#"):
        return ""
    # a # inside a topic is a wildcard: only "  # ..." after the last word is a comment
    cut = line.find(" #")
    return line[:cut].rstrip() if cut >= 0 else line


def _check_filter(topic: str, where: str) -> None:
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ConfigError(f"{where}: # must be a whole last level, in {topic!r}")
        if "+" in level and level != "+":
            raise ConfigError(f"{where}: + must be a whole level, in {topic!r}")


CLIENT_WRITE = ("cmd/#", "upload", "internal/chunk/all")
CLIENT_READ = (
    "state",
    "state/#",
    "status",
    "library",
    "node/+/status",
    "node/+/state",
    "reply/#",
    "internal/xfer/#",
)


def default_acl(cluster: str, nodes: Iterable[str]) -> Acl:
    """The embedded broker's ACL when it has a password file and no ACL file (module doc)."""
    base = f"nsync/{cluster}"
    client = [Rule(frozenset({WRITE}), f"{base}/{t}") for t in CLIENT_WRITE]
    client += [Rule(frozenset({READ}), f"{base}/{t}") for t in CLIENT_READ]
    return Acl(users={None: []}, patterns=client, trusted=frozenset(nodes), guarded=base)
