"""peft adapters for the LoRA tests (peft is the oracle; the library never imports it)."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch


def save_adapter(base: torch.nn.Module, path: Path, seed: int, std: float = 0.05, **config
                 ) -> torch.nn.Module:
    """A peft adapter (``peft.LoraConfig(**config)``) on a copy of ``base`` with lora_B drawn
    from N(0, ``std``) (peft starts it at zero, which would make the adapter a no-op), saved to
    ``path``; returns the PeftModel (the oracle)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    model.save_pretrained(str(path))
    return model.eval()
