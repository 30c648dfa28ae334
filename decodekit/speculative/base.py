"""The drafter protocol of speculative decoding, and its counters.

A user picks a drafter *config* (:class:`~decodekit.NGramDraft`,
:class:`~decodekit.DraftModel`, :class:`~decodekit.LayerSkipDraft`); the generator builds
it into a :class:`Drafter` with the target's :class:`~decodekit.engine.runner.ModelRunner`
and :class:`~decodekit.Sampler` (never the generator). Each step the speculative step asks
the drafter for :class:`Drafts` for some requests, verifies them with one target forward,
and tells the drafter how many were accepted.

Plain types; calls nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .._checks import int_at_least

__all__ = ["NO_LIMIT", "DraftRequest", "Drafter", "Drafts", "SpecStats", "check_k"]

NO_LIMIT = 1 << 30  # Drafter.available of a drafter that can draft any length


def check_k(k: Any) -> int:
    """A draft length: an int >= 1."""
    return int_at_least("k", k, 1)


@dataclass
class SpecStats:
    """Speculation counters (per request and per generator), with the usual definitions."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verification steps
    accepted_per_position: list[int] | None = None

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """1 + accepted / verification steps (tokens emitted per target forward)."""
        return 1.0 + self.accepted / self.steps if self.steps else 0.0

    def add(self, drafted: int, accepted: int, k: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        if self.accepted_per_position is None or len(self.accepted_per_position) < k:
            old = self.accepted_per_position or []
            self.accepted_per_position = old + [0] * (k - len(old))
        for j in range(accepted):
            self.accepted_per_position[j] += 1


@dataclass(frozen=True)
class DraftRequest:
    """One request to draft for.

    ``tokens``: its prompt, generated and pending tokens (host ints); the last one is the
    newest, not yet in the KV cache, at position ``len(tokens) - 1 == length``.
    ``budget``: the most tokens to draft (>= 0). ``room``: the most a window may hold for it
    (``budget`` is the draft policy's choice within it; jump-forward of guided requests may
    use all of it).
    """

    slot: int
    tokens: Sequence[int]
    budget: int
    room: int = 0
    evidence: int = 0  # the drafter's evidence class for this step (Drafter.evidence)

    @property
    def length(self) -> int:
        """Tokens in the target's KV cache for this request."""
        return len(self.tokens) - 1


@dataclass(frozen=True)
class Drafts:
    """A step's drafts for ``R`` requests.

    ``tokens``: int64 ``[R, K]`` on the device, ``-1`` past each row's draft;
    ``lengths``: drafted tokens per row (host); ``q``: fp32 ``[R, K, V]``, the distributions
    the drafts were drawn from, or None for a drafter without one (point masses).
    """

    tokens: torch.Tensor
    lengths: list[int]
    q: torch.Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    """What the speculative step needs from a built drafter.

    ``cost``: one drafted token's cost as a fraction of a target forward (0 for lookup).
    ``prior``: ``(h, g)``, the acceptance the draft policy assumes before any evidence: of a
    request's first drafted token, and of each next one once a run has started
    (:class:`~decodekit.speculative.policy.DraftPolicy`). Optional ``evidence_prior``:
    ``{evidence class: h}``, the first-token acceptance of each of its :meth:`evidence`
    classes before any evidence (``prior``'s ``h`` for a class it does not name).
    Slot hooks (``admit`` after the target prefilled a request, ``release``) let a drafter
    keep per-slot state; ``lengths`` are the target's per-slot cache lengths (0: free).
    """

    cost: float
    prior: tuple[float, float]

    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], steering: Sequence[Any]) -> None:
        """Requests just prefilled into the contiguous ``slots`` (steering: per slot or None)."""

    def release(self, slot: int) -> None:
        """The request in ``slot`` is gone."""

    def truncate(self, slot: int, length: int) -> None:
        """The target's cache for ``slot`` holds ``length`` tokens again (a call was undone):
        a drafter with its own cache must not count on more."""

    def confident(self, slot: int, tokens: Sequence[int]) -> bool:
        """Whether this step's draft for the request is very likely accepted whatever its
        recent drafts did (prompt lookup: a long match, the request is copying); the policy
        then drafts for it. False when the drafter cannot tell."""

    def evidence(self, slot: int, tokens: Sequence[int]) -> int:
        """A class of this step's draft for the request by what the drafter sees before
        drafting (prompt lookup: how far back the match agrees, whether it continues the
        passage being copied), 0 for none. The policy pools the first-token acceptance of each
        class over all requests: a request whose own history is poor still drafts where
        drafts of its class usually pass."""

    def available(self, slot: int, tokens: Sequence[int]) -> int:
        """The most tokens this step's draft for the request can have, as far as the drafter
        can tell before drafting (prompt lookup: 0 without a match, else what is left of the
        matched source); the policy plans no row for more. A model drafter: :data:`NO_LIMIT`."""

    def enable_graphs(self, capture: Any = None) -> None:
        """Capture CUDA graphs of the drafter's own forwards (``capture`` as for
        :meth:`~decodekit.engine.runner.ModelRunner.enable_graphs`); a no-op for drafters
        without a model of their own."""

    def propose(self, requests: Sequence[DraftRequest], lengths: Sequence[int]) -> Drafts | None:
        """Drafts for ``requests`` (None when no row has any)."""

    def committed(self, requests: Sequence[DraftRequest], accepted: Sequence[int], window: int) -> None:
        """Verification of a window of ``window`` drafts accepted ``accepted[r]`` per row."""
