"""One speculative step for a batch: propose, verify in one target forward, commit.

1. **Propose**: per request a draft length (:class:`~.policy.DraftPolicy`: expected tokens
   per unit of measured verification cost, within its token and length budget), then the
   drafter's :class:`~.base.Drafts`.
2. **Verify**: the target scores each row's newest token and its ``K`` drafts in one
   forward (``[R, K + 1]`` positions); the sampler turns the logits into the processed
   distributions of all window positions at once (penalties of position ``j`` count the
   window's drafts before ``j``) and runs exact batched speculative sampling (accept ``x``
   with probability ``min(1, p(x)/q(x))``, else draw from ``normalize(max(p - q, 0))``,
   bonus token from ``p`` after ``K`` acceptances).
3. **Commit**: the emitted tokens go to the sampler state and the runner's newest-token
   buffer; rejected drafts never reach the penalty counts or the output (their KV entries
   sit past the row's length and are overwritten). One host transfer per step.

May call: the runner, the sampler, the drafter, :mod:`.policy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.graphs import Capture
from ..engine.runner import ModelRunner, Rows
from ..nvtx import nvtx_range
from ..outputs import LogProbabilities, StepStats
from ..params import DEFAULT_MAX_NEW_TOKENS
from .base import Drafter, DraftRequest, Drafts, SpecStats
from .policy import DraftPolicy

__all__ = ["SpecRow", "SpeculativeStep"]


@dataclass(frozen=True)
class SpecRow:
    """What one request got from a speculative step: its emitted tokens (the accepted drafts
    then one corrected or bonus token) with their logprobs, and the draft counts."""

    tokens: list[int]
    logprobs: list[LogProbabilities | None]
    drafted: int
    accepted: int


class SpeculativeStep:
    """Speculative decoding for a generator's batch.

    Parameters
    ----------
    drafter : Drafter
        Built from the user's drafter config with the target runner and sampler.
    runner, sampler
        The target's.
    k : int
        Longest draft.
    policy : DraftPolicy
        Draft lengths per request and step.
    """

    def __init__(self, drafter: Drafter, runner: ModelRunner, sampler: Any, k: int,
                 policy: DraftPolicy, guidance: Any = None) -> None:
        self.drafter, self.runner, self.sampler = drafter, runner, sampler
        self.k, self.policy, self.guidance = k, policy, guidance
        self.stats = SpecStats()  # counted by the generator once a call succeeds

    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], steering: Sequence[Any]) -> None:
        """Requests just prefilled into the contiguous ``slots``."""
        for s in slots:
            self.policy.admit(s)
        self.drafter.admit(slots, prompts, steering)

    def release(self, slot: int) -> None:
        self.drafter.release(slot)

    def enable_graphs(self, capture: Capture | None = None) -> None:
        """The drafter's CUDA graphs (a draft model's decode steps; the target's windows are
        the runner's)."""
        self.drafter.enable_graphs(capture)

    def checkpoint(self, slots: list[int]) -> Any:
        """What a failed call must give back for ``slots``: the draft policy counts."""
        return self.policy.snapshot(slots)

    def restore(self, checkpoint: Any, lengths: dict[int, int]) -> None:
        """Undo a failed call: policy counts back, draft caches cut to the target's
        ``lengths`` (slot -> tokens in its cache again)."""
        self.policy.restore(checkpoint)
        for slot, length in lengths.items():
            self.drafter.truncate(slot, length)

    def requests(self, rows: Sequence[Any], tokens: Sequence[Sequence[int]], max_seq_len: int
                 ) -> list[DraftRequest] | None:
        """Draft requests for ``rows`` (contexts) whose known tokens are ``tokens[r]`` (prompt,
        generated and pending; the last one newest), or None when no row may draft."""
        caps, sure, ev, fill = [], [], [], []
        for c, seen in zip(rows, tokens, strict=True):
            limit = c.params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
            produced = len(seen) - len(c.prompt_token_ids)
            cap = max(0, min(self.k, limit - produced - 1, max_seq_len - c.length - 1) if c.speculate else 0)
            caps.append(cap)
            fill.append(min(cap, self.drafter.available(c.slot, seen)) if cap else 0)  # what it can draft
            sure.append(bool(fill[-1]) and self.drafter.confident(c.slot, seen))
            ev.append(self.drafter.evidence(c.slot, seen) if fill[-1] else 0)
        slots = [c.slot for c in rows]  # a step computes every slot from the lowest to the highest
        plan = self.policy.plan(slots, fill, sure, rows=self.runner.step_rows(slots), evidence=ev,
                                packed=self.runner.window_packed(slots))
        if not any(plan) and not any(c.guide is not None and cap for c, cap in zip(rows, caps, strict=True)):
            return None  # (a guided row may still jump forward over tokens its grammar forces)
        return [DraftRequest(c.slot, seen, n, cap, e)
                for c, seen, n, cap, e in zip(rows, tokens, plan, caps, ev, strict=True)]

    def run(self, rows: Sequence[Any], requests: Sequence[DraftRequest], lengths: Sequence[int],
            stats: StepStats, edit: Callable[[torch.Tensor, list[list[int]]], torch.Tensor] | None = None
            ) -> list[SpecRow] | None:
        """Draft, verify and commit for ``rows``; None (nothing done) when no row got a draft.
        ``edit(logits [R, K + 1, V], drafts)``: the window's logits as the verification should
        see them (logits processors; ``drafts[r]``: row ``r``'s drafts on the host)."""
        drafts = self.drafter.propose(requests, lengths) if any(r.budget for r in requests) else None
        guides = [c.guide for c in rows]
        mask, forced = None, [0] * len(rows)
        if any(g is not None for g in guides):
            drafts, mask, forced = self._guided(rows, requests, drafts)
        if drafts is None or not any(drafts.lengths):
            return None
        slots = [r.slot for r in requests]
        with nvtx_range("decodekit.verify", len(rows)):
            with stats.timing("forward_s"):
                win = self.runner.window(slots, drafts.tokens, lengths, drafts.lengths)
                logits = win.logits  # [R, K + 1, V]
            with stats.timing("sample_s"), nvtx_range("decodekit.sample", len(rows)):
                if edit is not None:
                    host = drafts.tokens.tolist()
                    logits = edit(logits, [h[:n] for h, n in zip(host, drafts.lengths, strict=True)])
                lp_src = self._logprob_source(rows, logits, slots, drafts.tokens, mask)  # before the commit
                out, n_acc = self._verify(win, logits, slots, drafts, mask)
                self.runner.set_last_tokens(win.index, out.gather(1, n_acc.long()[:, None])[:, 0])
                out_h, acc_h = out.tolist(), n_acc.tolist()  # the step's one host transfer
                if mask is not None:
                    self.guidance.accept(guides, [o[: a + 1] for o, a in zip(out_h, acc_h, strict=True)])
                lps = None if lp_src is None else self._logprobs(rows, lp_src, out, out_h)
        stats.steps += 1
        stats.forced_tokens += sum(min(f, a) for f, a in zip(forced, acc_h, strict=True))
        # a forced run is not what the drafter drafted: it catches up from before the window
        self.drafter.committed(requests, [0 if f else a for f, a in zip(forced, acc_h, strict=True)],
                               drafts.tokens.shape[1])
        result = []
        for r, (d, o, a) in enumerate(zip(drafts.lengths, out_h, acc_h, strict=True)):
            result.append(SpecRow(o[: a + 1], [None] * (a + 1) if lps is None else lps[r][: a + 1], d, a))
            if d and not forced[r]:  # jump-forward runs say nothing about the drafter
                self.policy.update(requests[r].slot, d, a, requests[r].evidence)
        return result

    def _guided(self, rows: Sequence[Any], requests: Sequence[DraftRequest], drafts: Drafts | None
                ) -> tuple[Drafts | None, torch.Tensor | None, list[int]]:
        """Guided rows: drafts cut at the first token the grammar refuses (exact for point-mass
        drafts and greedy rows; a sampled guided row with drawn drafts keeps none, since a cut
        changes what the draws stand for); jump-forward: where the grammar forces more tokens
        than survive, the forced run is the row's draft, a point mass accepted with
        probability 1. Returns the drafts, the window's masks and the forced count per row."""
        R = len(rows)
        guides = [c.guide for c in rows]
        forced = self.guidance.forced(guides, [r.room for r in requests])
        width = max([len(f) for f in forced] + ([drafts.tokens.shape[1]] if drafts is not None else [0]))
        if width == 0:
            return None, None, [0] * R
        tokens = torch.full((R, width), -1, dtype=torch.long, device=self.runner.device)
        lengths = [0] * R
        if drafts is not None:
            tokens[:, : drafts.tokens.shape[1]] = drafts.tokens
            lengths = [0 if c.guide is not None and drafts.q is not None and not c.params.is_greedy else n
                       for c, n in zip(rows, drafts.lengths, strict=True)]
        mask, cut = self.guidance.window(guides, tokens, lengths)
        q = drafts.q if drafts is not None else None
        n_forced = [0] * R
        for r, f in enumerate(forced):
            if len(f) > cut[r]:  # the forced run replaces the drafter's shorter valid prefix
                tokens[r, : len(f)] = torch.tensor(f, device=tokens.device)
                cut[r] = n_forced[r] = len(f)
        if any(n_forced):  # walk the runs in the grammars (cut before one that completes it)
            mask, cut = self.guidance.window(guides, tokens, cut)
            n_forced = [min(n, c) for n, c in zip(n_forced, cut, strict=True)]
            if q is not None:  # a point mass where the run replaced drawn drafts
                q = _with_point_masses(q, tokens, n_forced, width)
        col = torch.arange(width, device=tokens.device)
        tokens = torch.where(col[None, :] < torch.tensor(cut, device=tokens.device)[:, None], tokens, -1)
        return Drafts(tokens, cut, q), mask, n_forced

    def _verify(self, win: Rows, logits: torch.Tensor, slots: list[int], drafts: Drafts,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Processed distributions of the window's ``logits [R, K + 1, V]`` (within ``mask``:
        guided rows), verification, commit to the sampler state: ``(tokens int64 [R, K + 1]
        (-1 padded), accepted int32 [R])``. No upload: the window's carried the slots and
        draft counts."""
        sp = self.sampler
        # greedy rows: p is one-hot, so any q accepts exactly the drafts equal to the argmax
        fast = sp.verify_greedy(logits, slots, drafts.tokens, win.n_draft, index=win.index32, mask=mask)
        if fast is None and drafts.q is None:  # point masses: only the drafts' probabilities
            fast = sp.verify_point_masses(logits, slots, drafts.tokens, win.n_draft, index=win.index32,
                                          mask=mask)
        if fast is not None:
            out, n_acc = fast
        else:
            p = sp.window_probs(logits, slots, drafts.tokens, index=win.index32, mask=mask)
            out, n_acc = sp.verify(p, drafts.q, drafts.tokens, win.n_draft, slots, index=win.index32)
        sp.accept(slots, out, index=win.index32)
        return out, n_acc

    def _logprob_source(self, rows: Sequence[Any], logits: torch.Tensor, slots: list[int],
                        drafts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Log-probabilities ``[R, K + 1, V]`` the rows' logprobs come from, with the definitions
        of plain steps (None when no row asks): the target's log-softmax at each position (raw
        mode) or the processed log-probabilities of each window position (processed mode; read
        before the step's tokens are committed to the sampler state)."""
        if all(c.params.logprobs is None for c in rows):
            return None
        if self.sampler.logprobs_mode == "raw":
            return self.sampler.raw_logprobs(logits)
        return self.sampler.window_logprobs(logits, slots, drafts, mask=mask)

    @staticmethod
    def _logprobs(rows: Sequence[Any], src: torch.Tensor, out: torch.Tensor, out_h: list[list[int]]
                  ) -> list[list[LogProbabilities | None]]:
        """Per row and emitted token, its :class:`LogProbabilities` from ``src [R, K + 1, V]``
        (None for rows that do not ask)."""
        chosen = src.gather(2, out.clamp(min=0)[..., None])[..., 0].tolist()  # [R][K+1]
        n = max(c.params.logprobs for c in rows if c.params.logprobs is not None)
        top_v = top_i = None
        if n > 0:
            top = src.topk(n, -1)
            top_v, top_i = top.values.tolist(), top.indices.tolist()
        res = []
        for r, c in enumerate(rows):
            k = c.params.logprobs
            row: list[LogProbabilities | None] = []
            for j, t in enumerate(out_h[r]):
                if k is None or t < 0:
                    row.append(None)
                    continue
                top_d = dict(zip(top_i[r][j][:k], top_v[r][j][:k], strict=True)) if k else {}
                top_d.setdefault(t, chosen[r][j])
                row.append(LogProbabilities([chosen[r][j]], [top_d]))
            res.append(row)
        return res


def _with_point_masses(q: torch.Tensor, tokens: torch.Tensor, n_forced: Sequence[int], width: int
                       ) -> torch.Tensor:
    """``q [R, K, V]`` widened to ``width`` positions, with one-hot rows at the forced tokens."""
    R, K, V = q.shape
    out = torch.zeros(R, width, V, dtype=q.dtype, device=q.device)
    out[:, :K] = q
    for r, n in enumerate(n_forced):
        if n:
            out[r, :n] = 0.0
            out[r, torch.arange(n, device=q.device), tokens[r, :n]] = 1.0
    return out
