"""High-level API: ``LLM(...).generate(prompts, params)`` and ``LLM(...).stream(prompt, params)``.

Loads a model, builds a :class:`~decodekit.TokenGenerator`, and drives it with the
first-come-first-served scheduler (:func:`decodekit.engine.scheduler.continuous_batching`).

May call: the engine (generator, scheduler), loading, steering presets.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .engine.beam import BeamSearchOutput, BeamSearchParams
from .engine.ensemble import Ensemble
from .engine.generator import TokenGenerator
from .engine.requests import RequestGroup
from .engine.scheduler import continuous_batching
from .loading import load
from .outputs import RequestOutput
from .params import SamplingParams
from .steering.vector import Steering, SteeringVector
from .structured.spec import GuidedDecodingParams

__all__ = ["LLM", "RequestOutput"]

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


class LLM:
    """Load a model (default: the embedded SmolLM2-135M-Instruct) and generate with it.

    ``generator_options`` go to :class:`~decodekit.TokenGenerator` (``max_batch_size``,
    ``max_seq_len``, ...), except ``device``/``dtype`` which also steer loading, and
    ``model``/``tokenizer`` to pass objects already in memory. ``ensemble_models``: models
    sampled together with this one (an :class:`~decodekit.Ensemble`, equal-weight mixture;
    ``ensemble_weights`` / ``ensemble_combine`` change that).
    """

    def __init__(self, name_or_path: str | None = None, *, ensemble_models: Sequence | None = None,
                 ensemble_weights: Sequence[float] | None = None, ensemble_combine: str = "mixture",
                 **generator_options) -> None:
        model = generator_options.pop("model", None)
        tokenizer = generator_options.pop("tokenizer", None)
        if model is None or tokenizer is None:
            model, tokenizer = load(name_or_path, device=generator_options.get("device"),
                                    dtype=generator_options.get("dtype"))
        if ensemble_models is not None:
            generator_options["ensemble"] = Ensemble(ensemble_models, ensemble_weights, ensemble_combine)
        self.generator = TokenGenerator(model, tokenizer, **generator_options)
        self.tokenizer = tokenizer

    def steering(
        self,
        steering_vector: SteeringVector | Mapping[int, torch.Tensor] | str | None = None,
        steering_strength: float | None = None,
        steering_preset: str | None = None,
        steering_positions="all",
        steering_op: str = "add",
    ) -> Steering | None:
        """The :class:`~decodekit.Steering` for these options (None without a vector or preset).

        ``steering_vector`` is a :class:`~decodekit.SteeringVector`, a ``{layer: tensor}``
        mapping or a file (safetensors or GGUF control vector); ``steering_preset`` names a
        preset (:data:`decodekit.steering.presets.PRESETS`, trained on first use and cached).
        ``steering_strength`` defaults to the preset's documented strength, else 1.0.
        """
        if steering_vector is not None and steering_preset is not None:
            raise ValueError("give steering_vector or steering_preset, not both")
        if steering_preset is not None:
            from .steering.presets import preset_steering

            return preset_steering(steering_preset, self.generator.model, self.tokenizer, steering_strength,
                                   positions=steering_positions, op=steering_op)
        if steering_vector is None:
            if steering_strength is not None:
                raise ValueError("steering_strength needs a steering_vector or a steering_preset")
            return None
        return Steering(steering_vector, 1.0 if steering_strength is None else steering_strength,
                        positions=steering_positions, op=steering_op)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        steering_vector: SteeringVector | Mapping[int, torch.Tensor] | str | None = None,
        steering_strength: float | None = None,
        steering_preset: str | None = None,
        steering_positions="all",
        steering_op: str = "add",
        json_schema: Mapping | str | None = None,
        regex_pattern: str | None = None,
        grammar: str | None = None,
        choice: Sequence[str] | None = None,
        lora: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids or chat messages); outputs in order.

        The ``steering_*`` options steer every prompt of the call (see :meth:`steering`).
        ``json_schema`` / ``regex_pattern`` / ``grammar`` / ``choice`` (at most one) constrain
        every output of the call (:class:`~decodekit.GuidedDecodingParams`; a request's own
        ``params.guided_decoding`` is replaced). ``params.n`` / ``best_of``: several outputs
        per prompt from one prefill (``RequestOutput.outputs``). ``lora``: a loaded adapter's
        name, or a peft adapter folder (loaded under its path on first use; the LLM needs
        ``max_loras >= 1``).
        """
        options = dict(steering_vector=steering_vector, steering_strength=steering_strength,
                       steering_preset=steering_preset, steering_positions=steering_positions,
                       steering_op=steering_op, json_schema=json_schema, regex_pattern=regex_pattern,
                       grammar=grammar, choice=choice, lora=lora)
        requests = self.new_requests(prompts, params, **options)
        for _ in continuous_batching(self.generator, [c for r in requests for c in r.contexts]):
            pass
        return [r.output() for r in requests]

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams, *,
                    lora: str | os.PathLike[str] | None = None, **steering_options
                    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt with transformers' ``generate(num_beams=...)`` rules
        (:class:`~decodekit.BeamSearchParams`); outputs in order, each with its
        ``sequences`` best first. ``steering_options``: the ``steering_*`` keywords of
        :meth:`generate` (every beam is steered); ``lora``: as in :meth:`generate` (every beam
        is adapted)."""
        steering = self.steering(**steering_options)
        return self.generator.beam_search(_prompt_list(prompts), params, steering=steering,
                                          lora=self._lora(lora))

    def stream_outputs(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **options: Any,
    ) -> Iterator[RequestOutput]:
        """Generate for every prompt and yield :class:`RequestOutput` objects as the requests
        advance, each shaped by its ``params.output_kind``: ``CUMULATIVE`` everything so far,
        ``DELTA`` only the text, tokens and logprobs new since its last output (concatenated,
        they are the final output), ``FINAL_ONLY`` one output when done. A request's last
        output has ``finished=True``. With ``best_of > n`` a request yields only its final
        output (the best samples are known at the end). ``options``: :meth:`generate`'s
        keywords. Stopping the iteration early releases the running requests."""
        requests = self.new_requests(prompts, params, **options)
        owner = {c.request_id: r for r in requests for c in r.contexts}
        with contextlib.closing(continuous_batching(self.generator, [c for r in requests for c in r.contexts])
                                ) as steps:
            for res in steps:
                for request in {id(owner[rid]): owner[rid] for rid in res}.values():
                    out = request.poll()
                    if out is not None:
                        yield out

    def new_requests(self, prompts: Prompt | Sequence[Prompt],
                     params: SamplingParams | Sequence[SamplingParams] | None = None, **options: Any
                     ) -> list[RequestGroup]:
        """One :class:`~decodekit.engine.requests.RequestGroup` per prompt (its samples'
        contexts, not yet admitted), from :meth:`generate`'s arguments (``options``: its
        keywords). For a scheduler of your own (the server's engine thread uses it)."""
        unknown = set(options) - set(_GENERATE_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {sorted(unknown)}")
        opt = {k: options.get(k, d) for k, d in _GENERATE_OPTIONS.items()}
        steering = self.steering(opt["steering_vector"], opt["steering_strength"], opt["steering_preset"],
                                 opt["steering_positions"], opt["steering_op"])
        guided = _guided(opt["json_schema"], opt["regex_pattern"], opt["grammar"], opt["choice"])
        plist = _prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            pl = [params or SamplingParams()] * len(plist)
        else:
            pl = list(params)
            if len(pl) != len(plist):
                raise ValueError(f"{len(pl)} params for {len(plist)} prompts")
        if guided is not None:
            pl = [p.replace(guided_decoding=guided) for p in pl]
        gen = self.generator
        lora = self._lora(opt["lora"])
        return [RequestGroup(gen.new_contexts(p, sp, steering=steering, lora=lora), sp)
                for p, sp in zip(plist, pl, strict=True)]

    def _lora(self, lora: str | os.PathLike[str] | None) -> str | None:
        """The adapter name for ``lora``: a loaded name, or a folder loaded now under its path."""
        if lora is None:
            return None
        gen, name = self.generator, str(lora)
        if name in gen.loras:
            return name
        if not Path(name).is_dir():
            raise ValueError(f"lora: {name!r} is neither a loaded adapter ({list(gen.loras)}) nor an "
                             "adapter folder")
        res = gen.load_lora(name, name)
        if not res.ok:
            raise ValueError(f"lora: {res.status.name}: {res.message}")
        return name

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, **steering_options
               ) -> Iterator[str]:
        """Yield text deltas as they are final (stop strings are never streamed).
        ``steering_options``: the ``steering_*`` keywords of :meth:`generate`."""
        gen = self.generator
        params = params or SamplingParams()
        if isinstance(params, SamplingParams) and params.samples > 1:
            raise ValueError(f"stream yields one text, but params ask for n={params.n}, "
                             f"best_of={params.best_of}: use stream_outputs")
        steering = self.steering(**steering_options)
        ctx = gen.new_context(prompt, params, steering=steering)
        with contextlib.closing(continuous_batching(gen, [ctx])) as steps:  # released on early exit
            for res in steps:
                text = res[ctx.request_id].text
                if text:
                    yield text


#: Keywords of :meth:`LLM.generate` beyond prompts and params, with their defaults.
_GENERATE_OPTIONS: dict[str, Any] = dict(
    steering_vector=None, steering_strength=None, steering_preset=None, steering_positions="all",
    steering_op="add", json_schema=None, regex_pattern=None, grammar=None, choice=None, lora=None)


def _prompt_list(prompts: Any) -> list:
    """``prompts`` (one prompt or several) as a list of prompts."""
    if isinstance(prompts, Mapping):
        raise ValueError("prompts: a chat is a list of messages [{'role': ..., 'content': ...}], "
                         "and several prompts a list of those; got a single dict")
    if isinstance(prompts, torch.Tensor):  # [T] one prompt of ids, [N, T] N prompts
        prompts = prompts.tolist()
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
    single = isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and not isinstance(prompts[0], (str, list))
        and not (isinstance(prompts[0], Sequence) and not isinstance(prompts[0], Mapping))
    )
    return [prompts] if single else list(prompts)


def _guided(json_schema: Any, regex_pattern: str | None, grammar: str | None,
            choice: Sequence[str] | None) -> GuidedDecodingParams | None:
    """The guided-decoding spec of :meth:`LLM.generate`'s keywords (None when none is set)."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex_pattern", regex_pattern),
                               ("grammar", grammar), ("choice", choice)) if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"at most one of json_schema, regex_pattern, grammar, choice; got "
                         f"{', '.join(given)}")
    (name, value), = given.items()
    field = {"json_schema": "json", "regex_pattern": "regex"}.get(name, name)
    try:
        return GuidedDecodingParams(**{field: value})
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
