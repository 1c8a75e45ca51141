#!/usr/bin/env bash
# Prepare a Debian 12 / Raspberry Pi OS (bookworm) machine to run NSync.
#
#   bash scripts/setup.sh          # what `nsync node` and `nsync demo` need
#   bash scripts/setup.sh --test   # plus what the test suite needs (mosquitto, its clients,
#                                  # openssl, PulseAudio for the stream sink's real-audio test)
#
# Idempotent: when everything is present it only checks and returns within seconds.
# Missing system packages are installed with apt-get when run as root; otherwise the script
# names them and exits 1. The Python environment lives in .venv at the repository root and is
# reinstalled only when pyproject.toml changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.nsync-pyproject.sha256"

with_tests=0
for arg in "$@"; do
    case "$arg" in
        --test) with_tests=1 ;;
        -h | --help)
            sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup.sh: unknown argument: $arg (expected --test)" >&2
            exit 2
            ;;
    esac
done

say() { echo "setup: $*"; }
die() {
    echo "setup: error: $*" >&2
    exit 1
}

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
have_cmd() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1; }

# --- Python interpreter (>= 3.11) -------------------------------------------------------------
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 \
    || die "$PY not found; install Python >= 3.11 (apt-get install python3) or set \$PYTHON"
py_version="$("$PY" -c 'import platform; print(platform.python_version())')" \
    || die "$PY does not run; set \$PYTHON to a Python >= 3.11"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is Python $py_version; NSync needs Python >= 3.11 (set \$PYTHON to another interpreter)"
PY_PATH="$("$PY" -c 'import sys; print(sys.executable)')"
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"

# --- System packages --------------------------------------------------------------------------
missing=()
have_cmd ffmpeg && have_cmd ffprobe || missing+=(ffmpeg)
have_cmd gcc || missing+=(gcc)
if command -v dpkg-query >/dev/null 2>&1; then
    is_installed libasound2-dev || missing+=(libasound2-dev)
    # the stream sink (the default) plays through PortAudio
    is_installed libportaudio2 || missing+=(libportaudio2)
else
    [[ -f /usr/include/alsa/asoundlib.h ]] || missing+=(libasound2-dev)
    ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || missing+=(libportaudio2)
fi
if [[ ! -f "$PY_INCLUDE/Python.h" ]]; then
    # Debian's own interpreter gets its headers from python3-dev; others (pyenv, a custom
    # build) ship them, so a missing Python.h there cannot be fixed with apt.
    [[ "$PY_INCLUDE" == /usr/include/* ]] \
        || die "Python.h not found in $PY_INCLUDE for $PY_PATH; use an interpreter with its development headers"
    missing+=(python3-dev)
fi
if [[ ! -x "$VENV/bin/python" ]] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
new_mosquitto=0
if ((with_tests)) && ! have_cmd mosquitto; then
    missing+=(mosquitto)
    new_mosquitto=1
fi
# the tests read the cluster's topics as a user's scripts do, with mosquitto_sub
if ((with_tests)) && ! have_cmd mosquitto_sub; then
    missing+=(mosquitto-clients)
fi
# the secure Mosquitto test makes a private CA and the broker's certificate with openssl
if ((with_tests)) && ! have_cmd openssl; then
    missing+=(openssl)
fi
# the stream sink is tested against a real audio stack: a PulseAudio null sink, reached
# through ALSA's pulse plugin, recorded with parecord
if ((with_tests)); then
    have_cmd pulseaudio || missing+=(pulseaudio)
    have_cmd parecord || missing+=(pulseaudio-utils)
    if command -v dpkg-query >/dev/null 2>&1; then
        is_installed libasound2-plugins || missing+=(libasound2-plugins)
    fi
fi

if ((${#missing[@]})); then
    install_cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
    if [[ "$(id -u)" -ne 0 ]]; then
        die "missing system packages: ${missing[*]}
  install them as root, then run this again:
    sudo sh -c '$install_cmd'"
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing system packages: ${missing[*]} (and no apt-get here)"
    say "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    if ((new_mosquitto)); then
        # Tests start their own brokers on free ports; the packaged service would hold 1883.
        if [[ -d /run/systemd/system ]]; then
            systemctl disable --now mosquitto >/dev/null 2>&1 || true
        elif [[ -x /etc/init.d/mosquitto ]]; then
            /etc/init.d/mosquitto stop >/dev/null 2>&1 || true
            update-rc.d mosquitto disable >/dev/null 2>&1 || true
        fi
    fi
fi

# --- Virtual environment ----------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
    say "$VENV is broken (its interpreter no longer runs); recreating it"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV with $PY_PATH"
    "$PY" -m venv "$VENV"
fi

want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
    say "installing nsync-mqtt and its dependencies into $VENV"
    rm -f "$STAMP"
    (cd "$ROOT" && "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]')
    echo "$want" >"$STAMP"
fi
# the test lab (cluster harness, fault proxy, chaos runner): a package of its own, outside the
# shipped one, installed beside it for the tests and benchmarks
LAB_STAMP="$VENV/.nsync-lab-pyproject.sha256"
if ((with_tests)); then
    want="$(sha256sum "$ROOT/lab/pyproject.toml" | cut -d' ' -f1)"
    if [[ "$want" != "$(cat "$LAB_STAMP" 2>/dev/null || true)" ]]; then
        say "installing the test lab (nsync-lab) into $VENV"
        rm -f "$LAB_STAMP"
        (cd "$ROOT" && "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e lab)
        echo "$want" >"$LAB_STAMP"
    fi
fi
say "ready ($("$VENV/bin/python" -c 'import platform; print("Python", platform.python_version())'), $VENV)"
