"""What differs between the supported transformers releases, in one place.

decodekit drives models through a few transformers internals (the cache keyword, the
decoder layers' keyword arguments, the ``Cache`` base class). Where a release renamed
one, the names are resolved here, from the model's own signature first, so a model
written for either convention runs without a deprecation warning:

- transformers >= 5.2x takes the KV cache as ``cache=`` (models, decoder layers, mask
  helpers) and deprecates ``past_key_values=`` (warning, removal announced for 5.40);
  5.17 takes ``past_key_values=`` only. Output objects follow the same rename.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["CACHE_KWARGS", "cache_from_kwargs", "cache_kwarg", "library_cache_kwarg"]

# Newest name first: a layer that receives both reads the new one.
CACHE_KWARGS = ("cache", "past_key_values")


@functools.cache
def library_cache_kwarg() -> str:
    """The cache keyword of the installed transformers (read off ``LlamaModel.forward``)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model``'s forward takes its KV cache.

    The model's own signature decides (``inspect.signature`` follows transformers'
    ``deprecate_kwarg`` wrappers to the real parameters); a forward that takes only
    ``**kwargs`` gets the installed library's name.
    """
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in CACHE_KWARGS:
        if name in params:
            return name
    return library_cache_kwarg()


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any | None:
    """The cache object a decoder layer (or model) was called with, under either name."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None
