#!/usr/bin/env bash
# vmctl's one entry point for people and CI:
#   ./run.sh demo          the demo (installs what it needs first)
#   ./run.sh test [ARGS]   lint, type-check, unit and integration tests (ARGS go to pytest)
#   ./run.sh bench         the benchmarks under bench/
#   ./run.sh setup         only install: Debian packages, the virtualenv at .venv/
set -euo pipefail
cd "$(dirname "$0")"

ensure_system() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if ((${#missing[@]})); then
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        echo "==> installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

ensure_venv() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
        echo "==> installing vmctl and its dev tools into .venv/"
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -e '.[dev]'
        touch .venv/.installed
    fi
}

setup() {
    ensure_system
    ensure_venv
}

lint() {
    echo "==> ruff"
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    echo "==> mypy --strict"
    .venv/bin/mypy
}

case "${1:-}" in
setup) setup ;;
demo)
    setup
    exec .venv/bin/vmctl demo
    ;;
test)
    setup
    lint
    echo "==> pytest"
    shift
    exec .venv/bin/python -m pytest "$@"
    ;;
bench)
    setup
    exec .venv/bin/python bench/qmp_throughput.py
    ;;
*)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
