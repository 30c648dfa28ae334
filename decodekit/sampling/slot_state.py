"""Per-slot sampling state: device tables plus their host mirrors.

A request lives in a slot (a stable row) from :meth:`SlotState.add` to
:meth:`SlotState.remove`. Its state is struct-of-arrays on the device, in the column
layout of :mod:`decodekit.kernels.layout` (shared with the kernels):

* ``fparams [S, NF]`` fp32 / ``iparams [S, NI]`` int32: packed scalar settings and
  counters (step counter, bad-word history length, feature flags);
* ``seed [S]`` int64;
* ``bias [S, V]`` fp32: logit_bias, allowed tokens, single-token bad words (-inf);
* ``counts [S, V]`` int32: ``2 * output_count + in_prompt`` per token (penalties);
* ``suppress [S, NS]`` int32: EOS and stop ids banned until ``min_new_tokens`` (-1 padded);
* ``badseq [S, NB, L]`` / ``badlen [S, NB]`` int32: multi-token bad words, matched
  against ``hist [S, H]``, a ring of the last ``H`` tokens.

The optional tables are allocated when a first request needs them. The host mirrors
(flags, logprobs asked, live, params) let the sampler pick kernel specialisations
without reading the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..kernels import layout as L
from ..kernels.launch import next_pow2
from ..params import SamplingParams
from . import reference as ref

__all__ = ["SlotState", "Tables"]

Slots = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class Tables:
    """The optional device tables one launch needs; None where no row of the batch uses
    the feature (the kernels then compile it out)."""

    bias: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    suppress: torch.Tensor | None = None
    badseq: torch.Tensor | None = None
    badlen: torch.Tensor | None = None
    hist: torch.Tensor | None = None


@dataclass
class _HostRows:
    """One request's rows of every table, built on the host before one write each."""

    flags: int
    fparams: torch.Tensor
    iparams: torch.Tensor
    bias: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    suppress: list[int] | None = None
    badwords: list[tuple[int, ...]] | None = None


class SlotState:
    """Per-slot state of ``n_slots`` requests over a ``vocab_size`` vocabulary.

    ``kernels`` selects how :meth:`accept` commits (the Triton ``accept`` kernel or its
    torch reference); ``generator`` gives unseeded requests their seeds.
    """

    def __init__(self, vocab_size: int, n_slots: int, device: torch.device, *,
                 eos_token_ids: tuple[int, ...], generator: torch.Generator,
                 kernels: bool) -> None:
        self.vocab_size = vocab_size
        self.n_slots = n_slots
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.kernels = kernels
        self._gen = generator
        S = n_slots
        self.fparams = torch.zeros(S, L.NF, dtype=torch.float32, device=device)
        self.iparams = torch.zeros(S, L.NI, dtype=torch.int32, device=device)
        self.seed = torch.zeros(S, dtype=torch.int64, device=device)
        self.bias: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.suppress: torch.Tensor | None = None
        self.badseq: torch.Tensor | None = None
        self.badlen: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None
        self._flags = [0] * S
        self._nlogprobs = [-1] * S
        self._live = [False] * S
        self._params: list[SamplingParams | None] = [None] * S

    # ------------------------------------------------------------------ requests
    def check(self, params: SamplingParams, prompt_token_ids: Sequence[int] | torch.Tensor | None = None,
              eos_token_ids: Iterable[int] | None = None) -> tuple[list[int], tuple[int, ...]]:
        """Validate a request without changing any state. Returns ``(prompt ids, eos ids)``.

        A request is refused when its masks could leave no token to sample: the allowed
        set (or the whole vocabulary) minus single-token bad words, ``-inf`` biases, the
        ``min_new_tokens`` suppression and the last tokens of multi-token bad words (which
        may all be banned at once).
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        V = self.vocab_size
        params.validate_for_vocab(V)
        prompt = self._token_list(prompt_token_ids, "prompt_token_ids")
        eos = self.eos_token_ids if eos_token_ids is None else tuple(int(t) for t in eos_token_ids)
        for t in eos:
            if not 0 <= t < V:
                raise ValueError(f"eos_token_ids entry {t} outside [0, {V})")
        bad = params.bad_words_token_ids or ()
        banned = {s[0] for s in bad if len(s) == 1}
        banned |= {t for t, b in (params.logit_bias or {}).items() if b == -math.inf}
        maybe = {s[-1] for s in bad if len(s) > 1}
        suppress = set(eos) | set(params.stop_token_ids or ()) if params.min_new_tokens else set()
        if params.allowed_token_ids is not None:
            left = set(params.allowed_token_ids) - banned
            if not left or not left - suppress or not left - suppress - maybe:
                raise ValueError(
                    "allowed_token_ids leaves no token to sample once bad_words_token_ids, "
                    "-inf logit_bias and the min_new_tokens suppression are applied"
                )
        elif len(banned | suppress | maybe) >= V:
            raise ValueError("bad_words_token_ids and logit_bias ban the whole vocabulary")
        return prompt, eos

    def new_seed(self) -> int:
        """A seed for an unseeded request, from this state's own generator."""
        return int(torch.randint(0, 2**63 - 1, (1,), generator=self._gen).item())

    def add(self, slot: int, params: SamplingParams,
            prompt_token_ids: Sequence[int] | torch.Tensor | None = None,
            eos_token_ids: Iterable[int] | None = None, seed: int | None = None) -> None:
        """Put a request in free ``slot``: every table row is built on the host, then each
        table is written once."""
        self.check_slot(slot)
        if self._live[slot]:
            raise ValueError(f"slot {slot} is in use; remove() it first")
        prompt, eos = self.check(params, prompt_token_ids, eos_token_ids)
        rows = self._host_rows(params, prompt, eos)
        if rows.bias is not None:
            self._table("bias", torch.float32, 0)[slot].copy_(rows.bias)
        if rows.counts is not None:
            self._table("counts", torch.int32, 0)[slot].copy_(rows.counts)
        if rows.suppress:
            self._grow_suppress(len(rows.suppress))
            self.suppress[slot].copy_(self._padded(rows.suppress, self.suppress.shape[1]))
        if rows.badwords:
            self._write_badwords(slot, rows.badwords, prompt)
            rows.iparams[L.I_NHIST] = len(prompt)
        self.fparams[slot].copy_(rows.fparams)
        self.iparams[slot].copy_(rows.iparams)
        self.seed[slot] = params.seed if params.seed is not None else (
            seed if seed is not None else self.new_seed())
        self._flags[slot] = rows.flags
        self._nlogprobs[slot] = -1 if params.logprobs is None else params.logprobs
        self._live[slot] = True
        self._params[slot] = params

    def remove(self, slot: int) -> None:
        """Free ``slot``; its device rows are overwritten by the next :meth:`add`."""
        self.check_slot(slot)
        if not self._live[slot]:
            raise KeyError(f"slot {slot} is not in use")
        self._live[slot] = False
        self._flags[slot] = 0
        self._nlogprobs[slot] = -1
        self._params[slot] = None

    def params(self, slot: int) -> SamplingParams:
        """The settings of the request in ``slot``."""
        self.check_slot(slot)
        p = self._params[slot]
        if p is None:
            raise KeyError(f"slot {slot} is not in use")
        return p

    @property
    def free_slots(self) -> list[int]:
        return [s for s in range(self.n_slots) if not self._live[s]]

    # ------------------------------------------------------------------ batches
    def check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot must be an int in [0, {self.n_slots}), got {slot!r}")

    def slot_list(self, slots: Slots) -> list[int]:
        """``slots`` as a checked host list: ints in range, live, distinct. A tensor is read
        back to the host first (a sync for a device tensor: pass lists in per-step code)."""
        if isinstance(slots, torch.Tensor):
            if slots.dim() != 1 or slots.is_floating_point() or slots.dtype == torch.bool:
                raise ValueError(f"slots must be a 1-D integer tensor, got {slots.dtype} "
                                 f"{tuple(slots.shape)}")
            slots = slots.tolist()
        slots = list(slots)
        for s in slots:
            self.check_slot(s)
            if not self._live[s]:
                raise KeyError(f"slot {s} is not in use")
        if len(set(slots)) != len(slots):
            raise ValueError("slots must not repeat within one batch")
        return slots

    def index(self, slots: Slots, uploaded: torch.Tensor | None = None) -> torch.Tensor:
        """int32 ``[B]`` slot indices on the device, checked (:meth:`slot_list`) and uploaded
        without blocking; ``uploaded``: the caller's upload of the same slots (int32 ``[B]``
        on the device, e.g. packed with its other step inputs), used as it is."""
        checked = self.slot_list(slots)
        if uploaded is None:
            return self.upload(torch.tensor(checked, dtype=torch.int32))
        if not isinstance(uploaded, torch.Tensor) or uploaded.dtype != torch.int32 or \
                tuple(uploaded.shape) != (len(checked),) or uploaded.device.type != self.device.type:
            raise ValueError(f"index must be the {len(checked)} slots as an int32 tensor on "
                             f"{self.device}, got {getattr(uploaded, 'dtype', type(uploaded).__name__)} "
                             f"{tuple(getattr(uploaded, 'shape', ()))}")
        return uploaded

    def upload(self, values: torch.Tensor | Sequence) -> torch.Tensor:
        """``values`` on the device without blocking the host: host data goes through
        pinned memory on CUDA; device tensors are returned as they are."""
        if isinstance(values, torch.Tensor) and values.device.type != "cpu":
            return values.to(self.device)
        t = torch.as_tensor(values)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _host_list(self, slots: Slots) -> Iterable[int]:
        """The slots a host summary covers."""
        return self.slot_list(slots) if isinstance(slots, torch.Tensor) else slots

    def union_flags(self, slots: Slots) -> int:
        """OR of the feature flags of ``slots`` (host mirrors)."""
        f = 0
        for s in self._host_list(slots):
            f |= self._flags[s]
        return f

    def max_logprobs(self, slots: Slots) -> int:
        """Largest ``logprobs`` asked among ``slots`` (-1: none asked)."""
        return max((self._nlogprobs[s] for s in self._host_list(slots)), default=-1)

    def all_greedy(self, slots: Slots) -> bool:
        """True when every live slot among ``slots`` decodes greedily."""
        return all(self._flags[s] & L.GREEDY for s in self._host_list(slots) if self._live[s])

    def tables(self, flags: int) -> Tables:
        """The optional tables a launch over rows with union ``flags`` reads."""
        bad = bool(flags & L.BADSEQ)
        return Tables(
            bias=self.bias if flags & L.BIAS else None,
            counts=self.counts if flags & L.PENALTY else None,
            suppress=self.suppress if flags & L.SUPPRESS else None,
            badseq=self.badseq if bad else None,
            badlen=self.badlen if bad else None,
            hist=self.hist if bad else None,
        )

    # ------------------------------------------------------------------ accessors
    def step_counters(self, idx: torch.Tensor) -> torch.Tensor:
        """int32 ``[B]``: tokens committed per slot since :meth:`add` (plus :meth:`advance`);
        the position that keys each slot's randomness."""
        return self.iparams[idx.long(), L.I_NGEN]

    def seeds(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 ``[B]``: the slots' seeds."""
        return self.seed[idx.long()]

    def advance(self, idx: torch.Tensor, n: int | torch.Tensor) -> None:
        """Move the step counters of distinct slots ``idx [B]`` forward by ``n``."""
        self.iparams[idx.long(), L.I_NGEN] += n

    # ------------------------------------------------------------------ updates
    def accept(self, idx: torch.Tensor, tokens: torch.Tensor, flags: int) -> None:
        """Commit ``tokens [B, n]`` (ids outside ``[0, V)`` skipped) to distinct slots
        ``idx [B]`` whose union of flags is ``flags``: one kernel launch, or its reference."""
        t = self.tables(flags)
        if not self.kernels:
            ref.commit_tokens(tokens, idx, self.iparams, self.counts, self.hist, self.vocab_size)
            return
        from ..kernels.accept import accept

        accept(tokens.to(torch.int32).contiguous(), idx, self.iparams, t.counts, t.hist,
               self.vocab_size)

    def checkpoint(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Device copies of what :meth:`restore` brings back for slots ``idx``: their integer
        parameter rows (step counters, history lengths) and bad-word rings."""
        li = idx.long()
        return li, self.iparams[li].clone(), None if self.hist is None else self.hist[li].clone()

    def restore(self, checkpoint: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                tokens: torch.Tensor) -> None:
        """Back to ``checkpoint``, given every token committed to its slots since it was taken
        (``tokens [B, n]``, -1 padded): penalty counts by subtraction, the rest copied back.
        Any number of tokens (the rings are copied back whole)."""
        li, iparams, hist = checkpoint
        if self.counts is not None and tokens.numel():
            pen = (tokens >= 0) & ((self.iparams[li, L.I_FLAGS] & L.PENALTY) != 0)[:, None]
            rows = li[:, None].expand_as(tokens)
            self.counts.index_put_((rows, tokens.clamp(min=0)), torch.where(pen, -2, 0).to(torch.int32),
                                   accumulate=True)
        self.iparams[li] = iparams
        if hist is not None and self.hist is not None and hist.shape[1] == self.hist.shape[1]:
            self.hist[li] = hist

    def rollback(self, idx: torch.Tensor, tokens: torch.Tensor) -> None:
        """Undo :meth:`accept` of ``tokens [B, n]`` (negative ids skipped): step counters,
        penalty counts and bad-word history go back. At most ``HIST_SLACK`` tokens per row.
        Device ops only (both backends)."""
        li = idx.long()
        valid = tokens >= 0
        n = valid.sum(1).to(torch.int32)
        self.iparams[li, L.I_NGEN] -= n
        flags = self.iparams[li, L.I_FLAGS]
        if self.counts is not None:
            pen = valid & ((flags & L.PENALTY) != 0)[:, None]
            rows = li[:, None].expand_as(tokens)
            delta = torch.where(pen, -2, 0).to(torch.int32)
            self.counts.index_put_((rows, tokens.clamp(min=0)), delta, accumulate=True)
        if self.hist is not None:  # the ring keeps stale entries; n_hist says what counts
            bad = ((flags & L.BADSEQ) != 0).to(torch.int32)
            self.iparams[li, L.I_NHIST] -= n * bad

    # ------------------------------------------------------------------ reference gather
    def rows(self, idx: torch.Tensor) -> ref.RowState:
        """The reference :class:`~decodekit.sampling.reference.RowState` of slots ``idx [B]``
        (features a slot does not use are neutral)."""
        li = idx.long()
        f, i = self.fparams[li], self.iparams[li]
        flags = i[:, L.I_FLAGS]
        filt = (flags & L.FILTER) != 0
        st = ref.RowState(
            temperature=f[:, L.F_TEMP], top_k=torch.where(filt, i[:, L.I_TOPK], 0),
            top_p=torch.where(filt, f[:, L.F_TOPP], 1.0),
            min_p=torch.where(filt, f[:, L.F_MINP], 0.0),
            typical_p=torch.where(filt, f[:, L.F_TYP], 1.0),
            repetition_penalty=f[:, L.F_REP], frequency_penalty=f[:, L.F_FREQ],
            presence_penalty=f[:, L.F_PRES], seed=self.seed[li], n_gen=i[:, L.I_NGEN],
            min_new=i[:, L.I_MINNEW],
        )
        if self.bias is not None:
            st.bias = torch.where(((flags & L.BIAS) != 0)[:, None], self.bias[li], 0.0)
        if self.counts is not None:
            st.counts = torch.where(((flags & L.PENALTY) != 0)[:, None], self.counts[li], 0)
        if self.suppress is not None:
            st.suppress = torch.where(((flags & L.SUPPRESS) != 0)[:, None], self.suppress[li], -1)
        if self.badseq is not None:
            on = (flags & L.BADSEQ) != 0
            st.badseq = self.badseq[li]
            st.badseq_len = torch.where(on[:, None], self.badlen[li], 0)
            st.hist = self.hist[li]
            st.n_hist = i[:, L.I_NHIST]
        return st

    def window_rows(self, idx: torch.Tensor, drafts: torch.Tensor) -> ref.RowState:
        """The reference state of the ``R * W`` window rows of slots ``idx [R]`` with
        ``drafts [R, W - 1]`` (see :func:`~decodekit.sampling.reference.window_state`)."""
        pen = (self.iparams[idx.long(), L.I_FLAGS] & L.PENALTY) != 0
        return ref.window_state(self.rows(idx), drafts, self.vocab_size, penalized=pen)

    # ------------------------------------------------------------------ table building
    def _host_rows(self, params: SamplingParams, prompt: list[int], eos: tuple[int, ...]) -> _HostRows:
        """Every table row of one request, on the host."""
        V = self.vocab_size
        flags = L.GREEDY if params.is_greedy else (L.FILTER if params.uses_filtering else 0)
        single_bad = {s[0] for s in params.bad_words_token_ids or () if len(s) == 1}
        multi_bad = [tuple(s) for s in params.bad_words_token_ids or () if len(s) > 1]
        f = torch.tensor(
            [params.temperature, params.top_p, params.min_p, params.typical_p,
             params.repetition_penalty, params.frequency_penalty, params.presence_penalty, 0.0],
            dtype=torch.float32)
        i = torch.zeros(L.NI, dtype=torch.int32)
        i[L.I_TOPK] = params.effective_top_k(V)
        i[L.I_MINNEW] = params.min_new_tokens
        i[L.I_NLOGPROB] = -1 if params.logprobs is None else params.logprobs
        rows = _HostRows(flags, f, i)
        if params.logit_bias or params.allowed_token_ids is not None or single_bad:
            rows.flags |= L.BIAS
            rows.bias = self._bias_row(params, single_bad)
        if params.uses_penalties:
            rows.flags |= L.PENALTY
            rows.counts = torch.zeros(V, dtype=torch.int32)
            if prompt:
                rows.counts[torch.tensor(prompt, dtype=torch.long)] = 1
        if params.min_new_tokens:
            rows.suppress = sorted(set(eos) | set(params.stop_token_ids or ()))
            rows.flags |= L.SUPPRESS if rows.suppress else 0
        if multi_bad:
            rows.flags |= L.BADSEQ
            rows.badwords = multi_bad
        if params.logprobs is not None:
            rows.flags |= L.LOGPROB
        i[L.I_FLAGS] = rows.flags
        return rows

    def _bias_row(self, params: SamplingParams, single_bad: set[int]) -> torch.Tensor:
        row = torch.zeros(self.vocab_size, dtype=torch.float32)
        if params.allowed_token_ids is not None:
            row.fill_(-math.inf)
            row[list(params.allowed_token_ids)] = 0.0
        for t, b in (params.logit_bias or {}).items():
            if row[t] != -math.inf:
                row[t] = b
        if single_bad:
            row[list(single_bad)] = -math.inf
        return row

    def _write_badwords(self, slot: int, words: list[tuple[int, ...]], prompt: list[int]) -> None:
        """The slot's multi-token bad words and its history ring (the prompt's tail)."""
        self._grow_badseq(len(words), max(len(s) for s in words))
        NB, Lmax = self.badseq.shape[1:]
        seq = torch.full((NB, Lmax), -1, dtype=torch.int32)
        lens = torch.zeros(NB, dtype=torch.int32)
        for k, s in enumerate(words):
            seq[k, : len(s)] = torch.tensor(s, dtype=torch.int32)
            lens[k] = len(s)
        H = self.hist.shape[1]
        ring = torch.full((H,), -1, dtype=torch.int32)
        for p in range(max(0, len(prompt) - H), len(prompt)):
            ring[p % H] = prompt[p]
        self.badseq[slot].copy_(seq)
        self.badlen[slot].copy_(lens)
        self.hist[slot].copy_(ring)

    def _table(self, name: str, dtype: torch.dtype, fill: float) -> torch.Tensor:
        """Dense ``[S, V]`` table ``name``, allocated on first use."""
        t = getattr(self, name)
        if t is None:
            t = torch.full((self.n_slots, self.vocab_size), fill, dtype=dtype, device=self.device)
            setattr(self, name, t)
        return t

    @staticmethod
    def _padded(ids: list[int], width: int) -> torch.Tensor:
        row = torch.full((width,), -1, dtype=torch.int32)
        row[: len(ids)] = torch.tensor(ids, dtype=torch.int32)
        return row

    def _token_list(self, ids: Sequence[int] | torch.Tensor | None, name: str) -> list[int]:
        if ids is None:
            return []
        out = ids.tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]
        for t in out:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"{name} entry {t} outside [0, {self.vocab_size})")
        return out

    def _grow_suppress(self, n: int) -> None:
        want = next_pow2(n)
        old = self.suppress
        if old is not None and old.shape[1] >= want:
            return
        new = torch.full((self.n_slots, want), -1, dtype=torch.int32, device=self.device)
        if old is not None:
            new[:, : old.shape[1]] = old
        self.suppress = new

    def _grow_badseq(self, nb: int, length: int) -> None:
        NB, Lw = next_pow2(nb), next_pow2(length)
        if self.badseq is not None:
            NB, Lw = max(NB, self.badseq.shape[1]), max(Lw, self.badseq.shape[2])
            if (NB, Lw) == tuple(self.badseq.shape[1:]):
                return
        S, dev = self.n_slots, self.device
        seq = torch.full((S, NB, Lw), -1, dtype=torch.int32, device=dev)
        lens = torch.zeros(S, NB, dtype=torch.int32, device=dev)
        H = next_pow2(Lw + L.HIST_SLACK)  # room to roll back a speculative window
        hist = torch.full((S, H), -1, dtype=torch.int32, device=dev)
        if self.badseq is not None:
            ob, ol = self.badseq.shape[1:]
            seq[:, :ob, :ol] = self.badseq
            lens[:, :ob] = self.badlen
            hist = self._rehome(hist)
        self.badseq, self.badlen, self.hist = seq, lens, hist

    def _rehome(self, hist: torch.Tensor) -> torch.Tensor:
        """Copy each ring into the wider ``hist``: position p moves from p % H_old to p % H."""
        S, H = hist.shape
        Ho = self.hist.shape[1]
        nh = self.iparams[:, L.I_NHIST].long()
        p = nh[:, None] - Ho + torch.arange(Ho, device=self.device)[None, :]
        src = self.hist.gather(1, (p % Ho).clamp(min=0))
        wide = torch.full((S, H + 1), -1, dtype=torch.int32, device=self.device)
        wide.scatter_(1, torch.where(p >= 0, p % H, torch.full_like(p, H)), src)
        return wide[:, :H].contiguous()
