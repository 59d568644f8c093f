#!/usr/bin/env bash
# Lint, type-check and test memtrace:  sudo scripts/test.sh [pytest args...]
#
# Runs ruff, mypy and pytest from .venv (made by scripts/setup.sh). Every step
# runs; the exit status is non-zero if any of them failed. Tests marked `root`
# need root and BPF and are skipped when not run as root.
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd -P)"
cd "$REPO"

PY="$REPO/.venv/bin/python"
if [[ ! -x $PY ]]; then
    echo "error: $REPO/.venv is missing; run: sudo scripts/setup.sh" >&2
    exit 1
fi

if [[ $EUID -ne 0 ]]; then
    echo "test: WARNING: not running as root; tests marked 'root' (BPF) will be skipped." \
        "Use: sudo scripts/test.sh" >&2
elif ! mountpoint -q /sys/kernel/tracing; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null ||
        echo "test: WARNING: could not mount tracefs at /sys/kernel/tracing" >&2
fi

failed=()
step() {
    local name=$1
    shift
    echo "== $name"
    local rc=0
    "$@" || rc=$?
    if [[ $name == pytest && $rc -eq 5 ]]; then
        echo "test: WARNING: pytest collected no tests" >&2
        rc=0
    fi
    ((rc == 0)) || failed+=("$name (exit $rc)")
}

lint_dirs=()
for d in memtrace tests benchmarks; do
    [[ -d $d ]] && lint_dirs+=("$d")
done
if ((${#lint_dirs[@]})); then
    step ruff "$PY" -m ruff check "${lint_dirs[@]}"
fi
if [[ -d memtrace ]]; then
    step mypy "$PY" -m mypy memtrace
fi
step pytest "$PY" -m pytest -q -ra "$@"

if ((${#failed[@]})); then
    echo "test: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "test: all steps passed"
