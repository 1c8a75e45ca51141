"""Constants of the NSync integration."""

from __future__ import annotations

import re

DOMAIN = "nsync"
CONF_CLUSTER = "cluster"
DEFAULT_CLUSTER = "home"
CLUSTER_RE = re.compile(r"[a-z0-9_-]{1,64}")  # the cluster's own rule for names and ids

REPLY_TIMEOUT_S = 10.0  # a command's reply (the cluster answers within ~2 s or says why)
PROBE_TIMEOUT_S = 5.0  # the config flow's check that the cluster answers
PROBE_RETRY_S = 0.5  # ... asking again this often (a new subscription reaches the broker late)
LOAD_CHUNK_SIZE = 256 * 1024  # bytes per chunk frame of the chunked load
MAX_MEDIA_BYTES = 200 * 1024 * 1024  # refuse to fetch more than this for play_media
LOAD_TIMEOUT_MIN_S = 30.0  # a load's reply: at least this, plus 1 s per MB
VOLUME_STEP = 5  # volume up / down, in percent
