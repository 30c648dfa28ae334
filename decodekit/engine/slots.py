"""Which request owns which KV-cache slot.

Slots are handed out lowest-first (decode forwards span slots ``0 .. max_slot``, so low
slots keep batches narrow). The table also gives the runner each slot's cache length.
Plain bookkeeping; calls nothing.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

__all__ = ["SlotTable"]


class _HasLength(Protocol):
    length: int


T = TypeVar("T", bound=_HasLength)


class SlotTable(Generic[T]):
    """``size`` slots, each free or owned by one request (anything with a ``length``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._owner: list[T | None] = [None] * size

    @property
    def free(self) -> list[int]:
        """Free slots, ascending."""
        return [s for s, o in enumerate(self._owner) if o is None]

    @property
    def num_free(self) -> int:
        return sum(o is None for o in self._owner)

    def lowest_free(self) -> int | None:
        """The lowest free slot, or None."""
        return next((s for s, o in enumerate(self._owner) if o is None), None)

    def take(self, slot: int, owner: T) -> None:
        """``owner`` now holds the free ``slot``."""
        if self._owner[slot] is not None:
            raise ValueError(f"slot {slot} is already owned")
        self._owner[slot] = owner

    def give_back(self, slot: int) -> None:
        self._owner[slot] = None

    def owner(self, slot: int) -> T | None:
        return self._owner[slot]

    def lengths(self) -> list[int]:
        """Each slot's cache length (0 for a free slot): what the runner pads idle rows with."""
        return [0 if o is None else o.length for o in self._owner]
