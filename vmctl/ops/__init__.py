"""Domain operations (disks, NICs, CPUs, memory, balloon, migration, block jobs) built on QMP."""
