"""vmctl's loggers: structlog's once the application configured structlog, else the standard
library's logger of each module.

A library never configures logging, and structlog left unconfigured prints every event, debug
included, to stdout. So until the application configures structlog, vmctl's events go to stdlib
``logging`` (``logging.getLogger("vmctl.qmp.protocol")``, ...), where nothing below WARNING shows
unless the application asks for it (``logging.basicConfig(level=logging.DEBUG)``). Either way each
event carries its bound context (vm, cmd, id). Which logging is used, and at what level, is settled
when a logger is bound (a monitor, a VM): configure logging before creating them.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger


def get_logger(name: str) -> FilteringBoundLogger:
    """The logger of module ``name`` (``log = get_logger(__name__)``)."""
    return cast(FilteringBoundLogger, _ModuleLogger(name))


class _ModuleLogger:
    """Binds to whichever logging the application has, at the moment of binding."""

    def __init__(self, name: str) -> None:
        self._name = name

    def bind(self, **context: Any) -> FilteringBoundLogger:
        if structlog.is_configured():
            return cast(FilteringBoundLogger, structlog.get_logger(self._name).bind(**context))
        return _stdlib_bound(self._name).bind(**context)

    def __getattr__(self, method: str) -> Any:  # log.info(...) at module level: rare, bound afresh
        return getattr(self.bind(), method)


def _stdlib_bound(name: str) -> FilteringBoundLogger:
    logger = logging.getLogger(name)
    # A filtering logger drops what stdlib would drop at no cost: a filtered-out debug line is a no-op.
    wrapper = structlog.make_filtering_bound_logger(logger.getEffectiveLevel())
    return cast(FilteringBoundLogger, structlog.wrap_logger(logger, processors=[_to_stdlib], wrapper_class=wrapper))


def _to_stdlib(logger: WrappedLogger, method: str, event: EventDict) -> tuple[tuple[str], dict[str, Any]]:
    """The event as one stdlib record: ``qmp.command cmd='query-status' id='vmctl-1' ms=0.2``."""
    exc_info = event.pop("exc_info", None)
    text = str(event.pop("event", ""))
    if event:
        text += " " + " ".join(f"{key}={value!r}" for key, value in event.items())
    return (text,), ({"exc_info": exc_info} if exc_info else {})
