"""How long a command may take before its caller gets ``CommandTimeout``, by kind of command."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

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


def _check_seconds(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise InvalidArgument(f"{what} must be a positive number of seconds, not {value!r}")


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

    def for_command(self, command: str) -> float:
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
