#!/usr/bin/env bash
# Set up NSync on this machine and run the demo (`nsync demo`): a cluster of nodes on this one
# box playing the same music in sync. Arguments go to `nsync demo`.
#
#   bash scripts/demo.sh [--speakers N] [--seconds S] [--audio]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
exec .venv/bin/nsync demo "$@"
