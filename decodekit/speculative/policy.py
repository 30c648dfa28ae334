"""Draft lengths from a cost model: how many tokens each request of a batch drafts this step.

A verification window is rectangular: ``B`` rows of ``L + 1`` positions, ``L`` the longest
draft (the runner pads shorter rows), so it costs ``cost(B * (L + 1))`` in units of a
one-token forward (:class:`WindowCost`, measured on the running device when the generator is
built, or given). A request's ``j``-th drafted token is accepted with probability
``h * g^(j-1)``: ``h`` that its first token is, ``g`` that a run, once started, goes on
(prompt lookup is like this: the first token after a correction is a guess, then the copy
runs). For a given ``L`` every row best drafts ``min(L, its cap)`` (its padding costs the
same), so the plan is the ``L`` that maximises ``(B + sum of the rows' gains) /
(cost(B * (L + 1)) + drafting cost)``; ``L = 0`` (a plain step) is one of the candidates, so
by the model a plan is never below break-even. On a CPU, where two verified tokens already
cost nearly twice one, a request drafts only when it expects most of a token back; on a GPU,
where verifying a few more tokens is nearly free, it drafts on weaker odds. The measurement
times windows with the logits of every position (the verification needs them all).

``h`` and ``g`` per request: decayed counts of first tokens accepted, and of runs that went
on, around the drafter's prior; a request that does not draft drifts back to the prior; a
step where the drafter is *confident* (prompt lookup: a long match, the request is copying)
takes ``h`` at least :data:`CONFIDENT_HIT`.

Plain host arithmetic (the measurement runs forwards through the runner it is given).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DraftPolicy", "WindowCost"]

DECAY = 0.85  # weight of the older counts at each verification
IDLE_DECAY = 0.8  # per step without a draft: the counts drift back to the prior
PRIOR_WEIGHT = 2.0  # the prior counts as this many drafts
CONFIDENT_HIT = 0.9  # first-token acceptance on a step where the drafter is confident


class WindowCost:
    """``cost(T)``: a forward over ``T`` tokens relative to a one-token forward, piecewise
    linear between measured points (linear beyond the last), made non-decreasing.

    ``points``: ``{tokens: seconds or relative cost}``, with ``1`` among the keys.
    """

    def __init__(self, points: Mapping[int, float]) -> None:
        if 1 not in points:
            raise ValueError("window_cost needs the cost of 1 token (key 1)")
        if any(int(t) < 1 or not c > 0 for t, c in points.items()):
            raise ValueError("window_cost: token counts must be >= 1 and costs > 0")
        base, top, pts = points[1], 0.0, []
        for t, c in sorted(points.items()):  # never cheaper for more tokens (timing noise)
            top = max(top, c / base)
            pts.append((int(t), top))
        self.points = pts

    def __call__(self, tokens: float) -> float:
        pts = self.points
        if tokens <= pts[0][0] or len(pts) == 1:
            return pts[0][1]
        for (t0, c0), (t1, c1) in zip(pts, pts[1:], strict=False):
            if tokens <= t1:
                return c0 + (c1 - c0) * (tokens - t0) / (t1 - t0)
        (t0, c0), (t1, c1) = pts[-2], pts[-1]
        return c1 + (c1 - c0) / (t1 - t0) * (tokens - t1)

    def __repr__(self) -> str:
        return "WindowCost({" + ", ".join(f"{t}: {c:.2f}" for t, c in self.points) + "})"

    @classmethod
    def measure(cls, runner: Any, max_tokens: int, repeats: int = 3) -> WindowCost:
        """Time forwards of ``T`` = 1, 2, 4, ... ``max_tokens`` positions of slot 0 through
        ``runner``, with the logits of all ``T`` (the fastest of ``repeats`` after a warm-up).
        Call while no request holds a slot: the writes land in slot 0's free positions."""
        dev = runner.device
        size = runner.max_seq_len
        top = max(1, min(max_tokens, size))
        t_values = sorted({min(1 << i, top) for i in range(top.bit_length() + 1)} | {top})
        points: dict[int, float] = {}
        with torch.inference_mode():
            for T in t_values:
                ids = torch.zeros(1, T, dtype=torch.long, device=dev)
                pos = torch.arange(T, device=dev)[None]
                length = torch.full((1,), T, dtype=torch.long, device=dev)
                kv = runner.kv_len(T)
                runner.forward(ids, pos, length, 0, kv, keep=T)  # warm-up
                times = []
                for _ in range(repeats):
                    _sync(dev)
                    t0 = time.perf_counter()
                    runner.forward(ids, pos, length, 0, kv, keep=T)
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
                points[T] = min(times)
        return cls(points)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Counts:
    drafts: float = 0.0  # verifications with a draft
    hits: float = 0.0  # ... whose first drafted token was accepted
    tries: float = 0.0  # drafted tokens after an accepted one (a run could go on)
    kept: float = 0.0  # ... accepted

    def decay(self, f: float) -> None:
        self.drafts *= f
        self.hits *= f
        self.tries *= f
        self.kept *= f


class DraftPolicy:
    """Draft lengths for a batch.

    Parameters
    ----------
    k : int
        Longest draft per request.
    draft_cost : float
        One drafting step's cost in target forwards (0 for prompt lookup).
    cost : WindowCost
        Verification cost per verified tokens.
    prior : (float, float)
        The drafter's ``(h, g)`` before any evidence.
    enabled : bool
        False: every request drafts as much as it may (up to ``k``).
    """

    def __init__(self, k: int, draft_cost: float, cost: WindowCost, prior: tuple[float, float] = (0.6, 0.6),
                 enabled: bool = True) -> None:
        self.k, self.draft_cost, self.cost, self.enabled = k, draft_cost, cost, enabled
        self.prior = prior
        self._counts: dict[int, _Counts] = {}

    def admit(self, slot: int) -> None:
        """A new request in ``slot`` starts from the prior."""
        self._counts[slot] = _Counts()

    def acceptance(self, slot: int, confident: bool = False) -> tuple[float, float]:
        """The request's ``(h, g)`` estimate (``h`` at least :data:`CONFIDENT_HIT` when the
        drafter is confident this step)."""
        c = self._counts.setdefault(slot, _Counts())
        h0, g0 = self.prior
        h = (c.hits + PRIOR_WEIGHT * h0) / (c.drafts + PRIOR_WEIGHT)
        g = (c.kept + PRIOR_WEIGHT * g0) / (c.tries + PRIOR_WEIGHT)
        return (max(h, CONFIDENT_HIT) if confident else h), g

    def plan(self, slots: Sequence[int], caps: Sequence[int], confident: Sequence[bool] = ()) -> list[int]:
        """Draft length per row (``caps[r]``: the most row ``r`` may draft, ``confident[r]``:
        the drafter is sure of row ``r``'s draft this step)."""
        caps = [min(self.k, max(0, c)) for c in caps]
        if not self.enabled:
            return caps
        B = len(slots)
        sure = list(confident) or [False] * B
        hg = [self.acceptance(s, sure[r]) for r, s in enumerate(slots)]
        base = self.cost(B)
        best_L, best = 0, B / base
        expected = float(B)
        for L in range(1, max(caps, default=0) + 1):
            expected += sum(h * g ** (L - 1) for (h, g), cap in zip(hg, caps, strict=True) if cap >= L)
            value = expected / (self.cost(B * (L + 1)) + self.draft_cost * L * base)
            if value > best:
                best_L, best = L, value
        out = [min(best_L, c) for c in caps]
        for s, n in zip(slots, out, strict=True):
            if n == 0:
                self._counts.setdefault(s, _Counts()).decay(IDLE_DECAY)
        return out

    def update(self, slot: int, drafted: int, accepted: int) -> None:
        """After a verification of ``drafted`` tokens of which ``accepted`` were accepted."""
        if not drafted:
            return
        c = self._counts.setdefault(slot, _Counts())
        c.decay(DECAY)
        c.drafts += 1
        if accepted:
            c.hits += 1
            c.tries += min(accepted + 1, drafted) - 1
            c.kept += accepted - 1

    def snapshot(self, slots: Sequence[int]) -> dict[int, _Counts | None]:
        """Copies of the slots' counts, for :meth:`restore` (a failed call is undone)."""
        return {s: None if s not in self._counts else dataclasses.replace(self._counts[s]) for s in slots}

    def restore(self, snapshot: dict[int, _Counts | None]) -> None:
        for s, c in snapshot.items():
            if c is None:
                self._counts.pop(s, None)
            else:
                self._counts[s] = c
