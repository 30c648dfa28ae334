"""A request's state in the engine: :class:`TextGenerationContext`.

Created by :meth:`~decodekit.TokenGenerator.new_context`, advanced by ``next_token``,
released by ``release``. The scheduler reads it (status, text, tokens); the generator
writes it. Plain data; calls only its own EOS tracker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..outputs import GenerationStatus, LogProbabilities
from ..params import SamplingParams
from ..speculative.base import SpecStats
from ..steering.vector import Steering
from ..structured.grammar import Guide
from .eos import EOSTracker

__all__ = ["TextGenerationContext"]


@dataclass(eq=False)
class TextGenerationContext:
    """A request: its prompt, settings, status and the tokens generated so far.

    ``slot`` is its KV-cache slot while it runs (None before admission and after release);
    ``length`` counts the tokens in that slot's cache (the newest sampled token is not in it
    yet). ``speculate = False`` turns the generator's drafter off for this request;
    ``spec_stats`` counts its speculation. ``steering`` steers it alone. ``seed`` keys its
    randomness: ``params.seed``, or one the generator drew when it made the context (so a
    retried call samples the same tokens). ``preemptions`` counts the times a full paged
    cache took its room back: it then waits without a slot (``slot`` None, still ACTIVE) and
    the next call that includes it prefills its prompt and generated tokens again, then goes
    on exactly as if nothing had happened. ``guide``: its grammar's matcher, at the point of
    its generated tokens (guided decoding). ``parent_id`` / ``index``: sample ``index`` of
    a prompt drawn ``n`` / ``best_of`` times (:meth:`~decodekit.TokenGenerator.new_contexts`);
    ``prompt_logprobs``: entry ``i`` the raw log-probability of prompt token ``i`` given the
    ones before it (entry 0 None), filled by the prefill when ``params.prompt_logprobs`` asks.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos: EOSTracker
    status: GenerationStatus = GenerationStatus.ACTIVE
    slot: int | None = None
    length: int = 0
    last_token: int | None = None
    generated_token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogProbabilities] = field(default_factory=list)
    speculate: bool = True
    spec_stats: SpecStats = field(default_factory=SpecStats)
    steering: Steering | None = None
    seed: int | None = None  # the seed of its randomness (params.seed, or drawn at creation)
    preemptions: int = 0  # times the paged cache ran out and took its blocks back (it re-prefills)
    fork_of: TextGenerationContext | None = None  # made by fork() before its parent's prefill
    forks: int = 0  # children forked from it so far (their seeds go on from seed + forks + 1)
    guide: Guide | None = None  # its grammar matcher (params.guided_decoding)
    logits_processors: tuple = ()  # callables editing its logits before sampling (engine.processors)
    parent_id: str | None = None  # one of several samples of a prompt (new_contexts): the first one's id
    index: int = 0  # which sample (seeded seed + index)
    prompt_logprobs: list[LogProbabilities | None] | None = None  # params.prompt_logprobs, once prefilled
    lora: str | None = None  # the name of its LoRA adapter (loaded in the generator)

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

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the generated tokens' log-probabilities (None unless ``params.logprobs``)."""
        if self.params.logprobs is None:
            return None
        return float(sum(lp.token_log_probabilities[0] for lp in self.logprobs))

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens (those committed to the EOS tracker)."""
        return self.prompt_token_ids + self.generated_token_ids
