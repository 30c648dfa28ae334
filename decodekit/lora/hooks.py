"""LoRA injection: forward hooks on the target linear layers, per-request adapters in a device table.

:class:`LoRAHooks` mirrors :class:`~decodekit.steering.SteeringHooks`: hooks go on every target
linear layer while some request row has an adapter (and while a graph is captured inside
:meth:`~LoRAHooks.every_module`), and come off when none has: an idle LoRA-capable model runs
its layers without any hook. A request row is given an adapter slot with :meth:`~LoRAHooks.set_row`, and
before each forward the batch is bound to a contiguous range of rows (:meth:`~LoRAHooks.bind`).
Each hooked layer then adds ``scale[l] * (x A[l]^T) B[l]^T`` to the output tokens of rows whose
adapter ``l`` targets it. Rows without an adapter get nothing added (bit-identical to the unhooked
model), and when no bound row has an adapter the hooks return at once (a host-side check).

On CUDA the term is computed by the Triton kernels (:mod:`decodekit.kernels.lora`): per forward,
the bound rows are grouped by slot on the device, with no host sync and into fixed buffers, and
each layer runs a shrink and an expand launch that add into its output in place; the tables and
the row table never move, so the step can live in a CUDA graph (capture inside
:meth:`~LoRAHooks.every_module`). Elsewhere it is :func:`~decodekit.lora.reference.lora_add`
(which reads the slots on the host). Inference only: the kernel path is invisible to autograd.

Under tensor parallelism the tables hold this rank's slice of every adapter
(:class:`~decodekit.lora.LoRATables`), and a hook sees its layer's local input and output (the
TP plan's forward runs inside the module call): a column-wise layer adds its slice of the term
as it is; a row-wise one (input features split, output already summed) sums its partial shrink
``x A^T`` (``[tokens, rank]``, fp32) over the ranks with one all-reduce before the expand. Every
rank binds the same rows and runs the same hooks, so the collectives line up.

May call: :mod:`.tables`, :mod:`.reference`, :mod:`decodekit.kernels.lora`, :mod:`decodekit.nvtx`,
``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from ..nvtx import nvtx_range
from .reference import lora_add, lora_add_one
from .tables import LoRATables

__all__ = ["LoRAHooks"]


def _all_reduce(h: torch.Tensor, mesh: Any) -> None:
    """Sum ``h`` over the ranks of ``mesh`` (a 1-D DeviceMesh), in place: a row-wise layer's
    partial shrink."""
    torch.distributed.all_reduce(h, group=mesh.get_group())


class LoRAHooks:
    """Forward hooks on every target linear layer of ``model``, with an adapter per request row.

    Parameters
    ----------
    model : torch.nn.Module
        The model ``tables`` was built for.
    tables : LoRATables
        The adapter tables (slot 0: no adapter).
    max_rows : int
        Number of request rows (e.g. KV-cache slots).
    skip_idle_modules : bool
        If True (default), a hook returns at once on layers that no bound row's adapter targets.
        That is decided on the host at call time, so a CUDA graph captured with it bakes in the
        adapters bound at capture: capture inside :meth:`every_module` to serve any adapter later.
    backend : str
        ``"auto"`` (the Triton kernels on CUDA, the torch reference elsewhere), ``"triton"`` (also
        on CPU tensors under ``TRITON_INTERPRET=1``) or ``"torch"``.

    Notes
    -----
    The row table is ``slots [max_rows]`` (int64, on the tables' device): row ``r`` uses adapter
    slot ``slots[r]``. :meth:`bind` makes the batch's row ``b`` request row ``first_row + b`` and
    every one of its ``q`` tokens uses that row's adapter (prefill, decode and speculative
    windows alike).
    """

    def __init__(self, model: torch.nn.Module, tables: LoRATables, max_rows: int, *,
                 skip_idle_modules: bool = True, backend: str = "auto") -> None:
        if not isinstance(tables, LoRATables):
            raise TypeError(f"tables must be LoRATables, got {type(tables).__name__}")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.tables = tables
        self.max_rows = max_rows
        self.device = tables.device
        self.skip_idle_modules = bool(skip_idle_modules)
        self.kernels = backend == "triton" or (backend == "auto" and self.device.type == "cuda")
        self._slots = torch.zeros(max_rows, dtype=torch.int64, device=self.device)  # [R] row -> slot
        self._host = [0] * max_rows  # the same, on the host
        self._n_active = 0  # rows with an adapter
        self._groups = None
        if self.kernels:
            from ..kernels.lora import SlotGroups

            self._groups = SlotGroups(max_rows, tables.num_slots, self.device)
        self._shape: tuple[int, int] | None = None  # bound (B, q); None: unbound, hooks inert
        self._first = 0  # bound first row
        self._seg: torch.Tensor | None = None  # [B] slot of each bound row (a view of _slots)
        self._grouped: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # order, counts, ends
        self._tok: torch.Tensor | None = None  # [B * q] slot of each token (torch path)
        self._groups_host: list[tuple[int, torch.Tensor]] | None = None  # (slot, its token rows), torch path
        self._onehot: torch.Tensor | None = None  # [B * q, L + 1] fp32 one-hot of _tok, torch path
        self._keep: torch.Tensor | bool | None = None  # [B * q, 1] adapted tokens, or True: all, torch path
        self._bound: frozenset[int] = frozenset()  # slots of the bound rows, 0 excluded
        self._every = False
        self._cuda = torch.cuda.is_available()
        self._modules = [model.get_submodule(name) for name in tables.target_names]
        # per module: the all-reduce of a row-wise TP shard's partial shrink (None: whole layer)
        self._reduce = [None if mesh is None else functools.partial(_all_reduce, mesh=mesh)
                        for mesh in tables.reduce_meshes]
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}  # module index -> its hook
        self._one: int | None = None  # torch path: the one slot every bound row uses (None: mixed)
        self._removed = False

    def _sync_handles(self) -> None:
        """The hooks are on the layers that some row's adapter targets (every target layer
        inside :meth:`every_module`), and only there: an idle LoRA-capable model runs its layers
        with no hook at all, and layers no running adapter targets stay unhooked too (a forward
        hook on a module already costs its call a slower path)."""
        if self._removed:
            wanted: set[int] = set()
        elif self._every:
            wanted = set(range(len(self._modules)))
        else:
            active = frozenset(self._host) - {0} if self._n_active else frozenset()
            wanted = {m for m in range(len(self._modules)) if active and self.tables.targets(active, m)}
        for m in [m for m in self._handles if m not in wanted]:
            self._handles.pop(m).remove()
        for m in sorted(wanted - self._handles.keys()):
            self._handles[m] = self._modules[m].register_forward_hook(functools.partial(self._hook, m),
                                                                      prepend=True)

    # -- per-request state (host side, not per step) -----------------------------------------
    def _check_row(self, row: Any) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.max_rows:
            raise ValueError(f"row must be an int in [0, {self.max_rows}), got {row!r}")
        return row

    def set_row(self, row: int, slot: int | str | None) -> None:
        """Give request row ``row`` the adapter in ``slot`` (an int from
        :meth:`LoRATables.load`, or the adapter's name); 0 or None: no adapter. The adapter stays
        pinned in its slot (cannot be unloaded) until the row is cleared or set to another."""
        self._check_row(row)
        if slot is None:
            slot = 0
        elif isinstance(slot, str):
            slot = self.tables.slot_of(slot)
        elif isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.tables.num_slots \
                or (slot and self.tables.name_of(slot) is None):
            raise ValueError(f"slot must be 0 or the slot of a loaded adapter, got {slot!r}")
        old = self._host[row]
        if old == slot:
            return
        if slot:
            self.tables.acquire(slot)
        if old:
            self.tables.release(old)
        self._host[row] = slot
        self._slots[row] = slot
        self._n_active += (slot != 0) - (old != 0)
        self._sync_handles()

    def clear_row(self, row: int) -> None:
        """Request row ``row`` uses no adapter (releases its slot)."""
        self.set_row(row, 0)

    def row_slot(self, row: int) -> int:
        """The adapter slot of request row ``row`` (0: none)."""
        return self._host[self._check_row(row)]

    @property
    def active(self) -> bool:
        """Whether any row has an adapter."""
        return self._n_active > 0

    # -- per step (device side, sync-free) ---------------------------------------------------
    def bind(self, first_row: int, positions: torch.Tensor | tuple[int, int] | torch.Size) -> None:
        """Bind the next forward's batch: its row ``b`` is request row ``first_row + b``.

        Parameters
        ----------
        first_row : int
            Request row of batch row 0.
        positions : Tensor or tuple
            The batch's token positions ``[B, q]`` (only the shape is used), or ``(B, q)``.
        """
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else tuple(positions)
        if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                      for n in shape):
            raise ValueError(f"positions must be a tensor [B, q] or a shape (B, q) with B, q >= 1, "
                             f"got {shape}")
        b, q = shape
        if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0 \
                or first_row + b > self.max_rows:
            raise ValueError(f"first_row must be an int with 0 <= first_row and first_row + batch ({b}) "
                             f"<= max_rows ({self.max_rows}), got {first_row!r}")
        self._shape = (b, q)
        self._first = first_row
        self._seg = self._slots[first_row:first_row + b]
        self._bound = frozenset(self._host[first_row:first_row + b]) - {0}
        self._grouped = self._tok = self._groups_host = self._one = self._onehot = self._keep = None
        if not (self._bound or self._every):
            return
        if self.kernels:
            self._grouped = self._groups.fill(self._seg)
        elif len(self._bound) == 1 and 0 not in self._host[first_row:first_row + b]:
            self._one = next(iter(self._bound))  # every token one adapter: no grouping at all
        else:
            self._tok = self._seg.repeat_interleave(q)
            rows: dict[int, list[int]] = {}  # the host knows every row's slot: group once per forward
            for b_, slot in enumerate(self._host[first_row:first_row + b]):
                if slot:
                    rows.setdefault(slot, []).extend(range(b_ * q, (b_ + 1) * q))
            self._groups_host = [(slot, torch.tensor(r, device=self.device)) for slot, r in rows.items()]
            self._onehot = torch.nn.functional.one_hot(self._tok, self.tables.num_slots).float()
            self._keep = True if 0 not in self._host[first_row:first_row + b] \
                else (self._tok != 0).unsqueeze(1)

    @property
    def bound_rows(self) -> tuple[int, int] | None:
        """``(first_row, B)`` of the bound batch (None: unbound)."""
        return None if self._shape is None else (self._first, self._shape[0])

    def unbind(self) -> None:
        """Make the hooks inert until the next :meth:`bind`."""
        self._shape = self._seg = self._grouped = self._tok = self._groups_host = self._one = None
        self._onehot = self._keep = None
        self._bound = frozenset()

    @contextlib.contextmanager
    def bound(self, first_row: int, positions: torch.Tensor | tuple[int, int]) -> Iterator[None]:
        """``with hooks.bound(first_row, positions): model(...)``: bind, then unbind on exit."""
        self.bind(first_row, positions)
        try:
            yield
        finally:
            self.unbind()

    @contextlib.contextmanager
    def maybe_bound(self, first_row: int, positions: torch.Tensor | tuple[int, int]) -> Iterator[None]:
        """:meth:`bound` when some row has an adapter (or inside :meth:`every_module`); nothing
        at all otherwise."""
        if not (self.active or self._every):
            yield
            return
        with self.bound(first_row, positions):
            yield

    @property
    def capturing_every_module(self) -> bool:
        """Inside :meth:`every_module`."""
        return self._every

    @contextlib.contextmanager
    def every_module(self) -> Iterator[None]:
        """Run the LoRA launches on every target layer whatever the bound rows use: the forwards
        inside are what a CUDA graph must hold to serve any adapter later. Rows of slot 0 still
        come out bit-identical (the kernels never touch them)."""
        old, self._every = self._every, True
        self._sync_handles()
        try:
            yield
        finally:
            self._every = old
            self._sync_handles()

    def _hook(self, module_index: int, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self._shape is None:
            return None
        if not self._every and (not self._bound or (self.skip_idle_modules
                                                    and not self.tables.targets(self._bound, module_index))):
            return None
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) \
                or tuple(x.shape[:-1]) != tuple(output.shape[:-1]) or x.numel() // x.shape[-1] != \
                self._shape[0] * self._shape[1]:
            raise ValueError(f"LoRA: layer {self.tables.target_names[module_index]} input/output "
                             f"{getattr(x, 'shape', None)} / {getattr(output, 'shape', None)} does not match "
                             f"the bound batch {self._shape} ([B, q, features] expected)")
        if not self._cuda or torch.cuda.is_current_stream_capturing():  # (NVTX ranges need CUDA)
            return self.apply(module_index, x, output)
        with nvtx_range("decodekit.lora"):
            return self.apply(module_index, x, output)

    def apply(self, module_index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Add the bound rows' LoRA term of target layer ``module_index`` to its output ``y`` for
        input ``x`` (``[B, q, in]`` / ``[B, q, out]``, or flattened ``[B * q, .]``). The kernel
        path adds in place and returns None; the torch path returns a new tensor."""
        b, q = self._shape
        t = self.tables
        reduce = self._reduce[module_index]
        if self._one is not None:  # torch path, every token one adapter: two products
            a, bt = t.slot_views(module_index, self._one)
            out = lora_add_one(y.reshape(b * q, -1), x.reshape(b * q, -1), a, bt,
                               t.scale_of(module_index, self._one), reduce)
            return out.view(y.shape)
        A, B, scale = t.A[module_index], t.B[module_index], t.scale[module_index]
        if self.kernels:
            from ..kernels.lora import lora_expand_, lora_shrink

            x3 = x.reshape(b, q, x.shape[-1])
            y3 = y.view(b, q, y.shape[-1])
            h = lora_shrink(x3 if x3.stride(2) == 1 else x3.contiguous(), A, *self._grouped)
            if reduce is not None:
                reduce(h)  # rows of slot 0 hold whatever the buffer held: summed, never read
            lora_expand_(y3, h, B, scale, *self._grouped)
            return None
        Bt = None if t.Bt is None else t.Bt[module_index]
        At = None if t.At is None else t.At[module_index]
        out = lora_add(y.reshape(b * q, -1), x.reshape(b * q, -1), A, B, scale, self._tok, Bt,
                       self._groups_host, reduce, self._onehot, At, self._keep)
        return out.view(y.shape)

    def remove(self) -> None:
        """Take the hooks off the model and release the rows' adapters (the object is unusable
        afterwards)."""
        for row, slot in enumerate(self._host):
            if slot:
                self.clear_row(row)
        self._removed = True
        self._sync_handles()
        self.unbind()
