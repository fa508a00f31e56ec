#!/usr/bin/env bash
# vmctl's one entry point for people and CI:
#   ./run.sh demo          the demo (installs what it needs first)
#   ./run.sh test [ARGS]   lint, type-check, unit and integration tests (all on QEMU 7.2, then those
#                          marked versioned on 10.0; two workers); ARGS go to one pytest run instead
#   ./run.sh bench         the benchmarks under bench/
#   ./run.sh setup         only install: Debian packages, the virtualenv at .venv/, the test guests
set -euo pipefail
cd "$(dirname "$0")"
# The test guest (kernel + initramfs) is built once into this git-ignored directory.
export VMCTL_CACHE_DIR="$PWD/.cache"

ensure_system() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    command -v ip >/dev/null || missing+=(iproute2)
    [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing+=(ovmf)  # UEFI guests
    command -v openssl >/dev/null || missing+=(openssl)           # the tests' throwaway CAs
    command -v tcpdump >/dev/null || missing+=(tcpdump)           # the tests read the migration stream
    command -v xmllint >/dev/null || missing+=(libxml2-utils)     # virt-xml-validate checks domain XML with it
    command -v debugfs >/dev/null || missing+=(e2fsprogs)         # the agent tests make and read ext2 images
    command -v tmux >/dev/null || missing+=(tmux)                 # vmctl top is tested in a real terminal
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    # vmctl.testing.PrivateLibvirtd (see DEVELOPERS.md): the daemon, its QEMU driver, virsh; and what
    # pip needs to build libvirt-python (no wheels) against the system's libvirt. The Debian test guest
    # (vmctl.testing.DebianGuest): mmdebstrap (its root), dosfstools and mtools (its EFI system
    # partition), fdisk (sfdisk: its GPT).
    local package
    for package in libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc python3-dev \
        mmdebstrap dosfstools mtools fdisk; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
    done
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
    # libvirt's QEMU driver refuses to start without its user and group, even with QEMU as root.
    if ! getent group libvirt-qemu >/dev/null; then
        echo "==> creating the system group libvirt-qemu (libvirt's QEMU driver wants it)"
        $sudo groupadd --system libvirt-qemu
    fi
    if ! getent passwd libvirt-qemu >/dev/null; then
        echo "==> creating the system user libvirt-qemu (libvirt's QEMU driver wants it)"
        $sudo useradd --system -g libvirt-qemu -s /usr/sbin/nologin -M -d /nonexistent libvirt-qemu
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

# QEMU 10.0 from Debian's bookworm-backports, unpacked into .cache/ (the system keeps its QEMU):
# apt's own Debian entry, copied with that suite into a private apt configuration.
QEMU10_DIR="$PWD/.cache/qemu-10.0"
QEMU10="$QEMU10_DIR/qemu-system-x86_64"

ensure_qemu10() {
    [ -x "$QEMU10" ] && [ -x "$QEMU10_DIR/usr/bin/qemu-system-x86_64" ] && grep -q QEMU_MODULE_DIR "$QEMU10" && return
    echo "==> QEMU 10.0 (Debian bookworm-backports) into .cache/qemu-10.0/"
    local apt_dir="$PWD/.cache/apt-backports"
    rm -rf "$apt_dir" "$QEMU10_DIR"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs" "$QEMU10_DIR"
    local sources
    sources=$(python3 - "$apt_dir" <<'PY'
import pathlib, re, sys
out = pathlib.Path(sys.argv[1])
deb822 = pathlib.Path("/etc/apt/sources.list.d/debian.sources")
if deb822.exists():
    for stanza in deb822.read_text().split("\n\n"):
        if re.search(r"^Suites:.*\bbookworm\b", stanza, re.M) and "security" not in stanza:
            (out / "backports.sources").write_text(re.sub(r"^Suites:.*$", "Suites: bookworm-backports", stanza, flags=re.M).strip() + "\n")
            print(out / "backports.sources")
            sys.exit(0)
for line in pathlib.Path("/etc/apt/sources.list").read_text().splitlines():
    fields = line.split()
    if len(fields) >= 3 and fields[0] == "deb" and fields[2] == "bookworm":
        (out / "backports.list").write_text(" ".join([*fields[:2], "bookworm-backports", *fields[3:]]) + "\n")
        print(out / "backports.list")
        sys.exit(0)
sys.exit("no Debian bookworm entry in apt's sources to take the backports suite from")
PY
    )
    local opts=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/dev/null -o "Dir::Etc::sourcelist=$sources"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" -qq update
    (cd "$apt_dir/debs" && apt-get "${opts[@]}" -qq download \
        qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports \
        qemu-system-modules-opengl/bookworm-backports qemu-system-modules-spice/bookworm-backports)
    for deb in "$apt_dir"/debs/*.deb; do dpkg-deb -x "$deb" "$QEMU10_DIR"; done
    cat >"$QEMU10" <<'SH'
#!/bin/sh
# QEMU 10.0 unpacked by run.sh: its own firmware and data first, then the system's. Its own
# modules only (libvirt's probe loads them all; 7.2's abort it), set here: libvirt clears the environment.
here=$(dirname "$(readlink -f "$0")")
export QEMU_MODULE_DIR="$here/usr/lib/x86_64-linux-gnu/qemu"
exec "$here/usr/bin/qemu-system-x86_64" -L "$here/usr/share/qemu" -L /usr/share/qemu "$@"
SH
    chmod +x "$QEMU10"
    rm -rf "$apt_dir"
    "$QEMU10" --version | head -n 1 | sed 's/^/    /'
}

ensure_guest() {
    echo "==> test guest (built once into .cache/)"
    .venv/bin/python -c 'from vmctl.testing import TestGuest; print("   ", TestGuest.ensure().kernel.parent)'
}

# The Debian test guest (mmdebstrap's root mode, so as root) for integration/test_debian_guest.py.
ensure_debian_guest() {
    echo "==> Debian test guest (mmdebstrap, built once into .cache/)"
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo env "VMCTL_CACHE_DIR=$VMCTL_CACHE_DIR")
    "${sudo[@]}" .venv/bin/python -c 'from vmctl.testing import DebianGuest; print("   ", DebianGuest.ensure().image)'
}

# A postcopy target needs a userfaultfd that handles kernel faults; unprivileged, QEMU 7.2 gets one
# only with vm.unprivileged_userfaultfd=1, QEMU >= 8.1 also through /dev/userfaultfd, which its
# private /dev makes its own (nothing on the host changes). The tests use each way on the QEMU
# that needs it, and put the machine back as it was at the end.
UFFD_SYSCTL=/proc/sys/vm/unprivileged_userfaultfd
uffd_for_qemu72() { [ "$(id -u)" != 0 ] || echo 1 >"$UFFD_SYSCTL"; }
uffd_for_qemu10() { [ "$(id -u)" != 0 ] || echo 0 >"$UFFD_SYSCTL"; }
uffd_keep_machine() {
    [ "$(id -u)" = 0 ] && [ -w "$UFFD_SYSCTL" ] || return 0
    local sysctl
    sysctl=$(cat "$UFFD_SYSCTL")
    # shellcheck disable=SC2064  # the value now, restored at exit
    trap "echo $sysctl >$UFFD_SYSCTL" EXIT
}

setup() {
    ensure_system
    ensure_venv
    ensure_guest
    ensure_qemu10
}

lint() {
    echo "==> ruff"
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    echo "==> mypy --strict"
    .venv/bin/mypy
}

# stage NAME PREPARE COMMAND...: runs PREPARE, then COMMAND, and prints the stage's wall time.
stage_times=()
stage() {
    local name=$1 prepare=$2 started=$SECONDS status=0
    shift 2
    echo "==> pytest: $name"
    "$prepare"
    "$@" || status=$?
    local took=$((SECONDS - started))
    stage_times+=("$(printf '%d:%02d' $((took / 60)) $((took % 60)))")
    echo "==> took $(printf '%d:%02d' $((took / 60)) $((took % 60))): $name"
    return "$status"
}

case "${1:-}" in
setup)
    setup
    ensure_debian_guest
    ;;
demo)
    setup
    exec .venv/bin/vmctl demo
    ;;
test)
    setup
    ensure_debian_guest
    lint
    shift
    if (($#)); then # a developer's own selection, on the system's QEMU (or $VMCTL_QEMU)
        uffd_keep_machine
        uffd_for_qemu72 # the way that serves both QEMUs
        .venv/bin/python -m pytest "$@"
        exit 0
    fi
    uffd_keep_machine
    first=0 second=0
    # Two workers: the suite waits on guests most of the time (README, "The test suite"). A module
    # stays on one worker, in order, with its module-scoped guests booted once.
    parallel=(-n "${VMCTL_TEST_WORKERS:-2}" --dist loadfile --durations=25 --durations-min=5)
    # A short base directory: QEMU's unix sockets live under the tests' run dirs (108 bytes at most).
    basetemp=$(mktemp -d /tmp/vmctl-t.XXXX)
    stage "unit tests, and integration tests on QEMU $(qemu-system-x86_64 --version | head -n 1 | awk '{print $4}')" \
        uffd_for_qemu72 .venv/bin/python -m pytest "${parallel[@]}" --basetemp="$basetemp/1" || first=$?
    # On the second QEMU only what depends on the version (integration/versions.py says what differs).
    stage "integration tests marked versioned, on QEMU 10.0 (VMCTL_QEMU=.cache/qemu-10.0/qemu-system-x86_64)" \
        uffd_for_qemu10 env VMCTL_QEMU="$QEMU10" .venv/bin/python -m pytest integration -m versioned "${parallel[@]}" \
        --basetemp="$basetemp/2" || second=$?
    rm -rf "$basetemp"
    echo "==> stages took ${stage_times[*]}; the whole run $(printf '%d:%02d' $((SECONDS / 60)) $((SECONDS % 60)))"
    if [ "$first" != 0 ]; then exit "$first"; fi
    exit "$second"
    ;;
bench)
    setup
    .venv/bin/python -m pip install -q -e '.[bench]' # matplotlib, for the convergence picture
    uffd_keep_machine
    uffd_for_qemu72 # postcopy as QEMU's user, for bench/convergence.py
    .venv/bin/python bench/qmp_throughput.py
    .venv/bin/python bench/event_latency.py
    .venv/bin/python bench/qmp_scale.py
    .venv/bin/python bench/hotplug.py
    .venv/bin/python bench/stats.py
    .venv/bin/python bench/migration.py
    .venv/bin/python bench/convergence.py
    .venv/bin/python bench/soak.py
    .venv/bin/python bench/libvirt_overhead.py
    ;;
*)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
