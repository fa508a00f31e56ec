"""Run an operation as steps, each with its undo beside it; on failure, undo what was done."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from vmctl.errors import CommandTimeout, ConnectionLost, OutcomeUnknown

T = TypeVar("T")


class Steps:
    """``with Steps(log) as steps: x = steps.run("name", do, undo)``.

    If the block raises, the undos of the steps that completed run in reverse order. An undo that
    fails is logged and named in ``leftovers`` (the original error is re-raised either way).

    A step whose command timed out or lost the connection may have taken effect in QEMU: its undo
    runs too, with ``None`` for the result, so every undo must work from names alone and do
    nothing when there is nothing to undo. A step that raises ``OutcomeUnknown`` undoes nothing:
    every step done is a leftover, for the journal to settle.
    """

    def __init__(self, log: Any) -> None:
        self._log = log
        self._undo: list[tuple[str, Callable[[], Any]]] = []
        self.leftovers: list[str] = []

    def run(self, name: str, do: Callable[[], T], undo: Callable[[T | None], Any] | None = None) -> T:
        try:
            result = do()
        except (CommandTimeout, ConnectionLost):
            if undo is not None:  # its outcome is unknown: undo it if it happened
                self._undo.append((name, lambda: undo(None)))
            raise
        if undo is not None:
            self._undo.append((name, lambda: undo(result)))
        return result

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            return
        if isinstance(exc, OutcomeUnknown):  # undoing could break what the unknown step did
            self.leftovers = [name for name, _ in self._undo]
            self._undo.clear()
            return
        for name, undo in reversed(self._undo):
            try:
                undo()
                self._log.info("rollback.step_undone", step=name)
            except Exception as undo_error:
                self.leftovers.append(name)
                self._log.error("rollback.undo_failed", step=name, error=str(undo_error))
        self._undo.clear()
