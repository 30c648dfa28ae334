"""The batched sampler: per-request state in stable device rows (slots), one
fused path per step.

A scheduler ``add``s a request to a free slot once, then each step hands
``sample`` the logits ``[B, V]`` of the rows it runs and the slot of each row.
State is struct-of-arrays on the device: packed scalar parameters, a dense bias
row (logit_bias, allowed tokens, single-token bad words), dense penalty counts
(``2 * output_count + in_prompt``), the ``min_new_tokens`` suppression list and
multi-token bad words with a ring of recent tokens. ``sample`` commits its tokens
to that state on the device; ``accept`` commits tokens chosen elsewhere.

On CUDA (or with ``backend="triton"``) a step is two Triton launches
(:mod:`decodekit.kernels`) with no host synchronisation; elsewhere it runs the
torch reference (:mod:`decodekit.reference`), which computes the same function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from . import reference as ref
from .outputs import SamplerOutput
from .params import SamplingParams

__all__ = ["Sampler"]

# Flag bits and packed-table columns; decodekit.kernels._common holds the same values.
GREEDY, BIAS, PENALTY, SUPPRESS, BADSEQ, FILTER, LOGPROB = 1, 2, 4, 8, 16, 32, 64
NF = NI = 8
F_TEMP, F_TOPP, F_MINP, F_TYP, F_REP, F_FREQ, F_PRES = range(7)
I_TOPK, I_MINNEW, I_NGEN, I_FLAGS, I_NHIST, I_NLOGPROB = range(6)

BLOCK_PROCESS = 1024
BLOCK_SELECT = 256
MAX_VOCAB = 1 << 24
HIST_SLACK = 64  # tokens that rollback() may undo at once without losing bad-word history


def _pow2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


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
        if not isinstance(vocab_size, int) or not 1 <= vocab_size <= MAX_VOCAB:
            raise ValueError(f"vocab_size must be an int in [1, {MAX_VOCAB}], got {vocab_size!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
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
        self._gen = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        )
        S, dev = max_batch_size, self.device
        self.fparams = torch.zeros(S, NF, dtype=torch.float32, device=dev)
        self.iparams = torch.zeros(S, NI, dtype=torch.int32, device=dev)
        self.seed = torch.zeros(S, dtype=torch.int64, device=dev)
        self.bias: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.suppress: torch.Tensor | None = None
        self.badseq: torch.Tensor | None = None
        self.badlen: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None
        self._work: torch.Tensor | None = None
        self._part_f = torch.empty(S * 64 * 6, dtype=torch.float32, device=dev)
        self._part_i = torch.empty(S * 64, dtype=torch.int32, device=dev)
        # Host mirrors: which slots are live and which features each uses.
        self._flags = [0] * S
        self._nlogprobs = [-1] * S
        self._live = [False] * S
        self._params: list[SamplingParams | None] = [None] * S

    # ------------------------------------------------------------------ slots
    def add(
        self,
        slot: int,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] | torch.Tensor | None = None,
        *,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        """Put a request in ``slot`` (which must be free) with its settings and prompt.

        Raises ``ValueError`` for a bad slot, token ids outside ``[0, V)`` or a request
        whose masks leave no token to sample.
        """
        self._check_slot(slot)
        if self._live[slot]:
            raise ValueError(f"slot {slot} is in use; remove() it first")
        prompt, eos = self.check(params, prompt_token_ids, eos_token_ids=eos_token_ids)
        V = self.vocab_size
        flags = 0
        if params.is_greedy:
            flags |= GREEDY
        elif params.uses_filtering:
            flags |= FILTER
        single_bad = {s[0] for s in params.bad_words_token_ids or () if len(s) == 1}
        multi_bad = [tuple(s) for s in params.bad_words_token_ids or () if len(s) > 1]
        suppress = sorted(set(eos) | set(params.stop_token_ids or ())) if params.min_new_tokens else []
        allowed = set(params.allowed_token_ids) if params.allowed_token_ids is not None else None
        if params.logit_bias or allowed is not None or single_bad:
            flags |= BIAS
            row = torch.zeros(V, dtype=torch.float32)
            if allowed is not None:
                row.fill_(-math.inf)
                row[list(allowed)] = 0.0
            for t, b in (params.logit_bias or {}).items():
                if row[t] != -math.inf:
                    row[t] = b
            if single_bad:
                row[list(single_bad)] = -math.inf
            self._ensure("bias", lambda: torch.zeros(self.max_batch_size, V, device=self.device))
            self.bias[slot].copy_(row)
        if params.uses_penalties:
            flags |= PENALTY
            self._ensure(
                "counts",
                lambda: torch.zeros(self.max_batch_size, V, dtype=torch.int32, device=self.device),
            )
            row = torch.zeros(V, dtype=torch.int32)
            if prompt:
                row[torch.tensor(prompt, dtype=torch.long)] = 1
            self.counts[slot].copy_(row)
        if suppress:
            flags |= SUPPRESS
            self._grow_suppress(len(suppress))
            row = torch.full((self.suppress.shape[1],), -1, dtype=torch.int32)
            row[: len(suppress)] = torch.tensor(suppress, dtype=torch.int32)
            self.suppress[slot].copy_(row)
        n_hist = 0
        if multi_bad:
            flags |= BADSEQ
            self._grow_badseq(len(multi_bad), max(len(s) for s in multi_bad))
            NB, L = self.badseq.shape[1:]
            seq = torch.full((NB, L), -1, dtype=torch.int32)
            lens = torch.zeros(NB, dtype=torch.int32)
            for i, s in enumerate(multi_bad):
                seq[i, : len(s)] = torch.tensor(s, dtype=torch.int32)
                lens[i] = len(s)
            self.badseq[slot].copy_(seq)
            self.badlen[slot].copy_(lens)
            H = self.hist.shape[1]
            ring = torch.full((H,), -1, dtype=torch.int32)
            for p in range(max(0, len(prompt) - H), len(prompt)):
                ring[p % H] = prompt[p]
            self.hist[slot].copy_(ring)
            n_hist = len(prompt)
        if params.logprobs is not None:
            flags |= LOGPROB
        seed = params.seed if params.seed is not None else int(
            torch.randint(0, 2**63 - 1, (1,), generator=self._gen).item()
        )
        f = torch.tensor(
            [params.temperature, params.top_p, params.min_p, params.typical_p,
             params.repetition_penalty, params.frequency_penalty, params.presence_penalty, 0.0],
            dtype=torch.float32,
        )
        i = torch.tensor(
            [params.effective_top_k(V), params.min_new_tokens, 0, flags, n_hist,
             -1 if params.logprobs is None else params.logprobs, 0, 0],
            dtype=torch.int32,
        )
        self.fparams[slot].copy_(f)
        self.iparams[slot].copy_(i)
        self.seed[slot] = seed
        self._flags[slot] = flags
        self._nlogprobs[slot] = -1 if params.logprobs is None else params.logprobs
        self._live[slot] = True
        self._params[slot] = params

    def check(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] | torch.Tensor | None = None,
        *,
        eos_token_ids: Iterable[int] | None = None,
    ) -> tuple[list[int], tuple[int, ...]]:
        """Validate a request against this sampler without changing any state; the checks
        :meth:`add` makes. Returns ``(prompt ids, eos ids)``.

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

    def remove(self, slot: int) -> None:
        """Free ``slot``; its state is overwritten by the next ``add``."""
        self._check_slot(slot)
        if not self._live[slot]:
            raise KeyError(f"slot {slot} is not in use")
        self._live[slot] = False
        self._flags[slot] = 0
        self._nlogprobs[slot] = -1
        self._params[slot] = None

    def params(self, slot: int) -> SamplingParams:
        """The settings of the request in ``slot``."""
        self._check_slot(slot)
        p = self._params[slot]
        if p is None:
            raise KeyError(f"slot {slot} is not in use")
        return p

    @property
    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_batch_size) if not self._live[s]]

    # ------------------------------------------------------------------ steps
    def sample(self, logits: torch.Tensor, slots: Sequence[int] | torch.Tensor) -> SamplerOutput:
        """Draw one token per row of ``logits [B, V]`` for the requests in ``slots [B]``.

        The tokens are committed to each slot's state (penalty counts, step counter,
        bad-word history). On the Triton backend there is no host synchronisation when
        ``slots`` is a list or a tensor on the sampler's device (the torch backend is the
        CPU path and may synchronise).
        """
        idx, flags, nlp = self._prepare(logits, slots)
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        B, V = logits.shape
        if self.backend == "torch":
            if flags == GREEDY and nlp < 0 and self._all_greedy(slots):
                # plain greedy batch: the argmax, and count the step
                x = logits if logits.dtype == torch.float32 else logits.float()
                tok = torch.nan_to_num(x, nan=-ref.FLT_MAX).argmax(-1)
                self.iparams[idx.long(), I_NGEN] += 1
                return SamplerOutput(tok)
            tok, l, keep = ref.sample_from_logits(logits, self._rows(idx))
            lp = None
            if nlp >= 0:
                lp = self._ref_logprobs(logits, l, keep)
            self._commit_ref(idx, tok[:, None])
            return self._output(tok, lp, nlp)
        from . import kernels as K

        work = self._work_buf(B) if (flags & FILTER or self.logprobs_mode == "processed") else None
        chunks, chunk = K.launch_shape(B, V, self.device, BLOCK_PROCESS)
        self._launch_process(K, logits, idx, flags, work, chunks, chunk, need_raw=nlp >= 0)
        out_tok = torch.empty(B, dtype=torch.int64, device=self.device)
        out_lp = torch.empty(B, dtype=torch.float32, device=self.device) if nlp >= 0 else None
        mode = 0 if nlp < 0 else (1 if self.logprobs_mode == "raw" else 2)
        K.select(
            logits, idx, self.fparams, self.iparams, self.seed,
            self.counts if flags & PENALTY else None,
            self.hist if flags & BADSEQ else None,
            work, self._part_f, self._part_i, out_tok, out_lp, None,
            chunks=chunks, has_filter=bool(flags & FILTER), logprob_mode=mode, commit=True,
            block=BLOCK_SELECT,
        )
        top = None
        if nlp > 0:
            if mode == 1:
                top = self._raw_logprobs(logits)
            else:
                top = self._processed_top(work[:B])
        return self._output(out_tok, (out_lp, top), nlp)

    def probs(self, logits: torch.Tensor, slots: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The processed distribution fp32 ``[B, V]`` (one-hot for greedy rows); commits nothing."""
        idx, flags, _ = self._prepare(logits, slots)
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        B, V = logits.shape
        if self.backend == "torch":
            return ref.processed_probs_from_logits(logits, self._rows(idx))
        from . import kernels as K

        work = self._work_buf(B)
        chunks, chunk = K.launch_shape(B, V, self.device, BLOCK_PROCESS)
        self._launch_process(K, logits, idx, flags, work, chunks, chunk, need_raw=False)
        out = torch.empty(B, V, dtype=torch.float32, device=self.device)
        K.select(
            logits, idx, self.fparams, self.iparams, self.seed, None, None, work,
            self._part_f, self._part_i, None, None, out,
            chunks=chunks, has_filter=bool(flags & FILTER), logprob_mode=0, commit=False,
            block=BLOCK_SELECT,
        )
        return out

    def processed_logprobs(self, logits: torch.Tensor, slots: Sequence[int] | torch.Tensor
                           ) -> torch.Tensor:
        """What ``logprobs_mode="processed"`` reports, fp32 ``[B, V]``: the log-softmax of the
        processed logits with filtered tokens at -inf; commits nothing. Torch ops on any
        device (the reference path): for speculative steps that ask for logprobs."""
        idx, _, _ = self._prepare(logits, slots)
        state = self._rows(idx)
        l = ref.process_logits(logits, state)
        return torch.log_softmax(torch.where(ref.filter_keep(l, state), l, -math.inf), -1)

    def accept(self, slots: Sequence[int] | torch.Tensor, token_ids: torch.Tensor) -> None:
        """Commit tokens chosen outside :meth:`sample`: ``token_ids [B]`` or ``[B, n]``
        (negative ids are skipped), in order, to the slots' state."""
        idx = self._slots_tensor(slots)
        on_host = not isinstance(token_ids, torch.Tensor) or token_ids.device.type == "cpu"
        tok = torch.as_tensor(token_ids, device=self.device)
        if tok.dim() == 1:
            tok = tok[:, None]
        if tok.dim() != 2 or tok.shape[0] != idx.shape[0]:
            raise ValueError(f"token_ids must be [B] or [B, n] with B={idx.shape[0]}")
        if on_host and bool((tok >= self.vocab_size).any()):
            raise ValueError(f"token_ids entry {int(tok.max())} outside [0, {self.vocab_size})")
        # (device tensors are not read back: the kernel skips ids outside [0, V))
        if self.backend == "torch":
            self._commit_ref(idx, tok.long())
            return
        from . import kernels as K

        flags = self._union_flags(slots)
        K.accept(
            tok.to(torch.int32).contiguous(), idx, self.iparams,
            self.counts if flags & PENALTY else None,
            self.hist if flags & BADSEQ else None, self.vocab_size,
        )

    def rollback(self, slots: Sequence[int] | torch.Tensor, token_ids: torch.Tensor) -> None:
        """Undo :meth:`accept` of ``token_ids [B, n]`` (negative ids skipped): step counters,
        penalty counts and bad-word history go back. Speculative decoding accepts draft
        tokens tentatively (so penalties see the earlier drafts of the window) and rolls
        them back before committing what verification emitted. At most ``HIST_SLACK``
        tokens per row may be rolled back at once. Device ops only."""
        idx = self._slots_tensor(slots).long()
        tok = torch.as_tensor(token_ids, device=self.device).long()
        if tok.dim() == 1:
            tok = tok[:, None]
        valid = tok >= 0
        n = valid.sum(1).to(torch.int32)
        self.iparams[idx, I_NGEN] -= n
        flags = self.iparams[idx, I_FLAGS]
        if self.counts is not None:
            pen = valid & ((flags & PENALTY) != 0)[:, None]
            rows = idx[:, None].expand_as(tok)
            delta = torch.where(pen, -2, 0).to(torch.int32)
            self.counts.index_put_((rows, tok.clamp(min=0)), delta, accumulate=True)
        if self.hist is not None:  # the ring keeps stale entries; n_hist says what counts
            bad = ((flags & BADSEQ) != 0).to(torch.int32)
            self.iparams[idx, I_NHIST] -= n * bad

    # ---------------------------------------------------------- TRANSITION (replaced by sampling/)
    def all_greedy(self, slots) -> bool:
        return self._all_greedy(slots)

    def raw_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return self._raw_logprobs(logits)

    def draw(self, probs: torch.Tensor, slots, *, salt: int = 0) -> torch.Tensor:
        from .speculative.verify import draw

        idx = self._slots_tensor(slots).long()
        return draw(probs, self.seed[idx] ^ salt, self.iparams[idx, I_NGEN].long())

    def window_probs(self, logits: torch.Tensor, slots, drafts: torch.Tensor) -> torch.Tensor:
        W = logits.shape[1]
        out = []
        for j in range(W):
            out.append(self.probs(logits[:, j].contiguous(), slots))
            if j < W - 1:
                self.accept(slots, drafts[:, j])
        if W > 1:
            self.rollback(slots, drafts)
        return torch.stack(out, 1)

    def window_logprobs(self, logits: torch.Tensor, slots, drafts: torch.Tensor) -> torch.Tensor:
        W = logits.shape[1]
        out = []
        for j in range(W):
            out.append(self.processed_logprobs(logits[:, j].contiguous(), slots))
            if j < W - 1:
                self.accept(slots, drafts[:, j])
        if W > 1:
            self.rollback(slots, drafts)
        return torch.stack(out, 1)

    def verify(self, p, q, drafts, n_draft, slots):
        from .speculative.verify import verify

        idx = self._slots_tensor(slots).long()
        return verify(p, q, drafts, n_draft, self.seed[idx], self.iparams[idx, I_NGEN].long())

    # ------------------------------------------------------------------ helpers
    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.max_batch_size:
            raise ValueError(f"slot must be an int in [0, {self.max_batch_size}), got {slot!r}")

    def _token_list(self, ids, name: str) -> list[int]:
        if ids is None:
            return []
        out = ids.tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]
        for t in out:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"{name} entry {t} outside [0, {self.vocab_size})")
        return out

    def _ensure(self, name: str, make) -> None:
        if getattr(self, name) is None:
            setattr(self, name, make())

    def _grow_suppress(self, n: int) -> None:
        want = _pow2(n)
        old = self.suppress
        if old is not None and old.shape[1] >= want:
            return
        new = torch.full((self.max_batch_size, want), -1, dtype=torch.int32, device=self.device)
        if old is not None:
            new[:, : old.shape[1]] = old
        self.suppress = new

    def _grow_badseq(self, nb: int, length: int) -> None:
        NB, L = _pow2(nb), _pow2(length)
        if self.badseq is not None:
            NB, L = max(NB, self.badseq.shape[1]), max(L, self.badseq.shape[2])
            if (NB, L) == tuple(self.badseq.shape[1:]):
                return
        S, dev = self.max_batch_size, self.device
        seq = torch.full((S, NB, L), -1, dtype=torch.int32, device=dev)
        lens = torch.zeros(S, NB, dtype=torch.int32, device=dev)
        H = _pow2(L + HIST_SLACK)  # room to roll back a speculative window without losing history
        hist = torch.full((S, H), -1, dtype=torch.int32, device=dev)
        if self.badseq is not None:
            ob, ol = self.badseq.shape[1:]
            seq[:, :ob, :ol] = self.badseq
            lens[:, :ob] = self.badlen
            # Re-home each ring: token at position p moves from p % H_old to p % H_new.
            Ho = self.hist.shape[1]
            nh = self.iparams[:, I_NHIST].long()
            p = nh[:, None] - Ho + torch.arange(Ho, device=dev)[None, :]
            ok = p >= 0
            src = self.hist.gather(1, (p % Ho).clamp(min=0))
            wide = torch.full((S, H + 1), -1, dtype=torch.int32, device=dev)
            wide.scatter_(1, torch.where(ok, p % H, torch.full_like(p, H)), src)
            hist = wide[:, :H].contiguous()
        self.badseq, self.badlen, self.hist = seq, lens, hist

    def _slots_tensor(self, slots) -> torch.Tensor:
        if isinstance(slots, torch.Tensor):
            if slots.dim() != 1:
                raise ValueError(f"slots must be 1-D, got shape {tuple(slots.shape)}")
            return slots.to(device=self.device, dtype=torch.int32)
        slots = list(slots)
        for s in slots:
            self._check_slot(s)
            if not self._live[s]:
                raise KeyError(f"slot {s} is not in use")
        if len(set(slots)) != len(slots):
            raise ValueError("slots must not repeat within one batch")
        t = torch.tensor(slots, dtype=torch.int32)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _all_greedy(self, slots) -> bool:
        rows = range(self.max_batch_size) if isinstance(slots, torch.Tensor) else slots
        return all(self._flags[s] & GREEDY for s in rows if self._live[s])

    def _union_flags(self, slots) -> int:
        rows = range(self.max_batch_size) if isinstance(slots, torch.Tensor) else slots
        f = 0
        for s in rows:
            f |= self._flags[s]
        return f

    def _prepare(self, logits: torch.Tensor, slots) -> tuple[torch.Tensor, int, int]:
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits must be [B, {self.vocab_size}], got shape {tuple(logits.shape)}"
            )
        if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"logits dtype must be float32/float16/bfloat16, got {logits.dtype}")
        same = logits.device == self.device or (
            logits.device.type == self.device.type == "cuda"
            and (self.device.index is None or logits.device.index == self.device.index)
        )
        if not same:
            raise ValueError(f"logits are on {logits.device}, the sampler on {self.device}")
        idx = self._slots_tensor(slots)
        if idx.shape[0] != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logits rows but {idx.shape[0]} slots")
        if idx.shape[0] > self.max_batch_size:
            raise ValueError(f"batch of {idx.shape[0]} exceeds max_batch_size {self.max_batch_size}")
        rows = range(self.max_batch_size) if isinstance(slots, torch.Tensor) else slots
        nlp = max((self._nlogprobs[s] for s in rows), default=-1)
        return idx, self._union_flags(slots), nlp

    def _work_buf(self, B: int) -> torch.Tensor:
        if self._work is None:
            self._work = torch.empty(
                self.max_batch_size, self.vocab_size, dtype=torch.float32, device=self.device
            )
        return self._work

    def _launch_process(self, K, logits, idx, flags, work, chunks, chunk, need_raw) -> None:
        bad = flags & BADSEQ
        K.process_logits(
            logits, idx,
            self.fparams, self.iparams, self.seed,
            self.bias if flags & BIAS else None,
            self.counts if flags & PENALTY else None,
            self.suppress if flags & SUPPRESS else None,
            self.badseq if bad else None, self.badlen if bad else None,
            self.hist if bad else None,
            work, self._part_f, self._part_i,
            chunks=chunks, chunk=chunk, need_raw=need_raw, block=BLOCK_PROCESS,
        )

    def _rows(self, idx: torch.Tensor) -> ref.RowState:
        li = idx.long()
        f, i = self.fparams[li], self.iparams[li]
        flags = i[:, I_FLAGS]

        st = ref.RowState(
            temperature=f[:, F_TEMP], top_k=torch.where((flags & FILTER) != 0, i[:, I_TOPK], 0),
            top_p=torch.where((flags & FILTER) != 0, f[:, F_TOPP], 1.0),
            min_p=torch.where((flags & FILTER) != 0, f[:, F_MINP], 0.0),
            typical_p=torch.where((flags & FILTER) != 0, f[:, F_TYP], 1.0),
            repetition_penalty=f[:, F_REP], frequency_penalty=f[:, F_FREQ],
            presence_penalty=f[:, F_PRES], seed=self.seed[li], n_gen=i[:, I_NGEN],
            min_new=i[:, I_MINNEW],
        )
        pen = ((flags & PENALTY) != 0)[:, None]
        if self.bias is not None:
            st.bias = torch.where(((flags & BIAS) != 0)[:, None], self.bias[li], 0.0)
        if self.counts is not None:
            st.counts = torch.where(pen, self.counts[li], 0)
        if self.suppress is not None:
            st.suppress = torch.where(((flags & SUPPRESS) != 0)[:, None], self.suppress[li], -1)
        if self.badseq is not None:
            on = (flags & BADSEQ) != 0
            st.badseq = self.badseq[li]
            st.badseq_len = torch.where(on[:, None], self.badlen[li], 0)
            st.hist = self.hist[li]
            st.n_hist = i[:, I_NHIST]
        return st

    def _commit_ref(self, idx: torch.Tensor, tok: torch.Tensor) -> None:
        li = idx.long()
        flags = self.iparams[li, I_FLAGS]
        for j in range(tok.shape[1]):
            t = tok[:, j]
            ok = (t >= 0) & (t < self.vocab_size)
            self.iparams[li, I_NGEN] += ok.to(torch.int32)
            if self.counts is not None:
                pen = ok & ((flags & PENALTY) != 0)
                self.counts[li[pen], t[pen]] += 2
            if self.hist is not None:
                on = ok & ((flags & BADSEQ) != 0)
                s, H = li[on], self.hist.shape[1]
                nh = self.iparams[s, I_NHIST]
                self.hist[s, (nh % H).long()] = t[on].to(torch.int32)
                self.iparams[s, I_NHIST] = nh + 1

    def _ref_logprobs(self, logits, l, keep):
        if self.logprobs_mode == "raw":
            x = logits.float()
            lsm = torch.log_softmax(torch.where(torch.isnan(x), -math.inf, x), -1)
        else:
            lsm = torch.log_softmax(torch.where(keep, l, -math.inf), -1)
        return lsm

    def _raw_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        return torch.log_softmax(torch.where(torch.isnan(x), -math.inf, x), -1)

    def _processed_top(self, work: torch.Tensor) -> torch.Tensor:
        # The select kernel wrote -inf over filtered tokens of `work` in this mode.
        return torch.log_softmax(work, -1)

    def _output(self, tok: torch.Tensor, lp, nlp: int) -> SamplerOutput:
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
