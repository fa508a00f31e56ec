"""The ``vmctl`` command: an application on top of the library (it, unlike the library, configures
logging). ``command`` parses the arguments and runs a subcommand; the other modules are the
subcommands' views: ``qmpshell`` (``vmctl qmp``), ``listing`` (``vmctl ls``), ``top``,
``progress`` (``vmctl migrate``'s bar) and ``demo``.

``main`` is the console script's entry point; ``python -m vmctl.cli`` runs it too."""

from vmctl.cli.command import main

__all__ = ["main"]
