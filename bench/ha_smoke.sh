#!/usr/bin/env bash
# A real Home Assistant 2025.1 (not the test harness) with NSync's integration copied in as the
# README says, against a real 3-node cluster (virtual sinks) on Mosquitto, all on 127.0.0.1:
# onboarding, the MQTT integration, adding the cluster, and the media player's services
# (play_media from a local HTTP server, announce, volume, pause, clear), through Home
# Assistant's REST API (bench/ha_smoke.py). Needs .venv-ha (built by scripts/test.sh); Home
# Assistant installs its frontend into a copy of it on first start (network to PyPI, minutes).
#
#   bash bench/ha_smoke.sh        # prints what it checks, ends with "ALL OK"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="${HA_SMOKE_DIR:-/tmp/nsync-ha-smoke}"
[[ -x "$ROOT/.venv-ha/bin/python" ]] || { echo "no .venv-ha: run bash scripts/test.sh first" >&2; exit 2; }
[[ -x "$W/venv/bin/python" ]] || cp -a "$ROOT/.venv-ha" "$W/venv" 2>/dev/null \
    || { mkdir -p "$W" && cp -a "$ROOT/.venv-ha" "$W/venv"; }
rm -rf "$W/run"; mkdir -p "$W/run/cfg/custom_components" "$W/run/media"
cp -r "$ROOT/homeassistant/custom_components/nsync" "$W/run/cfg/custom_components/"
cat >"$W/run/cfg/configuration.yaml" <<'Y'
homeassistant:
  name: NSync smoke test
  internal_url: http://127.0.0.1:18123
http:
  server_host: 127.0.0.1
  server_port: 18123
api:
config:
Y
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 2
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
printf 'listener 18830 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n' >"$W/run/mosq.conf"
PATH="$PATH:/usr/sbin" mosquitto -c "$W/run/mosq.conf" >"$W/run/mosquitto.log" 2>&1 &
pids+=($!)
for n in kitchen living bedroom; do
    "$ROOT/.venv/bin/nsync" node --id $n --peers kitchen,living,bedroom \
        --broker mqtt://127.0.0.1:18830 --data-dir "$W/run/data-$n" --sink virtual \
        >"$W/run/node-$n.log" 2>&1 &
    pids+=($!)
done
"$W/venv/bin/python" -m homeassistant -c "$W/run/cfg" >"$W/run/hass.log" 2>&1 &
pids+=($!)
"$ROOT/.venv/bin/python" -m http.server 18124 --bind 127.0.0.1 -d "$W/run/media" >/dev/null 2>&1 &
pids+=($!)
"$ROOT/.venv/bin/python" "$ROOT/bench/ha_smoke.py" "$W/run/media"
