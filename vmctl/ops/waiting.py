"""Waiting on events with one deadline for the whole wait, not one per event."""

from __future__ import annotations

import time
from collections.abc import Iterator

from vmctl.errors import EventTimeout
from vmctl.qmp import Event, Subscription, timeouts


def events_until(subscription: Subscription, timeout: float) -> Iterator[Event]:
    """The subscription's events as they come, until ``timeout`` seconds have passed in all.

    A loop over it ends by itself at the deadline: its ``else`` (or the code after it) is the
    timeout."""
    deadline = timeouts.deadline(timeout)
    while True:
        try:
            yield subscription.get(max(0.0, deadline - time.monotonic()))
        except EventTimeout:
            return
