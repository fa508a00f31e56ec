#!/usr/bin/env bash
# vmctl's one entry point for people and CI:
#   ./run.sh demo          the demo (installs what it needs first)
#   ./run.sh test [ARGS]   lint, type-check, unit and integration tests (ARGS go to pytest)
#   ./run.sh bench         the benchmarks under bench/
#   ./run.sh setup         only install: Debian packages, the virtualenv at .venv/, the test guest
set -euo pipefail
cd "$(dirname "$0")"
# The test guest (kernel + initramfs) is built once into this git-ignored directory.
export VMCTL_CACHE_DIR="$PWD/.cache"

ensure_system() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    # The test guest is fetched with `apt-get download`, which needs the package lists.
    local lists_ready=1
    apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || lists_ready=0
    if ((${#missing[@]})) || [ "$lists_ready" = 0 ]; then
        echo "==> apt-get update"
        $sudo apt-get update -qq
    fi
    if ((${#missing[@]})); then
        echo "==> installing Debian packages: ${missing[*]}"
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

ensure_guest() {
    echo "==> test guest (built once into .cache/)"
    .venv/bin/python -c 'from vmctl.testing import TestGuest; print("   ", TestGuest.ensure().kernel.parent)'
}

setup() {
    ensure_system
    ensure_venv
    ensure_guest
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
    .venv/bin/python bench/qmp_throughput.py
    .venv/bin/python bench/event_latency.py
    .venv/bin/python bench/qmp_scale.py
    .venv/bin/python bench/hotplug.py
    exec .venv/bin/python bench/migration.py
    ;;
*)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
