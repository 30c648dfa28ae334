"""Speculative-decoding benchmark: decode tokens/s of decodekit's
:class:`~decodekit.generator.TokenGenerator` with a drafter (``--drafter``:
:class:`~decodekit.drafters.NGramDraft` prompt lookup, :class:`~decodekit.LayerSkipDraft`
self-speculation, :class:`~decodekit.DraftModel` with a random small draft, or ``all``)
against the same generator without one, in one run.

Both sides use the same target (on CPU the embedded SmolLM2-135M-Instruct in fp32), the
same chat prompts (rendered with the chat template into token ids once), the same
:class:`~decodekit.params.SamplingParams` (``max_new_tokens=N``, ``ignore_eos=False``, a
per-request seed) and the same scheduler loop; the only difference is ``draft=`` /
``num_speculative_tokens=`` at construction.

Prompt kinds (:data:`COPY_PROMPTS`, :data:`OPEN_PROMPTS`, 8 each):

* ``copy``: answers that copy from the prompt ("Repeat the following text exactly",
  "Fix the spelling in this paragraph", "Convert this list to a numbered list",
  "Summarise in the same words"), each over a 60-120 word passage written for this
  benchmark: the case prompt lookup is made for;
* ``open``: stories and explanations, whose answers rarely repeat the prompt: the
  no-match case, where speculation can only cost time.

Settings: greedy (temperature 0) and temperature 0.7 (no other filter). Batch sizes:

* ``B=1``: the prompts of a kind one after another (one request in flight); the two sides
  alternate per prompt (the order flips every repeat);
* ``B=8``: the 8 prompts of a kind at once through a continuous-batching loop: admit all,
  ``next_token(batch, num_steps=1)`` until every request is done, release.

The first ``next_token`` call prefills the requests and samples their first token;
**decode tokens/s** = (tokens generated - requests) / (sum of the wall times of all later
``next_token`` calls), counting the tokens each request actually produced (requests may stop
at EOS, and sampled runs need not stop at the same place on both sides). Per (point, side)
the reported value is the median over ``--repeats`` repetitions (after one short warm-up run
per side); **speedup** = speculative tok/s / plain tok/s.

Drafters (``--drafter``, default ``all``):

* ``ngram``: the copy and open prompts, both settings, both batch sizes (below);
* ``layerskip``: first a subset search, then the open prompts, both settings, both batch
  sizes with the best subset and ``k``. The search runs on :data:`SEARCH_PROMPTS` (open
  prompts kept out of the timed points), greedy, B=1, ``--search-tokens`` (48) new tokens.
  Candidates (:func:`layerskip_candidates`; 30 layers for SmolLM2): early exit (first N),
  "first a + every 2nd / 3rd middle layer + last b" and "drop a contiguous middle block",
  each with ``k`` in {2, 3, 4}. Phase 1 runs every candidate once on the first 2 search
  prompts (acceptance, mean accepted length, tok/s; speedup estimate = its tok/s over the
  mean plain tok/s of the plain runs of the same prompts just before and after its subset's
  k group). Phase 2
  times the ``--search-top`` (4) best estimates among the candidates that had any draft
  accepted (with adaptive ``k`` a drafter whose drafts are all rejected soon stops drafting
  and runs at about plain speed) again on all 3 search prompts, 2 repeats, interleaved
  with plain; the best measured speedup wins. ``--layerskip-layers`` /
  ``--layerskip-k`` skip the search;
* ``model``: a :class:`~decodekit.DraftModel` with a randomly initialised small draft of
  the target's config family and vocabulary (:data:`DRAFT_CONFIG`: 2 layers, hidden 128,
  ``torch.manual_seed(1234)``, same dtype and device), open prompts, greedy, B=1 and B=8,
  ``k=4``. Its acceptance is about 0: the rows show the overhead of drafting plus
  verification when nothing is accepted, and how far adaptive ``k`` limits it.

All speculative generators use decodekit's defaults (``adaptive_k=True``): on CPU the batch
shares a budget of ``k`` drafted tokens per step (``k // rows`` per row), so at B=8 with
``k <= 4`` no drafting happens. ``--device cuda`` runs the same code (same fp32 target).

NGram speculation: ``NGramDraft(n=3, k=4)`` everywhere, plus a sweep of ``k`` in {2, 4, 6}
(``n=3``) on copy prompts, greedy, B=1 (measured in the same interleaved runs as the
``k=4`` point, so the sweep rows share its plain side). Reported from the per-request
:class:`~decodekit.drafters.SpecStats` (summed over the timed runs): **acceptance rate** =
accepted / drafted; **mean accepted length** = 1 + accepted / verification steps that had a
draft (decodekit's definition); **tokens/step** = decode tokens / (requests advanced by the
decode calls), i.e. tokens per target forward per request, steps without a draft included.

Correctness: every greedy request's tokens must be identical between the speculative and
the plain run (speculation only changes how many target forwards it takes); the number of
requests that differ is reported as ``greedy mismatches`` and should be 0.

Targets (from the issue, evaluated and printed): NGramDraft on copy prompts, greedy, B=1 at
least 2x the plain tokens/s; LayerSkipDraft on open prompts, greedy, B=1 above 1.2x (an aim)
with the best subset the search finds; no configuration below 0.9x.

``--smoke``: a tiny random llama with a word-level tokenizer, repetitive / random token
prompts (2 per kind), B in {1, 2}, N=12, one repeat; the layer-skip search over the tiny
model's 2 layers and a 1-layer random draft model (tests the harness only).

Results: ``<out>/speculative-<device-slug>.json`` and ``.md`` (``-smoke`` appended for
``--smoke``, then ``-<tag>`` for ``--tag``).

Usage::

    python -m bench.speculative [--quick] [--threads N] [--out DIR] [--smoke]
                                [--repeats R] [--max-new-tokens N] [--tag TAG]
                                [--drafter ngram|layerskip|model|all]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._util import (
    DTYPES,
    device_name,
    fmt_ratio,
    load_average,
    markdown_table,
    metadata,
    pick_device,
    random_llama,
    result_stem,
    write_results,
)
from .generate import TINY_CONFIG, chat_ids, smoke_prompts

# --------------------------------------------------------------------------- prompts
#: Passages written for this benchmark (60-120 words each).
_LIGHTHOUSE = (
    "The lighthouse on Carrow Point was built in 1871 from granite quarried on the island "
    "itself. For ninety years a keeper lived in the small cottage at its base, climbing one "
    "hundred and twelve steps every evening to light the lamp and again every morning to put "
    "it out. In 1962 the light was automated, and the cottage stood empty until a local trust "
    "restored it as a museum. Visitors can now climb the tower on summer weekends, and on a "
    "clear day they can see the coast of three counties from the gallery at the top."
)
_ROUTER = (
    "To reset the router, first unplug the power cable and wait at least thirty seconds. While "
    "the router is off, check that the grey network cable is firmly connected to the port "
    "marked WAN. Plug the power cable back in and wait until the status light turns solid "
    "green, which usually takes two to three minutes. If the light keeps blinking orange, press "
    "and hold the small reset button on the back for ten seconds using a paper clip. The "
    "router will restart with its factory settings, and you will need to enter the network "
    "name and password printed on the label underneath."
)
_LIBRARY_TYPOS = (
    "Yesterday our team visted the new libary in the city centre. The bulding has four floors, "
    "and the top floor is a quiet reading room with a beatiful view of the river. The staff "
    "were very frendly and explained how to borow books using the self-service machines. We "
    "were suprised to learn that the library also lends musical instruments, board games and "
    "even gardening tools. Before we left, we signed up for a wekly workshop on writing short "
    "storys, which starts next month and is compleetly free for residents."
)
_EXPERIMENT_TYPOS = (
    "The experment was designed to mesure how quickly water cools in different containers. We "
    "filled a glass jar, a metal can and a plastic cup with the same amount of hot water and "
    "recorded the temprature every five minutes. The metal can cooled the fastest, loosing "
    "almost half of its heat in the first twenty minutes. The plastic cup kept the water warm "
    "for the longest time. We beleive this is because plastic is a poor conductor of heat, "
    "while metal lets heat escape easly. Next time we will repeat the test with lids on every "
    "container."
)
_RECIPE_LIST = "\n".join([
    "- Preheat the oven to 200 degrees Celsius.",
    "- Wash the potatoes and cut them into thin slices.",
    "- Toss the slices with olive oil, salt and a little black pepper.",
    "- Spread them in a single layer on a lined baking tray.",
    "- Bake for twenty-five minutes, turning them once halfway through.",
    "- Sprinkle with fresh rosemary and grated cheese.",
    "- Return the tray to the oven for five more minutes.",
    "- Let them cool slightly before serving with a green salad.",
])
_ONBOARDING_LIST = "\n".join([
    "- Create your account on the company portal using your work email address.",
    "- Set a password of at least twelve characters and turn on two-factor authentication.",
    "- Read the security handbook and sign the acknowledgement form.",
    "- Ask your manager to add you to the team calendar and the project channels.",
    "- Install the development tools listed on the setup page.",
    "- Clone the main repository and run the test suite once to check your setup.",
    "- Book a short meeting with your onboarding buddy for the end of your first week.",
])
_COUNCIL = (
    "The town council met on Tuesday evening to discuss the future of the old railway station. "
    "Several residents asked the council to turn the building into a community centre with a "
    "cafe, a small library and rooms for local clubs. Others argued that the site should be "
    "sold to a developer to pay for repairs to the town's roads. After two hours of debate, the "
    "council agreed to run a public survey over the summer and to make a final decision in "
    "October. The survey will be available online and at the town hall."
)
_BEES = (
    "Honeybees communicate the location of food through a movement known as the waggle dance. "
    "A bee that has found a good source of nectar returns to the hive and walks in a "
    "figure-eight pattern on the honeycomb. During the straight part of the dance it shakes its "
    "body from side to side. The angle of this straight run shows the direction of the flowers "
    "relative to the sun, and the length of the run shows how far away they are. Other bees "
    "follow the dancer closely, learn the route, and then fly out to collect the nectar "
    "themselves."
)

#: Prompts whose answers copy from their input.
COPY_PROMPTS: list[str] = [
    f"Repeat the following text exactly, word for word:\n\n{_LIGHTHOUSE}",
    f"Repeat the following text exactly:\n\n{_ROUTER}",
    f"Fix the spelling in this paragraph:\n\n{_LIBRARY_TYPOS}",
    f"Fix the spelling in this paragraph and return the corrected paragraph:\n\n{_EXPERIMENT_TYPOS}",
    f"Convert this list to a numbered list:\n\n{_RECIPE_LIST}",
    f"Convert this list to a numbered list:\n\n{_ONBOARDING_LIST}",
    f"Summarise in the same words, keeping the original sentences:\n\n{_COUNCIL}",
    f"Summarise in the same words:\n\n{_BEES}",
]

#: Open-ended prompts (the no-match case).
OPEN_PROMPTS: list[str] = [
    "Write a short story about a robot who discovers a garden on the roof of an abandoned factory.",
    "Explain how a bicycle stays upright when it is moving.",
    "Write a story about two friends who get lost in a snowy forest and find their way home.",
    "Explain why the Moon has phases.",
    "Describe what life might be like in a city on Mars in the year 2150.",
    "Explain how compound interest works, with an example.",
    "Write a fairy tale about a dragon who is afraid of the dark.",
    "Explain how the human heart pumps blood around the body.",
]

KINDS = ("copy", "open")

#: Open prompts used only by the LayerSkip subset search (not by the timed points).
SEARCH_PROMPTS: list[str] = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a rainbow forms after the rain.",
    "Describe a busy market in a small coastal town on a Saturday morning.",
]

DRAFTERS = ("ngram", "layerskip", "model")

#: The random ``--drafter model`` draft (vocabulary, family and positions from the target).
DRAFT_CONFIG: dict[str, Any] = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
SMOKE_DRAFT_CONFIG: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1)
DRAFT_SEED = 1234


def repetitive_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts (``--smoke``) that repeat a random 6-id phrase 3 times, then start it again."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        phrase = torch.randint(3, vocab, (6,), generator=gen).tolist()
        out.append(phrase * 3 + phrase[:2])
    return out


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    name: str
    temperature: float


SETTINGS = (Setting("greedy", 0.0), Setting("t0.7", 0.7))


@dataclass
class Config:
    device: torch.device
    dtype_name: str
    batches: list[int]
    max_new_tokens: int
    repeats: int
    warmup_tokens: int
    b1_prompts: int  # prompts per kind at B=1
    ngram_n: int
    ngram_min_n: int
    k_main: int
    k_sweep: list[int]
    smoke: bool
    drafters: list[str] = field(default_factory=lambda: list(DRAFTERS))
    search_tokens: int = 48
    search_ks: list[int] = field(default_factory=lambda: [2, 3, 4])
    search_top: int = 4
    search_repeats: int = 2
    layerskip_layers: list[int] | None = None  # skip the search: these layers ...
    layerskip_k: int | None = None  # ... with this k


@dataclass
class Workload:
    name: str
    description: str
    model: Any
    tokenizer: Any
    prompts: dict[str, list[list[int]]]  # kind -> token ids
    prompt_text: dict[str, list[str]] = field(default_factory=dict)


def build_workload(cfg: Config) -> Workload:
    dev = cfg.device
    if cfg.smoke:
        from .generate import word_tokenizer

        model = random_llama(DTYPES[cfg.dtype_name], dev, **TINY_CONFIG)
        with torch.no_grad():  # sharpen the output layer so greedy choices are not near-ties
            model.get_output_embeddings().weight.mul_(4.0)
        V = TINY_CONFIG["vocab_size"]
        return Workload("tiny-llama-random", "tiny random llama (2 layers, hidden 64, V=320)",
                        model, word_tokenizer(V),
                        {"copy": repetitive_prompts(2, V), "open": smoke_prompts(2, V, seed=1),
                         "search": smoke_prompts(3, V, seed=2)})
    from decodekit.loading import DEFAULT_MODEL, load

    model, tok = load(device=dev, dtype=DTYPES[cfg.dtype_name])
    return Workload("smollm2-135m", f"{DEFAULT_MODEL} (embedded)", model, tok,
                    {"copy": chat_ids(tok, COPY_PROMPTS), "open": chat_ids(tok, OPEN_PROMPTS),
                     "search": chat_ids(tok, SEARCH_PROMPTS)},
                    {"copy": COPY_PROMPTS, "open": OPEN_PROMPTS, "search": SEARCH_PROMPTS})


# --------------------------------------------------------------------------- drafters
@dataclass
class Drafter:
    """How to build one kind of drafter for a given ``k``."""

    name: str  # ngram | layerskip | model
    description: str
    make: Callable[[int], Any]
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the rows


def ngram_drafter(cfg: Config) -> Drafter:
    from decodekit.drafters import NGramDraft

    return Drafter("ngram", f"NGramDraft(n={cfg.ngram_n}, k=k, min_n={cfg.ngram_min_n})",
                   lambda k: NGramDraft(n=cfg.ngram_n, k=k, min_n=cfg.ngram_min_n))


def layerskip_drafter(keep: Sequence[int], desc: str, n_layers: int) -> Drafter:
    from decodekit import LayerSkipDraft

    keep = list(keep)
    return Drafter("layerskip", f"LayerSkipDraft({desc}: {len(keep)} of {n_layers} layers, "
                   f"layers={keep})", lambda k: LayerSkipDraft(keep, k=k),
                   {"layers": keep, "subset": desc, "kept_layers": len(keep),
                    "n_layers": n_layers})


def model_drafter(draft_model: Any, desc: str) -> Drafter:
    from decodekit import DraftModel

    return Drafter("model", f"DraftModel({desc})", lambda k: DraftModel(draft_model, k=k),
                   {"draft_model": desc})


def n_decoder_layers(model: Any) -> int:
    from decodekit.draft_models import decoder_layer_list

    parent, name = decoder_layer_list(model)
    return len(getattr(parent, name))


def layerskip_candidates(n_layers: int) -> list[tuple[str, list[int]]]:
    """Layer subsets for the search: ``(description, kept layer indices)``, deduplicated,
    each keeping at least one layer and skipping at least one. For the 30 layers of
    SmolLM2: early exit (first 8 / 12 / 16 / 20 / 24), "first a + every s-th middle layer +
    last b" ((a, b, s) in (2, 2, 3), (4, 2, 2), (4, 2, 3), (8, 4, 2), (8, 4, 3)) and "drop a
    contiguous middle block" (keep first a + last b: (8, 6), (12, 6), (14, 8), (12, 12),
    (16, 10), i.e. 14 to 26 layers);
    other depths are scaled. Models of at most 4 layers (``--smoke``): each early exit and
    each single skipped layer."""
    L = n_layers
    out: list[tuple[str, list[int]]] = []

    def add(desc: str, keep: Any) -> None:
        k = sorted({i for i in keep if 0 <= i < L})
        if 0 < len(k) < L and all(k != c for _, c in out):
            out.append((desc, k))

    if L <= 4:
        for n in range(1, L):
            add(f"first {n}", range(n))
        for i in range(L):
            add(f"skip layer {i}", [j for j in range(L) if j != i])
        return out

    def sc(x: int) -> int:
        return max(1, round(x * L / 30))

    for n in (8, 12, 16, 20, 24):
        add(f"first {sc(n)}", range(sc(n)))
    for a, b, st in ((2, 2, 3), (4, 2, 2), (4, 2, 3), (8, 4, 2), (8, 4, 3)):
        a, b = sc(a), sc(b)
        add(f"first {a} + every {st}{'nd' if st == 2 else 'rd'} of {a}-{L - b - 1} + last {b}",
            [*range(a), *range(a, L - b, st), *range(L - b, L)])
    for a, b in ((8, 6), (12, 6), (14, 8), (12, 12), (16, 10)):
        a, b = sc(a), sc(b)
        add(f"drop {a}-{L - b - 1} (first {a} + last {b})", [*range(a), *range(L - b, L)])
    return out


def random_draft_model(wl: Workload, cfg: Config) -> tuple[Any, str]:
    """A randomly initialised small causal LM of the target's config family with the
    target's vocabulary, on the target's device and dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tcfg = wl.model.config
    V = int(wl.model.get_output_embeddings().weight.shape[0])
    dims = SMOKE_DRAFT_CONFIG if cfg.smoke else DRAFT_CONFIG
    ids = {k: getattr(tcfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    conf = AutoConfig.for_model(
        tcfg.model_type, vocab_size=V,
        max_position_embeddings=int(getattr(tcfg, "max_position_embeddings", 2048)),
        **{k: v for k, v in ids.items() if v is not None}, **dims)
    torch.manual_seed(DRAFT_SEED)
    with torch.device(cfg.device):
        model = AutoModelForCausalLM.from_config(conf)
    model = model.to(DTYPES[cfg.dtype_name]).eval()
    n_params = sum(p.numel() for p in model.parameters())
    desc = (f"random {tcfg.model_type}, {dims['num_hidden_layers']} layer(s), hidden "
            f"{dims['hidden_size']}, V={V}, {n_params / 1e6:.1f}M params, seed {DRAFT_SEED}")
    return model, desc


# --------------------------------------------------------------------------- running
@dataclass
class Run:
    """What one side did over a set of requests (summed over B=1 runs)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_calls: int = 0
    row_steps: int = 0  # sum over decode calls of the requests they advanced
    requests: int = 0
    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    spec_steps: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def decode_tokens(self) -> int:
        return self.generated - self.requests

    @property
    def tok_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else None

    def add(self, other: Run) -> None:
        for name in ("prefill_s", "decode_s", "decode_calls", "row_steps", "requests",
                     "generated", "drafted", "accepted", "spec_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        app = other.accepted_per_position
        if len(self.accepted_per_position) < len(app):
            self.accepted_per_position += [0] * (len(app) - len(self.accepted_per_position))
        for j, a in enumerate(app):
            self.accepted_per_position[j] += a
        self.tokens += other.tokens


def make_params(temperature: float, n: int, seed: int) -> Any:
    from decodekit.params import SamplingParams

    return SamplingParams(temperature=temperature, max_new_tokens=n, ignore_eos=False, seed=seed)


def run_batch(gen: Any, prompts: Sequence[list[int]], seeds: Sequence[int], temperature: float,
              n: int) -> Run:
    """Admit all ``prompts`` at once, ``next_token(batch, 1)`` until every one is done, release."""
    ctxs = {f"r{s}": gen.new_context(p, make_params(temperature, n, s), request_id=f"r{s}")
            for p, s in zip(prompts, seeds, strict=True)}
    run = Run(requests=len(ctxs))
    try:
        t0 = time.perf_counter()
        gen.next_token(ctxs, 1)
        run.prefill_s = time.perf_counter() - t0
        while True:
            active = sum(not c.is_done for c in ctxs.values())
            if not active:
                break
            t0 = time.perf_counter()
            gen.next_token(ctxs, 1)
            run.decode_s += time.perf_counter() - t0
            run.decode_calls += 1
            run.row_steps += active
            if run.decode_calls > 4 * n:
                raise RuntimeError(f"requests not done after {run.decode_calls} decode calls")
    finally:
        for c in ctxs.values():
            gen.release(c)
    for c in ctxs.values():
        run.tokens.append(list(c.generated_token_ids))
        run.generated += len(c.generated_token_ids)
        st = c.spec_stats
        run.drafted += st.drafted
        run.accepted += st.accepted
        run.spec_steps += st.steps
        run.add(Run(accepted_per_position=list(st.accepted_per_position or [])))
    if any(len(t) > n for t in run.tokens):
        raise RuntimeError(f"a request produced more than max_new_tokens={n} tokens")
    return run


def make_generator(wl: Workload, batch: int, max_seq: int, k: int,
                   drafter: Drafter | None) -> Any:
    """A generator with ``drafter.make(k)`` (decodekit's default ``adaptive_k=True``), or a
    plain one for ``k = 0``."""
    from decodekit.generator import TokenGenerator

    draft = drafter.make(k) if k and drafter is not None else None
    return TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch, max_seq_len=max_seq,
                          seed=0, draft=draft, num_speculative_tokens=k if draft else None)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def run_point(wl: Workload, kind: str, setting: Setting, batch: int, ks: list[int],
              cfg: Config, drafter: Drafter) -> list[dict[str, Any]]:
    """One (kind, setting, batch): the plain side and one speculative side per ``k``, run
    interleaved; one JSON row per ``k`` (all sharing the plain side)."""
    n = cfg.max_new_tokens
    prompts = wl.prompts[kind] if batch > 1 else wl.prompts[kind][: cfg.b1_prompts]
    seeds = [1000 + i for i in range(len(prompts))]
    if batch > 1:
        prompts = [prompts[i % len(prompts)] for i in range(batch)]
        seeds = [1000 + i for i in range(batch)]
    max_seq = -(-(max(map(len, prompts)) + n) // 64) * 64
    variants = [0, *ks]  # k = 0: plain
    load_start = load_average()
    base: dict[str, Any] = {
        "drafter": drafter.name, "drafter_description": drafter.description, **drafter.extra,
        "kind": kind, "setting": setting.name, "temperature": setting.temperature,
        "batch": batch, "max_new_tokens": n, "requests_per_repeat": len(prompts),
        "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                          "mean": sum(map(len, prompts)) / len(prompts)},
        "ngram_n": cfg.ngram_n, "ngram_min_n": cfg.ngram_min_n, "repeats": cfg.repeats,
    }
    try:
        gens = {k: make_generator(wl, batch, max_seq, k, drafter) for k in variants}
        runs: dict[int, list[Run]] = {k: [] for k in variants}
        per_group: dict[int, list[list[Run]]] = {k: [] for k in variants}  # [group][repeat]
        groups = ([[i] for i in range(len(prompts))] if batch == 1
                  else [list(range(len(prompts)))])
        # warm-up: one short run per side
        for k in variants:
            run_batch(gens[k], prompts[:batch], seeds[:batch], setting.temperature,
                      min(cfg.warmup_tokens, n))
        for rep in range(cfg.repeats):
            order = variants if rep % 2 == 0 else variants[::-1]
            totals = {k: Run() for k in variants}
            for gi, g in enumerate(groups):
                for k in order:
                    r = run_batch(gens[k], [prompts[i] for i in g], [seeds[i] for i in g],
                                  setting.temperature, n)
                    totals[k].add(r)
                    if rep == 0:
                        per_group[k].append([])
                    per_group[k][gi].append(r)
            for k in variants:
                runs[k].append(totals[k])
        del gens
        gc.collect()
    except Exception as exc:
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return [{**base, "k": k, "status": f"error: {_short(exc)}", "plain": None, "spec": None,
                 "speedup": None, "greedy_mismatches": None} for k in ks]
    load_end = load_average()

    def side(rs: list[Run]) -> dict[str, Any]:
        tok_s = [r.tok_s for r in rs if r.tok_s is not None]
        return {
            "tok_s": _median(tok_s) if tok_s else None,
            "tok_s_all": tok_s,
            "decode_tokens_all": [r.decode_tokens for r in rs],
            "generated_tokens_all": [r.generated for r in rs],
            "decode_s_all": [r.decode_s for r in rs],
            "decode_calls_all": [r.decode_calls for r in rs],
            "prefill_ms": _median([r.prefill_s for r in rs]) * 1e3,
            "step_ms": _median([r.decode_s / r.decode_calls for r in rs if r.decode_calls]) * 1e3
            if any(r.decode_calls for r in rs) else None,
            "tokens_per_step": (sum(r.decode_tokens for r in rs) / sum(r.row_steps for r in rs)
                                if any(r.row_steps for r in rs) else None),
        }

    plain = side(runs[0])
    rows = []
    for k in ks:
        spec = side(runs[k])
        drafted = sum(r.drafted for r in runs[k])
        accepted = sum(r.accepted for r in runs[k])
        spec_steps = sum(r.spec_steps for r in runs[k])
        per_pos = [0] * k
        for r in runs[k]:
            for j, a in enumerate(r.accepted_per_position[:k]):
                per_pos[j] += a
        spec.update({
            "drafted": drafted, "accepted": accepted, "verify_steps_with_draft": spec_steps,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_length": 1.0 + accepted / spec_steps if spec_steps else None,
            "accepted_per_position": per_pos,
            "draft_coverage": spec_steps / sum(r.row_steps for r in runs[k])
            if any(r.row_steps for r in runs[k]) else None,
        })
        mism = compared = None
        first_diff: list[int] = []
        if setting.temperature == 0.0:
            mism = compared = 0
            for rp, rs in zip(runs[0], runs[k], strict=True):
                for a, b in zip(rp.tokens, rs.tokens, strict=True):
                    compared += 1
                    if a != b:
                        mism += 1
                        first_diff.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False))
                                                if x != y), min(len(a), len(b))))
        speedup = (spec["tok_s"] / plain["tok_s"]) if spec["tok_s"] and plain["tok_s"] else None
        per_rep = [s.tok_s / p.tok_s for p, s in zip(runs[0], runs[k], strict=True)
                   if s.tok_s and p.tok_s]
        per_prompt = None
        if batch == 1:  # each group is one prompt
            per_prompt = []
            for gi, (gp, gs) in enumerate(zip(per_group[0], per_group[k], strict=True)):
                pt = _median([r.tok_s for r in gp if r.tok_s] or [0.0])
                st = _median([r.tok_s for r in gs if r.tok_s] or [0.0])
                dr, ac = sum(r.drafted for r in gs), sum(r.accepted for r in gs)
                per_prompt.append({
                    "prompt": gi, "plain_tok_s": pt, "spec_tok_s": st,
                    "speedup": st / pt if pt else None,
                    "acceptance_rate": ac / dr if dr else 0.0,
                    "tokens_per_step": (sum(r.decode_tokens for r in gs)
                                        / max(1, sum(r.row_steps for r in gs))),
                    "generated_tokens": [r.generated for r in gs],
                })
        rows.append({**base, "k": k, "status": "ok", "plain": plain, "spec": spec,
                     "per_prompt": per_prompt,
                     "speedup": speedup, "speedup_per_repeat": per_rep,
                     "greedy_mismatches": mism, "greedy_requests_compared": compared,
                     "greedy_first_diff_at": first_diff,
                     "load_avg_1m": {"start": load_start, "end": load_end}})
    return rows


# --------------------------------------------------------------------------- layer-skip search
def _serial(gen: Any, prompts: Sequence[list[int]], n: int) -> Run:
    """The prompts one after another (B=1), greedy; seeds 1000 + i as in the timed points."""
    total = Run()
    for i, p in enumerate(prompts):
        total.add(run_batch(gen, [p], [1000 + i], 0.0, n))
    return total


def _stats(run: Run, plain: Run | None) -> dict[str, Any]:
    mism = None
    if plain is not None:
        mism = sum(a != b for a, b in zip(plain.tokens, run.tokens, strict=True))
    return {
        "tok_s": run.tok_s,
        "acceptance_rate": run.accepted / run.drafted if run.drafted else 0.0,
        "mean_accepted_length": 1.0 + run.accepted / run.spec_steps if run.spec_steps else None,
        "tokens_per_step": run.decode_tokens / run.row_steps if run.row_steps else None,
        "drafted": run.drafted, "accepted": run.accepted, "greedy_mismatches": mism,
    }


def layerskip_search(wl: Workload, cfg: Config) -> dict[str, Any]:
    """Phase 1: every (subset, k) once on the first 2 search prompts; phase 2: the
    ``search_top`` best speedup estimates timed again on all search prompts, interleaved
    with plain, ``search_repeats`` times. Returns the candidate table and the winner."""
    n = cfg.search_tokens
    prompts = wl.prompts["search"]
    short = prompts[:2]
    L = n_decoder_layers(wl.model)
    max_seq = -(-(max(map(len, prompts)) + n) // 64) * 64
    subsets = layerskip_candidates(L)
    cands = [(desc, keep, k) for desc, keep in subsets for k in cfg.search_ks]
    t_start, load_start = time.perf_counter(), load_average()
    warm = min(cfg.warmup_tokens, n)

    plain_gen = make_generator(wl, 1, max_seq, 0, None)
    _serial(plain_gen, short[:1], warm)
    # plain again after each subset's k group: each estimate is relative to the plain runs
    # just before and after it (the load of a shared machine drifts over the phase)
    plain_short: list[Run] = [_serial(plain_gen, short, n)]
    entries: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []
    for i, (desc, keep, k) in enumerate(cands):
        entry: dict[str, Any] = {"subset": desc, "layers": keep, "kept_layers": len(keep), "k": k}
        try:
            gen = make_generator(wl, 1, max_seq, k, layerskip_drafter(keep, desc, L))
            _serial(gen, short[:1], warm)
            entry.update(status="ok", **_stats(_serial(gen, short, n), plain_short[0]))
            del gen
        except Exception as exc:
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            entry.update(status=f"error: {_short(exc)}", tok_s=None)
        entries.append(entry)
        group.append(entry)
        if i + 1 == len(cands) or cands[i + 1][1] != keep:  # end of this subset's k group
            before = plain_short[-1].tok_s
            plain_short.append(_serial(plain_gen, short, n))
            after = plain_short[-1].tok_s
            local = (before + after) / 2 if before and after else (before or after)
            for e in group:
                e["plain_tok_s_local"] = local
                e["speedup_est"] = e["tok_s"] / local if e.get("tok_s") and local else None
            group = []
        print(f"  search {i + 1}/{len(cands)}: {desc} ({len(keep)} layers) k={k} | accept "
              f"{_f(entry.get('acceptance_rate'), '{:.0%}')} | mean acc len "
              f"{_f(entry.get('mean_accepted_length'), '{:.2f}')} | {_f(entry.get('tok_s'))} "
              f"tok/s | plain {_f(plain_short[-1].tok_s)} tok/s | {entry['status']}", flush=True)
    plain_tok_s = _median([r.tok_s for r in plain_short if r.tok_s] or [0.0]) or None
    phase1_s = time.perf_counter() - t_start

    # phase 2: the best estimates, all search prompts, interleaved with plain
    # only candidates that had a draft accepted: with adaptive k a drafter whose drafts are all
    # rejected soon stops drafting and runs at about plain speed, which says nothing about it
    ranked = sorted((e for e in entries if e.get("speedup_est") and e.get("accepted")),
                    key=lambda e: -e["speedup_est"])
    if not ranked:
        ranked = sorted((e for e in entries if e.get("speedup_est")),
                        key=lambda e: -e["speedup_est"])
    top = ranked[: cfg.search_top]
    gens = {id(e): make_generator(wl, 1, max_seq, e["k"],
                                  layerskip_drafter(e["layers"], e["subset"], L)) for e in top}
    for g in gens.values():
        _serial(g, prompts[:1], warm)
    plain_runs: list[Run] = []
    spec_runs: dict[int, list[Run]] = {id(e): [] for e in top}
    for rep in range(cfg.search_repeats):
        order: list[Any] = [None, *top]
        for i, p in enumerate(prompts):
            for e in order if (rep + i) % 2 == 0 else order[::-1]:
                g = plain_gen if e is None else gens[id(e)]
                r = run_batch(g, [p], [1000 + i], 0.0, n)
                if i == 0:
                    (plain_runs if e is None else spec_runs[id(e)]).append(Run())
                (plain_runs if e is None else spec_runs[id(e)])[-1].add(r)
    del gens
    gc.collect()
    timed_plain = _median([r.tok_s for r in plain_runs if r.tok_s] or [0.0]) or None
    for e in top:
        rs = spec_runs[id(e)]
        tot = Run()
        for r in rs:
            tot.add(r)
        st = _stats(tot, None)
        mism = sum(a != b for rp, rsp in zip(plain_runs, rs, strict=True)
                   for a, b in zip(rp.tokens, rsp.tokens, strict=True))
        tok_s = _median([r.tok_s for r in rs if r.tok_s] or [0.0]) or None
        e["timed"] = {"tok_s": tok_s, "plain_tok_s": timed_plain,
                      "speedup": tok_s / timed_plain if tok_s and timed_plain else None,
                      "acceptance_rate": st["acceptance_rate"],
                      "mean_accepted_length": st["mean_accepted_length"],
                      "tokens_per_step": st["tokens_per_step"], "greedy_mismatches": mism,
                      "tok_s_all": [r.tok_s for r in rs],
                      "plain_tok_s_all": [r.tok_s for r in plain_runs]}
    timed = [e for e in top if e["timed"]["speedup"]]
    best = max(timed, key=lambda e: e["timed"]["speedup"], default=None)
    if best is None:
        best = ranked[0] if ranked else None
    if best is None:
        raise RuntimeError("layer-skip search: no candidate ran")
    print(f"  search best: {best['subset']} ({best['kept_layers']} layers) k={best['k']} | "
          f"timed speedup {fmt_ratio((best.get('timed') or {}).get('speedup'))}", flush=True)
    return {
        "n_layers": L, "candidates": len(cands), "max_new_tokens": n,
        "prompts_phase1": len(short), "prompts_phase2": len(prompts),
        "repeats_phase2": cfg.search_repeats, "top": cfg.search_top, "ks": cfg.search_ks,
        "plain_tok_s_phase1": plain_tok_s,
        "plain_tok_s_phase1_all": [r.tok_s for r in plain_short],
        "plain_tok_s_phase2": timed_plain,
        "entries": entries,
        "best": {"subset": best["subset"], "layers": best["layers"], "k": best["k"],
                 "kept_layers": best["kept_layers"],
                 "speedup": (best.get("timed") or {}).get("speedup")},
        "greedy_mismatches": sum(e.get("greedy_mismatches") or 0 for e in entries)
        + sum(e["timed"]["greedy_mismatches"] or 0 for e in top),
        "phase1_s": phase1_s, "total_s": time.perf_counter() - t_start,
        "load_avg_1m": {"start": load_start, "end": load_average()},
    }


# --------------------------------------------------------------------------- output
def _f(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in rows:
        p, s = r["plain"] or {}, r["spec"] or {}
        out.append([
            r.get("drafter", "ngram"), r["kind"], _f(r["temperature"], "{:g}"), r["batch"], r["k"],
            _f(p.get("tok_s")),
            _f(s.get("tok_s")), fmt_ratio(r["speedup"]),
            _f(s.get("acceptance_rate"), "{:.0%}"), _f(s.get("mean_accepted_length"), "{:.2f}"),
            _f(s.get("tokens_per_step"), "{:.2f}"),
            "-" if r["greedy_mismatches"] is None else
            f"{r['greedy_mismatches']}/{r['greedy_requests_compared']}",
            r["status"] if r["status"] != "ok" else "ok",
        ])
    return out


HEADERS = ["drafter", "kind", "temp", "batch", "k", "plain tok/s", "spec tok/s", "speedup", "accept rate",
           "mean acc len", "tok/step", "greedy mismatches", "status"]


def evaluate_targets(rows: Sequence[dict[str, Any]], cfg: Config,
                     search: dict[str, Any] | None = None) -> dict[str, Any]:
    ok_rows = [r for r in rows if r["speedup"] is not None]
    ng = [r for r in ok_rows if r["drafter"] == "ngram"]
    main = [r for r in ng if r["kind"] == "copy" and r["setting"] == "greedy" and r["batch"] == 1]
    at_main = next((r for r in main if r["k"] == cfg.k_main), None)
    best = max(main, key=lambda r: r["speedup"], default=None)
    slow = [r for r in ok_rows if r["speedup"] < 0.9]
    out: dict[str, Any] = {
        "copy_greedy_b1_speedup_k_main": at_main and at_main["speedup"],
        "copy_greedy_b1_best": best and {"k": best["k"], "speedup": best["speedup"]},
        "copy_greedy_b1_2x_met": bool(at_main and at_main["speedup"] >= 2.0),
        "copy_greedy_b1_2x_met_best_k": bool(best and best["speedup"] >= 2.0),
        "min_speedup": min((r["speedup"] for r in ok_rows), default=None),
        "no_config_below_0.9x_met": not slow and len(ok_rows) == len(rows),
        "below_0.9x": [{"drafter": r["drafter"], "kind": r["kind"], "setting": r["setting"],
                        "batch": r["batch"], "k": r["k"], "speedup": r["speedup"]} for r in slow],
        "greedy_mismatches_total": sum(r["greedy_mismatches"] or 0 for r in rows)
        + ((search or {}).get("greedy_mismatches") or 0),
    }
    for name in ("ngram", "layerskip", "model"):
        mine = [r for r in rows if r["drafter"] == name]
        if not mine:
            continue
        ok = [r for r in mine if r["speedup"] is not None]
        out[name] = {
            "rows": len(mine), "failed": len(mine) - len(ok),
            "min_speedup": min((r["speedup"] for r in ok), default=None),
            "max_speedup": max((r["speedup"] for r in ok), default=None),
            "below_0.9x": sum(r["speedup"] < 0.9 for r in ok),
            "greedy_mismatches": sum(r["greedy_mismatches"] or 0 for r in mine),
        }
    ls = next((r for r in ok_rows if r["drafter"] == "layerskip" and r["kind"] == "open"
               and r["setting"] == "greedy" and r["batch"] == 1), None)
    if "layerskip" in out:
        out["layerskip"].update({
            "layers": ls and ls.get("layers"), "subset": ls and ls.get("subset"),
            "k": ls and ls["k"],
            "open_greedy_b1_speedup": ls and ls["speedup"],
            "open_greedy_b1_1.2x_met": bool(ls and ls["speedup"] > 1.2),
            "search_best_speedup": search and search["best"]["speedup"],
        })
    return out


def render_markdown(meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    t = meta["targets"]
    lines = [
        f"# Speculative decoding benchmark: {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- timestamp: {meta['timestamp']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, triton "
        f"{meta['triton']}, python {meta['python']}",
        f"- torch threads: {meta['cpu_threads']} ({meta['cpu_count']} cores); 1-minute load "
        f"average {meta['load_avg_1m']} at the start, {meta['load_avg_1m_end']} at the end, "
        f"at most {meta['load_avg_1m_max_seen']} at a point's start or end (this process's "
        f"own threads count; above {meta['cpu_threads']} means other work shared the cores)",
        f"- model: {meta['model']}, {meta['dtype']}; max_new_tokens {meta['max_new_tokens']}, "
        "ignore_eos False (same on both sides)",
        *[f"- drafter {d['name']}: {d['description']}" + (
            f"; k sweep {meta['k_sweep']} on copy prompts, greedy, B=1" if d["name"] == "ngram"
            else "") + f"; points: {d['points']}" for d in meta["drafters"]],
        "- speculative generators use adaptive k (decodekit's default): on CPU a batch shares "
        "k drafted tokens per step (k // rows per row), so B=8 with k <= 4 drafts nothing",
        f"- prompts: {meta['n_prompts']} per kind ({meta['b1_prompts']} at B=1, one after "
        f"another; B={max(meta['batches'])}: {max(meta['batches'])} requests at once, "
        "admitted together, next_token until all are done); "
        + ("copy = a random 6-token phrase repeated 3 times; open = random tokens"
           if meta["smoke"] else
           "copy = repeat / fix spelling / numbered list / summarise in the same words over "
           "60-120 word passages; open = stories, explanations"),
        f"- {meta['repeats']} repeat(s) per point, sides interleaved, medians; one warm-up run "
        "per side and point",
        "- tok/s = (generated tokens - requests) / sum of the wall times of the next_token "
        "calls after the first (prefill) one; speedup = spec tok/s / plain tok/s",
        "- accept rate = accepted / drafted; mean acc len = 1 + accepted / verification "
        "steps with a draft (SpecStats); tok/step = decode tokens per request-step (steps "
        "without a draft included)",
        "- greedy mismatches = greedy requests whose speculative tokens differ from the plain "
        "run's (should be 0)",
        "",
    ]
    lines.append(markdown_table(HEADERS, table_rows(rows)))
    for r in rows:
        if r.get("per_prompt") and r["drafter"] == "ngram" and r["kind"] == "copy" \
                and r["setting"] == "greedy" and r["k"] == meta["k_main"]:
            texts = meta["prompts"].get("copy") if not meta["smoke"] else None
            lines += ["", f"Per prompt (copy, greedy, B=1, k={r['k']}; medians over repeats):", ""]
            lines.append(markdown_table(
                ["prompt", "plain tok/s", "spec tok/s", "speedup", "accept rate", "tok/step"],
                [[(texts[p["prompt"]].split(":")[0][:60] if texts else p["prompt"]),
                  _f(p["plain_tok_s"]), _f(p["spec_tok_s"]), fmt_ratio(p["speedup"]),
                  _f(p["acceptance_rate"], "{:.0%}"), _f(p["tokens_per_step"], "{:.2f}")]
                 for p in r["per_prompt"]]))
    search = meta.get("layerskip_search")
    if search:
        lines += search_markdown(search)
    lines += ["", "Targets:", ""]
    if "ngram" in t:
        lines.append(f"- NGramDraft, copy, greedy, B=1, k={meta['k_main']}: "
                     f"{fmt_ratio(t['copy_greedy_b1_speedup_k_main'])} (target >= 2x: "
                     f"{'met' if t['copy_greedy_b1_2x_met'] else 'NOT met'}); best k: "
                     + ("-" if not t["copy_greedy_b1_best"] else
                        f"k={t['copy_greedy_b1_best']['k']} "
                        f"{fmt_ratio(t['copy_greedy_b1_best']['speedup'])}"))
    if "layerskip" in t:
        ls = t["layerskip"]
        lines.append(
            f"- LayerSkipDraft, open, greedy, B=1 ({ls['subset']}, {len(ls['layers'] or [])} "
            f"layers, k={ls['k']}): {fmt_ratio(ls['open_greedy_b1_speedup'])} (aim > 1.2x: "
            f"{'met' if ls['open_greedy_b1_1.2x_met'] else 'NOT met'}); the search's best "
            f"timed candidate on the search prompts: {fmt_ratio(ls['search_best_speedup'])}; "
            f"LayerSkip rows {fmt_ratio(ls['min_speedup'])} to {fmt_ratio(ls['max_speedup'])}")
    if "model" in t:
        dm = t["model"]
        lines.append(f"- DraftModel (random draft, overhead picture): {fmt_ratio(dm['min_speedup'])}"
                     f" to {fmt_ratio(dm['max_speedup'])}; below 0.9x: {dm['below_0.9x']} of "
                     f"{dm['rows']} rows")
    lines.append(f"- slowest configuration: {fmt_ratio(t['min_speedup'])} (target: none below "
                 f"0.9x: {'met' if t['no_config_below_0.9x_met'] else 'NOT met'})")
    for s in t["below_0.9x"]:
        lines.append(f"  - below 0.9x: {s['drafter']} {s['kind']} {s['setting']} B={s['batch']} "
                     f"k={s['k']}: {fmt_ratio(s['speedup'])}")
    lines.append(f"- greedy mismatches: {t['greedy_mismatches_total']}")
    return "\n".join(lines) + "\n"


def search_markdown(search: dict[str, Any]) -> list[str]:
    """The layer-skip search table (best speedup estimate first)."""
    lines = [
        "", f"LayerSkip subset search ({search['n_layers']} decoder layers; {search['candidates']} "
        f"candidates = subsets x k in {search['ks']}; greedy, B=1, {search['max_new_tokens']} new "
        f"tokens; phase 1: each candidate once on {search['prompts_phase1']} search prompts, est. "
        "speedup = its tok/s / the mean plain tok/s of the plain runs just before and after its "
        f"subset's k group ({len(search['plain_tok_s_phase1_all'])} plain runs, median "
        f"{_f(search['plain_tok_s_phase1'])} tok/s); phase 2: the top {search['top']} "
        "estimates among the candidates with any accepted draft, timed again on "
        f"{search['prompts_phase2']} prompts, {search['repeats_phase2']} repeats "
        f"interleaved with plain ({_f(search['plain_tok_s_phase2'])} tok/s); "
        f"{search['total_s']:.0f} s in all). Best: {search['best']['subset']}, k="
        f"{search['best']['k']} ({fmt_ratio(search['best']['speedup'])}).", "",
    ]
    ents = sorted(search["entries"], key=lambda e: -(e.get("speedup_est") or 0.0))
    body = []
    for e in ents:
        tm = e.get("timed") or {}
        body.append([
            e["subset"], e["kept_layers"], e["k"], _f(e.get("acceptance_rate"), "{:.0%}"),
            _f(e.get("mean_accepted_length"), "{:.2f}"), _f(e.get("tokens_per_step"), "{:.2f}"),
            _f(e.get("tok_s")), _f(e.get("plain_tok_s_local")), fmt_ratio(e.get("speedup_est")),
            _f(tm.get("tok_s")),
            fmt_ratio(tm.get("speedup")),
            "-" if e.get("greedy_mismatches") is None else
            str(e["greedy_mismatches"] + (tm.get("greedy_mismatches") or 0)),
            e["status"],
        ])
    lines.append(markdown_table(
        ["subset", "kept layers", "k", "accept rate", "mean acc len", "tok/step", "search tok/s",
         "plain tok/s", "est. speedup", "timed tok/s", "timed speedup", "greedy mismatches", "status"], body))
    return lines


def format_row_line(r: dict[str, Any]) -> str:
    head = f"{r['drafter']:<9} {r['kind']:<4} {r['setting']:<6} B={r['batch']:<2} k={r['k']}"
    if r["status"] != "ok":
        return f"{head} | {r['status']}"
    p, s = r["plain"], r["spec"]
    mism = "" if r["greedy_mismatches"] is None else \
        f" | greedy mismatches {r['greedy_mismatches']}/{r['greedy_requests_compared']}"
    return (f"{head} | plain {_f(p['tok_s'])} tok/s | spec {_f(s['tok_s'])} tok/s | speedup "
            f"{fmt_ratio(r['speedup'])} | accept {_f(s['acceptance_rate'], '{:.0%}')} | mean acc "
            f"len {_f(s['mean_accepted_length'], '{:.2f}')} | tok/step "
            f"{_f(s['tokens_per_step'], '{:.2f}')}{mism}")


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.speculative",
        description="Decode tokens/s of decodekit's TokenGenerator with and without NGramDraft "
                    "speculation, on copy-heavy and open-ended prompts.",
    )
    p.add_argument("--quick", action="store_true",
                   help="1 repeat and 4 prompts per kind at batch 1")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random llama + word tokenizer, B 1 and 2, 12 new tokens")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 2; 1 with --smoke); 0: torch's choice")
    p.add_argument("--repeats", type=int, help="timed repetitions per point (default 3)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens per request (default 96; 12 with --smoke)")
    p.add_argument("--ngram-min-n", type=int, default=1, metavar="M",
                   help="NGramDraft min_n: shortest suffix worth matching (default 1, "
                        "decodekit's default)")
    p.add_argument("--drafter", choices=[*DRAFTERS, "all"], default="all",
                   help="ngram: NGramDraft on copy and open prompts; layerskip: subset search, "
                        "then LayerSkipDraft on open prompts; model: DraftModel with a random "
                        "small draft on open prompts, greedy; all (default): all three")
    p.add_argument("--search-tokens", type=int, metavar="N",
                   help="new tokens per request in the layer-skip search (default 48; 12 with "
                        "--smoke)")
    p.add_argument("--search-top", type=int, metavar="T",
                   help="candidates timed again in phase 2 of the search (default 4; 3 with "
                        "--quick, 2 with --smoke)")
    p.add_argument("--layerskip-layers", metavar="I,J,..|N",
                   help="skip the search: keep these layer indices (or the first N)")
    p.add_argument("--layerskip-k", type=int, metavar="K",
                   help="k for --layerskip-layers (default 4)")
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--out", default="bench/results", help="directory for the JSON/markdown files")
    p.add_argument("--tag", default=None,
                   help="suffix of the result files: speculative-<device-slug>-<tag>.{json,md}")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    n = args.max_new_tokens or (12 if args.smoke else 96)
    layers: list[int] | None = None
    if args.layerskip_layers:
        try:
            vals = [int(x) for x in args.layerskip_layers.split(",") if x.strip()]
        except ValueError:
            raise SystemExit("--layerskip-layers: comma-separated ints (or one N)") from None
        layers = list(range(vals[0])) if len(vals) == 1 else vals
    if n < 2:
        raise SystemExit("--max-new-tokens must be >= 2 (the first token is prefill)")
    return Config(
        device=pick_device(args.device), dtype_name="fp32",
        batches=[1, 2] if args.smoke else [1, 8], max_new_tokens=n,
        repeats=args.repeats or (1 if (args.quick or args.smoke) else 3),
        warmup_tokens=4 if args.smoke else 8,
        b1_prompts=2 if args.smoke else (4 if args.quick else 8),
        ngram_n=3, ngram_min_n=args.ngram_min_n, k_main=4, k_sweep=[2, 4, 6], smoke=bool(args.smoke),
        drafters=list(DRAFTERS) if args.drafter == "all" else [args.drafter],
        search_tokens=args.search_tokens or (12 if args.smoke else 48),
        search_top=args.search_top or (2 if args.smoke else (3 if args.quick else 4)),
        search_repeats=1 if (args.smoke or args.quick) else 2,
        layerskip_layers=layers, layerskip_k=args.layerskip_k,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    dev = cfg.device
    threads = args.threads if args.threads is not None else (1 if cfg.smoke else 2)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    print(f"device: {device_name(dev)}, {torch.get_num_threads()} torch thread(s)")
    load = load_start = load_average()
    if dev.type != "cuda" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {load} on {os.cpu_count()} cores; CPU timings "
              "will be noisy", file=sys.stderr)
    wl = build_workload(cfg)
    rows: list[dict[str, Any]] = []
    drafters: list[dict[str, Any]] = []
    search: dict[str, Any] | None = None

    def points(drafter: Drafter, kinds: Sequence[str], settings: Sequence[Setting],
               ks_of: Callable[[str, Setting, int], list[int]]) -> None:
        drafters.append({"name": drafter.name, "description": drafter.description,
                         "points": f"{'/'.join(kinds)} prompts, "
                                   f"{'/'.join(s.name for s in settings)}, "
                                   f"B={'/'.join(map(str, cfg.batches))}"})
        for kind in kinds:
            for setting in settings:
                for batch in cfg.batches:
                    for row in run_point(wl, kind, setting, batch, ks_of(kind, setting, batch),
                                         cfg, drafter):
                        rows.append(row)
                        print(format_row_line(row), flush=True)

    if "ngram" in cfg.drafters:
        points(ngram_drafter(cfg), KINDS, SETTINGS,
               lambda kind, setting, batch: sorted({cfg.k_main, *cfg.k_sweep})
               if kind == "copy" and setting.name == "greedy" and batch == 1 else [cfg.k_main])
    if "layerskip" in cfg.drafters:
        L = n_decoder_layers(wl.model)
        if cfg.layerskip_layers:
            keep, desc = cfg.layerskip_layers, "given"
            best_k = cfg.layerskip_k or cfg.k_main
        else:
            print(f"layer-skip search ({L} layers):", flush=True)
            search = layerskip_search(wl, cfg)
            keep, desc, best_k = (search["best"]["layers"], search["best"]["subset"],
                                  search["best"]["k"])
        points(layerskip_drafter(keep, desc, L), ["open"], SETTINGS,
               lambda kind, setting, batch: [best_k])
    if "model" in cfg.drafters:
        draft_model, ddesc = random_draft_model(wl, cfg)
        points(model_drafter(draft_model, ddesc), ["open"], [SETTINGS[0]],
               lambda kind, setting, batch: [cfg.k_main])

    meta = metadata(
        dev,
        threads=torch.get_num_threads(),
        model=wl.description, dtype=cfg.dtype_name, smoke=cfg.smoke,
        max_new_tokens=cfg.max_new_tokens, ignore_eos=False, repeats=cfg.repeats,
        warmup_tokens=cfg.warmup_tokens, batches=cfg.batches, b1_prompts=cfg.b1_prompts,
        n_prompts=len(wl.prompts["copy"]), ngram_n=cfg.ngram_n, ngram_min_n=cfg.ngram_min_n,
        k_main=cfg.k_main,
        k_sweep=cfg.k_sweep, settings={s.name: {"temperature": s.temperature} for s in SETTINGS},
        prompts=wl.prompt_text or {k: v for k, v in wl.prompts.items()},
        drafter_option=args.drafter, drafters=drafters, layerskip_search=search,
        search_tokens=cfg.search_tokens,
    )
    meta["load_avg_1m"] = load_start  # metadata() reads it now, at the end
    meta["load_avg_1m_end"] = load_average()
    meta["load_avg_1m_max_seen"] = max(
        [x for r in [*rows, search or {}] for x in (r.get("load_avg_1m") or {}).values()
         if x is not None]
        + [x for x in (load_start, meta["load_avg_1m_end"]) if x is not None], default=None)
    meta["targets"] = evaluate_targets(rows, cfg, search)
    md = render_markdown(meta, rows)
    stem = result_stem("speculative", dev, "smoke" if cfg.smoke else None, args.tag)
    json_path, md_path = write_results(args.out, stem, meta, rows, md)
    print()
    print(md)
    print(f"wrote {json_path} and {md_path}")
    failed = any(r["status"] != "ok" for r in rows)
    if failed:
        print("some points failed (see status above)", file=sys.stderr)
    if meta["targets"]["greedy_mismatches_total"]:
        print("greedy outputs differ between speculative and plain runs", file=sys.stderr)
    return 1 if failed or meta["targets"]["greedy_mismatches_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
