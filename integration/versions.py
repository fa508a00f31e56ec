"""Why a test runs again on the second QEMU: what changes between QEMU versions in what it drives.

CI runs the whole suite on Debian 12's QEMU 7.2, then only the tests marked
``@pytest.mark.versioned(REASON)`` on QEMU 10.0 (see README, "The test suite"). A test is marked
when vmctl or the test branches on the version, or when it drives a part of QEMU whose QMP
interface or behaviour differs between the two; the reason says which part. The rest (the QMP
transport's rules, a dying process, device hotplug's journal, the agent, the operator's views)
depends on vmctl and the guest, not on QEMU's version.
"""

MIGRATION = (
    "migration: its capabilities and parameters (multifd, dirty-limit, zero-page detection), "
    "its states and the device state in the stream differ between QEMU versions"
)
CONVERGENCE = (
    "the convergence policy plans from the version: throttling and XBZRLE refused before 10.0 under TCG, "
    "dirty-limit from 8.1, userfaultfd for postcopy by device from 8.1"
)
BLOCK_JOBS = "block jobs: their QMP commands, events and job states (commit, stream, mirror, transactions) change"
CPU_HOTPLUG = "vCPU hotplug under TCG: QEMU < 8 crashes on a second hotplug, vmctl refuses it by version"
MEMORY_HOTPLUG = "memory hotplug: DIMM and virtio-mem devices, their ACPI and properties, differ between versions"
DISK_DEVICES = "blockdev and virtio-blk/scsi device properties, and PCI/PCIe hotplug on each machine type, differ"
SANDBOX = "QEMU's seccomp filter (-sandbox) and the system calls QEMU makes change between versions"
PCIE = "PCIe root ports, the machine types' layouts and UEFI's variable store differ between versions"
GREETING = "the greeting, version and capabilities QEMU announces differ between versions"
LIBVIRT_PROBE = "libvirt probes each QEMU's capabilities and builds its command line from them"
DISTRIBUTION = "a real distribution's boot, udev hotplug, agent and migration on each supported QEMU"
ISOLATION = (
    "a private /dev and a uid of its own: which device nodes and system calls QEMU needs at start-up, "
    "and userfaultfd by device from 8.1, differ between versions"
)
BACKUP = (
    "backups: blockdev-backup with copy-before-write, transactions of dirty bitmaps and jobs, "
    "persistent bitmaps in qcow2, differ between versions"
)
