"""Training steering vectors from contrastive prompt pairs (mean difference or PCA).

May call: :mod:`decodekit.engine.model_adapter` (decoder layers), :mod:`.vector`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from .._checks import is_int
from ..engine.model_adapter import decoder_layers, model_device
from .vector import SteeringVector

__all__ = ["train_steering_vector"]

_METHODS = ("mean_diff", "pca")



def _pairs(pairs: Any) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes, Mapping)) or not isinstance(pairs, Sequence):
        raise ValueError(f"pairs must be a sequence of (positive, negative) prompts, got "
                         f"{type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs must hold at least one (positive, negative) pair, got none")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, Mapping):
            pos, neg = pair.get("positive"), pair.get("negative")
        elif isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
            pos, neg = pair
        else:
            pos = neg = None
        if not isinstance(pos, str) or not isinstance(neg, str):
            raise ValueError(f"pairs[{i}] must be (positive, negative) strings or a dict with keys "
                             f"'positive' and 'negative', got {pair!r}")
        out.append((pos, neg))
    return out


def _layers(layers: Any, num_layers: int) -> list[int]:
    """Parse ``layers`` (ints, or a string like ``"8-16"`` / ``"3,5,8-10"``, inclusive)."""
    if isinstance(layers, str):
        out: list[int] = []
        for part in layers.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ValueError(f"layers must be ints or a range string like '8-16' (inclusive), "
                                 f"got {layers!r}")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    else:
        try:
            out = list(layers)
        except TypeError:
            raise ValueError(f"layers must be an iterable of ints or a range string like '8-16', "
                             f"got {layers!r}") from None
        if not all(is_int(k) for k in out):
            raise ValueError(f"layers must be ints, got {out!r}")
    if not out:
        raise ValueError(f"layers must name at least one decoder layer, got {layers!r}")
    bad = [k for k in out if not 0 <= k < num_layers]
    if bad:
        raise ValueError(f"layers: layer {bad[0]} outside the model's {num_layers} decoder layers "
                         f"[0, {num_layers})")
    return sorted(set(int(k) for k in out))


def _last_states(model: torch.nn.Module, tokenizer: Any, texts: list[str], layers: list[int],
                 token_index: int, batch_size: int) -> dict[int, torch.Tensor]:
    """Hidden state ``hidden_states[layer + 1]`` at each text's ``token_index``-th real token.

    Returns ``{layer: [len(texts), H]}`` in fp32 on the CPU. Texts are tokenized one by one
    and padded here (on the tokenizer's padding side) with explicit ``position_ids``, so a
    text's states do not depend on what it is batched with.
    """
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    encoded = [list(tokenizer(t)["input_ids"]) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        if not -len(ids) <= token_index < len(ids):
            raise ValueError(f"token_index {token_index} is outside the prompt {text!r} "
                             f"({len(ids)} tokens)")
    states: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        cols = []
        for row, seq in enumerate(chunk):
            first = width - len(seq) if left else 0
            ids[row, first:first + len(seq)] = torch.tensor(seq)
            mask[row, first:first + len(seq)] = 1
            cols.append(first + (token_index % len(seq)))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), output_hidden_states=True, use_cache=False)
        rows = torch.arange(len(chunk))
        col_idx = torch.tensor(cols)
        for k in layers:
            states[k].append(out.hidden_states[k + 1][rows, col_idx].float().cpu())
    return {k: torch.cat(v) for k, v in states.items()}


def train_steering_vector(model: torch.nn.Module, tokenizer: Any,
                          pairs: Sequence[tuple[str, str] | Mapping[str, str]],
                          layers: Iterable[int] | str, method: Literal["mean_diff", "pca"] = "mean_diff",
                          token_index: int = -1, batch_size: int = 16,
                          model_name: str | None = None) -> SteeringVector:
    """Train a steering vector from (positive, negative) prompt pairs.

    For every pair the model is run on both prompts and the hidden state after decoder layer
    ``l`` (``hidden_states[l + 1]``) is read at token ``token_index`` of the prompt's real
    tokens (``-1``: its last token, whatever the padding). With ``D_l [N, H]`` the
    positive-minus-negative differences at layer ``l``:

    * ``mean_diff``: ``mean(D_l)``.
    * ``pca``: the first principal direction of ``D_l`` (repeng's "pca_diff" idea, taken
      uncentered: the top right singular vector of ``D_l``, so a difference shared by all
      pairs is found rather than subtracted away), signed so that positives project higher
      than negatives on average, and scaled to the norm of ``mean(D_l)`` so that strengths
      mean the same for both methods.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM; run under ``torch.no_grad()`` in its current mode and dtype.
    tokenizer
        Its tokenizer (called per prompt, special tokens as it adds them by default).
    pairs : sequence of (str, str) or {"positive": str, "negative": str}
    layers : iterable of int or str
        Decoder layers (0-based), or an inclusive range string such as ``"8-16"``.
    method : {"mean_diff", "pca"}
    token_index : int
        Which real token of each prompt to read (Python indexing over the prompt's tokens).
    batch_size : int
        Prompts per forward.
    model_name : str, optional
        Stored on the vector; default ``model.config._name_or_path`` or its ``model_type``.

    Returns
    -------
    SteeringVector
        ``{layer: [H]}`` fp32, with ``method`` and ``model_name`` set.

    Notes
    -----
    For the last decoder layer transformers' ``hidden_states[-1]`` is taken after the final
    norm, so a vector trained there lives in that (normalized) space.
    """
    pairs = _pairs(pairs)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
    if not is_int(token_index):
        raise ValueError(f"token_index must be an int, got {token_index!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    layer_ids = _layers(layers, len(decoder_layers(model)))
    texts = [s for pos, neg in pairs for s in (pos, neg)]
    states = _last_states(model, tokenizer, texts, layer_ids, int(token_index), int(batch_size))
    directions = {}
    for k in layer_ids:
        diffs = states[k][0::2] - states[k][1::2]  # [N, H]
        mean = diffs.mean(0)
        if method == "mean_diff":
            directions[k] = mean
            continue
        _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
        first = vh[0].float()
        if (diffs @ first).mean() < 0:
            first = -first
        directions[k] = first * torch.linalg.vector_norm(mean)
    config = getattr(model, "config", None)
    if model_name is None and config is not None:
        model_name = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
    return SteeringVector(directions, model_name=model_name or None, method=method,
                          metadata={"pairs": str(len(pairs)), "token_index": str(int(token_index)),
                                    "layers": ",".join(map(str, layer_ids))})
