"""Domain operations as QMP procedures: a monitor and values in, values out, each step with its
undo beside it (``rollback.Steps``). They never import the VM (``vmctl.vm``), so they run on any
monitor: vmctl's own socket, or one proxied by libvirt."""
