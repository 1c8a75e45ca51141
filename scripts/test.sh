#!/usr/bin/env bash
# Set up and run the whole NSync test suite: lint, format check, type check, tests.
#
#   bash scripts/test.sh [PYTEST_ARGS...]    e.g. bash scripts/test.sh -k election -x
#
# Every step runs even when an earlier one fails; the exit status is non-zero if any failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh --test

# Integration tests start mosquitto, which Debian installs in /usr/sbin.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin" ;; esac

# `bash scripts/test.sh -- -k foo` and `bash scripts/test.sh -k foo` mean the same.
if [[ "${1:-}" == "--" ]]; then
    shift
fi

lint_paths=(nsync_mqtt lab tests)
[[ -d bench ]] && lint_paths+=(bench)

failed=()
step() {
    local name="$1"
    shift
    printf '\n==> %s\n' "$name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

# The Home Assistant integration's tests need Home Assistant itself, which needs Python >= 3.12
# and pins paho-mqtt 1.6: they run in their own environment, .venv-ha, built from the first
# suitable interpreter found (python3.12 or python3.13 on the PATH, or under pyenv).
ha_python() {
    local cand
    for cand in python3.12 python3.13 "$HOME"/.pyenv/versions/3.12*/bin/python \
        "$HOME"/.pyenv/versions/3.13.[01]/bin/python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c \
            'import sys, venv; sys.exit(not ((3, 12) <= sys.version_info[:3] < (3, 13, 2)))' \
            >/dev/null 2>&1; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

ha_tests() {
    local py req="tests/homeassistant/requirements.txt" venv="$ROOT/.venv-ha"
    if ! py="$(ha_python)"; then
        echo "Home Assistant tests skipped: they need Python 3.12 or 3.13.0-3.13.1 (python3.12 or" \
            "python3.13 on the PATH, or under pyenv) and none was found"
        return 0
    fi
    local stamp="$venv/.nsync-requirements.sha256" want
    want="$(sha256sum "$req" | cut -d' ' -f1) $py"
    if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
        echo "building $venv with $py (Home Assistant and its test plugin; a few minutes)"
        rm -rf "$venv"
        "$py" -m venv "$venv" || return 1
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" 2>&1 \
            | grep -v "^WARNING: Location .* is ignored" || true
        "$venv/bin/python" -c 'import pytest_homeassistant_custom_component' || return 1
        echo "$want" >"$stamp"
    fi
    "$venv/bin/python" -m pytest -c tests/homeassistant/pytest.ini -q tests/homeassistant
}

lint_paths+=(homeassistant)

step "ruff check" .venv/bin/ruff check "${lint_paths[@]}"
step "ruff format --check" .venv/bin/ruff format --check "${lint_paths[@]}"
step "mypy" .venv/bin/mypy
step "pytest" .venv/bin/pytest -q tests "$@"
if [[ $# -eq 0 ]]; then
    step "home assistant tests" ha_tests
fi

echo
if ((${#failed[@]})); then
    (IFS=,; echo "FAILED:${failed[*]/#/ }" >&2)
    exit 1
fi
echo "all checks passed"
