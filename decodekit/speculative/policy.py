"""Draft lengths from a cost model: how many tokens each request of a batch drafts this step.

A verification window is rectangular: ``B`` rows of ``L + 1`` positions, ``L`` the longest
draft (the runner pads shorter rows; free slots between the lowest and the highest are rows
too), so it costs ``cost(B, L + 1)`` in units of a one-token forward (:class:`WindowCost`, measured per rows
and width on the running device when the generator is built, or given). A request's ``j``-th
drafted token is accepted with probability
``h * g^(j-1)``: ``h`` that its first token is, ``g`` that a run, once started, goes on
(prompt lookup is like this: the first token after a correction is a guess, then the copy
runs). For a given ``L`` every row best drafts ``min(L, its cap)`` (its padding costs the
same), so the plan is the ``L`` that maximises ``(B + sum of the rows' gains) /
(cost(B, L + 1) + drafting cost)``; ``L = 0`` (a plain step) is one of the candidates, so
by the model a plan is never below break-even. On a CPU, where two verified tokens already
cost nearly twice one, a request drafts only when it expects most of a token back; on a GPU,
where verifying a few more tokens is nearly free, it drafts on weaker odds. The measurement
times windows with the logits of every position (the verification needs them all).

``h`` and ``g`` per request: decayed counts of first tokens accepted, and of runs that went
on, around the drafter's prior; a request that does not draft drifts back to the prior; a
step where the drafter is *confident* (prompt lookup: a long match, the request is copying)
takes ``h`` at least :data:`CONFIDENT_HIT`. A step whose draft falls in one of the drafter's
*evidence* classes (prompt lookup: how far back the match agrees, whether it continues the
passage being copied) takes ``h`` at least the first-token acceptance of that class pooled
over every request (decayed counts around the class's own prior, the drafter's
``evidence_prior``: for prompt lookup three tokens agreeing where the copy stands start at
0.6, a one-token match at 0.15): a request that paraphrased for a while
still drafts where the match says it copies again, and one-token guesses, mostly wrong, do
not lift it. The larger of the two is optimistic (sampled copy prompts: resumed copies
predicted 0.42, passed 0.20), which pays at one row, where a window of a few positions costs
little more than a step, and does not where every window is ``B`` rows wide: a window of more
than one row takes the request's own decayed record with the class around the pooled one
instead (calibrated: 0.31 vs 0.25). At one row that calibrated estimate drafted less and got
fewer tokens per unit of cost (SmolLM2 copy prompts, t=0.7, 8 seeds each, priced by one
width table: 1.36-1.83 vs 1.45-1.87); at 8 rows it drafts fewer windows in open text.

Estimates picked because they are high overshoot (a window opens on the rows that look best
this step): windows of more than one row scale every row's expected tokens by the batch's
accepted / predicted tokens over recent multi-row verifications (decayed, starting at 1,
within 0.25-1.25, drifting back to 1 on steps without a draft). SmolLM2 on 2 cores, 8 open
prompts together, priced by one table: 0.925x -> 0.955x of plain steps' tokens per cost
greedy, 0.952x -> 0.971x at t=0.7; copy prompts unchanged (greedy 1.21x, t=0.7 0.985x ->
0.990x over 8 seeds per prompt). Rows the drafter can fill no further (``fill``: prompt
lookup without a match, or near the end of its source) count for no more tokens than they
can hold: open greedy 0.990x, t=0.7 0.995x.

Packed windows (a CPU runner feeds the model only the window's real tokens, rounded up to a
multiple of ``PACK_MULTIPLE``): a row's drafts cost what its tokens add
(:meth:`WindowCost.packed`, measured with one long row and the others one token), so rows draft
different lengths; for each width the plan takes the drafted tokens of every row in order of
their expected acceptance and keeps the best set (:meth:`DraftPolicy._plan_packed`). Every
plan also prices the sampler's work over the window (``"cell"``: per row and position, at
the longest draft's width). SmolLM2 on 2 cores, 8 prompts together: copy 1.38x (greedy) /
1.04x (t=0.7) of plain decoding, open 0.98x / 0.99x (padded: 1.16x / 1.00x, 0.98x / 0.99x).

Plain host arithmetic (the measurement runs forwards through the runner it is given).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..engine.runner import PACK_MULTIPLE, round_packed

__all__ = ["DraftPolicy", "WindowCost"]

DECAY = 0.85  # weight of the older counts at each verification
IDLE_DECAY = 0.8  # per step without a draft: the counts drift back to the prior
PRIOR_WEIGHT = 2.0  # the prior counts as this many drafts
CONFIDENT_HIT = 0.9  # first-token acceptance on a step where the drafter is confident
DENSE_WIDTHS = 32  # WindowCost.measure times every one-row width up to this
POOL_DECAY = 0.97  # weight of an evidence class's older counts at each of its verifications
CALIB_DECAY = 0.97  # weight of the older tokens in the batch-wide calibration at each verification
CALIB_WEIGHT = 4.0  # the calibration starts at 1 as if this many tokens had come as predicted
CALIB_RANGE = (0.25, 1.25)  # the calibration's bounds
CALIB_IDLE = 0.9  # per multi-row step without a draft: the calibration drifts back to 1


class WindowCost:
    """``cost(rows, width)``: a forward over ``rows`` batch rows of ``width`` positions each,
    relative to a one-row, one-token forward; ``cost(tokens)`` is ``cost(1, tokens)``;
    :meth:`packed` prices a packed window (rows of different widths, no padding).

    ``points``: ``{(rows, width): seconds or relative cost}``, with ``(1, 1)`` among the keys;
    an int key ``T`` stands for ``(1, T)``. Between measured widths the cost is piecewise
    linear (linear beyond the last), between measured row counts linear in the rows; a table
    of one row only (int keys) prices ``rows x width`` as ``rows * width`` tokens of one row.
    Made non-decreasing in both (timing noise never makes more work cheaper). Keys
    ``(rows, width, rows + width - 1)``: a *packed* forward of ``rows`` rows, one of them
    ``width`` tokens and the others one each (:meth:`packed` interpolates by tokens between
    that and the full ``(rows, width)``). Key ``"cell"``: the verification's work per window
    position and row outside the forward (the sampler's passes over a vocabulary of logits;
    :meth:`sampling`), in the same unit.

    Rows matter on their own: a batch of ``B`` rows of ``L + 1`` positions costs more than
    one row of ``B * (L + 1)`` (each row reads its own keys and values), by 1.2-1.5x for
    SmolLM2 on a 2-core CPU at ``B = 8``.
    """

    def __init__(self, points: Mapping[Any, float]) -> None:
        keys: dict[tuple[int, int], float] = {}
        long: dict[tuple[int, int], float] = {}
        cell = float(points.get("cell", 0.0))
        if not cell >= 0.0:
            raise ValueError(f"window_cost['cell'] must be >= 0, got {cell!r}")
        for key, c in points.items():
            if key == "cell":
                continue
            rw = (1, key) if isinstance(key, int) else tuple(key)
            if len(rw) == 3 and all(int(x) >= 1 for x in rw) and int(rw[2]) == int(rw[0]) + int(rw[1]) - 1 \
                    and c > 0:
                long[(int(rw[0]), int(rw[1]))] = float(c)
                continue
            if len(rw) != 2 or any(int(x) < 1 for x in rw) or not c > 0:
                raise ValueError("window_cost: keys must be token counts >= 1, (rows, width) pairs >= 1 or "
                                 "(rows, width, rows + width - 1) packed triples, and costs > 0, got "
                                 f"{key!r}: {c!r}")
            keys[(int(rw[0]), int(rw[1]))] = float(c)
        if (1, 1) not in keys:
            raise ValueError("window_cost needs the cost of 1 token (key 1, or (1, 1))")
        base = keys[(1, 1)]
        self.cell = cell / base
        # packed windows with one long row: their own curves (one row: the same as unpacked)
        self.long: WindowCost | None = None
        if long:
            one = {(1, w): c for (r, w), c in keys.items() if r == 1}
            self.long = WindowCost({**one, **{(r, w): c for (r, w), c in long.items() if r > 1}})
        self.rows: list[int] = sorted({r for r, _ in keys})
        self.curves: dict[int, list[tuple[int, float]]] = {}
        below: list[tuple[int, float]] | None = None
        for r in self.rows:
            top, pts = 0.0, []
            for w in sorted(w for rr, w in keys if rr == r):
                c = keys[(r, w)] / base
                if below is not None:
                    c = max(c, _interp(below, w))  # never cheaper with more rows
                top = max(top, c)
                pts.append((w, top))
            self.curves[r] = below = pts
        self.points = sorted(((r, w), c) for r, pts in self.curves.items() for w, c in pts)

    def __call__(self, rows: float, width: float | None = None) -> float:
        if width is None:
            rows, width = 1, rows
        if len(self.rows) == 1:  # one row measured: the tokens decide
            return _interp(self.curves[self.rows[0]], rows * width)
        rs = self.rows
        if rows <= rs[0]:
            return _interp(self.curves[rs[0]], width)
        i = next((i for i in range(1, len(rs)) if rows <= rs[i]), len(rs) - 1)  # beyond: the last two
        r0, r1 = rs[i - 1], rs[i]
        c0, c1 = _interp(self.curves[r0], width), _interp(self.curves[r1], width)
        return max(c0, c0 + (c1 - c0) * (rows - r0) / (r1 - r0))

    def packed(self, rows: int, width: int, tokens: float) -> float:
        """A packed window of ``rows`` rows, the widest ``width`` positions, ``tokens`` in all
        (as the runner carries them: rounded up to a multiple of ``PACK_MULTIPLE``): linear
        in the tokens between one long row (``rows + width - 1``) and every row that wide
        (``cost(rows, width)``); without packed points, ``cost(rows, width)``."""
        return float(self.packed_line(rows, width, np.asarray([tokens], dtype=np.float64))[0])

    def packed_line(self, rows: int, width: int, tokens: np.ndarray) -> np.ndarray:
        """:meth:`packed` for many token counts ``tokens [n]`` at once."""
        full = self(rows, width)
        hi = rows * width
        lo = min(_rounded(rows + width - 1), hi)  # the runner rounds a packed forward's tokens up
        if self.long is None or rows <= 1 or width <= 1 or lo >= hi:
            return np.full(tokens.shape, full)
        one = min(self.long(rows, width), full)
        return one + (full - one) * np.clip((np.minimum(_rounded(tokens), hi) - lo) / (hi - lo), 0.0, 1.0)

    def sampling(self, rows: int, width: int) -> float:
        """The verification's work outside the forward for ``rows`` rows of ``width`` positions
        (the sampler's passes over each position's logits)."""
        return self.cell * rows * width

    def table(self) -> dict[Any, float]:
        """The points as a ``window_cost`` table (relative costs; packed triples and
        ``"cell"`` included)."""
        out: dict[Any, float] = dict(self.points)
        if self.long is not None:
            out |= {(r, w, r + w - 1): c for (r, w), c in self.long.points if r > 1}
        if self.cell:
            out["cell"] = self.cell
        return out

    def __repr__(self) -> str:
        return "WindowCost({" + ", ".join(f"{k}: {c:.2f}" for k, c in self.table().items()) + "})"

    @classmethod
    def measure(cls, runner: Any, max_rows: int, max_width: int, repeats: int = 2,
                context: int = 256) -> WindowCost:
        """Time forwards of ``rows`` slots (from slot 0; 1, ``max_rows`` and every fourth part
        of it: 8 -> 1, 2, 8) of ``width`` positions each (one row: every width up to
        ``max_width`` when that is at most :data:`DENSE_WIDTHS`, since small matrix products are
        lumpy on CPUs (SmolLM2 on 2 cores: 4 positions cost 1.55 forwards, 3 cost 1.16; 13-15
        cost 2.35, 16 cost 2.05); more rows and wider windows: 1, 2, 4, .. and ``max_width``, a
        power of two just below it left out), after ``context`` cached positions, with the
        logits of every position (the verification needs them all): the fastest of
        ``repeats`` after one warm-up forward at the largest shape; ``"cell"``: a log-softmax
        over the largest window's logits, per position and row. On a runner that packs its
        windows (``runner.packs_windows``), also packed windows of one long row and the others
        one token each (keys ``(rows, width, rows + width - 1)``; carried as the runner does,
        rounded up to a multiple of ``PACK_MULTIPLE`` tokens; none where that is the grid).
        Call while no request holds a slot: the writes land in free positions (a paged
        cache's free slots write to its null block)."""
        dev = runner.device
        size = runner.max_seq_len
        top_w = max(1, min(max_width, size))
        sparse = sorted({1 << i for i in range(top_w.bit_length()) if (1 << i) < top_w - 1} | {1, top_w})
        dense = list(range(1, top_w + 1)) if top_w <= DENSE_WIDTHS else sparse
        rows = sorted({1} | {max_rows >> (2 * j) for j in range(8) if max_rows >> (2 * j) >= 1})

        points: dict[tuple[int, ...], float] = {}

        def forward(b: int, w: int, packed: bool = False) -> float:
            c = max(0, min(context, size - w))
            ids = torch.zeros(b, w, dtype=torch.long, device=dev)
            pos = (torch.arange(w, device=dev) + c)[None].expand(b, w).contiguous()
            length = torch.full((b,), c + w, dtype=torch.long, device=dev)
            _sync(dev)
            t0 = time.perf_counter()
            if packed:  # one row of w tokens, the others one each (as the runner rounds them)
                widths = round_packed(np.array([w] + [1] * (b - 1)), w)
                runner.forward_packed(ids, pos, length, 0, runner.kv_len(c + w), widths)
            else:
                runner.forward(ids, pos, length, 0, runner.kv_len(c + w), keep=w)
            _sync(dev)
            return time.perf_counter() - t0

        def sampling(x: torch.Tensor) -> float:
            _sync(dev)
            t0 = time.perf_counter()
            torch.log_softmax(x, -1)
            _sync(dev)
            return time.perf_counter() - t0

        with torch.inference_mode():
            forward(rows[-1], top_w)  # warm-up
            logits = torch.zeros(rows[-1] * top_w, runner.adapter.vocab_size, device=dev)
            points["cell"] = min(sampling(logits) for _ in range(repeats + 1)) / logits.shape[0]
            for b in rows:
                for w in (dense if b == 1 else sparse):
                    points[(b, w)] = min(forward(b, w) for _ in range(repeats))
                    if b > 1 and w > 1 and getattr(runner, "packs_windows", False) and \
                            round_packed(np.array([w] + [1] * (b - 1)), w) is not None:
                        points[(b, w, b + w - 1)] = min(forward(b, w, True) for _ in range(repeats))
        return cls(points)


def _interp(pts: Sequence[tuple[int, float]], x: float) -> float:
    """Piecewise-linear ``pts`` (ascending x) at ``x``: flat below the first, linear beyond
    the last two."""
    if x <= pts[0][0] or len(pts) == 1:
        return pts[0][1]
    for (t0, c0), (t1, c1) in zip(pts, pts[1:], strict=False):
        if x <= t1:
            return c0 + (c1 - c0) * (x - t0) / (t1 - t0)
    (t0, c0), (t1, c1) = pts[-2], pts[-1]
    return c1 + (c1 - c0) / (t1 - t0) * (x - t1)


def _rounded(tokens: Any) -> Any:
    """Token counts as a packed forward carries them (up to a multiple of ``PACK_MULTIPLE``)."""
    return -(-np.asarray(tokens) // PACK_MULTIPLE) * PACK_MULTIPLE


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


@dataclass
class _Calibration:
    predicted: float = 0.0  # drafted tokens' expected acceptances, by the estimates they were planned with
    accepted: float = 0.0  # ... and the tokens accepted

    def add(self, predicted: float, accepted: float, decay: float = CALIB_DECAY) -> None:
        self.predicted = self.predicted * decay + predicted
        self.accepted = self.accepted * decay + accepted

    @property
    def factor(self) -> float:
        f = (self.accepted + CALIB_WEIGHT) / (self.predicted + CALIB_WEIGHT)
        return min(max(f, CALIB_RANGE[0]), CALIB_RANGE[1])


@dataclass
class _Snapshot:
    counts: dict[int, _Counts | None]  # slot -> over all its drafts (None: none)
    own: dict[int, dict[int, _Counts]]  # slot -> evidence class -> the request's
    pooled: dict[int, _Counts]  # evidence class -> over every request
    planned: dict[int, tuple[float, float]]  # slot -> the (h, g) its pending multi-row draft was planned with
    calibration: _Calibration


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
    evidence_prior : mapping, optional
        ``{evidence class: h}`` before any evidence of that class (default: ``prior``'s h).
    """

    def __init__(self, k: int, draft_cost: float, cost: WindowCost, prior: tuple[float, float] = (0.6, 0.6),
                 enabled: bool = True, evidence_prior: Mapping[int, float] | None = None) -> None:
        self.k, self.draft_cost, self.cost, self.enabled = k, draft_cost, cost, enabled
        self.prior = prior
        self.evidence_prior = dict(evidence_prior or {})
        for e, h in self.evidence_prior.items():
            if not 0.0 <= h <= 1.0:
                raise ValueError(f"evidence_prior[{e}] must be in [0, 1], got {h}")
        self._counts: dict[int, _Counts] = {}
        self._pooled: dict[int, _Counts] = {}  # evidence class -> counts over every request
        self._own: dict[int, dict[int, _Counts]] = {}  # slot -> evidence class -> the request's counts
        self._planned: dict[int, tuple[float, float]] = {}  # slot -> (h, g) of its pending multi-row draft
        self._calibration = _Calibration()  # multi-row windows: accepted / predicted tokens

    @classmethod
    def for_drafter(cls, drafter: Any, k: int, cost: WindowCost, enabled: bool = True) -> DraftPolicy:
        """The policy for a built drafter: its ``cost``, ``prior`` and, when it has one, its
        ``evidence_prior``."""
        return cls(k, drafter.cost, cost, drafter.prior, enabled, getattr(drafter, "evidence_prior", None))

    def admit(self, slot: int) -> None:
        """A new request in ``slot`` starts from the prior."""
        self._counts[slot] = _Counts()
        self._own.pop(slot, None)
        self._planned.pop(slot, None)

    def acceptance(self, slot: int, confident: bool = False, evidence: int = 0,
                   own: bool = False) -> tuple[float, float]:
        """The request's ``(h, g)`` estimate (``h`` at least :data:`CONFIDENT_HIT` when the
        drafter is confident this step, and at least the pooled estimate of the step's
        ``evidence`` class when it has one). ``own``: with a class, ``h`` is instead the
        request's own record with the class around the pooled one (calibrated; :meth:`plan`
        asks for it when a window has more than one row)."""
        c = self._counts.setdefault(slot, _Counts())
        h0, g0 = self.prior
        h = (c.hits + PRIOR_WEIGHT * h0) / (c.drafts + PRIOR_WEIGHT)
        g = (c.kept + PRIOR_WEIGHT * g0) / (c.tries + PRIOR_WEIGHT)
        if evidence:
            p = self._pooled.get(evidence, _Counts())
            he = self.evidence_prior.get(evidence, h0)
            pooled = (p.hits + PRIOR_WEIGHT * he) / (p.drafts + PRIOR_WEIGHT)
            if own:
                c_e = self._own.get(slot, {}).get(evidence, _Counts())
                return (c_e.hits + PRIOR_WEIGHT * pooled) / (c_e.drafts + PRIOR_WEIGHT), g
            h = max(h, pooled)
        return (max(h, CONFIDENT_HIT) if confident else h), g

    def plan(self, slots: Sequence[int], caps: Sequence[int], confident: Sequence[bool] = (),
             rows: int | None = None, evidence: Sequence[int] = (), packed: bool = False) -> list[int]:
        """Draft length per row (``caps[r]``: the most row ``r`` may draft, ``confident[r]``:
        the drafter is sure of row ``r``'s draft this step, ``evidence[r]``: the class of row
        ``r``'s draft, 0 for none). ``rows``: the batch rows a step computes (free slots between
        the lowest and the highest included; default ``len(slots)``). ``packed``: the window
        runs packed (:meth:`WindowCost.packed`: each row pays for its own drafts), so rows
        draft different lengths: the drafted tokens are taken in order of their expected
        acceptance while that raises the expected tokens per unit of cost."""
        caps = [min(self.k, max(0, c)) for c in caps]
        if not self.enabled:
            return caps
        B = len(slots)
        n = max(B, rows or 0)
        sure = list(confident) or [False] * B
        ev = list(evidence) or [0] * B
        hg = [self.acceptance(s, sure[r], ev[r], n > 1) for r, s in enumerate(slots)]
        base = self.cost(n, 1)
        scale = self._calibration.factor if n > 1 else 1.0
        if packed and n > 1:
            out = self._plan_packed(n, hg, caps, scale, base)
        else:
            best_L, best = 0, B / (base + self.cost.sampling(n, 1))
            expected = float(B)
            for L in range(1, max(caps, default=0) + 1):
                expected += scale * sum(h * g ** (L - 1)
                                        for (h, g), c in zip(hg, caps, strict=True) if c >= L)
                spent = self.cost(n, L + 1) + self.cost.sampling(n, L + 1)
                value = expected / (spent + self.draft_cost * L * base)
                if value > best:
                    best_L, best = L, value
            out = [min(best_L, c) for c in caps]
        if n > 1 and not any(out):
            self._calibration.add(0.0, 0.0, CALIB_IDLE)
        for s, d, e, est in zip(slots, out, ev, hg, strict=True):
            if d and n > 1:
                self._planned[s] = est
            else:
                self._planned.pop(s, None)
            if d == 0:  # drift back to the prior (a request's class record: to the pooled one)
                self._counts.setdefault(s, _Counts()).decay(IDLE_DECAY)
                if e in self._own.get(s, {}):
                    self._own[s][e].decay(IDLE_DECAY)
        return out

    def _plan_packed(self, rows: int, hg: Sequence[tuple[float, float]], caps: Sequence[int], scale: float,
                     base: float) -> list[int]:
        """Per row drafts for a packed window over ``rows`` batch rows. For each longest draft
        ``L`` (the window's width, which sets a step in the cost and the sampler's work over
        every row), the drafted tokens of positions ``<= L`` (row ``r``'s ``j``-th expects
        ``scale * h_r * g_r^(j-1)``) in order of that; the best prefix over every ``L`` by
        expected tokens per unit of cost (``cost.packed``; drafting: ``L`` steps)."""
        B = len(caps)
        items = [(scale * h * g ** (j - 1), j, r)
                 for r, ((h, g), c) in enumerate(zip(hg, caps, strict=True)) for j in range(1, c + 1)]
        if not items:
            return [0] * B
        items.sort(key=lambda t: (-t[0], t[1]))  # within a row, position order
        gains, js = np.array([t[0] for t in items]), np.array([t[1] for t in items])
        best, best_L, best_T = B / (base + self.cost.sampling(rows, 1)), 0, 0
        for L in range(1, int(js.max()) + 1):
            g = gains[js <= L]
            T = np.arange(1, g.size + 1)
            spent = self.cost.packed_line(rows, L + 1, B + T) + self.cost.sampling(rows, L + 1) + \
                self.draft_cost * L * base
            value = (B + np.cumsum(g)) / spent
            i = int(value.argmax())
            if value[i] > best:
                best, best_L, best_T = float(value[i]), L, i + 1
        out = [0] * B
        for _gain, _j, r in [t for t in items if t[1] <= best_L][:best_T]:
            out[r] += 1
        return out

    def update(self, slot: int, drafted: int, accepted: int, evidence: int = 0) -> None:
        """After a verification of ``drafted`` tokens of which ``accepted`` were accepted
        (``evidence``: the draft's class, see :meth:`plan`)."""
        if not drafted:
            return
        if slot in self._planned:
            h, g = self._planned.pop(slot)
            self._calibration.add(sum(h * g ** j for j in range(drafted)), accepted)
        if evidence:
            p = self._pooled.setdefault(evidence, _Counts())
            p.decay(POOL_DECAY)
            p.drafts += 1
            p.hits += accepted > 0
            own = self._own.setdefault(slot, {}).setdefault(evidence, _Counts())
            own.decay(DECAY)
            own.drafts += 1
            own.hits += accepted > 0
        c = self._counts.setdefault(slot, _Counts())
        c.decay(DECAY)
        c.drafts += 1
        if accepted:
            c.hits += 1
            c.tries += min(accepted + 1, drafted) - 1
            c.kept += accepted - 1

    def snapshot(self, slots: Sequence[int]) -> _Snapshot:
        """Copies of the slots' counts (over all drafts and per evidence class) and the pooled
        ones, for :meth:`restore` (a failed call is undone)."""
        return _Snapshot({s: None if s not in self._counts else dataclasses.replace(self._counts[s])
                          for s in slots},
                         {s: {e: dataclasses.replace(c) for e, c in self._own[s].items()}
                          for s in slots if s in self._own},
                         {e: dataclasses.replace(c) for e, c in self._pooled.items()},
                         dict(self._planned), dataclasses.replace(self._calibration))

    def restore(self, snapshot: _Snapshot) -> None:
        self._pooled = dict(snapshot.pooled)
        self._planned = dict(snapshot.planned)
        self._calibration = dataclasses.replace(snapshot.calibration)  # the snapshot may be restored again
        for s, c in snapshot.counts.items():
            if c is None:
                self._counts.pop(s, None)
            else:
                self._counts[s] = c
            self._own.pop(s, None)
        self._own |= snapshot.own
