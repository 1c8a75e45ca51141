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

step "ruff check" .venv/bin/ruff check "${lint_paths[@]}"
step "ruff format --check" .venv/bin/ruff format --check "${lint_paths[@]}"
step "mypy" .venv/bin/mypy
step "pytest" .venv/bin/pytest -q tests "$@"

echo
if ((${#failed[@]})); then
    (IFS=,; echo "FAILED:${failed[*]/#/ }" >&2)
    exit 1
fi
echo "all checks passed"
