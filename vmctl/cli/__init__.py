"""The ``vmctl`` command: an application on top of the library (it, unlike the library, configures
logging). ``command`` holds the arguments and runs a subcommand's handler; each handler lives in
the module named after what it does: ``monitor`` (``qmp``, with ``qmpshell``, and ``events``),
``status``, ``listing`` (``ls``), ``top``, ``migrate`` (with ``progress``, its bar), ``tools``
(``screenshot``, ``agent``) and ``demo``.

``main`` is the console script's entry point; ``python -m vmctl.cli`` runs it too."""

from vmctl.cli.command import main

__all__ = ["main"]
