"""How long a command may take before its caller gets ``CommandTimeout``, by kind of command."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs

from vmctl.errors import InvalidArgument

#: Queries answer from QEMU's memory; block and device set-up may touch storage or wait on the
#: main loop; "*" patterns match by prefix. Anything unlisted gets ``default``.
DEFAULT_RULES: Mapping[str, float] = MappingProxyType(
    {
        "query-*": 10.0,
        "qom-get": 10.0,
        "qom-list": 10.0,
        "ringbuf-read": 10.0,
        "qmp_capabilities": 10.0,
        "stop": 10.0,
        "cont": 10.0,
        "system_reset": 10.0,
        "system_powerdown": 10.0,
        "quit": 10.0,
        "migrate": 30.0,
        "device_add": 30.0,
        "device_del": 30.0,
        "blockdev-add": 60.0,
        "blockdev-del": 60.0,
        "blockdev-create": 60.0,
        "transaction": 60.0,
        "human-monitor-command": 60.0,
    }
)


def _frozen_rules(rules: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(rules))


#: The longest single wait a face makes; a longer timeout is honoured by waiting again.
MAX_WAIT_SLICE: Final = 3600.0


def check_timeout(value: Any, what: str = "timeout", *, allow_zero: bool = False) -> float:
    """``value`` as seconds if it is a finite number > 0 (or >= 0); else ``InvalidArgument``.

    Checked before anything is sent: ``inf`` or ``nan`` would otherwise fail deep inside a wait,
    after the command went out."""
    valid = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not valid:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgument(f"{what} must be a finite number of seconds {bound}, not {value!r}")
    return float(value)


#: The furthest ahead a deadline is set: adding a huge finite timeout (1e300 s) to a clock would
#: lose the clock's digits, and no wait outlives 31 years.
_FURTHEST: Final = 1e9


def deadline(timeout: float, *, now: float | None = None) -> float:
    """The clock's time ``timeout`` seconds after ``now`` (default: ``time.monotonic()``; an
    asyncio face passes its loop's time). Every wait of a whole operation counts down to one."""
    return (time.monotonic() if now is None else now) + min(timeout, _FURTHEST)


def _check_seconds(value: float, what: str) -> None:
    check_timeout(value, what)


@attrs.frozen(kw_only=True)
class TimeoutPolicy:
    """Per-command default timeouts; ``with_rules`` derives a policy with overrides."""

    default: float = 30.0
    rules: Mapping[str, float] = attrs.field(default=DEFAULT_RULES, converter=_frozen_rules)
    _cache: dict[str, float] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _check_seconds(self.default, "the default timeout")
        for name, seconds in self.rules.items():
            _check_seconds(seconds, f"the timeout for {name!r}")

    def with_rules(self, rules: Mapping[str, float], *, default: float | None = None) -> TimeoutPolicy:
        return TimeoutPolicy(default=self.default if default is None else default, rules=dict(self.rules) | dict(rules))

    def for_command(self, command: str, timeout: float | None = None) -> float:
        """How long ``command`` may take: the caller's ``timeout`` (checked) when given, else by its kind.

        Every face asks here, so a command gets the same time on vmctl's socket and through libvirt."""
        if timeout is not None:
            return check_timeout(timeout)
        try:
            return self._cache[command]
        except KeyError:
            pass
        seconds = self.rules.get(command)
        if seconds is None:
            prefixes = [p for p in self.rules if p.endswith("*") and command.startswith(p[:-1])]
            seconds = self.rules[max(prefixes, key=len)] if prefixes else self.default
        self._cache[command] = seconds
        return seconds
