"""Beam search over the generator's KV-cache slots, with the semantics of Hugging Face
transformers' ``generate(num_beams=k, do_sample=False)`` (transformers 5's vectorised
``_beam_search``), rule for rule:

- each step scores every continuation of every running beam by its cumulative log-probability
  (``log_softmax`` of the fp32 logits, after dividing them by ``temperature`` when it is > 0)
  and keeps the best ``max(2, 1 + n_eos) * k`` candidates with **one** ``topk`` over the
  request's ``[k * V]`` scores (the first step: beam 0 only, the others start at -1e9);
- candidates that end (an EOS token, or the ``max_tokens``-th token) leave the running set;
  only the first ``k`` candidates may enter the finished set, scored
  ``cumulative logprob / generated_length ** length_penalty`` (the length counts the EOS
  token, not the prompt); the finished set keeps the best ``k``;
- the search ends when every candidate hit a stop (the length limit), when
  ``early_stopping=True`` and ``k`` beams have finished, or when the early-stop heuristic says no
  running beam can beat the worst finished one (``early_stopping=False``: at the current
  length; ``"never"``: at ``max_tokens`` when ``length_penalty > 0``).

Each request searches alone (HF with a batch of one prompt); several requests run their
decode steps in one forward. Beams are rows (slots) of the generator's KV cache: the prompt is
prefilled once, and after each step a beam whose parent changed takes its parent's cache with
:meth:`~decodekit.engine.runner.ModelRunner.fork` (shared blocks, copied on the next write, in
the paged cache; a row copy with ``kv_cache="slots"``). The step's selection runs on the
device; one host transfer per step brings back the parents (for the cache bookkeeping) and
which requests go on. Beam rows run without speculation or logits processors; a ``steering``
steers every beam and a LoRA adapter adapts every beam (prefix-cache blocks salted like a
steered or adapted request's).

May call: the generator's :class:`~decodekit.engine.runner.ModelRunner` and
:class:`~decodekit.engine.slots.SlotTable` (its public methods).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_float, check_int, describe, int_at_least

__all__ = ["MAX_BEAM_WIDTH", "BeamScores", "BeamSearch", "BeamSearchOutput", "BeamSearchParams",
           "BeamSequence"]

MAX_BEAM_WIDTH = 64
NEG = -1.0e9  # transformers' "impossible" score


@dataclass(frozen=True)
class BeamSearchParams:
    """Settings of one beam search.

    Parameters
    ----------
    beam_width : int
        Beams kept per request, in ``[1, 64]``.
    max_tokens : int
        New tokens per sequence (the EOS token included), >= 1.
    ignore_eos : bool
        EOS is an ordinary token (``2 * beam_width`` candidates per step; beams end only at
        ``max_tokens``).
    temperature : float
        >= 0; > 0 divides the logits before the log-softmax (still deterministic); 0: no scaling.
    length_penalty : float
        Exponent of the generated length that divides a finished beam's cumulative logprob.
    early_stopping : True | False | "never"
        transformers' meaning: True stops once ``beam_width`` beams finished; False stops when
        the best running beam, at its current length, cannot beat the worst finished one;
        "never" assumes the best running beam could reach ``max_tokens`` when
        ``length_penalty > 0``.
    num_return_sequences : int | None
        Sequences returned per request, best first, in ``[1, beam_width]`` (None: ``beam_width``).
    include_stop_str_in_output : bool
        Keep the EOS token's text at the end of a sequence that ended with it.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        set_("beam_width", check_int("beam_width", self.beam_width, lambda v: 1 <= v <= MAX_BEAM_WIDTH,
                                     f"in [1, {MAX_BEAM_WIDTH}]"))
        set_("max_tokens", int_at_least("max_tokens", self.max_tokens, 1))
        set_("temperature", check_float("temperature", self.temperature, lambda v: 0.0 <= v < float("inf"),
                                        "a finite number >= 0"))
        set_("length_penalty", check_float("length_penalty", self.length_penalty,
                                           lambda v: abs(v) < float("inf"), "a finite number"))
        es = self.early_stopping
        if not (es is True or es is False or (isinstance(es, str) and es == "never")):
            raise ValueError(f"early_stopping must be True, False or 'never', got {describe(es)}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {describe(getattr(self, name))}")
        n = self.num_return_sequences
        if n is not None:
            set_("num_return_sequences", check_int("num_return_sequences", n,
                                                   lambda v: 1 <= v <= self.beam_width,
                                                   f"in [1, beam_width={self.beam_width}] or None"))

    @property
    def n_return(self) -> int:
        """Sequences returned per request."""
        return self.beam_width if self.num_return_sequences is None else self.num_return_sequences


@dataclass(frozen=True)
class BeamSequence:
    """One finished beam: its generated ``token_ids`` (the EOS token included when it ended
    with one), their ``text`` (without the EOS token's, unless ``include_stop_str_in_output``;
    ``""`` without a tokenizer), the sum of their log-probabilities and the ``score`` the
    search ranks by (``cumulative_logprob / len(token_ids) ** length_penalty``, transformers'
    ``sequences_scores``). ``finish_reason``: ``"stop"`` (EOS) or ``"length"``."""

    token_ids: list[int]
    text: str
    cumulative_logprob: float
    score: float
    finish_reason: str = "length"


@dataclass(frozen=True)
class BeamSearchOutput:
    """The result for one prompt: ``sequences``, best first (``num_return_sequences`` of them)."""

    request_id: str
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]


class BeamScores:
    """The selection state of ``B`` requests' beam searches, on the device, step by step
    exactly as transformers' ``_beam_search`` (each request searching alone).

    Running beams: scores ``[B, k]`` (fp32 cumulative logprobs, -1e9 for impossible ones) and
    generated tokens ``[B, k, N]``. Finished set (``k`` entries per request, best first):
    scores, cumulative logprobs, ``done`` (a real finished sequence), lengths and tokens.
    ``unsat [B, 1]``: the early-stop heuristic still sees room for improvement.
    """

    def __init__(self, batch: int, params: BeamSearchParams, eos_ids: list[int], device: torch.device):
        k, n = params.beam_width, params.max_tokens
        self.k, self.n, self.params = k, n, params
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        # stop once k beams finished (width 1: greedy decoding, as generate(num_beams=1) runs)
        self.stop_full = params.early_stopping is True or k == 1
        self.width = max(2, 1 + len(eos_ids)) * k  # candidates per step
        self.top = torch.arange(self.width, device=device) < k  # [K]: may finish
        self.run_scores = torch.zeros(batch, k, device=device)
        self.run_scores[:, 1:] = NEG
        self.run_seq = torch.zeros(batch, k, n, dtype=torch.long, device=device)
        self.fin_scores = torch.full((batch, k), NEG, device=device)
        self.fin_cum = torch.zeros(batch, k, device=device)
        self.fin_done = torch.zeros(batch, k, dtype=torch.bool, device=device)
        self.fin_len = torch.zeros(batch, k, dtype=torch.long, device=device)
        self.fin_seq = torch.zeros(batch, k, n, dtype=torch.long, device=device)
        self.unsat = torch.ones(batch, 1, dtype=torch.bool, device=device)

    def advance(self, logp: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step from ``logp [B, k, V]`` (fp32 log-probabilities of each running beam's next
        token; ``step``: tokens generated before it). Returns, on the device, each new running
        beam's parent (index into the previous beams) ``[B, k]``, its new token ``[B, k]`` and
        whether each request goes on ``[B]``."""
        B, k, V = logp.shape
        acc = (logp + self.run_scores[:, :, None]).reshape(B, k * V)
        top_v, top_i = torch.topk(acc, self.width)  # [B, K], best first
        parent, tok = top_i // V, top_i % V
        if step + 1 >= self.n:  # the length limit: every candidate ends
            hits = torch.ones_like(tok, dtype=torch.bool)
        else:
            hits = torch.isin(tok, self.eos)
        cand = self.run_seq.gather(1, parent[:, :, None].expand(B, self.width, self.n))  # [B, K, N]
        cand[:, :, step] = tok
        # the best k candidates that did not end keep running (ended ones only as a last resort)
        run_v = top_v + hits.to(torch.float32) * NEG
        nxt = torch.topk(run_v, k)[1]  # [B, k]
        self.run_scores = run_v.gather(1, nxt)
        self.run_seq = cand.gather(1, nxt[:, :, None].expand(B, k, self.n))
        self._finish(top_v, cand, hits, step)
        self._heuristic(step + 1)
        full = self.fin_done.all(-1) & self.stop_full
        go_on = self.unsat[:, 0] & ~full & ~hits.all(-1)
        return parent.gather(1, nxt), tok.gather(1, nxt), go_on

    def _finish(self, top_v: torch.Tensor, cand: torch.Tensor, hits: torch.Tensor, step: int) -> None:
        """Merge the candidates that just ended among the first ``k`` into the finished set
        (``top_v [B, K]`` cumulative logprobs, ``cand [B, K, N]`` tokens, ``hits [B, K]``)."""
        B, k = top_v.shape[0], self.k
        did = hits & self.top[None, :]
        score = top_v / ((step + 1) ** self.params.length_penalty)
        full = torch.all(self.fin_done, dim=-1, keepdim=True) & self.stop_full  # no new entries
        score = score + full.to(torch.float32) * NEG
        score = score + (~self.unsat).to(torch.float32) * NEG  # no improvement possible
        score = score + (~did) * NEG  # still running: not a finished sequence
        merged = torch.cat((self.fin_scores, score), dim=1)
        idx = torch.topk(merged, k)[1]  # [B, k]
        self.fin_scores = merged.gather(1, idx)
        self.fin_cum = torch.cat((self.fin_cum, top_v), dim=1).gather(1, idx)
        self.fin_done = torch.cat((self.fin_done, did), dim=1).gather(1, idx)
        length = torch.full_like(hits, step + 1, dtype=torch.long)
        self.fin_len = torch.cat((self.fin_len, length), dim=1).gather(1, idx)
        seqs = torch.cat((self.fin_seq, cand), dim=1)
        self.fin_seq = seqs.gather(1, idx[:, :, None].expand(B, k, self.n))

    def _heuristic(self, generated: int) -> None:
        """Can the best running beam still beat the worst finished one (``generated`` tokens so
        far)? ``"never"`` with a positive length penalty assumes it reaches ``max_tokens``."""
        lp, es = self.params.length_penalty, self.params.early_stopping
        length = self.n if (isinstance(es, str) and es == "never" and lp > 0.0) else generated
        best = self.run_scores[:, :1] / (length ** lp)
        worst = torch.where(self.fin_done, torch.min(self.fin_scores, dim=1, keepdim=True)[0], NEG)
        self.unsat = self.unsat & torch.any(best > worst, dim=-1, keepdim=True)

    def keep(self, rows: torch.Tensor) -> None:
        """Only the requests at ``rows`` (int64 ``[B']``, device) go on."""
        for name in ("run_scores", "run_seq", "fin_scores", "fin_cum", "fin_done", "fin_len", "fin_seq",
                     "unsat"):
            setattr(self, name, getattr(self, name).index_select(0, rows))

    def result(self, row: int) -> tuple[torch.Tensor, ...]:
        """Request ``row``'s finished set: ``(tokens [k, N], lengths [k], scores [k],
        cumulative logprobs [k], done [k])`` (device; later steps never write into them)."""
        return self.fin_seq[row], self.fin_len[row], self.fin_scores[row], self.fin_cum[row], \
            self.fin_done[row]


class _Request:
    """One prompt's beams: the slots it holds and which one holds each running beam. Its
    ``length`` (positions cached per beam) is what the slot table reports for each slot."""

    def __init__(self, prompt: list[int], slots: list[int]) -> None:
        self.request_id = uuid.uuid4().hex
        self.prompt, self.slots = prompt, slots
        self.beams = [slots[0]] * len(slots)  # before the first step every beam is the prompt
        self.length = 0
        self.result: tuple[torch.Tensor, ...] | None = None


class BeamSearch:
    """Runs :class:`BeamSearchParams` searches on a
    :class:`~decodekit.engine.generator.TokenGenerator`'s free slots (the caller holds the
    generator's lock). Requests run in groups of ``free slots // beam_width``; every slot taken
    is given back at the end, also when a forward fails."""

    def __init__(self, gen: Any, params: BeamSearchParams, steering: Any = None, lora: str | None = None
                 ) -> None:
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
        self.gen, self.runner, self.params, self.steering = gen, gen.runner, params, steering
        self.lora = lora
        self.eos_ids = [] if params.ignore_eos else sorted(set(gen.eos_token_ids))
        free = gen.slots.num_free
        if params.beam_width > free:
            raise ValueError(f"beam_width {params.beam_width} exceeds the {free} free slots of this "
                             f"generator (max_batch_size {gen.max_batch_size}); raise max_batch_size or "
                             "release requests")
        self.group = free // params.beam_width

    @torch.inference_mode()
    def run(self, prompts: list[list[int]]) -> list[BeamSearchOutput]:
        """The search of each prompt (token ids), in order."""
        room = self.gen.max_seq_len - self.params.max_tokens
        for ids in prompts:
            if not ids:
                raise ValueError("prompt is empty")
            if len(ids) > room:
                raise ValueError(f"prompt has {len(ids)} tokens but only {max(room, 0)} fit (max_seq_len "
                                 f"{self.gen.max_seq_len} - max_tokens {self.params.max_tokens})")
        out: list[BeamSearchOutput] = []
        for i in range(0, len(prompts), self.group):
            out += self._run_group(prompts[i:i + self.group])
        return out

    def _run_group(self, prompts: list[list[int]]) -> list[BeamSearchOutput]:
        """Search ``prompts`` together (each on its own ``beam_width`` slots): prefill each, then
        one selection (:class:`BeamScores`) and one decode forward of every running beam per step."""
        reqs: list[_Request] = []
        try:
            first = [self._start(p, reqs) for p in prompts]  # [V] each
            logp = self._logp(torch.stack(first))[:, None, :].expand(-1, self.params.beam_width, -1)
            state = BeamScores(len(reqs), self.params, self.eos_ids, self.runner.device)
            if state.width > logp.shape[1] * logp.shape[2]:
                raise ValueError(f"beam search keeps {state.width} candidates per step but the model has "
                                 f"{logp.shape[2]} tokens x {logp.shape[1]} beams")
            active = list(reqs)
            for step in range(self.params.max_tokens):
                parents, tokens, go_on = state.advance(logp, step)
                host = torch.cat((parents.flatten(), go_on.to(torch.long))).tolist()  # the step's one sync
                active, tokens = self._select(state, active, host, tokens)
                if not active:
                    break
                logp = self._decode(active, tokens)
            return self._outputs(reqs)
        finally:
            for r in reqs:
                self._release(r)
            self.runner.reserve([], [], [])  # the freed tables reach the device

    def _start(self, prompt: list[int], reqs: list[_Request]) -> torch.Tensor:
        """Take ``beam_width`` slots for ``prompt`` and prefill it into the first one; returns
        the logits ``[V]`` of its last token."""
        slots = self.gen.slots.free[: self.params.beam_width]
        req = _Request(prompt, slots)
        for s in slots:
            self.gen.slots.take(s, req)
        reqs.append(req)
        root = slots[0]
        if self.steering is not None:
            for s in slots:  # every beam is steered (a beam's slot is its row of the hook tables)
                self.runner.hooks.set_row(s, self.steering, len(prompt))
        if self.lora is not None:
            for s in slots:  # and adapted (its row of the LoRA index)
                self.runner.lora.set_row(s, self.lora)
        salts = self.gen.prefix_salts(self.steering, len(prompt), len(prompt), self.lora)
        cached = self.runner.admit(root, prompt, salts)
        logits = self.runner.prefill([prompt], root, [cached])[0]
        self.runner.register(root, prompt, salts)
        req.length = len(prompt)
        return logits

    def _logp(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 log-probabilities of ``logits [..., V]`` (divided by the temperature when > 0)."""
        x = logits.to(torch.float32)
        if self.params.temperature > 0:
            x = x / self.params.temperature
        return torch.log_softmax(x, dim=-1)

    def _select(self, state: BeamScores, active: list[_Request], host: list[int], tokens: torch.Tensor
                ) -> tuple[list[_Request], torch.Tensor]:
        """Apply a step's outcome (``host``: parents ``[B * k]`` then go-on flags ``[B]``): ended
        requests keep their finished set and give their slots back, the others point each beam
        at its parent's cache. Returns the requests that go on and their tokens ``[B', k]``."""
        k, B = self.params.beam_width, len(active)
        go_on = host[B * k:]
        for b, r in enumerate(active):
            if go_on[b]:
                self._reorder(r, host[b * k:(b + 1) * k])
            else:
                r.result = state.result(b)
                self._release(r)
        if all(go_on):
            return active, tokens
        rows = [b for b in range(B) if go_on[b]]
        if rows:
            index = self.runner.upload(rows)
            state.keep(index)
            tokens = tokens.index_select(0, index)
        return [active[b] for b in rows], tokens

    def _reorder(self, req: _Request, parents: list[int]) -> None:
        """New beam ``i`` continues old beam ``parents[i]``: the first child of a parent stays in
        its slot, every other child takes the slot of a dropped beam and forks the parent's
        cache into it."""
        old, new, used, extra = req.beams, list(req.beams), set(), []
        for i, p in enumerate(parents):
            if old[p] in used:
                extra.append(i)
            else:
                new[i] = old[p]
                used.add(old[p])
        spare = [s for s in req.slots if s not in used]
        for i, s in zip(extra, spare, strict=True):
            self.runner.free(s)
            self.runner.fork(old[parents[i]], s)
            new[i] = s
        req.beams = new

    def _decode(self, active: list[_Request], tokens: torch.Tensor) -> torch.Tensor:
        """One decode forward of every running beam (``tokens [B, k]`` its newest token);
        returns the log-probabilities ``[B, k, V]``."""
        slots = [s for r in active for s in r.beams]
        starts = [r.length for r in active for _ in r.beams]
        self.runner.reserve(slots, starts, [a + 1 for a in starts])
        self.runner.set_last_tokens(self.runner.upload(slots), tokens.reshape(-1))
        out = self.runner.decode(slots, self.gen.slots.lengths())
        for r in active:
            r.length += 1
        return self._logp(out.logits).view(len(active), self.params.beam_width, -1)

    def _release(self, req: _Request) -> None:
        """Give ``req``'s slots and cache back (once)."""
        for s in req.slots:
            self.runner.free(s)
            if self.steering is not None:
                self.runner.hooks.clear_row(s)
            if self.lora is not None:
                self.runner.lora.clear_row(s)
            self.gen.slots.give_back(s)
        req.slots, req.beams = [], []

    def _outputs(self, reqs: list[_Request]) -> list[BeamSearchOutput]:
        """The finished sets of ``reqs`` (one host transfer) as outputs, best first."""
        n = self.params.n_return
        fields = zip(*(r.result for r in reqs), strict=True)  # per field, one entry per request
        seqs, lens, scores, cums, done = (torch.stack([x[:n] for x in f]).cpu().tolist() for f in fields)
        tok = self.gen.tokenizer
        out = []
        for b, r in enumerate(reqs):
            beams = []
            for j in range(n):
                ids = seqs[b][j][: lens[b][j]]
                stop = bool(done[b][j]) and bool(ids) and ids[-1] in self.eos_ids
                text = _text(tok, ids[:-1] if stop else ids, ids[-1] if stop else None,
                             self.params.include_stop_str_in_output)
                beams.append(BeamSequence(ids, text, float(cums[b][j]), float(scores[b][j]),
                                          "stop" if stop else "length"))
            out.append(BeamSearchOutput(r.request_id, list(r.prompt), beams))
        return out


def _text(tokenizer: Any, ids: list[int], eos: int | None, include_eos: bool) -> str:
    """``ids`` detokenized (special tokens skipped), plus the EOS token's own text when
    ``include_eos``; ``""`` without a tokenizer."""
    if tokenizer is None:
        return ""
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) if ids else ""
    if eos is not None and include_eos:
        text += tokenizer.decode([eos], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text
