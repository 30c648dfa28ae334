"""Structured output: what a request's output must match (:class:`GuidedDecodingParams`), its
grammar and matcher (:mod:`.grammar`, on xgrammar) and the batch bitmask the sampler applies
(:mod:`.masks`)."""

from .spec import GuidedDecodingParams

__all__ = ["GuidedDecodingParams"]
