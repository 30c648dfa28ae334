"""The batched sampler: per-request state in stable device rows (slots), one fused path
per step.

A scheduler ``add``s a request to a free slot once, then each step hands ``sample`` the
logits ``[B, V]`` of the rows it runs and the slot of each row. The state lives in a
:class:`~decodekit.sampling.slot_state.SlotState`; ``sample`` commits its tokens to it on
the device, ``accept`` commits tokens chosen elsewhere.

This module only dispatches: on CUDA (or with ``backend="triton"``) a step is two Triton
launches (:mod:`decodekit.kernels`: ``process`` then ``select``) with no host
synchronisation; elsewhere it runs the torch reference
(:mod:`decodekit.sampling.reference`), which computes the same function. Speculative
decoding uses the window API: :meth:`Sampler.window_probs` (the target distributions of
a whole draft window in one process + one select launch), :meth:`Sampler.verify` and
:meth:`Sampler.draw`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .._checks import check_device, check_int
from ..kernels import layout as L
from ..kernels.launch import row_split
from ..outputs import SamplerOutput
from ..params import SamplingParams
from . import reference as ref
from .slot_state import Slots, SlotState

_ARGMAX_CHANGING = L.BIAS | L.PENALTY | L.SUPPRESS | L.BADSEQ  # what can move a greedy row's argmax

__all__ = ["Sampler", "verify"]

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def verify(
    p: torch.Tensor,
    q: torch.Tensor | None,
    draft: torch.Tensor,
    n_draft: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``draft [B, K]`` (``n_draft [B]`` valid per row) against target ``p [B, K+1, V]``
    and draft ``q [B, K, V]`` (None: a drafter without a distribution, i.e. point masses),
    with randomness keyed by ``seed [B]`` and ``position [B]`` (the step counter of each
    row's first draft).

    Returns ``(tokens int64 [B, K+1], n_accepted int32 [B])``: each row emits its
    ``n_accepted`` accepted drafts then one corrected or bonus token; the rest is -1.
    ``backend``: ``"triton"`` (the verify kernel), ``"torch"`` (the reference) or
    ``"auto"`` (the kernel on CUDA). ``n_draft`` is range-checked when it is on the CPU;
    a device tensor is clamped to ``[0, K]`` instead (never read back).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if p.dim() != 3 or draft.dim() != 2 or p.shape[1] != draft.shape[1] + 1:
        raise ValueError(f"p must be [B, K+1, V] for draft [B, K]; got {tuple(p.shape)}")
    K = draft.shape[1]
    if n_draft.device.type == "cpu":
        if bool((n_draft < 0).any()) or bool((n_draft > K).any()):
            raise ValueError(f"n_draft must be in [0, {K}]")
    else:
        n_draft = n_draft.clamp(0, K)
    p, q = p.float(), None if q is None else q.float()
    if backend == "triton" or (backend == "auto" and p.device.type == "cuda"):
        from ..kernels.verify import verify as verify_kernel

        return verify_kernel(p.contiguous(), None if q is None else q.contiguous(), draft, n_draft,
                             seed, position)
    return ref.verify_reference(p, q, draft, n_draft, seed, position)


class Sampler:
    """Batched sampler with per-request settings and seeds in stable slots.

    Parameters
    ----------
    vocab_size : int
        ``V``; logits passed to :meth:`sample` must be ``[B, V]``.
    max_batch_size : int
        Number of slots (and the largest ``B``).
    device : torch.device or str, optional
        Where state lives; defaults to CUDA when available, else CPU.
    eos_token_ids : iterable of int, optional
        Tokens suppressed (with ``stop_token_ids``) until ``min_new_tokens`` are out.
    logprobs_mode : {"raw", "processed"}
        ``raw``: log-softmax of the model's logits (vLLM's default); ``processed``:
        log of the distribution actually sampled from (after penalties,
        temperature and filters).
    backend : {"auto", "triton", "torch"}
        ``auto`` uses the Triton kernels on CUDA and the torch reference elsewhere.
    seed : int, optional
        Seeds the generator that gives unseeded requests their seeds.

    Attributes
    ----------
    state : SlotState
        The per-slot device tables and host mirrors (read them, change them through the
        sampler's methods).
    backend, device, vocab_size, max_batch_size, logprobs_mode, eos_token_ids
        As resolved from the arguments (``backend`` is ``"triton"`` or ``"torch"``).
    """

    def __init__(
        self,
        vocab_size: int,
        max_batch_size: int,
        device: torch.device | str | None = None,
        *,
        eos_token_ids: Iterable[int] | None = None,
        logprobs_mode: str = "raw",
        backend: str = "auto",
        seed: int | None = None,
    ) -> None:
        vocab_size = check_int("vocab_size", vocab_size, lambda v: 1 <= v <= L.MAX_VOCAB,
                               f"in [1, {L.MAX_VOCAB}]")
        max_batch_size = check_int("max_batch_size", max_batch_size, lambda v: v >= 1, ">= 1")
        if seed is not None:
            seed = check_int("seed", seed, lambda v: 0 <= v < 2**63, "in [0, 2**63 - 1] or None")
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.device = check_device("device", device) or torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.backend = backend
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.logprobs_mode = logprobs_mode
        self.eos_token_ids = tuple(sorted({int(t) for t in (eos_token_ids or ())}))
        for t in self.eos_token_ids:
            if not 0 <= t < vocab_size:
                raise ValueError(f"eos_token_ids entry {t} outside [0, {vocab_size})")
        gen = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        self.state = SlotState(vocab_size, max_batch_size, self.device,
                               eos_token_ids=self.eos_token_ids, generator=gen,
                               kernels=backend == "triton")
        # Launch scratch (Triton path): processed rows and per-chunk partials, grown on demand.
        self._work: torch.Tensor | None = None
        self._part_f = torch.empty(max_batch_size * L.MAX_CHUNKS * L.NPART, device=self.device)
        self._part_i = torch.empty(max_batch_size * L.MAX_CHUNKS, dtype=torch.int32,
                                   device=self.device)
        self._band_buf = None  # kernels.bands.BandBuffers, made on the first filtered step

    # ------------------------------------------------------------------ slots
    def add(self, slot: int, params: SamplingParams,
            prompt_token_ids: Sequence[int] | torch.Tensor | None = None, *,
            eos_token_ids: Iterable[int] | None = None, seed: int | None = None) -> None:
        """Put a request in ``slot`` (which must be free) with its settings and prompt.
        ``seed`` seeds a request whose ``params.seed`` is None (default: :meth:`new_seed`).

        Raises ``ValueError`` for a bad slot, token ids outside ``[0, V)`` or a request
        whose masks leave no token to sample.
        """
        if seed is not None:
            seed = check_int("seed", seed, lambda v: 0 <= v < 2**63, "in [0, 2**63 - 1] or None")
        self.state.add(slot, params, prompt_token_ids, eos_token_ids, seed)

    def new_seed(self) -> int:
        """A seed for an unseeded request, from the sampler's generator (``Sampler(seed=...)``
        makes the sequence reproducible)."""
        return self.state.new_seed()

    def check(self, params: SamplingParams,
              prompt_token_ids: Sequence[int] | torch.Tensor | None = None, *,
              eos_token_ids: Iterable[int] | None = None) -> tuple[list[int], tuple[int, ...]]:
        """Validate a request against this sampler without changing any state; the checks
        :meth:`add` makes. Returns ``(prompt ids, eos ids)``."""
        return self.state.check(params, prompt_token_ids, eos_token_ids)

    def remove(self, slot: int) -> None:
        """Free ``slot``; its state is overwritten by the next ``add``."""
        self.state.remove(slot)

    def params(self, slot: int) -> SamplingParams:
        """The settings of the request in ``slot``."""
        return self.state.params(slot)

    @property
    def free_slots(self) -> list[int]:
        """Slots without a request, ascending."""
        return self.state.free_slots

    def all_greedy(self, slots: Slots) -> bool:
        """True when every live slot among ``slots`` (all slots for a device tensor) is
        greedy: their distributions are one-hot at the argmax."""
        return self.state.all_greedy(slots)

    def step_counters(self, slots: Slots) -> torch.Tensor:
        """int32 ``[B]`` on the device: tokens committed per slot (plus :meth:`advance`),
        the position that keys each request's randomness."""
        return self.state.step_counters(self.state.index(slots))

    def advance(self, slots: Slots, n: int) -> None:
        """Move the step counters of ``slots`` forward by ``n >= 0`` without committing
        tokens (no penalties, no history): the randomness of a request resumed at
        position ``n``."""
        n = check_int("n", n, lambda v: v >= 0, ">= 0")
        self.state.advance(self.state.index(slots), n)

    # ------------------------------------------------------------------ steps
    def sample(self, logits: torch.Tensor, slots: Slots, *, index: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> SamplerOutput:
        """Draw one token per row of ``logits [B, V]`` for the requests in ``slots [B]``
        (a list, or an int tensor on the sampler's device; no slot twice). ``index``: the
        caller's upload of ``slots`` (int32 ``[B]`` on the device), which saves the sampler's.
        ``mask``: allowed tokens per row, int32 ``[B, ceil(V / 32)]`` on the device (bit
        ``i % 32`` of word ``i // 32``; guided decoding), applied inside the processing pass;
        where it meets nothing the request's own masks allow, it wins (see
        :func:`~decodekit.sampling.reference.process_logits`). Raw logprobs stay the model's.

        The tokens are committed to each slot's state (penalty counts, step counter,
        bad-word history). On the Triton backend there is no host synchronisation (the
        torch backend is the CPU path and may synchronise).
        """
        idx = self._prepare(logits, slots, index)
        mask = self._check_mask(mask, logits.shape[0])
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        flags, nlp = self.state.union_flags(slots), self.state.max_logprobs(slots)
        if self.backend == "torch":
            return self._sample_reference(logits, slots, idx, flags, nlp, mask)
        from ..kernels.select import select

        B = logits.shape[0]
        work = self._work_rows(B) if flags & L.FILTER or self.logprobs_mode == "processed" else None
        split = self._process(logits, idx, flags, work, need_raw=nlp >= 0, mask=mask)
        bands = self._bands(work, B, idx, flags, split)
        chunks = split[0]
        out_tok = torch.empty(B, dtype=torch.int64, device=self.device)
        out_lp = torch.empty(B, dtype=torch.float32, device=self.device) if nlp >= 0 else None
        mode = 0 if nlp < 0 else (1 if self.logprobs_mode == "raw" else 2)
        t, st = self.state.tables(flags), self.state
        select(logits, idx, st.fparams, st.iparams, st.seed, t.counts, t.hist, work,
               self._part_f, self._part_i, out_tok, out_lp, None, chunks=chunks,
               has_filter=bool(flags & L.FILTER), logprob_mode=mode, commit=True, bands=bands)
        top = None
        if nlp > 0:
            # processed mode: the select kernel wrote -inf over the filtered tokens of `work`
            top = self.raw_logprobs(logits) if mode == 1 else torch.log_softmax(work[:B], -1)
        return self._output(out_tok, (out_lp, top), nlp)

    def probs(self, logits: torch.Tensor, slots: Slots, *, mask: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The processed distribution fp32 ``[B, V]`` of ``logits [B, V]`` for ``slots [B]``
        (one-hot for greedy rows); commits nothing. ``mask``: as in :meth:`sample`."""
        idx = self._prepare(logits, slots)
        mask = self._check_mask(mask, logits.shape[0])
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        if self.backend == "torch":
            rows = self.state.rows(idx)
            rows.allowed = mask
            return ref.processed_probs_from_logits(logits, rows)
        return self._probs_triton(logits, idx, self.state.union_flags(slots), mask=mask)

    def passes(self, logits: torch.Tensor, slots: Slots, *,
               banded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Profiling aid (Triton backend): the tokens a sampling step would draw for
        ``logits [B, V]`` and how many passes over each row it makes (int32 ``[B]``: the
        process pass, the banded passes, the select passes; counted by the kernels). Commits
        nothing; runs the counting variants of the kernels. ``banded=False`` skips the banded
        launches: every threshold by the select launch's pivot search (their fallback)."""
        if self.backend != "triton":
            raise ValueError("passes() counts the Triton kernels' passes: use backend='triton'")
        from ..kernels.select import select

        idx = self._prepare(logits, slots)
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        flags, B = self.state.union_flags(slots), logits.shape[0]
        work = self._work_rows(B) if flags & L.FILTER else None
        split = self._process(logits, idx, flags, work, need_raw=False)
        count = torch.ones(B, dtype=torch.int32, device=self.device)  # the process pass
        bands = self._bands(work, B, idx, flags, split, count) if banded else None
        chunks = split[0]
        tok = torch.empty(B, dtype=torch.int64, device=self.device)
        t, st = self.state.tables(flags), self.state
        select(logits, idx, st.fparams, st.iparams, st.seed, t.counts, t.hist, work,
               self._part_f, self._part_i, tok, None, None, chunks=chunks,
               has_filter=bool(flags & L.FILTER), logprob_mode=0, commit=False, bands=bands,
               passes=count)
        return tok, count

    def processed_logprobs(self, logits: torch.Tensor, slots: Slots) -> torch.Tensor:
        """What ``logprobs_mode="processed"`` reports, fp32 ``[B, V]``: the log-softmax of the
        processed logits with filtered tokens at -inf; commits nothing. Torch ops on any
        device (the reference path; may synchronise)."""
        idx = self._prepare(logits, slots)
        return self._reference_logprobs_processed(logits, self.state.rows(idx))

    @staticmethod
    def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
        """What ``logprobs_mode="raw"`` reports: fp32 log-softmax of ``logits [..., V]``, NaN
        counted as -inf."""
        x = logits.float()
        return torch.log_softmax(torch.where(torch.isnan(x), -math.inf, x), -1)

    # ------------------------------------------------------------------ speculative windows
    def window_probs(self, logits: torch.Tensor, slots: Slots, drafts: torch.Tensor, *,
                     index: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Processed distributions of a speculative window; commits nothing.

        ``logits [R, W, V]``: the target's logits at the ``W`` window positions of ``R``
        requests in ``slots [R]`` (distinct); ``drafts [R, W-1]`` int64, ``-1`` = no draft.
        Returns fp32 ``[R, W, V]``: position ``j`` of request ``r`` is the distribution of
        :meth:`probs` as if ``drafts[r, :j]`` had been accepted (each valid draft counts as
        an output token for the penalties, advances the step counter of the
        ``min_new_tokens`` suppression and extends the bad-word history). On the Triton
        path: one process and one select launch over the ``R * W`` rows (plus the banded
        filter's when rows filter). ``index``: as in :meth:`sample`. ``mask``: int32
        ``[R * W, ceil(V / 32)]``, the allowed tokens of each window position (row ``r * W + j``;
        guided decoding, as in :meth:`sample`).
        """
        idx, drafts = self._prepare_window(logits, slots, drafts, index)
        R, W, V = logits.shape
        mask = self._check_mask(mask, R * W)
        flat = logits.reshape(R * W, V)
        flat = flat if flat.stride(1) == 1 else flat.contiguous()
        if self.backend == "torch":
            rows = self.state.window_rows(idx, drafts)
            rows.allowed = mask
            return ref.processed_probs_from_logits(flat, rows).view(R, W, V)
        rows_slot = idx[:, None].expand(R, W).reshape(R * W)  # several rows per slot
        return self._probs_triton(flat, rows_slot, self.state.union_flags(slots), drafts,
                                  mask=mask).view(R, W, V)

    def window_logprobs(self, logits: torch.Tensor, slots: Slots, drafts: torch.Tensor, *,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """What ``logprobs_mode="processed"`` reports at each window position, fp32
        ``[R, W, V]`` (shapes, state rule and ``mask`` of :meth:`window_probs`); commits
        nothing. Torch ops on any device (may synchronise)."""
        idx, drafts = self._prepare_window(logits, slots, drafts)
        R, W, V = logits.shape
        rows = self.state.window_rows(idx, drafts)
        rows.allowed = self._check_mask(mask, R * W)
        return self._reference_logprobs_processed(logits.reshape(R * W, V), rows).view(R, W, V)

    def verify(self, p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor,
               n_draft: Sequence[int] | torch.Tensor, slots: Slots, *, index: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact speculative verification of ``drafts [R, W-1]`` (``n_draft [R]`` valid per
        row) against the target ``p [R, W, V]`` (e.g. :meth:`window_probs`) and the draft
        distributions ``q [R, W-1, V]`` (None: point masses), keyed by each slot's seed and
        current step counter. Commits nothing: :meth:`accept` the emitted tokens.

        Returns ``(tokens int64 [R, W] -1 padded, n_accepted int32 [R])``. ``index``: as in
        :meth:`sample`.
        """
        idx = self.state.index(slots, index)
        if p.dim() != 3 or p.shape[0] != idx.shape[0] or p.shape[2] != self.vocab_size:
            raise ValueError(f"p must be [{idx.shape[0]}, W, {self.vocab_size}], got {tuple(p.shape)}")
        nd = _draft_counts(n_draft, p.shape[1])
        if nd.device.type == "cpu":
            nd = self.state.upload(nd)
        seed = self.state.seeds(idx)
        position = self.state.step_counters(idx).long()
        return verify(p, q, drafts, nd, seed, position,
                      backend="triton" if self.backend == "triton" else "torch")

    def verify_point_masses(self, logits: torch.Tensor, slots: Slots, drafts: torch.Tensor,
                            n_draft: torch.Tensor, *, index: torch.Tensor | None = None,
                            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`window_probs` then :meth:`verify` for drafts without a distribution (point
        masses: prompt lookup, greedy drafters), on the torch path without forming every
        window position's distribution (see
        :func:`~decodekit.sampling.reference.verify_point_masses_from_logits`): the same
        tokens. Shapes, ``index`` and ``mask`` as in :meth:`window_probs`; ``n_draft [R]``.
        Returns ``(tokens int64 [R, W] -1 padded, n_accepted int32 [R])``, or None on the
        Triton path (its process + select + verify launches already stay on the device).
        Commits nothing."""
        if self.backend != "torch":
            return None
        idx, drafts = self._prepare_window(logits, slots, drafts, index)
        R, W, V = logits.shape
        nd = _draft_counts(n_draft, W)
        if nd.shape != (R,):
            raise ValueError(f"n_draft must hold {R} counts, got shape {tuple(nd.shape)}")
        rows = self.state.window_rows(idx, drafts)
        rows.allowed = self._check_mask(mask, R * W)
        flat = logits.reshape(R * W, V)
        return ref.verify_point_masses_from_logits(
            flat, rows, drafts, nd.to(self.device), self.state.seeds(idx),
            self.state.step_counters(idx).long())

    def verify_greedy(self, logits: torch.Tensor, slots: Slots, drafts: torch.Tensor,
                      n_draft: torch.Tensor, *, index: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Verification without distributions when every row decodes greedily and nothing
        changes its argmax (no bias, penalties, suppressed tokens or bad words; filters keep
        the top token): drafts are accepted while they equal the argmax of the raw logits
        ``[R, W, V]``; then the argmax. What :meth:`window_probs` + :meth:`verify` give for
        such rows, in two torch ops. Returns ``(tokens int64 [R, W] -1 padded, n_accepted
        int32 [R])``, or None when a row needs the full path. Commits nothing. ``mask``: as in
        :meth:`window_probs` (the argmax is taken inside it)."""
        if not self.state.all_greedy(slots) or self.state.union_flags(slots) & _ARGMAX_CHANGING:
            return None
        self._prepare_window(logits, slots, drafts, index)
        x = logits if logits.dtype == torch.float32 else logits.float()
        x = torch.nan_to_num(x, nan=-ref.FLT_MAX)
        if mask is not None:  # no request mask here (_ARGMAX_CHANGING): the grammar's alone
            R, W, V = x.shape
            ok = ref.unpack_bitmask(self._check_mask(mask, R * W), V).view(R, W, V)
            x = x.masked_fill(~ok, -math.inf)
        top = x.argmax(-1)  # [R, W], as the plain greedy step
        R, W = top.shape
        col = torch.arange(W, device=top.device)
        ok = (drafts.to(top.device) == top[:, : W - 1]) & (col[: W - 1] < n_draft[:, None])
        n_acc = ok.int().cumprod(1).sum(1)
        return torch.where(col <= n_acc[:, None], top, -1), n_acc.int()

    def draw(self, probs: torch.Tensor, slots: Slots, *, salt: int) -> torch.Tensor:
        """One token per row of ``probs [R, V]`` (int64 ``[R]``): the exponential race keyed
        by (slot seed ^ ``salt``, the slot's step counter). Drafters pass their own salt so
        that their draws are independent of the verification's. Commits nothing."""
        salt = check_int("salt", salt, lambda v: -(2**63) <= v < 2**63, "in the int64 range")
        idx = self.state.index(slots)
        if probs.dim() != 2 or probs.shape != (idx.shape[0], self.vocab_size):
            raise ValueError(f"probs must be [{idx.shape[0]}, {self.vocab_size}], got {tuple(probs.shape)}")
        return ref.draw(probs, self.state.seeds(idx) ^ salt, self.state.step_counters(idx))

    # ------------------------------------------------------------------ state updates
    def accept(self, slots: Slots, token_ids: torch.Tensor | Sequence, *,
               index: torch.Tensor | None = None) -> None:
        """Commit tokens chosen outside :meth:`sample`: ``token_ids [B]`` or ``[B, n]``
        (negative ids are skipped), in order, to the slots' state. Host ids are checked
        against ``V``; device ids are not read back (the kernel skips ids outside ``[0, V)``).
        ``index``: as in :meth:`sample`."""
        idx = self.state.index(slots, index)
        if not isinstance(token_ids, torch.Tensor) or token_ids.device.type == "cpu":
            host = torch.as_tensor(token_ids)
            if host.numel() and bool((host >= self.vocab_size).any()):
                raise ValueError(f"token_ids entry {int(host.max())} outside [0, {self.vocab_size})")
            token_ids = host
        tok = self.state.upload(token_ids)
        if tok.dim() == 1:
            tok = tok[:, None]
        if tok.dim() != 2 or tok.shape[0] != idx.shape[0]:
            raise ValueError(f"token_ids must be [B] or [B, n] with B={idx.shape[0]}")
        self.state.accept(idx, tok.long(), self.state.union_flags(slots))

    def rollback(self, slots: Slots, token_ids: torch.Tensor | Sequence) -> None:
        """Undo :meth:`accept` of ``token_ids [B, n]`` (negative ids skipped): step counters,
        penalty counts and bad-word history go back. At most ``HIST_SLACK`` (64) tokens per
        row that uses multi-token bad words (:meth:`restore` has no limit). Host ids are
        checked against ``V``; on a CPU sampler the penalty counts are checked too (a token
        that was never accepted is a ``ValueError``); device ids are not read back."""
        slots = self.state.slot_list(slots)
        idx = self.state.index(slots)
        tok = self._token_matrix(token_ids, len(slots))
        n = int(tok.shape[1])
        if n > L.HIST_SLACK and self.state.union_flags(slots) & L.BADSEQ:
            raise ValueError(f"rollback of {n} tokens per row: at most {L.HIST_SLACK} for requests "
                             "with multi-token bad words (use checkpoint/restore)")
        self.state.rollback(idx, tok)
        if self.device.type == "cpu" and self.state.counts is not None:
            self._check_rollback_counts(slots, idx, tok)

    def checkpoint(self, slots: Slots) -> tuple:
        """An opaque device snapshot of ``slots`` for :meth:`restore` (no sync)."""
        return self.state.checkpoint(self.state.index(slots))

    def restore(self, checkpoint: tuple, token_ids: torch.Tensor | Sequence) -> None:
        """Bring the checkpoint's slots back to when it was taken, given every token committed
        to them since (``token_ids [B, n]`` in the checkpoint's slot order, -1 padded)."""
        tok = self._token_matrix(token_ids, int(checkpoint[0].shape[0]))
        self.state.restore(checkpoint, tok)

    def _token_matrix(self, token_ids: torch.Tensor | Sequence, rows: int) -> torch.Tensor:
        """``[B]`` / ``[B, n]`` ids (host ids checked against ``V``) as int64 ``[B, n]`` on the device."""
        if not isinstance(token_ids, torch.Tensor) or token_ids.device.type == "cpu":
            host = torch.as_tensor(token_ids)
            if host.is_floating_point() or host.dtype == torch.bool:
                raise ValueError(f"token_ids must be integers, got {host.dtype}")
            if host.numel() and bool((host >= self.vocab_size).any()):
                raise ValueError(f"token_ids entry {int(host.max())} outside [0, {self.vocab_size})")
            token_ids = host
        tok = self.state.upload(token_ids).long()
        tok = tok[:, None] if tok.dim() == 1 else tok
        if tok.dim() != 2 or tok.shape[0] != rows:
            raise ValueError(f"token_ids must be [B] or [B, n] with B={rows}, got {tuple(tok.shape)}")
        return tok

    def _check_rollback_counts(self, slots: list[int], idx: torch.Tensor, tok: torch.Tensor) -> None:
        """After a rollback on a CPU sampler: no penalty count may have gone negative (a token
        rolled back that was never accepted); if one did, the rollback is undone first."""
        li = idx.long()[:, None].expand_as(tok)
        pen = (tok >= 0) & ((self.state.iparams[idx.long(), L.I_FLAGS] & L.PENALTY) != 0)[:, None]
        if bool((pen & (self.state.counts[li, tok.clamp(min=0)] < 0)).any()):
            self.state.accept(idx, tok, self.state.union_flags(slots))
            raise ValueError("rollback of a token that was never accepted (its penalty count would go "
                             "negative)")

    # ------------------------------------------------------------------ helpers
    def _prepare(self, logits: torch.Tensor, slots: Slots, index: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Check ``logits [B, V]`` against ``slots``; the device slot indices int32 ``[B]``."""
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [B, {self.vocab_size}], got shape {tuple(logits.shape)}")
        self._check_logits(logits)
        idx = self.state.index(slots, index)
        if idx.shape[0] != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logits rows but {idx.shape[0]} slots")
        if idx.shape[0] > self.max_batch_size:
            raise ValueError(f"batch of {idx.shape[0]} exceeds max_batch_size {self.max_batch_size}")
        return idx

    def _prepare_window(self, logits: torch.Tensor, slots: Slots, drafts: torch.Tensor,
                        index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a window's ``logits [R, W, V]`` and ``drafts [R, W-1]``; returns the slot
        indices int32 ``[R]`` and the drafts as int64 on the device."""
        if logits.dim() != 3 or logits.shape[2] != self.vocab_size:
            raise ValueError(f"logits must be [R, W, {self.vocab_size}], got shape {tuple(logits.shape)}")
        self._check_logits(logits)
        R, W = logits.shape[:2]
        if not isinstance(drafts, torch.Tensor) or drafts.shape != (R, W - 1) or \
                drafts.is_floating_point() or drafts.is_complex():
            raise ValueError(f"drafts must be an integer tensor [{R}, {W - 1}], got "
                             f"{getattr(drafts, 'shape', type(drafts).__name__)}")
        if W - 1 > L.MAX_WINDOW_DRAFTS:
            raise ValueError(f"at most {L.MAX_WINDOW_DRAFTS} drafts per window, got {W - 1}")
        idx = self.state.index(slots, index)
        if idx.shape[0] != R or R > self.max_batch_size:
            raise ValueError(f"{R} window requests but {idx.shape[0]} slots")
        return idx, self.state.upload(drafts).to(torch.int64).contiguous()

    def _check_mask(self, mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """A guided-decoding bitmask checked against ``rows`` and the vocabulary."""
        if mask is None:
            return None
        words = -(-self.vocab_size // 32)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.int32 or mask.shape != (rows, words):
            raise ValueError(f"mask must be an int32 tensor [{rows}, {words}] (ceil(V / 32) words per row), "
                             f"got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        if mask.device.type != self.device.type:
            raise ValueError(f"mask is on {mask.device}, the sampler on {self.device}")
        return mask.contiguous()

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits dtype must be float32/float16/bfloat16, got {logits.dtype}")
        same = logits.device == self.device or (
            logits.device.type == self.device.type == "cuda"
            and (self.device.index is None or logits.device.index == self.device.index)
        )
        if not same:
            raise ValueError(f"logits are on {logits.device}, the sampler on {self.device}")

    def _work_rows(self, rows: int) -> torch.Tensor:
        """The fp32 ``[>= rows, V]`` buffer of processed logits (grown, never shrunk)."""
        if self._work is None or self._work.shape[0] < rows:
            n = max(rows, self.max_batch_size)
            self._work = torch.empty(n, self.vocab_size, dtype=torch.float32, device=self.device)
        return self._work

    def _process(self, logits: torch.Tensor, rows_slot: torch.Tensor, flags: int,
                 work: torch.Tensor | None, *, need_raw: bool, drafts: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> tuple[int, int]:
        """Launch 1 over ``logits [N, V]`` (row ``n`` reads slot ``rows_slot[n]``); returns
        its row split ``(programs per row, columns per program)``, which the later launches
        share."""
        from ..kernels.process import process_logits

        N, V = logits.shape
        if self._part_i.numel() < N * L.MAX_CHUNKS:
            self._part_f = torch.empty(N * L.MAX_CHUNKS * L.NPART, device=self.device)
            self._part_i = torch.empty(N * L.MAX_CHUNKS, dtype=torch.int32, device=self.device)
        chunks, chunk = row_split(N, V, self.device, L.BLOCK_PROCESS)
        t, st = self.state.tables(flags), self.state
        process_logits(logits, rows_slot, st.fparams, st.iparams, st.seed, t.bias, t.counts,
                       t.suppress, t.badseq, t.badlen, t.hist, work, self._part_f, self._part_i,
                       chunks=chunks, chunk=chunk, need_raw=need_raw, drafts=drafts, mask=mask)
        return chunks, chunk

    def _bands(self, work: torch.Tensor | None, N: int, rows_slot: torch.Tensor, flags: int,
               split: tuple[int, int], passes: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Launches 2-5 when rows filter: thresholds in three passes (``kernels.bands``)."""
        if not flags & L.FILTER or work is None:
            return None
        from ..kernels.bands import BandBuffers, banded_filter

        if self._band_buf is None:
            self._band_buf = BandBuffers(self.device)
        st = self.state
        banded_filter(work, N, rows_slot, st.fparams, st.iparams, st.seed, self._part_f, self._band_buf,
                      chunks=split[0], chunk=split[1], passes=passes)
        return self._band_buf.fin_i, self._band_buf.fin_f

    def _probs_triton(self, logits: torch.Tensor, rows_slot: torch.Tensor, flags: int,
                      drafts: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Processed distributions fp32 ``[N, V]`` in two launches (window rows with ``drafts``)."""
        from ..kernels.select import select

        N, V = logits.shape
        work = self._work_rows(N)
        split = self._process(logits, rows_slot, flags, work, need_raw=False, drafts=drafts, mask=mask)
        bands = self._bands(work, N, rows_slot, flags, split)
        chunks = split[0]
        out = torch.empty(N, V, dtype=torch.float32, device=self.device)
        st = self.state
        select(logits, rows_slot, st.fparams, st.iparams, st.seed, None, None, work,
               self._part_f, self._part_i, None, None, out, chunks=chunks,
               has_filter=bool(flags & L.FILTER), logprob_mode=0, commit=False, bands=bands)
        return out

    def _sample_reference(self, logits: torch.Tensor, slots: Slots, idx: torch.Tensor,
                          flags: int, nlp: int, mask: torch.Tensor | None = None) -> SamplerOutput:
        """The torch path of :meth:`sample` (commits like the kernels do)."""
        if flags == L.GREEDY and nlp < 0 and mask is None and self.state.all_greedy(slots):
            # plain greedy batch: the argmax, and count the step
            x = logits if logits.dtype == torch.float32 else logits.float()
            tok = torch.nan_to_num(x, nan=-ref.FLT_MAX).argmax(-1)
            self.state.advance(idx, 1)
            return SamplerOutput(tok)
        rows = self.state.rows(idx)
        rows.allowed = mask
        tok, l, keep = ref.sample_from_logits(logits, rows)
        lp = None
        if nlp >= 0:
            lp = self.raw_logprobs(logits) if self.logprobs_mode == "raw" else \
                torch.log_softmax(torch.where(keep, l, -math.inf), -1)
        self.state.accept(idx, tok[:, None], flags)
        return self._output(tok, lp, nlp)

    @staticmethod
    def _reference_logprobs_processed(logits: torch.Tensor, rows: ref.RowState) -> torch.Tensor:
        l = ref.process_logits(logits, rows)
        return torch.log_softmax(torch.where(ref.filter_keep(l, rows), l, -math.inf), -1)

    @staticmethod
    def _output(tok: torch.Tensor, lp: torch.Tensor | tuple | None, nlp: int) -> SamplerOutput:
        if nlp < 0:
            return SamplerOutput(tok)
        if isinstance(lp, tuple):
            chosen, lsm = lp
        else:
            lsm = lp
            chosen = lsm.gather(1, tok[:, None])[:, 0]
        if nlp == 0 or lsm is None:
            return SamplerOutput(tok, chosen)
        top = lsm.topk(nlp, dim=-1)
        return SamplerOutput(tok, chosen, top.values, top.indices)


def _draft_counts(n_draft: Sequence[int] | torch.Tensor, width: int) -> torch.Tensor:
    """``n_draft`` as a tensor, range-checked against a window of ``width`` positions when it is
    on the host (a device tensor is never read back)."""
    nd = n_draft if isinstance(n_draft, torch.Tensor) else torch.tensor(list(n_draft))
    if nd.device.type == "cpu" and (bool((nd < 0).any()) or bool((nd > width - 1).any())):
        raise ValueError(f"n_draft must be in [0, {width - 1}]")
    return nd
