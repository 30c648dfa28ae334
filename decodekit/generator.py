"""The per-step token generator around a Hugging Face causal LM (shaped like MAX's
``TokenGenerator``): a scheduler creates contexts, calls :meth:`TokenGenerator.next_token`
with whichever contexts it wants to advance, and releases them when done.

One step: prefill the contexts new to the generator (one forward each, into their
KV-cache slot), then run decode steps for the whole batch: one forward over the
contiguous slot range, the fused sampler over the rows that asked, EOS tracking and
streaming detokenisation on the host. Requests may join and leave between calls;
nobody else's work is recomputed. Slots are reused lowest-first.
"""

from __future__ import annotations

import enum
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import nvtx
from .draft_models import DraftModel, DraftRunner, LayerSkipDraft
from .drafters import NGramDraft, SpecStats
from .eos import EOSTracker
from .hf_compat import cache_kwarg
from .kv_cache import SlotKVCache, attention_masks, mask_layout
from .outputs import LogProbabilities, SamplerOutput
from .params import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from .sampling import Sampler
from .steer_hooks import SteeringHooks, maybe_bound
from .steering import Steering

__all__ = [
    "GenerationStatus",
    "StepStats",
    "TextGenerationContext",
    "TextGenerationResponse",
    "TextResponse",
    "TokenGenerator",
]


class GenerationStatus(enum.Enum):
    ACTIVE = "active"
    END_OF_SEQUENCE = "end_of_sequence"
    MAXIMUM_LENGTH = "maximum_length"
    CANCELLED = "cancelled"

    @property
    def is_done(self) -> bool:
        return self is not GenerationStatus.ACTIVE


@dataclass(frozen=True)
class TextResponse:
    """One generated token (MAX's ``TextResponse``)."""

    next_token: int
    log_probabilities: LogProbabilities | None = None


@dataclass
class TextGenerationResponse:
    """What one request produced in one :meth:`TokenGenerator.next_token` call."""

    tokens: list[TextResponse]
    final_status: GenerationStatus
    text: str = ""

    @property
    def is_done(self) -> bool:
        return self.final_status.is_done


@dataclass
class StepStats:
    """Counters of the last :meth:`TokenGenerator.next_token` call (host wall times)."""

    batch_size: int = 0
    tokens: int = 0
    prefill_tokens: int = 0
    steps: int = 0
    forward_s: float = 0.0
    sample_s: float = 0.0
    total_s: float = 0.0


@dataclass(eq=False)
class TextGenerationContext:
    """A request's state: its prompt, settings, status and the tokens generated so far."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos: EOSTracker
    status: GenerationStatus = GenerationStatus.ACTIVE
    slot: int | None = None
    length: int = 0  # tokens in the KV cache
    last_token: int | None = None  # sampled, not yet in the cache
    generated_token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogProbabilities] = field(default_factory=list)
    speculate: bool = True  # use the generator's drafter for this request
    spec_k: int | None = None  # current draft length (adaptive k)
    draft_length: int = 0  # tokens in the draft model's own KV cache (DraftModel)
    spec_rest: int = 0  # steps left without drafting (adaptive k at 0)
    spec_misses: int = 0  # rests in a row that ended in a rejected probe
    spec_alpha: float | None = None  # running per-token acceptance (adaptive k)
    spec_stats: SpecStats = field(default_factory=SpecStats)
    steering: Steering | None = None

    @property
    def text(self) -> str:
        return self.eos.text

    @property
    def finish_reason(self) -> str | None:
        if self.status is GenerationStatus.CANCELLED:
            return "cancelled"
        return self.eos.finish_reason

    @property
    def is_done(self) -> bool:
        return self.status.is_done


@dataclass(frozen=True)
class _HostToken:
    """A pending token already on the host (speculative steps), with its logprobs if asked."""

    token: int
    logprobs: LogProbabilities | None = None


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(model.config, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return sorted(ids)


class TokenGenerator:
    """Drives a Hugging Face causal LM one step at a time for a caller's scheduler.

    Parameters
    ----------
    model, tokenizer
        Any in-memory transformers causal LM (attention through the Cache API) and its
        tokenizer. An unsupported model raises ``ValueError`` here, never wrong tokens.
    max_batch_size : int
        Slots: requests that can be in flight at once.
    max_seq_len : int
        Positions per slot (prompt + generated).
    device, dtype
        Where the model and cache run (default: the model's).
    logprobs_mode, seed
        Passed to :class:`~decodekit.Sampler`.
    cuda_graphs : bool
        On CUDA, run decode steps as CUDA graphs captured once per batch-size bucket
        (1, 2, 4, ... up to ``max_batch_size``), falling back to eager where capture fails.
    draft, num_speculative_tokens
        Speculative decoding: a drafter (:class:`~decodekit.NGramDraft`,
        :class:`~decodekit.DraftModel` or :class:`~decodekit.LayerSkipDraft`) proposes up
        to ``k`` tokens per request and step; the target verifies them in one forward with
        exact rejection sampling (:mod:`decodekit.speculative`), so outputs keep the
        target's distribution (greedy: identical tokens). ``ctx.speculate = False`` turns
        it off per request. Logprobs of tokens from speculative steps come from the
        target's logits at their positions (raw) or the processed target distribution.
    steering : bool
        Install the steering hooks (once, on every decoder layer) so that requests can
        carry a :class:`~decodekit.Steering` (``new_context(..., steering=...)``). Rows
        without one are bit-identical to an unsteered generator. Decode steps of a batch
        while any request is steered run eagerly (not as CUDA graphs).
    adaptive_k : bool
        Per request, lengthen drafts after full acceptances and halve them after full
        rejections (resting a few steps at 0), so low acceptance costs little; and shorten
        drafts when the batch is large (see ``_batch_cap``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int = 2048,
        device=None,
        dtype=None,
        logprobs_mode: str = "raw",
        seed: int | None = None,
        sampler_backend: str = "auto",
        cuda_graphs: bool = True,
        draft: NGramDraft | DraftModel | LayerSkipDraft | None = None,
        num_speculative_tokens: int | None = None,
        adaptive_k: bool = True,
        steering: bool = True,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.vocab_size = self._vocab_size()
        self.eos_token_ids = _eos_ids(model, tokenizer)
        if draft is not None and not isinstance(draft, (NGramDraft, DraftModel, LayerSkipDraft)):
            raise TypeError("draft must be an NGramDraft, DraftModel or LayerSkipDraft, got "
                            f"{type(draft).__name__}")
        k = num_speculative_tokens if num_speculative_tokens is not None else (
            draft.k if draft is not None else 0)
        if not isinstance(k, int) or k < 0 or (draft is not None and k < 1):
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {k!r}")
        self.draft, self.spec_k = draft, (k if draft is not None else 0)
        self.adaptive_k = adaptive_k
        self.spec_stats = SpecStats()
        self._cache_kw = cache_kwarg(self.model)
        try:
            self._mask_kind, self._windows = mask_layout(self.model)
        except (TypeError, OSError) as e:
            raise ValueError(f"unsupported model {type(model).__name__}: {e}") from e
        # spec_k + 1 scratch positions: a verification window never writes past the cache
        self.cache = SlotKVCache(self.model.config, max_batch_size,
                                 max_seq_len + (self.spec_k + 1 if self.spec_k else 0),
                                 self.device, self.dtype)
        self.sampler = Sampler(self.vocab_size, max_batch_size, self.device,
                               eos_token_ids=self.eos_token_ids, logprobs_mode=logprobs_mode,
                               seed=seed, backend=sampler_backend)
        self._free = list(range(max_batch_size))
        self._contexts: dict[str, TextGenerationContext] = {}
        self._slot_owner: list[TextGenerationContext | None] = [None] * max_batch_size
        self.stats = StepStats()
        self._last_tok = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._steer: SteeringHooks | None = None
        self._steered_slots: set[int] = set()  # slots whose steering rows are written
        self._self_test()
        if steering:
            try:
                self._steer = SteeringHooks(self.model, max_batch_size, self.device)
            except ValueError:  # no decoder layer list found: steering requests will say so
                self._steer = None
            else:  # the hooks live as long as the generator
                weakref.finalize(self, self._steer.remove)
        self._drafter = None if draft is None or isinstance(draft, NGramDraft) else DraftRunner(self, draft)
        # adaptive k: a drafted token pays when its acceptance beats its cost, in target
        # forwards: drafting (0 for n-grams) plus verifying one more position (compute-bound
        # on a CPU, nearly free on a GPU)
        self._break_even = (0.0 if self._drafter is None else self._drafter.cost) + (
            0.02 if self.device.type == "cuda" else 0.1)
        self._graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self._graphs = _DecodeGraphs(self)
            with torch.inference_mode():
                self._graphs.capture_all()

    # ------------------------------------------------------------------ requests
    def new_context(
        self,
        prompt: str | Sequence[int] | Sequence[Mapping[str, str]],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        steering: Steering | None = None,
    ) -> TextGenerationContext:
        """Make a request context; nothing runs until :meth:`next_token`.

        ``prompt`` is text, token ids, or chat messages (rendered with the tokenizer's
        chat template). A prompt longer than ``max_seq_len - max_new_tokens`` raises
        ``ValueError`` unless ``truncate_prompt_tokens`` keeps only its last tokens.
        ``steering`` steers this request alone (positions are its absolute token positions:
        the prompt is ``0 .. len(prompt) - 1``).
        """
        self._check_steering(steering)
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate_for_vocab(self.vocab_size)
        ids = self._encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        max_new = params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        room = self.max_seq_len - max_new
        if truncate_prompt_tokens is not None:
            if not isinstance(truncate_prompt_tokens, int) or truncate_prompt_tokens < 1:
                raise ValueError(
                    f"truncate_prompt_tokens must be an int >= 1, got {truncate_prompt_tokens!r}"
                )
            ids = ids[-truncate_prompt_tokens:]
        if len(ids) > room:
            raise ValueError(
                f"prompt has {len(ids)} tokens but only {max(room, 0)} fit "
                f"(max_seq_len {self.max_seq_len} - max_new_tokens {max_new}); shorten it, "
                "lower max_new_tokens, or set truncate_prompt_tokens"
            )
        self.sampler.check(params, ids)  # masks that could leave nothing to sample, etc.
        rid = request_id if request_id is not None else uuid.uuid4().hex
        if rid in self._contexts:
            raise ValueError(f"request_id {rid!r} is already in use")
        eos = EOSTracker(params, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer,
                         prompt_token_ids=ids, default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
        ctx = TextGenerationContext(rid, ids, params, eos)
        ctx.steering = steering
        return ctx

    def _check_steering(self, steering) -> None:
        if steering is None:
            return
        if not isinstance(steering, Steering):
            raise TypeError(f"steering must be a decodekit.Steering, got {type(steering).__name__}")
        if self._steer is None:
            raise ValueError("this generator has no steering hooks (constructed with steering=False, or "
                             f"the decoder layers of {type(self.model).__name__} were not found)")
        steering.vector.check_fits(self._steer.num_layers, self._steer.hidden_size)

    def release(self, context_or_request_id: TextGenerationContext | str) -> None:
        """Free a request's slot; an active request ends CANCELLED. Unknown ids: ``KeyError``."""
        rid = (context_or_request_id.request_id
               if isinstance(context_or_request_id, TextGenerationContext)
               else context_or_request_id)
        ctx = self._contexts.pop(rid, None)
        if ctx is None:
            given = context_or_request_id
            if isinstance(given, TextGenerationContext) and given.slot is None:
                if given.status is GenerationStatus.ACTIVE:  # never started: cancel it
                    given.status = GenerationStatus.CANCELLED
                return
            raise KeyError(f"unknown request_id {rid!r}")
        if ctx.status is GenerationStatus.ACTIVE:
            ctx.status = GenerationStatus.CANCELLED
        self._free_slot(ctx)

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def next_token(
        self, batch: Mapping[str, TextGenerationContext], num_steps: int = 1
    ) -> dict[str, TextGenerationResponse]:
        """Advance every context in ``batch`` by up to ``num_steps`` tokens.

        Contexts new to the generator are prefilled first (their first token counts as
        one step). Returns, per request id, the tokens produced in this call and the
        status after it. Done requests free their slot at once; call :meth:`release`
        to forget them.
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        t_start = time.perf_counter()
        stats = StepStats()
        out: dict[str, TextGenerationResponse] = {}
        # Tokens sampled in this call stay on the device, (SamplerOutput, row) per step,
        # until one transfer at the end hands them to the EOS trackers.
        pending: dict[str, list[tuple[SamplerOutput, int]]] = {}
        with nvtx.nvtx_range("decodekit.step", len(batch)):
            live: list[TextGenerationContext] = []
            self._check_batch(batch)
            fresh: list[TextGenerationContext] = []
            try:
                for rid, ctx in batch.items():
                    out[rid] = TextGenerationResponse([], ctx.status)
                    if ctx.is_done:
                        continue
                    pending[rid] = []
                    if ctx.slot is None:
                        self._admit(ctx)
                        fresh.append(ctx)
                    live.append(ctx)
            except BaseException:
                for ctx in fresh:
                    self._unadmit(ctx)
                raise
            try:
                prefilled = self._prefill_all(fresh, stats)
            except BaseException:
                for ctx in fresh:  # undo the admissions: the contexts stay as they were
                    self._unadmit(ctx)
                raise
            for ctx, first in prefilled:
                pending[ctx.request_id].append(first)
            steps_left = {c.request_id: num_steps - len(pending[c.request_id]) for c in live}
            for _ in range(num_steps):
                rows = [c for c in live if steps_left[c.request_id] > 0 and
                        self._room(c, len(pending[c.request_id]))]
                if not rows:
                    break
                if self.draft is not None:
                    drafts = self._propose(rows, pending)
                    if drafts is not None:
                        for c, toks in self._spec_decode(rows, *drafts, stats).items():
                            pending[c.request_id].extend(toks)
                            steps_left[c.request_id] -= 1
                        continue
                    # no row has a draft: a plain step draws the same tokens, cheaper
                res = self._decode(rows, stats)
                for i, c in enumerate(rows):
                    pending[c.request_id].append((res, i))
                    steps_left[c.request_id] -= 1
            host = self._to_host(pending)
            for ctx in live:
                out[ctx.request_id] = self._finish_commit(ctx, host[ctx.request_id], stats)
        stats.batch_size = len(live)
        stats.total_s = time.perf_counter() - t_start
        self.stats = stats
        return out

    # ------------------------------------------------------------------ internals
    def _check_batch(self, batch: Mapping[str, TextGenerationContext]) -> None:
        """Validate the whole batch before touching any state, so an error leaves every
        context as it was (nothing half-admitted, no sampled token lost)."""
        new = 0
        for rid, ctx in batch.items():
            if rid != ctx.request_id:
                raise ValueError(f"batch key {rid!r} != context.request_id {ctx.request_id!r}")
            if ctx.is_done:
                continue
            if ctx.slot is None:
                if rid in self._contexts:
                    raise ValueError(f"request_id {rid!r} is already running")
                new += 1
            elif self._contexts.get(rid) is not ctx:
                raise ValueError(f"context {rid!r} belongs to another generator")
        if new > len(self._free):
            raise RuntimeError(
                f"{new} new requests but only {len(self._free)} of {self.max_batch_size} slots are "
                "free: release finished requests first"
            )

    def _vocab_size(self) -> int:
        emb = self.model.get_output_embeddings()
        if emb is not None and hasattr(emb, "weight"):
            return int(emb.weight.shape[0])
        return int(self.model.config.vocab_size)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True,
                                                     tokenize=True)
            if isinstance(ids, Mapping) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        ids = [int(t) for t in prompt]
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt token id {t} outside [0, {self.vocab_size})")
        return ids

    def _admit(self, ctx: TextGenerationContext) -> None:
        if ctx.request_id in self._contexts:
            raise ValueError(f"request_id {ctx.request_id!r} is already running")
        if not self._free:
            raise RuntimeError(
                f"all {self.max_batch_size} slots are busy: release finished requests first"
            )
        slot = self._free[0]
        self.sampler.add(slot, ctx.params, ctx.prompt_token_ids)  # may refuse: slot stays free
        if ctx.steering is not None:
            try:
                self._check_steering(ctx.steering)  # (the field may have changed since new_context)
                self._steered_slots.add(slot)
                self._steer.set_row(slot, ctx.steering, len(ctx.prompt_token_ids))
                if self._drafter is not None:
                    self._drafter.set_steering(slot, ctx.steering, len(ctx.prompt_token_ids))
            except BaseException:
                self.sampler.remove(slot)
                self._clear_steering(slot)
                raise
        self._free.pop(0)
        ctx.slot = slot
        self._slot_owner[slot] = ctx
        self._contexts[ctx.request_id] = ctx

    def _unadmit(self, ctx: TextGenerationContext) -> None:
        """Undo :meth:`_admit` for a context whose prefill did not complete."""
        self._contexts.pop(ctx.request_id, None)
        self._free_slot(ctx)
        ctx.length = ctx.draft_length = 0

    def _free_slot(self, ctx: TextGenerationContext) -> None:
        if ctx.slot is None:
            return
        self.sampler.remove(ctx.slot)
        if ctx.slot in self._steered_slots:  # whatever ctx.steering says now
            self._clear_steering(ctx.slot)
        self._slot_owner[ctx.slot] = None
        self._free.append(ctx.slot)
        self._free.sort()
        ctx.slot = None

    def _clear_steering(self, slot: int) -> None:
        self._steered_slots.discard(slot)
        if self._steer is not None:
            self._steer.clear_row(slot)
        if self._drafter is not None:
            self._drafter.set_steering(slot, None, 0)

    def _room(self, ctx: TextGenerationContext, n_pending: int) -> bool:
        done = len(ctx.generated_token_ids) + n_pending
        limit = ctx.params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        return done < limit and ctx.length < self.max_seq_len

    def _masks(self, q_pos: torch.Tensor, length: torch.Tensor, kv_len: int):
        return attention_masks(self._mask_kind, self._windows, q_pos, length, kv_len, self.dtype)

    def _forward(self, input_ids, q_pos, length, first_slot: int, kv_len: int, keep: int = 1):
        """Logits ``[B, V]`` of each row's last position (``[B, keep, V]`` when keep > 1)."""
        self.cache.bind(first_slot, q_pos, kv_len)
        with maybe_bound(self._steer, first_slot, q_pos):
            out = self.model(
                input_ids=input_ids,
                attention_mask=self._masks(q_pos, length, kv_len),
                position_ids=q_pos,
                use_cache=True,
                **{self._cache_kw: self.cache},
                logits_to_keep=keep,
            )
        return out.logits[:, -1, :] if keep == 1 else out.logits[:, -keep:, :]

    def _kv_len(self, longest: int) -> int:
        return min(self.cache.max_seq_len, -(-longest // 64) * 64)

    def _prefill_all(self, fresh: list[TextGenerationContext], stats: StepStats):
        """Prefill new requests, one forward per run of contiguous slots (left-padded).

        Padding sits before each shorter prompt, so every row's last prompt token is the
        last position and one logits row per request is kept. Pad tokens write their KV
        at positions after their row's prompt (free space, masked out, overwritten later).
        """
        fresh = sorted(fresh, key=lambda c: c.slot)
        runs: list[list[TextGenerationContext]] = []
        for c in fresh:
            if runs and runs[-1][-1].slot + 1 == c.slot:
                runs[-1].append(c)
            else:
                runs.append([c])
        done = []
        for run in runs:
            res = self._prefill(run, stats)
            done.extend((c, (res, i)) for i, c in enumerate(run))
        return done

    def _prefill(self, run: list[TextGenerationContext], stats: StepStats) -> SamplerOutput:
        P = max(len(c.prompt_token_ids) for c in run)
        ids = torch.zeros(len(run), P, dtype=torch.long)
        pos = torch.zeros(len(run), P, dtype=torch.long)
        for r, c in enumerate(run):
            n = len(c.prompt_token_ids)
            ids[r, P - n:] = torch.tensor(c.prompt_token_ids)
            pos[r, P - n:] = torch.arange(n)
            pos[r, : P - n] = torch.arange(n, P)  # pads: free positions after the prompt
        lengths = [len(c.prompt_token_ids) for c in run]
        slots = [c.slot for c in run]
        with nvtx.nvtx_range("decodekit.prefill", sum(lengths)):
            t0 = time.perf_counter()
            x, q = ids.to(self.device), pos.to(self.device)
            with nvtx.nvtx_range("decodekit.forward", sum(lengths)):
                lengths_dev = self._upload(lengths)
                logits = self._forward(x, q, lengths_dev, slots[0], self._kv_len(P))
                if self._drafter is not None:
                    self._drafter.prefill(x, q, lengths_dev, slots[0], self._kv_len(P), run)
            t1 = time.perf_counter()
            with nvtx.nvtx_range("decodekit.sample", len(run)):
                res = self.sampler.sample(logits, slots)
                self._last_tok[slots[0]: slots[0] + len(run)] = res.token_ids
            stats.forward_s += t1 - t0
            stats.sample_s += time.perf_counter() - t1
        stats.prefill_tokens += sum(lengths)
        for c, n in zip(run, lengths, strict=True):
            c.length = n
        return res

    def _decode(self, rows: list[TextGenerationContext], stats: StepStats) -> SamplerOutput:
        """One decode step for ``rows``: a forward over slots ``0..max_slot`` (other slots in
        that range are padding whose outputs are ignored), then the sampler over the rows.
        Each row's input is its newest token, already on the device (``_last_tok``)."""
        n = max(c.slot for c in rows) + 1
        steered = self._steer is not None and self._steer.active  # graphs hold no steering
        graphs = self._graphs is not None and self._graphs.ready(n) and not steered
        n_fill = self._graphs.bucket(n) if graphs else n  # a graph runs its whole bucket
        pos = [0] * n_fill
        length = [0] * n_fill
        for slot in range(n_fill):  # padding rows write at their own next position (free space)
            owner = self._slot_owner[slot]
            if owner is not None:
                p = min(owner.length, self.max_seq_len - 1)
                pos[slot], length[slot] = p, p + 1
        longest = 1
        for c in rows:  # each row's newest token goes to its next position
            pos[c.slot], length[c.slot] = c.length, c.length + 1
            longest = max(longest, c.length + 1)
        slots = [c.slot for c in rows]
        with nvtx.nvtx_range("decodekit.decode", len(rows)):
            t0 = time.perf_counter()
            with nvtx.nvtx_range("decodekit.forward", n):
                if graphs:
                    logits = self._graphs.run(n_fill, pos, length)[:n]
                else:
                    q = self._upload(pos)[:, None]
                    ln = self._upload(length)
                    logits = self._forward(self._last_tok[:n, None], q, ln, 0,
                                           self._kv_len(longest))
            t1 = time.perf_counter()
            with nvtx.nvtx_range("decodekit.sample", len(rows)):
                idx = self._upload(slots)
                res = self.sampler.sample(logits.index_select(0, idx), slots)
                self._last_tok.index_copy_(0, idx, res.token_ids)
            for c in rows:
                c.length += 1
            stats.forward_s += t1 - t0
            stats.sample_s += time.perf_counter() - t1
        stats.steps += 1
        return res

    def _batch_cap(self, n_rows: int) -> int:
        """Longest draft per row at this batch size. A verification forward costs about
        ``1 + k`` tokens per row: on a CPU (compute-bound already at small batches) the
        whole batch shares a budget of ``k`` drafted tokens per step; on a GPU decode is
        bandwidth-bound, so drafts stay full length up to batch 32 and shrink beyond."""
        if not self.adaptive_k:
            return self.spec_k
        if self.device.type != "cuda":
            return self.spec_k // n_rows
        return self.spec_k if n_rows <= 32 else self.spec_k * 32 // n_rows

    def _propose(self, rows: list[TextGenerationContext], pending):
        """Drafts for one speculative step, or None when no row has any: ``(drafts int64
        [R, K] on the device (-1 past each row's draft), n_draft per row, q [R, K, V] or
        None for a drafter without a distribution)``."""
        cap = self._batch_cap(len(rows))
        if cap == 0:
            return None
        host = self._to_host({c.request_id: pending[c.request_id] for c in rows})
        rooms, seen = [], []
        for c in rows:  # later steps of this call see plain ints
            pend = pending[c.request_id]
            toks, lps = host[c.request_id]
            pend[:] = [_HostToken(t, lp) for t, lp in zip(toks, lps, strict=True)]
            limit = c.params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
            room = min(self._adaptive_k(c), cap,
                       limit - len(c.generated_token_ids) - len(pend) - 1,
                       self.max_seq_len - c.length - 1)
            rooms.append(max(room, 0) if c.speculate else 0)
            seen.append(c.prompt_token_ids + c.generated_token_ids + toks)
        if not any(rooms):
            return None
        if self._drafter is not None:
            dpad, q = self._drafter.propose(rows, seen, rooms)
            return dpad, rooms, q
        drafts = [self.draft.propose(s, r) if r > 0 else [] for s, r in zip(seen, rooms, strict=True)]
        K = max(len(d) for d in drafts)
        if K == 0:
            return None
        dpad = torch.full((len(rows), K), -1, dtype=torch.long)
        for r, d in enumerate(drafts):
            dpad[r, : len(d)] = torch.tensor(d, dtype=torch.long)
        return dpad.to(self.device), [len(d) for d in drafts], None

    def _adaptive_k(self, c: TextGenerationContext) -> int:
        """Draft length for a request: grows after fully accepted drafts, halves after fully
        rejected ones; at 0 the request rests, then probes with 1, resting twice as long
        after each probe that is rejected too (8, 16, ... 128 steps). Model drafts cost
        forwards, so they start at half length."""
        if not self.adaptive_k:
            return self.spec_k
        if c.spec_k is None:
            c.spec_k = self.spec_k if self._drafter is None else max(1, self.spec_k // 2)
        if c.spec_k == 0:
            c.spec_rest -= 1
            if c.spec_rest > 0:
                return 0
            c.spec_k = 1
        return c.spec_k

    def _adapt(self, c: TextGenerationContext, drafted: int, accepted: int) -> None:
        """After a verification: k grows after a full acceptance, halves after a full
        rejection; the request rests (backoff) when k reaches 0 or its running acceptance
        is below the drafter's break-even (a draft that costs more than it saves)."""
        if not self.adaptive_k or not drafted:
            return
        rate = accepted / drafted
        prior = 1.0 if c.spec_alpha is None else c.spec_alpha  # optimistic start
        c.spec_alpha = 0.7 * prior + 0.3 * rate
        if accepted == drafted:
            c.spec_k = min(self.spec_k, c.spec_k + 1)
        elif accepted == 0:
            c.spec_k //= 2
        if c.spec_k == 0 or c.spec_alpha < self._break_even:
            c.spec_k = 0
            c.spec_rest = 8 << min(c.spec_misses, 4)
            c.spec_misses += 1
        elif accepted:
            c.spec_misses = 0

    def _spec_decode(self, rows: list[TextGenerationContext], dpad_dev: torch.Tensor,
                     n_draft: list[int], q_draft: torch.Tensor | None,
                     stats: StepStats) -> dict[TextGenerationContext, list[int]]:
        """One speculative step: one target forward over ``1 + K`` positions per row
        (``dpad_dev [R, K]``: the drafts, -1 past ``n_draft``), exact verification against
        the draft distributions ``q_draft [R, K, V]`` (None: point masses), commit of the
        emitted tokens, rollback of the rest.

        Penalties see the earlier drafts of the window: draft ``j``'s target distribution
        is computed as if drafts ``0..j-1`` had been accepted (``Sampler.window_probs``,
        which commits nothing); only the emitted tokens are committed, so rejected drafts
        never reach the penalty counts, the EOS tracker or the output.
        """
        K = dpad_dev.shape[1]
        q = K + 1
        n = max(c.slot for c in rows) + 1
        ar = torch.arange(q)
        pos = torch.zeros(n, q, dtype=torch.long)
        length = torch.zeros(n, dtype=torch.long)
        for slot in range(n):  # padding rows write after their own length (free space)
            owner = self._slot_owner[slot]
            if owner is not None:
                pos[slot] = owner.length + ar
                length[slot] = owner.length + 1
        ids = self._last_tok[:n, None].repeat(1, q)
        for c in rows:
            pos[c.slot] = c.length + ar
            length[c.slot] = c.length + q
        slots = [c.slot for c in rows]
        idx = self._upload(slots)
        rows_dev = idx[:, None].expand(-1, K)
        ids[rows_dev, 1 + torch.arange(K, device=self.device)[None, :]] = dpad_dev.clamp(min=0)
        with nvtx.nvtx_range("decodekit.verify", len(rows)):
            t0 = time.perf_counter()
            with nvtx.nvtx_range("decodekit.forward", n * q):
                longest = int(max(c.length for c in rows)) + q
                logits = self._forward(ids, pos.to(self.device), length.to(self.device), 0,
                                       self._kv_len(longest), keep=q)
                if q == 1:
                    logits = logits[:, None]
            t1 = time.perf_counter()
            with nvtx.nvtx_range("decodekit.sample", len(rows)):
                sel = logits.index_select(0, idx)
                sp = self.sampler
                processed_lp = sp.logprobs_mode == "processed" and any(
                    c.params.logprobs is not None for c in rows)
                lsm = sp.window_logprobs(sel, slots, dpad_dev) if processed_lp else None
                nd = self._upload(n_draft)
                out, n_acc = sp.verify(sp.window_probs(sel, slots, dpad_dev), q_draft, dpad_dev,
                                       nd, slots)
                sp.accept(slots, out)
                self._last_tok.index_copy_(0, idx, out.gather(1, n_acc.long()[:, None])[:, 0])
                out_h, acc_h = out.tolist(), n_acc.tolist()
                lps = self._spec_logprobs(rows, sel, lsm, out, out_h)
            stats.forward_s += t1 - t0
            stats.sample_s += time.perf_counter() - t1
        stats.steps += 1
        if self._drafter is not None:
            self._drafter.committed(rows, K, acc_h)
        result = {}
        for r, (c, d, o, a) in enumerate(zip(rows, n_draft, out_h, acc_h, strict=True)):
            c.length += a + 1
            result[c] = [_HostToken(t, None if lps is None else lps[r][j]) for j, t in enumerate(o[: a + 1])]
            if d:
                c.spec_stats.add(d, a, self.spec_k)
                self.spec_stats.add(d, a, self.spec_k)
                self._adapt(c, d, a)
        return result

    def _spec_logprobs(self, rows, logits: torch.Tensor, processed: torch.Tensor | None, out: torch.Tensor,
                       out_h: list[list[int]]):
        """Logprobs of a speculative step's tokens for the rows that ask (None if none do):
        ``[row][position] -> LogProbabilities``, from the target's logits ``[R, K+1, V]``
        (raw mode) or the processed log-probabilities of each position (processed mode),
        the same definitions as on plain steps."""
        asked = [c.params.logprobs for c in rows if c.params.logprobs is not None]
        if not asked:
            return None
        if self.sampler.logprobs_mode == "raw":
            src = self.sampler.raw_logprobs(logits)
        else:
            src = processed
        chosen = src.gather(2, out.clamp(min=0)[..., None])[..., 0].tolist()  # [R][K+1]
        n = max(asked)
        top_v = top_i = None
        if n > 0:
            top = src.topk(n, -1)
            top_v, top_i = top.values.tolist(), top.indices.tolist()
        res = []
        for r, c in enumerate(rows):
            row = []
            for j, t in enumerate(out_h[r]):
                k = c.params.logprobs
                if k is None or t < 0:
                    row.append(None)
                    continue
                top_d = dict(zip(top_i[r][j][:k], top_v[r][j][:k], strict=True)) if k else {}
                top_d.setdefault(t, chosen[r][j])
                row.append(LogProbabilities([chosen[r][j]], [top_d]))
            res.append(row)
        return res

    def _upload(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _to_host(self, pending) -> dict[str, tuple[list[int], list[LogProbabilities | None]]]:
        """One device-to-host transfer for every token sampled in this call."""
        results: dict[int, SamplerOutput] = {}
        for items in pending.values():
            for item in items:
                if not isinstance(item, _HostToken):
                    results[id(item[0])] = item[0]
        order = list(results)
        flat = torch.cat([results[k].token_ids for k in order]).tolist() if order else []
        base, at = {}, 0
        for k in order:
            base[k] = at
            at += results[k].token_ids.shape[0]
        host = {}
        for rid, items in pending.items():
            ctx = self._contexts.get(rid)
            want_lp = ctx is not None and ctx.params.logprobs is not None
            toks = [it.token if isinstance(it, _HostToken) else flat[base[id(it[0])] + it[1]]
                    for it in items]
            lps = [it.logprobs if isinstance(it, _HostToken) else
                   it[0].log_probabilities(it[1], ctx.params.logprobs) if want_lp else None
                   for it in items]
            host[rid] = (toks, lps)
        return host

    def _keep_logprobs(self, ctx: TextGenerationContext, res, row: int) -> None:
        if ctx.params.logprobs is not None and res.logprobs is not None:
            ctx.logprobs.append(res.log_probabilities(row, ctx.params.logprobs))

    def _finish_commit(self, ctx: TextGenerationContext, sampled, stats: StepStats
                       ) -> TextGenerationResponse:
        """Hand the call's tokens to the EOS tracker; keep what precedes the first stop."""
        toks, lps = sampled
        commit = ctx.eos.commit(toks)
        kept = list(commit.token_ids)
        responses = [TextResponse(t, lp) for t, lp in zip(kept, lps[: len(kept)], strict=True)]
        if ctx.params.logprobs is not None:
            ctx.logprobs.extend(lp for lp in lps[: len(kept)] if lp is not None)
        ctx.generated_token_ids.extend(kept)
        if toks:
            ctx.last_token = toks[-1]
        stats.tokens += len(kept)
        if commit.finished:
            ctx.status = (GenerationStatus.MAXIMUM_LENGTH if commit.finish_reason == "length"
                          else GenerationStatus.END_OF_SEQUENCE)
        elif ctx.length >= self.max_seq_len:
            ctx.status = GenerationStatus.MAXIMUM_LENGTH
        if ctx.status.is_done:
            self._free_slot(ctx)
        return TextGenerationResponse(responses, ctx.status, commit.text)

    # ------------------------------------------------------------------ self test
    @torch.inference_mode()
    def _self_test(self) -> None:
        """Prefill + decode through the slot cache must match a cache-free forward;
        otherwise the model's attention does not go through the Cache API as we use it."""
        V = self.vocab_size
        n = min(6, self.max_seq_len - 1)
        ids = torch.arange(1, n + 2, device=self.device)[None] % V
        try:
            ref = self.model(input_ids=ids, use_cache=False).logits[0, -2:].float()
            slot = self.max_batch_size - 1
            pos = torch.arange(n, device=self.device)[None]
            a = self._forward(ids[:, :n], pos, torch.tensor([n], device=self.device), slot,
                              self._kv_len(n + 1))
            p2 = torch.tensor([[n]], device=self.device)
            b = self._forward(ids[:, n:], p2, torch.tensor([n + 1], device=self.device), slot,
                              self._kv_len(n + 1))
        except Exception as e:  # noqa: BLE001 - any failure means unsupported
            raise ValueError(
                f"unsupported model {type(self.model).__name__}: a forward through decodekit's "
                f"slot KV cache failed ({type(e).__name__}: {e})"
            ) from e
        got = torch.cat([a, b]).float()
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
        if not err <= tol:
            raise ValueError(
                f"unsupported model {type(self.model).__name__}: its attention does not follow "
                f"the Cache API as decodekit drives it (relative error {err:.2e})"
            )


class _DecodeGraphs:
    """CUDA graphs of the decode forward, one per batch-size bucket, captured at construction.

    Static inputs: the generator's ``_last_tok`` (token ids), and position / length
    buffers filled each step; attention always spans ``max_seq_len`` (masks are built
    inside the graph from the buffers). A bucket whose capture fails falls back to eager.
    """

    def __init__(self, gen: TokenGenerator) -> None:
        self.gen = gen
        S = gen.max_batch_size
        self.buckets = sorted({min(1 << i, S) for i in range(S.bit_length() + 1)})
        self.pos = torch.zeros(S, 1, dtype=torch.long, device=gen.device)
        self.length = torch.zeros(S, dtype=torch.long, device=gen.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: set[int] = set()
        self.pool = None

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def capture_all(self) -> None:
        """Capture every bucket now, while the cache holds no request (warm-up forwards
        write at position 0 of slots ``0..b-1``)."""
        for b in self.buckets:
            try:
                self._capture(b)
            except Exception as e:  # noqa: BLE001 - any capture failure means eager
                import warnings

                warnings.warn(f"decodekit: CUDA graph capture failed for batch {b}, running "
                              f"eagerly ({type(e).__name__}: {e})", stacklevel=3)
                self.failed.add(b)
                torch.cuda.synchronize()

    def ready(self, n: int) -> bool:
        return self.bucket(n) in self.graphs

    def _forward(self, b: int) -> torch.Tensor:
        g = self.gen
        return g._forward(g._last_tok[:b, None], self.pos[:b], self.length[:b], 0, g.max_seq_len)

    def _capture(self, b: int) -> None:
        g = self.gen
        self.pos[:b].zero_()
        self.length[:b].zero_()
        stream = torch.cuda.Stream(g.device)
        stream.wait_stream(torch.cuda.current_stream(g.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up allocations and lazy initialisation
                self._forward(b)
        torch.cuda.current_stream(g.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = (graph, logits)

    def run(self, b: int, pos: list[int], length: list[int]) -> torch.Tensor:
        """Replay bucket ``b``; ``pos``/``length`` cover all ``b`` rows (live slots that are
        not decoding write at their own next position, unowned slots at position 0)."""
        self.pos[:b, 0].copy_(self.gen._upload(pos), non_blocking=True)
        self.length[:b].copy_(self.gen._upload(length), non_blocking=True)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits
