"""What this QEMU supports, from ``query-qmp-schema``: commands, their arguments and features."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs


@attrs.frozen(slots=True, kw_only=True)
class CommandInfo:
    name: str
    arguments: frozenset[str]
    features: frozenset[str]
    argument_features: Mapping[str, frozenset[str]]


@attrs.frozen(slots=True, kw_only=True)
class EventInfo:
    name: str
    features: frozenset[str]


@attrs.frozen(slots=True, kw_only=True)
class QMPSchema:
    commands: Mapping[str, CommandInfo]
    events: Mapping[str, EventInfo]

    @classmethod
    def from_qmp(cls, entities: Iterable[Mapping[str, Any]]) -> QMPSchema:
        by_name = {str(e.get("name")): e for e in entities if isinstance(e, Mapping)}
        commands: dict[str, CommandInfo] = {}
        events: dict[str, EventInfo] = {}
        for name, entity in by_name.items():
            meta = entity.get("meta-type")
            features = frozenset(str(f) for f in entity.get("features", ()))
            if meta == "command":
                members = _members(by_name, str(entity.get("arg-type", "")), set())
                commands[name] = CommandInfo(
                    name=name,
                    arguments=frozenset(members),
                    features=features,
                    argument_features=members,
                )
            elif meta == "event":
                events[name] = EventInfo(name=name, features=features)
        return cls(commands=commands, events=events)

    def has_command(self, command: str) -> bool:
        return command in self.commands

    def has_argument(self, command: str, argument: str) -> bool:
        """Whether ``command`` takes ``argument`` (at top level or in any union branch)."""
        info = self.commands.get(command)
        return info is not None and argument in info.arguments

    def has_feature(self, command: str, feature: str, *, argument: str | None = None) -> bool:
        """Whether ``command`` (or one of its arguments) carries ``feature`` (e.g. ``deprecated``)."""
        info = self.commands.get(command)
        if info is None:
            return False
        if argument is None:
            return feature in info.features
        return feature in info.argument_features.get(argument, frozenset())


def _members(by_name: Mapping[str, Mapping[str, Any]], type_name: str, seen: set[str]) -> dict[str, frozenset[str]]:
    """Member names of an object type, with those of its union variants, and their features."""
    if type_name in seen:
        return {}
    seen.add(type_name)
    entity = by_name.get(type_name)
    if entity is None or entity.get("meta-type") != "object":
        return {}
    members = {
        str(m.get("name")): frozenset(str(f) for f in m.get("features", ()))
        for m in entity.get("members", ())
        if isinstance(m, Mapping)
    }
    for variant in entity.get("variants", ()):
        if isinstance(variant, Mapping):
            for name, features in _members(by_name, str(variant.get("type", "")), seen).items():
                members.setdefault(name, features)
    return members
