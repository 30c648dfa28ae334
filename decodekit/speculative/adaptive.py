"""Adaptive draft length: how many tokens to draft for a request this step.

Per request (per slot, reset at admission): ``k`` grows by one after a fully accepted
draft (prompt lookup, whose drafts are free: to twice the accepted draft) and halves after a
fully rejected one; at 0 the request rests, then probes with one token, resting twice as
long after each probe that is rejected too (8, 16, ... 128 steps). A drafter that is sure of
a draft (prompt lookup on a long match: the request is copying) ends a rest at once
(:meth:`AdaptiveK.probe`).
A request whose running acceptance falls below the drafter's break-even (a drafted token
that costs more than it saves) rests as well. Model drafts cost forwards, so they start at
half length. Per batch, :meth:`AdaptiveK.batch_cap` shortens drafts as the batch grows.

Plain host arithmetic; calls nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["AdaptiveK"]

REST_STEPS = 8  # first rest after k reaches 0; doubles per rejected probe, up to 16x
VERIFY_COST = {"cuda": 0.02, "cpu": 0.1}  # one more verified position, in target forwards


@dataclass
class _State:
    k: int
    rest: int = 0  # steps left without drafting (k == 0)
    misses: int = 0  # rests in a row that ended in a rejected probe
    alpha: float | None = None  # running per-token acceptance


class AdaptiveK:
    """Draft lengths for up to ``max_slots`` requests.

    Parameters
    ----------
    k : int
        The longest draft (``num_speculative_tokens``).
    draft_cost : float
        One drafted token's cost in target forwards (0 for prompt lookup).
    device_type : str
        ``"cuda"`` (verification nearly free, drafts full length up to batch 32) or another
        (compute-bound already at small batches: the batch shares one budget of ``k``).
    enabled : bool
        False: always ``k`` (no adaptation, no batch cap).
    """

    def __init__(self, k: int, draft_cost: float, device_type: str, enabled: bool = True) -> None:
        self.k, self.enabled, self.device_type = k, enabled, device_type
        self.free = draft_cost == 0
        self.start = k if self.free else max(1, k // 2)
        self.break_even = draft_cost + VERIFY_COST.get(device_type, VERIFY_COST["cpu"])
        self._states: dict[int, _State] = {}

    def admit(self, slot: int) -> None:
        """A new request in ``slot`` starts fresh."""
        self._states[slot] = _State(self.start)

    def batch_cap(self, n_rows: int) -> int:
        """Longest draft per row at this batch size. A verification forward costs about
        ``1 + k`` tokens per row: on a CPU the whole batch shares a budget of ``k`` drafted
        tokens per step; on a GPU decode is bandwidth-bound, so drafts stay full length up
        to batch 32 and shrink beyond."""
        if not self.enabled:
            return self.k
        if self.device_type != "cuda":
            return self.k // n_rows
        return self.k if n_rows <= 32 else self.k * 32 // n_rows

    def length(self, slot: int) -> int:
        """This step's draft length for the request in ``slot`` (counts down a rest)."""
        if not self.enabled:
            return self.k
        st = self._states.setdefault(slot, _State(self.start))
        if st.k == 0:
            st.rest -= 1
            if st.rest > 0:
                return 0
            st.k = 1
        return st.k

    def probe(self, slot: int) -> int:
        """A resting request drafts again at once (the drafter is confident): half the longest
        draft; the rest is over."""
        st = self._states.setdefault(slot, _State(self.start))
        st.k, st.rest = max(1, self.k // 2), 0
        return st.k

    def update(self, slot: int, drafted: int, accepted: int) -> None:
        """After a verification of ``drafted`` tokens of which ``accepted`` were accepted."""
        if not self.enabled or not drafted:
            return
        st = self._states.setdefault(slot, _State(self.start))
        rate = accepted / drafted
        prior = 1.0 if st.alpha is None else st.alpha  # optimistic start
        st.alpha = 0.7 * prior + 0.3 * rate
        if accepted == drafted:  # prompt lookup (free drafts) regrows fast after a backoff
            st.k = min(self.k, max(st.k + 1, 2 * drafted) if self.free else st.k + 1)
        elif accepted == 0:
            st.k //= 2
        if st.k == 0 or st.alpha < self.break_even:
            st.k = 0
            st.rest = REST_STEPS << min(st.misses, 4)
            st.misses += 1
        elif accepted:
            st.misses = 0

    def snapshot(self, slots: list[int]) -> dict[int, _State | None]:
        """Copies of the slots' states, for :meth:`restore` (a failed call is undone)."""
        return {s: None if s not in self._states else dataclasses.replace(self._states[s]) for s in slots}

    def restore(self, snapshot: dict[int, _State | None]) -> None:
        for s, st in snapshot.items():
            if st is None:
                self._states.pop(s, None)
            else:
                self._states[s] = st

    def misses(self, slot: int) -> int:
        """Rests in a row that ended in a rejected probe (0 after an accepted draft)."""
        st = self._states.get(slot)
        return 0 if st is None else st.misses
