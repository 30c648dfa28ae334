"""The per-step token generator around a Hugging Face causal LM (shaped like MAX's
``TokenGenerator``): a scheduler creates contexts, calls :meth:`TokenGenerator.next_token`
with whichever contexts it wants to advance, and releases them when done.

One call: admit the contexts new to the generator (a KV-cache slot and sampler state
each), prefill them (one forward per run of contiguous slots), then run decode steps for
the whole batch (plain, or speculative when a drafter is set and has drafts), and finally
hand the call's tokens to each request's EOS tracker in one host transfer. Requests may
join and leave between calls; nobody else's work is recomputed.

May call: :mod:`.runner` (forwards), the sampler, :mod:`decodekit.speculative.step`,
:mod:`.slots`, :mod:`.pending`, :mod:`.eos`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
import types
import uuid
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .. import nvtx
from .._checks import int_at_least
from ..lora.adapters import LoRAOperation, LoRARequest, LoRAResponse, LoRAStatus
from ..lora.tables import LoRATables
from ..outputs import GenerationStatus, SamplerOutput, StepStats, TextGenerationResponse, TextResponse
from ..params import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from ..sampling import Sampler
from ..speculative import DraftModel, LayerSkipDraft, NGramDraft
from ..speculative.base import SpecStats
from ..speculative.policy import DraftPolicy, WindowCost
from ..speculative.step import SpeculativeStep
from ..steering.vector import Steering
from .beam import BeamSearch, BeamSearchOutput, BeamSearchParams
from .blocks import OutOfBlocks
from .context import TextGenerationContext
from .ensemble import Ensemble
from .eos import EOSTracker
from .graphs import Capture
from .guidance import Guidance
from .kv_cache import kv_shape
from .model_adapter import ModelAdapter, Prompt
from .paging import KVStats, range_salts
from .parallel import all_ranks, check_tensor_parallel, from_leader, shared_seed
from .pending import PendingTokens
from .processors import apply_processors, apply_window_processors, check_processors
from .runner import ModelRunner, Paging
from .scoring import score_prompt
from .slots import SlotTable
from .transaction import CallTransaction

__all__ = ["TokenGenerator"]

DraftConfig = NGramDraft | DraftModel | LayerSkipDraft


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
    logprobs_mode, seed, sampler_backend
        Passed to :class:`~decodekit.Sampler`.
    cuda_graphs : bool
        On CUDA, run decode steps as CUDA graphs captured once per batch-size bucket
        (1, 2, 4, ... up to ``max_batch_size``), and speculative verification windows and a
        draft model's steps per (bucket, width); eager where capture fails
        (:meth:`enable_graphs`).
    draft, num_speculative_tokens
        Speculative decoding: a drafter (:class:`~decodekit.NGramDraft`,
        :class:`~decodekit.DraftModel` or :class:`~decodekit.LayerSkipDraft`) proposes up
        to ``k`` tokens per request and step; the target verifies them in one forward with
        exact rejection sampling (:mod:`decodekit.speculative.step`), so outputs keep the
        target's distribution (greedy: identical tokens). ``ctx.speculate = False`` turns
        it off per request.
    adaptive_k : bool
        Per request and step draft lengths from the cost model
        (:class:`~decodekit.speculative.policy.DraftPolicy`); False: every request drafts
        ``k`` tokens (fewer near its token budget).
    window_cost : dict[int | tuple[int, ...] | str, float] | None
        The draft policy's verification costs: ``{(rows, width): time}`` of one forward over
        ``rows`` batch rows of ``width`` positions, or ``{tokens: time}`` for one row (any
        unit; ``1`` or ``(1, 1)`` among the keys); optionally packed windows ``{(rows, width,
        rows + width - 1): time}`` (one row ``width`` wide, the others one token) and
        ``{"cell": time}``, the sampler's work per window position and row
        (:class:`~decodekit.speculative.policy.WindowCost`). None measures them on the running
        device when the generator is built (rows 1, 2, 4, .. max_batch_size by widths 1, 2, 4,
        .. k + 1; a few seconds on a CPU); timings vary from run
        to run, so seeded *sampled* outputs with speculation are reproducible only with a
        given table (greedy outputs always equal plain decoding's).
    steering : bool
        Install the steering hooks (once, on every decoder layer) so that requests can carry
        a :class:`~decodekit.Steering` (``new_context(..., steering=...)``). Rows without one
        are bit-identical to an unsteered generator. While any request is steered, steps
        replay a second set of graphs captured with steering read on every layer.
    kv_cache : {"paged", "slots"}
        ``"paged"``: keys and values live in blocks of ``block_size`` positions
        (:class:`~decodekit.engine.kv_cache.PagedKVCache`), handed to requests as they grow,
        shared between requests with a common prompt prefix (``prefix_caching``) and
        copied on write. ``"slots"``: one static row of ``max_seq_len`` positions per slot.
    kv_cache_tokens : int | None
        Paged cache capacity in positions (rounded up to whole blocks). Default: enough for
        every slot at ``max_seq_len`` (the same memory as ``"slots"``), so the cache never
        runs out.
    block_size : int
        Positions per block (paged).
    prefix_caching : bool
        Reuse the cached blocks of a prompt's prefix instead of recomputing them; a block's
        key covers its tokens, every token before it, and the steering of its positions.
    attention : {"auto", "triton", "torch"}
        With the paged cache: ``"triton"`` runs attention as the paged Triton kernel
        (registered as a transformers attention backend; reads only each row's live blocks;
        on CPU tensors only under ``TRITON_INTERPRET=1``); ``"torch"`` gathers each row's
        blocks for the model's own attention; ``"auto"``: Triton on CUDA, torch elsewhere.
    batch_logits_processors : Sequence[Callable] | None
        Called once per step with a :class:`~decodekit.engine.processors.BatchProcessorInputs`
        (the step's logits, edited in place, and its requests) before the sampler. Per-request
        ones: ``new_context(..., logits_processors=...)``. With a drafter they also see
        every speculative window position.
    ensemble : Ensemble | None
        Sample from this model combined with other models over its vocabulary
        (:class:`~decodekit.engine.ensemble.Ensemble`: mixture or product of the members'
        distributions); each member keeps a static KV cache in step with the slots. Not
        with ``draft`` (ensemble steps are plain); steering steers the target only.
    max_loras, max_lora_rank : int
        Per-request LoRA adapters (peft format): up to ``max_loras`` loaded at once
        (:meth:`load_lora`, :meth:`lora`), each of rank <= ``max_lora_rank``, on tables
        allocated here; a request names one with ``new_context(..., lora=name)``. 0 (default):
        no LoRA support. Rows without an adapter are bit-identical to a generator without it.
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_seq_len: int = 2048,
                 device=None, dtype=None, logprobs_mode: str = "raw", seed: int | None = None,
                 sampler_backend: str = "auto", cuda_graphs: bool = True, draft: DraftConfig | None = None,
                 num_speculative_tokens: int | None = None, adaptive_k: bool = True,
                 window_cost: dict[Any, float] | None = None, steering: bool = True,
                 kv_cache: str = "paged", kv_cache_tokens: int | None = None, block_size: int = 16,
                 prefix_caching: bool = True, attention: str = "auto",
                 batch_logits_processors: Sequence[Callable] | None = None,
                 ensemble: Ensemble | None = None, max_loras: int = 0, max_lora_rank: int = 64) -> None:
        int_at_least("max_batch_size", max_batch_size, 1)
        int_at_least("max_loras", max_loras, 0)
        int_at_least("max_lora_rank", max_lora_rank, 1)
        int_at_least("max_seq_len", max_seq_len, 2)
        if kv_cache not in ("paged", "slots"):
            raise ValueError(f"kv_cache must be 'paged' or 'slots', got {kv_cache!r}")
        if attention not in ("auto", "triton", "torch"):
            raise ValueError(f"attention must be 'auto', 'triton' or 'torch', got {attention!r}")
        if attention == "triton" and kv_cache != "paged":
            raise ValueError("attention='triton' needs kv_cache='paged'")
        k = _speculative_k(draft, num_speculative_tokens)
        self._batch_processors = check_processors("batch_logits_processors", batch_logits_processors)
        if ensemble is not None and not isinstance(ensemble, Ensemble):
            raise ValueError(f"ensemble must be an Ensemble or None, got {type(ensemble).__name__}")
        if ensemble is not None and draft is not None:
            raise ValueError("ensemble and draft cannot be combined (ensemble steps have no speculative "
                             "window)")
        self.adapter = ModelAdapter(model, tokenizer, device, dtype)
        check_tensor_parallel(self.adapter.tp_size, kv_shape(self.adapter.model.config)[1])
        seed = shared_seed(seed, self.adapter.tp_size)  # every rank keys its draws alike
        limit = self.adapter.max_positions
        if limit is not None and max_seq_len + (k + 1 if k else 0) > limit:
            extra = f" + {k + 1} speculative positions" if k else ""
            raise ValueError(f"max_seq_len {max_seq_len}{extra} exceeds the {limit} learned positions "
                             f"of {self.adapter.name}")
        self.adapter.self_test()
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        scratch = k + 1 if k else 0  # a verification window never writes past the cache
        paging = None
        if kv_cache == "paged":
            kernel = attention == "triton" or (attention == "auto" and self.device.type == "cuda")
            paging = _paging(max_batch_size, max_seq_len + scratch, kv_cache_tokens, block_size,
                             prefix_caching, kernel)
        self.runner = ModelRunner(self.adapter, max_batch_size, max_seq_len, scratch=scratch,
                                  steering=steering, paging=paging,
                                  lora=(max_loras, max_lora_rank) if max_loras else None)
        self._lora_pins: dict[str, weakref.finalize] = {}  # request id -> its adapter's pin
        self._lora_loads: dict[str, int] = {}  # adapter name -> load number (prefix-cache salt)
        self._lora_load_count = itertools.count()
        self._cached: dict[int, int] = {}  # slot -> prompt tokens found in the prefix cache
        self._forks: dict[int, TextGenerationContext] = {}  # slot -> parent whose prefill it shares
        self._admissions = itertools.count()
        self._age: dict[str, int] = {}  # request id -> admission number (the youngest is preempted first)
        self.sampler = Sampler(self.vocab_size, max_batch_size, self.device, eos_token_ids=self.eos_token_ids,
                               logprobs_mode=logprobs_mode, seed=seed, backend=sampler_backend)
        self.slots: SlotTable[TextGenerationContext] = SlotTable(max_batch_size)
        self.members = None if ensemble is None else ensemble.build(self.runner, self.vocab_size, tokenizer)
        self.guidance = Guidance(tokenizer, self.vocab_size, self.eos_token_ids, max_batch_size, self.device)
        self._contexts: dict[str, TextGenerationContext] = {}  # admitted (hold a slot)
        self._issued: weakref.WeakValueDictionary[str, TextGenerationContext] = weakref.WeakValueDictionary()
        self._steered: set[int] = set()  # slots whose steering rows are written
        self._lock = threading.RLock()  # one call at a time: concurrent callers wait
        self.speculative: SpeculativeStep | None = None
        if draft is not None:
            drafter = draft.build(self.runner, self.sampler)
            if window_cost is not None:
                cost = WindowCost(window_cost)
            elif adaptive_k:  # timings differ between ranks: every rank plans with rank 0's
                measured = WindowCost.measure(self.runner, max_batch_size, k + 1)
                cost = WindowCost(from_leader(measured.table(), self.adapter.tp_size))
            else:
                cost = WindowCost({1: 1.0})
            policy = DraftPolicy.for_drafter(drafter, k, cost, adaptive_k)
            self.speculative = SpeculativeStep(drafter, self.runner, self.sampler, k, policy, self.guidance)
        self.stats = StepStats()
        if cuda_graphs and self.device.type == "cuda" and self.adapter.tp_size > 1:
            # NCCL collectives inside captured graphs are not verified yet (no multi-GPU machine)
            warnings.warn("CUDA graphs are not used under tensor parallelism yet: the steps run eager",
                          stacklevel=2)
        elif cuda_graphs and self.device.type == "cuda":
            self.enable_graphs()

    def enable_graphs(self, capture: Capture | None = None) -> None:
        """Capture the CUDA graphs of every decode path now: decode steps per batch bucket
        (plain and steered), speculative verification windows per (bucket, width) and a
        draft model's decode steps. Done at construction on CUDA with ``cuda_graphs=True``;
        call it while no request holds a slot. ``capture``:
        :func:`~decodekit.engine.graphs.eager_capture` runs the same bucketing and padding on
        a CPU (the tests do). A bucket whose capture fails runs eagerly, with a warning."""
        with self._lock:
            if self._contexts:
                raise RuntimeError("enable_graphs needs every slot free (capture writes to the cache)")
            self.runner.enable_graphs(capture, window=self.spec_k)
            if self.members is not None:
                self.members.enable_graphs(capture)
            if self.speculative is not None:
                self.speculative.enable_graphs(capture)

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.dtype

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        return self.adapter.eos_token_ids

    @property
    def spec_k(self) -> int:
        """Longest draft (0 without a drafter)."""
        return 0 if self.speculative is None else self.speculative.k

    @property
    def spec_stats(self) -> SpecStats:
        """Speculation counters over every request (zeros without a drafter)."""
        return SpecStats() if self.speculative is None else self.speculative.stats

    @property
    def kv_stats(self) -> KVStats | None:
        """Paged-cache counters since construction (prefix-cache hits, copied blocks); None
        with ``kv_cache="slots"``."""
        return None if self.runner.kv is None else self.runner.kv.stats

    def encode(self, prompt: Prompt) -> list[int]:
        """The token ids ``new_context`` would give ``prompt`` (text, chat messages with the
        chat template and the generation prompt, or token ids); ``ValueError`` for anything else."""
        return self.adapter.encode(prompt)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache that requests hold: blocks of the paged cache (cached
        prefix blocks that nobody holds count as free), slots of the static one."""
        kv = self.runner.kv
        if kv is None:
            return 1.0 - len(self.free_slots) / self.max_batch_size
        return 1.0 - kv.num_usable / (kv.pool.num_blocks - 1)

    @property
    def running(self) -> Mapping[str, TextGenerationContext]:
        """The admitted requests (they hold a slot), by request id (read-only)."""
        return types.MappingProxyType(self._contexts)

    @property
    def free_slots(self) -> list[int]:
        """Free KV-cache slots, ascending."""
        return self.slots.free

    # ------------------------------------------------------------------ requests
    # ------------------------------------------------------------------ LoRA adapters
    def lora(self, request: LoRARequest) -> LoRAResponse:
        """Load or unload an adapter (MAX's ``LoRARequest`` -> ``LoRAResponse``; never raises:
        a malformed request is the ``ValueError`` of building the ``LoRARequest``). Unloading
        an adapter that a live request names answers ``UNLOAD_ERROR``."""
        tables = self._lora_tables()
        if tables is None:
            load = getattr(request, "operation", None) is LoRAOperation.LOAD
            return LoRAResponse(LoRAStatus.LOAD_ERROR if load else LoRAStatus.UNSPECIFIED_ERROR,
                                "this generator has no LoRA support (construct it with max_loras >= 1)")
        with self._lock:
            res = tables.handle(request)
            if isinstance(request, LoRARequest) and request.operation is LoRAOperation.LOAD \
                    and not all_ranks(res.ok, self.adapter.tp_size):  # a rank could not read it
                if res.ok:
                    tables.unload(request.lora_name)
                    res = LoRAResponse(LoRAStatus.LOAD_ERROR, f"LoRA adapter {request.lora_name!r} loaded "
                                       "here but not on every tensor-parallel rank: unloaded again")
            if res.ok and request.operation is LoRAOperation.LOAD:
                self._lora_loads[request.lora_name] = next(self._lora_load_count)
            if res.status is LoRAStatus.UNLOAD_ERROR and request.lora_name in tables.names:
                users = sum(1 for rid in self._lora_pins
                            if getattr(self._issued.get(rid), "lora", None) == request.lora_name)
                res = LoRAResponse(res.status, f"LoRA adapter {request.lora_name!r} is in use by {users} "
                                               "live request(s): release them (or let them finish) first")
        return res

    def load_lora(self, name: str, path: str | os.PathLike[str]) -> LoRAResponse:
        """Load the peft adapter folder ``path`` as ``name`` (see :meth:`lora`)."""
        return self.lora(LoRARequest(LoRAOperation.LOAD, name, path))

    def unload_lora(self, name: str) -> LoRAResponse:
        """Unload adapter ``name`` (see :meth:`lora`)."""
        return self.lora(LoRARequest(LoRAOperation.UNLOAD, name))

    @property
    def loras(self) -> tuple[str, ...]:
        """Names of the loaded adapters."""
        tables = self._lora_tables()
        return () if tables is None else tables.names

    def _lora_tables(self) -> LoRATables | None:
        return None if self.runner.lora is None else self.runner.lora.tables

    def _check_lora(self, lora: Any) -> None:
        """``ValueError`` unless ``lora`` is None or the name of a loaded adapter."""
        if lora is None:
            return
        if not isinstance(lora, str):
            raise ValueError(f"lora must be an adapter name (str) or None, got {type(lora).__name__}")
        tables = self._lora_tables()
        if tables is None:
            raise ValueError("lora: this generator has no LoRA support (construct it with max_loras >= 1)")
        if lora not in tables.names:
            raise ValueError(f"lora: no adapter named {lora!r} is loaded (loaded: {list(tables.names)})")

    def _pin_lora(self, ctx: TextGenerationContext) -> None:
        """``ctx`` names an adapter: it stays loaded until ``ctx`` is done, released or gone."""
        self._check_lora(ctx.lora)
        tables = self._lora_tables()
        slot = tables.slot_of(ctx.lora)
        tables.acquire(slot)
        self._lora_pins[ctx.request_id] = weakref.finalize(ctx, tables.release, slot)

    def _unpin_lora(self, ctx: TextGenerationContext) -> None:
        pin = self._lora_pins.pop(ctx.request_id, None)
        if pin is not None:
            pin()

    def new_context(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    *, truncate_prompt_tokens: int | None = None,
                    steering: Steering | None = None,
                    logits_processors: Sequence[Callable] | None = None,
                    lora: str | None = None) -> TextGenerationContext:
        """Make a request context; nothing runs until :meth:`next_token`.

        ``prompt`` is text, token ids, or chat messages (rendered with the tokenizer's chat
        template). A prompt longer than ``max_seq_len - max_new_tokens`` raises ``ValueError``
        unless ``truncate_prompt_tokens`` keeps only its last tokens. ``steering`` steers this
        request alone (positions are its absolute token positions: the prompt is
        ``0 .. len(prompt) - 1``). ``logits_processors``: callables that edit this request's
        logits before each draw (:mod:`decodekit.engine.processors`). ``truncate_prompt_tokens``
        (k >= 1: the last k tokens; -1: as many as fit) overrides ``params``'. ``lora``: the
        name of a loaded adapter (:meth:`load_lora`), pinned until the request is done. Several
        samples (``params.n`` or ``best_of`` > 1) need :meth:`new_contexts`.
        """
        params = params if params is not None else SamplingParams()
        if isinstance(params, SamplingParams) and params.samples > 1:
            raise ValueError(f"new_context makes one context, but params ask for n={params.n}, "
                             f"best_of={params.best_of}: use new_contexts (one context per sample)")
        return self._new_context(prompt, params, request_id, truncate_prompt_tokens=truncate_prompt_tokens,
                                 steering=steering, logits_processors=logits_processors, lora=lora)

    def new_contexts(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None, **options: Any) -> list[TextGenerationContext]:
        """The ``params.best_of or params.n`` samples of one prompt, as contexts a scheduler
        runs like any other (``options``: :meth:`new_context`'s keywords). Sample ``i`` has
        ``index`` i, ``parent_id`` the first one's request id and seed ``seed + i``: it equals
        the request seeded ``seed + i``. Passed to one :meth:`next_token` call in this order,
        they share one prefill (:meth:`fork`). With ``best_of > n`` they report logprobs
        (``logprobs=0`` unless more were asked): choosing the best needs them."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.samples > params.n and params.logprobs is None:
            params = params.replace(logprobs=0)
        first = self._new_context(prompt, params, request_id, **options)
        group = [first] + (self.fork(first, params.samples - 1) if params.samples > 1 else [])
        for i, c in enumerate(group):
            c.parent_id, c.index = first.request_id, i
        return group

    def _new_context(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                     *, truncate_prompt_tokens: int | None = None,
                     steering: Steering | None = None,
                     logits_processors: Sequence[Callable] | None = None,
                     lora: str | None = None) -> TextGenerationContext:
        self._check_steering(steering)
        self._check_lora(lora)
        processors = check_processors("logits_processors", logits_processors)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate_for_vocab(self.vocab_size)
        ids = self.adapter.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        max_new = params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        room = self.max_seq_len - max_new
        keep = truncate_prompt_tokens if truncate_prompt_tokens is not None else params.truncate_prompt_tokens
        if keep is not None:
            if keep == -1 and room < 1:
                raise ValueError(f"truncate_prompt_tokens=-1: no prompt token fits (max_seq_len "
                                 f"{self.max_seq_len} - max_new_tokens {max_new} = {room}); lower "
                                 "max_new_tokens")
            keep = room if keep == -1 else int_at_least("truncate_prompt_tokens", keep, 1)
            ids = ids[-keep:]
        if len(ids) > room:
            hint = "lower truncate_prompt_tokens" if keep is not None else "set truncate_prompt_tokens"
            raise ValueError(f"prompt has {len(ids)} tokens but only {max(room, 0)} fit (max_seq_len "
                             f"{self.max_seq_len} - max_new_tokens {max_new}); shorten it, lower "
                             f"max_new_tokens, or {hint}")
        self.sampler.check(params, ids)  # masks that could leave nothing to sample, etc.
        guide = self.guidance.guide(params.guided_decoding)  # compiled here: a bad spec fails now
        eos = EOSTracker(params, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer,
                         prompt_token_ids=ids, default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
        with self._lock:
            rid = self._new_request_id(request_id)
            seed = params.seed if params.seed is not None else self.sampler.new_seed()
            ctx = TextGenerationContext(rid, ids, params, eos, steering=steering, seed=seed, guide=guide,
                                        logits_processors=processors, lora=lora)
            if lora is not None:
                self._pin_lora(ctx)
            self._issued[rid] = ctx
        return ctx

    def fork(self, ctx: TextGenerationContext, n: int) -> list[TextGenerationContext]:
        """``n`` new contexts that go on from where ``ctx`` stands, sharing its KV cache
        (blocks copied only when a child writes into a shared one) and its settings; child
        ``i`` (1..n) is seeded ``ctx.seed + i`` (a later fork of the same ``ctx`` goes on
        numbering: ``ctx.forks``).

        - ``ctx`` not prefilled yet (n samples of one prompt): pass the children in the same
          :meth:`next_token` call as ``ctx``, after it. The prompt is prefilled once; every
          child samples its first token from the same logits (its only token of that call),
          so child ``i`` equals an independent request seeded ``seed + i``, token for token.
          A child that comes without its parent prefills its prompt itself (the prefix cache
          still helps). Forks of such a child are more samples of the same prompt: they share
          the same prefill and are numbered on from the first parent.
        - ``ctx`` running or preempted (beam search, branching): the children carry ``ctx``'s
          generated tokens, logprobs, text and stop-string state, and the sampler's counters
          and penalty counts as they are. A running ``ctx``'s children are admitted now, each
          on a free slot (``RuntimeError`` without enough); a preempted one's are prefilled
          when a call includes them, like it.
        """
        n = int_at_least("n", n, 1)
        with self._lock:
            if not isinstance(ctx, TextGenerationContext) or self._issued.get(ctx.request_id) is not ctx:
                raise ValueError("fork: ctx must be a context made by this generator's new_context")
            if ctx.is_done:
                raise ValueError(f"fork: context {ctx.request_id!r} is {ctx.status.name}, not ACTIVE")
            if ctx.slot is not None and n > self.slots.num_free:
                raise RuntimeError(f"fork of a running request needs {n} free slots, {self.slots.num_free} "
                                   "are free")
            # before a prefill every fork is another sample of the root prompt: numbered from it
            base = (ctx.fork_of or ctx) if not ctx.generated_token_ids else ctx
            children, first = [], base.forks + 1
            base.forks += n
            for i in range(first, first + n):
                seed = (base.seed + i) % (1 << 63)
                params = ctx.params if ctx.params.seed is None else dataclasses.replace(ctx.params, seed=seed)
                name = f"{ctx.request_id}.{i}"
                rid = self._new_request_id(None if name in self._issued or name in self._contexts else name)
                child = TextGenerationContext(rid, list(ctx.prompt_token_ids), params, ctx.eos.fork(),
                                              steering=ctx.steering, seed=seed, speculate=ctx.speculate,
                                              guide=ctx.guide.fork() if ctx.guide is not None else None,
                                              logits_processors=ctx.logits_processors, lora=ctx.lora)
                if child.lora is not None:
                    self._pin_lora(child)
                self._issued[rid] = child
                children.append(child)
            if not ctx.generated_token_ids:  # before the prefill: share it
                for child in children:
                    child.fork_of = ctx.fork_of or ctx
                return children
            for child in children:  # from its tokens: now if running, at re-admission if preempted
                child.generated_token_ids = list(ctx.generated_token_ids)
                child.logprobs = list(ctx.logprobs)
                child.last_token = ctx.last_token
                if ctx.slot is not None:
                    self._admit(child, share=ctx)
                    self._fork_cache(ctx.slot, child.slot)
                    self._forks.pop(child.slot)
                    child.length = ctx.length
                    if self.speculative is not None:
                        self.speculative.admit([child.slot], [child.tokens[: child.length]], [child.steering])
            return children

    def beam_search(self, prompts: Sequence[Prompt], params: BeamSearchParams, *,
                    steering: Steering | None = None, lora: str | None = None) -> list[BeamSearchOutput]:
        """Beam search for each prompt (text, token ids or chat messages, as :meth:`new_context`
        takes) with transformers' ``generate(num_beams=...)`` rules (:mod:`.beam`), each on
        ``params.beam_width`` free slots (``ValueError`` when fewer are free), without
        speculation; ``steering`` steers every beam, ``lora`` (a loaded adapter's name, pinned
        while the search runs) adapts every beam. Every slot is free again when it returns
        or raises. ``OutOfBlocks`` (a ``RuntimeError``) when the paged cache cannot hold the
        beams next to the running requests."""
        self._check_steering(steering)
        self._check_lora(lora)
        if isinstance(prompts, (str, bytes, Mapping, torch.Tensor)) or not isinstance(prompts, Sequence) \
                or any(isinstance(p, (int, Mapping)) for p in prompts):
            raise ValueError("prompts must be a list of prompts (wrap a single prompt in a list)")
        if self.members is not None or self._batch_processors:
            raise ValueError("beam_search runs neither an ensemble nor batch_logits_processors")
        ids = [self.adapter.encode(p) for p in prompts]
        with self._lock:
            tables = self._lora_tables() if lora is not None else None
            pin = None if tables is None else tables.slot_of(lora)
            if pin is not None:
                tables.acquire(pin)  # not unloaded while the beams use it
            try:
                return BeamSearch(self, params, steering, lora).run(ids)
            except OutOfBlocks as e:  # (every slot and block was given back)
                raise OutOfBlocks(f"beam search ran out of KV blocks ({e}): raise kv_cache_tokens, lower "
                                  "beam_width or max_tokens, or release running requests") from e
            finally:
                if pin is not None:
                    tables.release(pin)

    def _new_request_id(self, request_id: str | None) -> str:
        """``request_id`` (or a fresh one) if no live context of this generator has it."""
        if request_id is None:
            return uuid.uuid4().hex
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str or None, got {request_id!r}")
        other = self._issued.get(request_id)
        live = other is not None and other.status is GenerationStatus.ACTIVE
        if request_id in self._contexts or live:
            raise ValueError(f"request_id {request_id!r} is already in use by a live context "
                             "(release it first)")
        return request_id

    def release(self, context_or_request_id: TextGenerationContext | str) -> None:
        """Free a request's slot; an active request ends CANCELLED. Unknown ids: ``KeyError``."""
        given = context_or_request_id
        rid = given.request_id if isinstance(given, TextGenerationContext) else given
        with self._lock:
            ctx = self._contexts.get(rid)
            if isinstance(given, TextGenerationContext) and ctx is not given:
                if given.slot is None:  # never admitted (or long released): cancel it, touch nothing else
                    if given.status is GenerationStatus.ACTIVE:
                        given.status = GenerationStatus.CANCELLED
                    if self._issued.get(rid) is given:
                        self._unpin_lora(given)
                    return
                raise ValueError(f"context {rid!r} belongs to another generator")
            if ctx is None:
                waiting = self._issued.get(rid)  # preempted, or never admitted: holds nothing
                if waiting is None:
                    raise KeyError(f"unknown request_id {rid!r}")
                if waiting.status is GenerationStatus.ACTIVE:
                    waiting.status = GenerationStatus.CANCELLED
                self._unpin_lora(waiting)
                return
            del self._contexts[rid]
            if ctx.status is GenerationStatus.ACTIVE:
                ctx.status = GenerationStatus.CANCELLED
            self._free_slot(ctx)
            self._unpin_lora(ctx)

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def next_token(self, batch: Mapping[str, TextGenerationContext], num_steps: int = 1
                   ) -> dict[str, TextGenerationResponse]:
        """Advance every context in ``batch`` by up to ``num_steps`` steps.

        Contexts new to the generator are prefilled first (their first token counts as one
        step); a speculative step may emit several tokens. Returns, per request id, the
        tokens produced in this call and the status after it. Done requests free their slot
        at once; call :meth:`release` to forget them. When the paged cache is short of
        blocks, a context may get no tokens in a call (it waits, or was preempted: still
        ACTIVE, see ``stats.waiting`` / ``stats.preempted``); include it in a later call.
        """
        int_at_least("num_steps", num_steps, 1)
        with self._lock, nvtx.nvtx_range("decodekit.step", len(batch)):
            t0, stats = time.perf_counter(), StepStats()
            self._check_batch(batch)
            live, fresh = self._admit_all(batch, stats)
            try:
                live = self._make_room(live, fresh, num_steps, stats)
            except BaseException:
                for ctx in fresh:
                    self._unadmit(ctx)
                raise
            pending = PendingTokens({c.request_id: c.params.logprobs for c in live})
            spec: list[tuple[TextGenerationContext, int, int]] = []  # (ctx, drafted, accepted)
            tx = CallTransaction(live, self.sampler, self.runner, self.speculative)
            marks = self.guidance.marks([c.guide for c in live])
            try:
                forked = frozenset(c for c in fresh if c.slot in self._forks)
                self._prefill_all(fresh, pending, stats)
                self._decode(live, fresh, num_steps, pending, spec, stats, forked)
                host = pending.to_host()
                ends = {c.request_id: self.guidance.stop_index(c.guide, marks.get(c.guide)) for c in live}
            except BaseException:
                self.guidance.undo(marks)
                self._undo(tx, pending, fresh)
                raise
            out = {rid: TextGenerationResponse([], c.status) for rid, c in batch.items()}
            self._count_speculation(spec)
            for c in live:
                out[c.request_id] = self._commit(c, *host[c.request_id], stats, ends[c.request_id])
        stats.batch_size, stats.total_s = len(live), time.perf_counter() - t0
        self.stats = stats
        return out

    def _decode(self, live: list[TextGenerationContext], fresh: list[TextGenerationContext], num_steps: int,
                pending: PendingTokens, spec: list, stats: StepStats,
                forked: frozenset[TextGenerationContext] = frozenset()) -> None:
        """Up to ``num_steps`` decode steps (a prefill counts as one) over the rows with room."""
        # a prefill counts as a step; a fork sharing a prefill takes only its first token now
        # (no room was reserved for it before its parent's prefill)
        steps = {c.request_id: num_steps if c in forked else int(c in fresh) for c in live}
        for _ in range(num_steps):
            if self.speculative is not None:  # drafts need the matchers up to date
                self.guidance.flush()
            rows = [c for c in live if steps[c.request_id] < num_steps
                    and self._room(c, pending.count(c.request_id))]
            if not rows:
                return
            self._step(rows, pending, spec, stats)
            for c in rows:
                steps[c.request_id] += 1

    def _undo(self, tx: CallTransaction, pending: PendingTokens, fresh: list[TextGenerationContext]) -> None:
        """A call failed: back to its start; the contexts it admitted leave their slots."""
        try:
            tx.roll_back(pending)
        finally:
            for ctx in fresh:
                self._unadmit(ctx)

    def _count_speculation(self, spec: list[tuple[TextGenerationContext, int, int]]) -> None:
        """Speculation counters of a call, counted once it succeeded."""
        for c, drafted, accepted in spec:
            c.spec_stats.add(drafted, accepted, self.speculative.k)
            self.speculative.stats.add(drafted, accepted, self.speculative.k)

    # ------------------------------------------------------------------ admission
    def _check_batch(self, batch: Mapping[str, TextGenerationContext]) -> None:
        """Validate the whole batch before touching any state, so an error leaves every
        context as it was (nothing half-admitted, no sampled token lost)."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a mapping {{request_id: TextGenerationContext}}, got "
                            f"{type(batch).__name__}")
        new = 0
        for rid, ctx in batch.items():
            if not isinstance(ctx, TextGenerationContext):
                raise TypeError(f"batch[{rid!r}] must be a TextGenerationContext, got {type(ctx).__name__}")
            if rid != ctx.request_id:
                raise ValueError(f"batch key {rid!r} != context.request_id {ctx.request_id!r}")
            if ctx.is_done:
                continue
            if ctx.slot is None:
                if rid in self._contexts:
                    raise ValueError(f"request_id {rid!r} is already running")
                if self._issued.get(rid) is not ctx:
                    raise ValueError(f"context {rid!r} was not made by this generator's new_context "
                                     "(its prompt and settings were checked against another one)")
                new += 1
            elif self._contexts.get(rid) is not ctx:
                raise ValueError(f"context {rid!r} belongs to another generator")
        if new > self.slots.num_free:
            raise RuntimeError(f"{new} new requests but only {self.slots.num_free} of {self.max_batch_size} "
                               "slots are free: release finished requests first")

    def _check_steering(self, steering: Steering | None) -> None:
        if steering is None:
            return
        if not isinstance(steering, Steering):
            raise TypeError(f"steering must be a decodekit.Steering, got {type(steering).__name__}")
        hooks = self.runner.hooks
        if hooks is None:
            raise ValueError("this generator has no steering hooks (constructed with steering=False, or "
                             f"the decoder layers of {self.adapter.name} were not found)")
        steering.vector.check_fits(hooks.num_layers, hooks.hidden_size)

    def _admit_all(self, batch: Mapping[str, TextGenerationContext], stats: StepStats
                   ) -> tuple[list[TextGenerationContext], list[TextGenerationContext]]:
        """``(live, fresh)``: the active contexts that hold a slot, and those admitted now (all
        or none, except that contexts for which the paged cache has no room wait: they and
        every new context after them stay unadmitted, first come first served)."""
        live = [c for c in batch.values() if not c.is_done]
        fresh: list[TextGenerationContext] = []
        waiting: list[TextGenerationContext] = []
        try:
            for ctx in live:
                if ctx.slot is None:
                    if waiting:
                        waiting.append(ctx)
                        continue
                    parent = ctx.fork_of if ctx.fork_of in fresh and not ctx.fork_of.generated_token_ids \
                        and not ctx.generated_token_ids else None
                    try:
                        self._admit(ctx, share=parent)
                    except OutOfBlocks:
                        if not (self._contexts or fresh):  # alone and still no room: cannot happen
                            raise
                        waiting.append(ctx)
                        continue
                    fresh.append(ctx)
        except BaseException:
            for ctx in fresh:
                self._unadmit(ctx)
            raise
        stats.waiting = len(waiting)
        return [c for c in live if c not in waiting], fresh

    def _make_room(self, live: list[TextGenerationContext], fresh: list[TextGenerationContext],
                   num_steps: int, stats: StepStats) -> list[TextGenerationContext]:
        """Hold private cache blocks for every position the call may write (``num_steps``
        steps, a verification window each with a drafter). When the blocks run out the
        youngest admitted request gives its blocks and slot back (preemption; one admitted
        in this call just waits) until the older ones fit. Returns the rows that run."""
        if self.runner.kv is None:
            return live
        adv = 1 + self.spec_k  # tokens a step may emit; a step writes spec_k + 1 past its start
        order = sorted(live, key=lambda c: self._age[c.request_id])
        rows = list(order)
        for ctx in order:
            if ctx not in rows or ctx.slot in self._forks:  # a fork holds nothing before its parent's prefill
                continue
            cap = min(self.max_seq_len, len(ctx.prompt_token_ids) + (ctx.params.max_new_tokens
                                                                      or DEFAULT_MAX_NEW_TOKENS))
            start = len(ctx.tokens) if ctx in fresh else ctx.length  # admitted now: after its prefill
            steps = num_steps - (ctx in fresh)  # a prefill counts as a step
            if steps == 0:
                continue
            end = min(start + steps * adv, cap) + self.spec_k + 1
            while True:
                try:
                    self.runner.reserve([ctx.slot], [start], [end], sync=False)
                    break
                except OutOfBlocks:
                    victim = max(self._contexts.values(), key=lambda c: self._age[c.request_id])
                    if victim is ctx and len(self._contexts) == 1:
                        raise RuntimeError("the KV cache cannot hold one request: raise "
                                           "kv_cache_tokens") from None
                    if victim in fresh:
                        fresh.remove(victim)
                        self._unadmit(victim)
                        stats.waiting += 1
                    else:
                        self._preempt(victim)
                        stats.preempted += 1
                    if victim in rows:
                        rows.remove(victim)
                    if victim is ctx:
                        break
        self.runner.reserve([], [], [])  # one upload of every table change of the call
        return [c for c in live if c in rows]

    def _preempt(self, ctx: TextGenerationContext) -> None:
        """``ctx`` gives its slot and blocks back and waits (ACTIVE); its tokens are kept and
        prefilled again when a later call includes it."""
        del self._contexts[ctx.request_id]
        self._free_slot(ctx)
        ctx.length = 0
        ctx.preemptions += 1

    def _admit(self, ctx: TextGenerationContext, share: TextGenerationContext | None = None) -> None:
        """``ctx`` takes the lowest free slot, sampler state and cache room for its tokens (a
        preempted request: its prompt and everything generated, with the sampler's counters
        and penalty counts brought forward over the generated tokens). ``share``: an admitted
        request whose cache ``ctx`` shares instead (a fork). ``OutOfBlocks``: nothing changed."""
        slot = self.slots.lowest_free()
        if slot is None:
            raise RuntimeError(f"all {self.max_batch_size} slots are busy: release finished requests first")
        self.sampler.add(slot, ctx.params, ctx.prompt_token_ids, seed=ctx.seed)  # may refuse: slot stays free
        if ctx.generated_token_ids:  # preempted earlier: the sampler state as it was
            self.sampler.accept([slot], [ctx.generated_token_ids])
        if ctx.steering is not None:
            try:
                self._check_steering(ctx.steering)  # (the field may have changed since new_context)
                self._steered.add(slot)
                self.runner.hooks.set_row(slot, ctx.steering, len(ctx.prompt_token_ids))
            except BaseException:
                self.sampler.remove(slot)
                self._clear_steering(slot)
                raise
        if ctx.lora is not None:
            self.runner.lora.set_row(slot, ctx.lora)
        try:
            if share is None:
                # a prompt to score is computed whole (no logits for cached positions)
                lookup = ctx.params.prompt_logprobs is None or ctx.prompt_logprobs is not None
                self._cached[slot] = self.runner.admit(slot, ctx.tokens, self._salts(ctx), lookup)
            else:  # the cache is shared once ``share`` is prefilled (_sample_forks)
                self._forks[slot] = share
        except OutOfBlocks:
            self.sampler.remove(slot)
            self._clear_steering(slot)
            self._clear_lora(slot)
            raise
        self.slots.take(slot, ctx)
        ctx.slot = slot
        self._contexts[ctx.request_id] = ctx
        self._age[ctx.request_id] = next(self._admissions)

    def _salts(self, ctx: TextGenerationContext) -> list[bytes]:
        """Prefix-cache salts of the blocks of ``ctx``'s tokens (its steering and adapter)."""
        return self.prefix_salts(ctx.steering, len(ctx.prompt_token_ids), len(ctx.tokens), ctx.lora)

    def prefix_salts(self, steering: Steering | None, prompt_len: int, n_tokens: int,
                     lora: str | None = None) -> list[bytes]:
        """Prefix-cache salts of the full blocks of ``n_tokens`` tokens of a request with a
        ``prompt_len``-token prompt, ``steering`` and LoRA adapter ``lora``: what changes their
        keys and values."""
        salts: list[bytes] = []
        if steering is not None and self.runner.kv is not None:
            lo, hi = steering.position_range(prompt_len)
            bs = self.runner.kv.block_size
            salts = range_salts(steering.digest(), lo, hi, n_tokens // bs, bs)
        if lora is not None:  # every key chains from block 0's: salting it separates them all
            tag = f"lora:{lora}:{self._lora_loads.get(lora, -1)}".encode()
            salts = [(salts[0] if salts else b"") + tag] + salts[1:]
        return salts

    def _unadmit(self, ctx: TextGenerationContext) -> None:
        """Undo :meth:`_admit` for a context whose prefill did not complete."""
        self._contexts.pop(ctx.request_id, None)
        self._free_slot(ctx)
        ctx.length = 0

    def _free_slot(self, ctx: TextGenerationContext) -> None:
        if ctx.slot is None:
            return
        self.sampler.remove(ctx.slot)
        self.runner.free(ctx.slot)
        self._cached.pop(ctx.slot, None)
        self._forks.pop(ctx.slot, None)
        if ctx.slot in self._steered:  # whatever ctx.steering says now
            self._clear_steering(ctx.slot)
        self._clear_lora(ctx.slot)
        if self.speculative is not None:
            self.speculative.release(ctx.slot)
        self.slots.give_back(ctx.slot)
        self._age.pop(ctx.request_id, None)
        ctx.slot = None

    def _clear_lora(self, slot: int) -> None:
        if self.runner.lora is not None:
            self.runner.lora.clear_row(slot)

    def _clear_steering(self, slot: int) -> None:
        self._steered.discard(slot)
        if self.runner.hooks is not None:
            self.runner.hooks.clear_row(slot)

    # ------------------------------------------------------------------ forwards
    def _prefill_all(self, fresh: list[TextGenerationContext], pending: PendingTokens,
                     stats: StepStats) -> None:
        """Prefill new requests, one forward per run of contiguous slots; forks of a request
        prefilled here sample their first token from its logits."""
        forks = [c for c in fresh if c.slot in self._forks]
        rows: dict[int, torch.Tensor] = {}  # parent slot -> logits [V]
        for c in fresh:
            if (c.slot not in self._forks and c.params.prompt_logprobs is not None
                    and c.prompt_logprobs is None):
                self._score(c, stats)
        for run in _contiguous_runs([c for c in fresh if c.slot not in self._forks]):
            self._prefill(run, pending, stats, rows if forks else None)
        if forks:
            self._sample_forks(forks, rows, pending, stats)

    def _score(self, ctx: TextGenerationContext, stats: StepStats) -> None:
        """``ctx``'s prompt log-probabilities: its prompt but the last token forwarded in
        chunks (:mod:`.scoring`); the prefill then computes the last token."""
        with nvtx.nvtx_range("decodekit.prefill", len(ctx.prompt_token_ids) - 1), stats.timing("forward_s"):
            ctx.prompt_logprobs = score_prompt(self.runner, ctx.slot, ctx.prompt_token_ids,
                                               ctx.params.prompt_logprobs, self.vocab_size)
        self._cached[ctx.slot] = len(ctx.prompt_token_ids) - 1
        stats.prefill_tokens += len(ctx.prompt_token_ids) - 1

    def _sample_forks(self, forks: list[TextGenerationContext], rows: dict[int, torch.Tensor],
                      pending: PendingTokens, stats: StepStats) -> None:
        slots = [c.slot for c in forks]
        parents = [self._forks.pop(s) for s in slots]
        for p, s in zip(parents, slots, strict=True):  # the parent's prompt is in its cache now
            self._fork_cache(p.slot, s)
        logits = torch.stack([rows[p.slot] for p in parents])  # [R, V]
        with stats.timing("sample_s"), nvtx.nvtx_range("decodekit.sample", len(forks)):
            res = self._sample(forks, logits, slots, pending)
            pending.add_sampled([c.request_id for c in forks], res)
            self._set_last_tokens(self.runner.upload(slots), res.token_ids)
        for c, p in zip(forks, parents, strict=True):
            c.length = len(c.tokens)
            c.fork_of = None
            if c.params.prompt_logprobs is not None:
                c.prompt_logprobs = p.prompt_logprobs
            if self.speculative is not None:
                self.speculative.admit([c.slot], [c.tokens], [c.steering])

    def _prefill(self, run: list[TextGenerationContext], pending: PendingTokens, stats: StepStats,
                 rows: dict[int, torch.Tensor] | None = None) -> None:
        prompts = [c.tokens for c in run]  # a preempted request: its generated tokens too
        slots = [c.slot for c in run]
        starts = [self._cached.pop(s, 0) for s in slots]
        n_tokens = sum(len(p) - a for p, a in zip(prompts, starts, strict=True))
        with nvtx.nvtx_range("decodekit.prefill", n_tokens):
            with stats.timing("forward_s"):
                logits = self.runner.prefill(prompts, slots[0], starts)
                if self.members is not None:  # the ensemble's members prefill the same slots
                    logits = self.members.prefill(logits, prompts, slots[0])
                if rows is not None:  # forks sample from these
                    rows.update(zip(slots, logits, strict=True))
                for c, p in zip(run, prompts, strict=True):
                    self.runner.register(c.slot, p, self._salts(c))
                if self.speculative is not None:
                    self.speculative.admit(slots, prompts, [c.steering for c in run])
            with stats.timing("sample_s"), nvtx.nvtx_range("decodekit.sample", len(run)):
                res = self._sample(run, logits, slots, pending)
                pending.add_sampled([c.request_id for c in run], res)
                self._set_last_tokens(slice(slots[0], slots[-1] + 1), res.token_ids)
        stats.prefill_tokens += n_tokens
        stats.prefix_hit_tokens += sum(starts)
        for c, p in zip(run, prompts, strict=True):
            c.length = len(p)

    def _step(self, rows: list[TextGenerationContext], pending: PendingTokens, spec: list,
              stats: StepStats) -> None:
        """One decode step for ``rows``: speculative when a drafter has drafts, else plain."""
        if self.speculative is not None and self._speculate(rows, pending, spec, stats):
            return
        slots = [c.slot for c in rows]
        with nvtx.nvtx_range("decodekit.decode", len(rows)):
            with stats.timing("forward_s"):
                out = self.runner.decode(slots, self.slots.lengths())
                if self.members is not None:
                    out = self.members.decode(out, slots, self.slots.lengths())
            with stats.timing("sample_s"), nvtx.nvtx_range("decodekit.sample", len(rows)):
                res = self._sample(rows, out.logits, slots, pending, out.index32)
                pending.add_sampled([c.request_id for c in rows], res)
                self._set_last_tokens(out.index, res.token_ids)
        for c in rows:
            c.length += 1
        stats.steps += 1

    def _fork_cache(self, parent: int, child: int) -> None:
        """``child``'s caches (the target's and each ensemble member's) take ``parent``'s."""
        self.runner.fork(parent, child)
        if self.members is not None:
            self.members.fork(parent, child)

    def _set_last_tokens(self, slots: torch.Tensor | slice, tokens: torch.Tensor) -> None:
        """The next decode inputs of the target and every ensemble member."""
        self.runner.set_last_tokens(slots, tokens)
        if self.members is not None:
            self.members.set_last_tokens(slots, tokens)

    def _sample(self, rows: list[TextGenerationContext], logits: torch.Tensor, slots: list[int],
                pending: PendingTokens, index: torch.Tensor | None = None) -> SamplerOutput:
        """Sample one token per row: after the logits processors, within each guided row's
        grammar (its matcher accepts the token)."""
        if self._batch_processors or any(c.logits_processors for c in rows):
            host = pending.to_host([c.request_id for c in rows])  # processors see every token so far
            seen = [c.tokens + host[c.request_id][0] for c in rows]
            logits = apply_processors(logits, rows, seen, self._batch_processors)
        guides = [c.guide for c in rows]
        res = self.sampler.sample(logits, slots, index=index, mask=self.guidance.mask(guides))
        self.guidance.accept_later(guides, res.token_ids)  # read once the next forward is enqueued
        return res

    def _speculate(self, rows: list[TextGenerationContext], pending: PendingTokens, spec: list,
                   stats: StepStats) -> bool:
        """A speculative step; False (nothing done) when no row has a draft."""
        counts, step = spec, self.speculative
        host = pending.to_host([c.request_id for c in rows])  # drafters read tokens on the host
        seen = [c.tokens + host[c.request_id][0] for c in rows]
        requests = step.requests(rows, seen, self.max_seq_len)
        edit = None
        if self._batch_processors or any(c.logits_processors for c in rows):
            def edit(logits: torch.Tensor, drafts: list[list[int]]) -> torch.Tensor:
                return apply_window_processors(logits, rows, seen, drafts, self._batch_processors)
        result = None if requests is None else step.run(rows, requests, self.slots.lengths(), stats, edit)
        if result is None:
            return False  # a plain step draws the same tokens, cheaper
        for c, r in zip(rows, result, strict=True):
            pending.add_host(c.request_id, r.tokens, r.logprobs)
            c.length += len(r.tokens)
            if r.drafted:
                counts.append((c, r.drafted, r.accepted))
        return True

    # ------------------------------------------------------------------ finishing
    def _room(self, ctx: TextGenerationContext, n_pending: int) -> bool:
        done = len(ctx.generated_token_ids) + n_pending
        limit = ctx.params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        # its grammar has ended (known one step late in plain steps: Guidance.accept_later)
        over = ctx.guide is not None and ctx.guide.terminated
        return done < limit and ctx.length < self.max_seq_len and not over

    def _commit(self, ctx: TextGenerationContext, toks: list[int], lps: list, stats: StepStats,
                stop: int | None = None) -> TextGenerationResponse:
        """Hand the call's tokens to the EOS tracker; keep what precedes the first stop
        (``stop``: the index of the token that ended the request's grammar)."""
        commit = ctx.eos.commit(toks, stop_after=stop)
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
            self._unpin_lora(ctx)
        return TextGenerationResponse(responses, ctx.status, commit.text)


def _speculative_k(draft: DraftConfig | None, num_speculative_tokens: int | None) -> int:
    """The longest draft: ``num_speculative_tokens``, else the drafter's ``k`` (0: no drafter)."""
    if draft is not None and not isinstance(draft, (NGramDraft, DraftModel, LayerSkipDraft)):
        raise TypeError("draft must be an NGramDraft, DraftModel or LayerSkipDraft, got "
                        f"{type(draft).__name__}")
    if draft is None:
        if num_speculative_tokens is not None:
            int_at_least("num_speculative_tokens", num_speculative_tokens, 0)
        return 0
    k = draft.k if num_speculative_tokens is None else num_speculative_tokens
    return int_at_least("num_speculative_tokens", k, 1)


def _paging(slots: int, row: int, tokens: int | None, block_size: int, prefix_caching: bool,
            kernel: bool) -> Paging:
    """The paged cache's shape for ``slots`` rows of up to ``row`` positions."""
    int_at_least("block_size", block_size, 1)
    if kernel and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two >= 16 for the attention kernel, got "
                         f"{block_size}")
    per_row = -(-row // block_size)
    if tokens is None:
        blocks = slots * per_row
    else:
        blocks = -(-int_at_least("kv_cache_tokens", tokens, 1) // block_size)
        if blocks < per_row:
            raise ValueError(f"kv_cache_tokens must hold at least one full-length request "
                             f"({per_row * block_size} positions of max_seq_len + speculative scratch), "
                             f"got {tokens}")
    if not isinstance(prefix_caching, bool):
        raise ValueError(f"prefix_caching must be a bool, got {prefix_caching!r}")
    return Paging(blocks + 1, block_size, prefix_caching, kernel)  # + the null block


def _contiguous_runs(contexts: Sequence[TextGenerationContext]) -> list[list[TextGenerationContext]]:
    """Contexts grouped into runs of consecutive slots (each run is one prefill forward)."""
    runs: list[list[TextGenerationContext]] = []
    for c in sorted(contexts, key=lambda c: c.slot):
        if runs and runs[-1][-1].slot + 1 == c.slot:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs
