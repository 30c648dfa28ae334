"""One prompt's samples as the user sees them: :class:`RequestGroup`.

A prompt drawn ``n`` / ``best_of`` times is several contexts
(:meth:`~decodekit.TokenGenerator.new_contexts`); a :class:`RequestGroup` turns their state
into :class:`~decodekit.RequestOutput` objects shaped by ``params.output_kind``
(cumulative, deltas, or one final output). ``LLM.generate`` / ``stream_outputs`` and the
server's engine thread all read their outputs through it.

May call: the contexts (read only) and the output types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..outputs import CompletionOutput, RequestOutput
from ..params import RequestOutputKind, SamplingParams
from .context import TextGenerationContext

__all__ = ["RequestGroup"]


def _completion(ctx: TextGenerationContext, logprobs: bool, seen: tuple[int, int] = (0, 0)
                ) -> CompletionOutput:
    """``ctx``'s output past ``seen`` (characters, tokens already given: DELTA), with its
    logprobs when ``logprobs`` (the user asked)."""
    chars, n = seen
    lps = list(ctx.logprobs[n:]) if logprobs else None
    return CompletionOutput(ctx.index, ctx.text[chars:], list(ctx.generated_token_ids[n:]), ctx.finish_reason,
                            lps, ctx.cumulative_logprob)


class RequestGroup:
    """The samples ``contexts`` of one prompt, requested with ``params`` (the user's: ``n``,
    ``best_of``, ``output_kind``)."""

    def __init__(self, contexts: Sequence[TextGenerationContext], params: SamplingParams) -> None:
        self.contexts = list(contexts)
        self.params = params
        self._seen: dict[str, tuple[int, int]] = {}

    @property
    def request_id(self) -> str:
        first = self.contexts[0]
        return first.parent_id or first.request_id

    @property
    def is_done(self) -> bool:
        return all(c.is_done for c in self.contexts)

    def output(self, seen: Mapping[str, tuple[int, int]] | None = None) -> RequestOutput:
        """The :class:`RequestOutput` now: the best ``n`` by cumulative logprob once every
        sample is done with ``best_of``, else every sample in order; each sample's text,
        tokens and logprobs past ``seen[request_id]`` (characters, tokens)."""
        params, first = self.params, self.contexts[0]
        keep = list(self.contexts)
        if params.samples > params.n:  # every sample finished: choose the best n
            keep = sorted(keep, key=lambda c: -(c.cumulative_logprob or 0.0))[: params.n]
        seen = seen or {}
        outs = [_completion(c, params.logprobs is not None, seen.get(c.request_id, (0, 0))) for c in keep]
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(first.prompt_token_ids),
            text=outs[0].text, token_ids=outs[0].token_ids, finish_reason=outs[0].finish_reason,
            logprobs=outs[0].logprobs, outputs=outs, prompt_logprobs=first.prompt_logprobs,
            finished=self.is_done,
        )

    def poll(self) -> RequestOutput | None:
        """The next output that ``params.output_kind`` asks for, or None when it asks for
        nothing now: ``CUMULATIVE`` everything so far, ``DELTA`` what is new since the last
        poll, ``FINAL_ONLY`` (and ``best_of > n``, whose best samples are known only at the
        end) one output when every sample is done."""
        params, done = self.params, self.is_done
        final = params.output_kind is RequestOutputKind.FINAL_ONLY or params.samples > params.n
        if final and not done:
            return None
        if params.output_kind is not RequestOutputKind.DELTA or params.samples > params.n:
            return self.output()
        out = self.output(self._seen)
        self._seen.update({c.request_id: (len(c.text), len(c.generated_token_ids)) for c in self.contexts})
        return out
