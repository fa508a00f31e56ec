"""Remove secrets from QMP messages before they reach a log line or a transcript."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

REDACTED: Final = "<redacted>"

# Argument names that carry secrets: password, passwd, secret, key, passphrase, token as whole
# words inside a QAPI name (so "key-secret" and "new-secret" match, "keyboard" does not).
_SECRET_KEY = re.compile(r"(?:^|[-_])(?:password|passwd|secret|key|passphrase|token)(?:[-_]|$)", re.IGNORECASE)
_HMP_SECRET = re.compile(r"((?:^|,)\s*(?:data|password|passwd|secret|key|passphrase)=)([^,\s]+)", re.IGNORECASE)
_HMP_SECRET_COMMANDS: Final = frozenset({"set_password", "change"})


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_KEY.search(name))


def redact_arguments(command: str, arguments: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A copy of ``arguments`` with every secret value replaced; the input is not modified."""
    if not arguments:
        return arguments
    cleaned = _redact(arguments)
    assert isinstance(cleaned, dict)
    if command == "object-add" and arguments.get("qom-type") == "secret" and "data" in cleaned:
        cleaned["data"] = REDACTED
    props = cleaned.get("props")
    if command == "object-add" and isinstance(props, dict) and arguments.get("qom-type") == "secret":
        props["data"] = REDACTED  # pre-6.0 nested form
    if command == "human-monitor-command" and isinstance(cleaned.get("command-line"), str):
        cleaned["command-line"] = redact_hmp(cleaned["command-line"])
    return cleaned


def redact_hmp(command_line: str) -> str:
    words = command_line.split()
    if words and words[0] in _HMP_SECRET_COMMANDS and len(words) > 2:
        return " ".join([*words[:2], REDACTED])
    return _HMP_SECRET.sub(lambda m: m.group(1) + REDACTED, command_line)


def redact_value(value: Any) -> Any:
    """Redact secret-named keys anywhere in a reply or event payload."""
    return _redact(value)


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: (
                REDACTED
                if isinstance(key, str) and is_secret_name(key) and not isinstance(item, (dict, list))
                else _redact(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_redact(item) for item in value]
    return value
