"""Per-request LoRA adapters: many peft adapters served at once, one per request row.

- :mod:`.adapters`: the request / response types (:class:`LoRARequest`, :class:`LoRAResponse`,
  :class:`LoRAStatus`, :class:`LoRAOperation`, :class:`LoRAType`) and :func:`read_adapter`,
  which reads and validates a peft adapter folder into CPU tensors;
- :mod:`.tables`: :class:`LoRATables`, the preallocated device tables of every targeted linear
  layer (load = copy into a free slot, unload = zero it; addresses never change);
- :mod:`.hooks`: :class:`LoRAHooks`, forward hooks on the target layers that add each row's
  adapter term (Triton kernels on CUDA, the torch reference elsewhere);
- :mod:`.reference`: :func:`lora_delta`, the torch reference and the kernels' oracle.

Typical use::

    tables = LoRATables(model, max_loras=4, max_lora_rank=16)
    hooks = LoRAHooks(model, tables, max_rows=8)
    tables.handle(LoRARequest(LoRAOperation.LOAD, "sql", "/adapters/sql"))  # -> LoRAResponse
    hooks.set_row(0, "sql")                 # request row 0 uses it
    with hooks.bound(0, (batch, q)):        # batch row b = request row 0 + b
        logits = model(input_ids).logits

May call: :mod:`decodekit.engine.model_adapter` (decoder layers), :mod:`decodekit.kernels.lora`.
"""

from .adapters import (
    LoRAAdapter,
    LoRAError,
    LoRAModuleWeights,
    LoRAOperation,
    LoRARequest,
    LoRAResponse,
    LoRAStatus,
    LoRAType,
    read_adapter,
)
from .hooks import LoRAHooks
from .reference import lora_add, lora_add_one, lora_delta
from .tables import LoRATables

__all__ = ["LoRAAdapter", "LoRAError", "LoRAHooks", "LoRAModuleWeights", "LoRAOperation", "LoRARequest",
           "LoRAResponse", "LoRAStatus", "LoRATables", "LoRAType", "lora_add", "lora_add_one", "lora_delta",
           "read_adapter"]
