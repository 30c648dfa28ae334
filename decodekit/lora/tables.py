"""Preallocated per-module adapter tables: loading an adapter is a copy into a free slot.

:class:`LoRATables` owns, for every targeted linear layer ``m`` of a model (default: every
``nn.Linear`` inside the decoder layers), ``A[m] [max_loras + 1, max_lora_rank, in]`` and
``B[m] [max_loras + 1, out, max_lora_rank]`` in the layer's dtype and device, and ``scale [M,
max_loras + 1]`` (fp32). Slot 0 is all zeros (no adapter); an adapter of rank ``r <
max_lora_rank`` fills the first ``r`` rows of A and columns of B and leaves the rest zero, and a
module it does not target stays zero in its slot. Loading and unloading write into the tables
in place: their addresses never change, so a CUDA graph captured over them stays valid.

Under tensor parallelism (transformers' TP plan), a table holds this rank's slice of each
adapter, cut like its layer: a column-wise layer (q/k/v, gate/up; output features split) keeps
its rows of B, a row-wise one (o, down; input features split) its columns of A, whose partial
shrink the hooks sum over the layer's ranks (:attr:`LoRATables.reduce_meshes`).

Slots in use by request rows (:meth:`LoRATables.acquire`, done by
:meth:`~decodekit.lora.LoRAHooks.set_row`) cannot be unloaded.

May call: :mod:`decodekit.engine.model_adapter` (decoder layers), :mod:`decodekit.engine.parallel`
(layer shards), :mod:`.adapters`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..engine.model_adapter import decoder_layers
from ..engine.parallel import LinearShard, linear_shard
from .adapters import (
    LoRAAdapter,
    LoRAError,
    LoRAOperation,
    LoRARequest,
    LoRAResponse,
    LoRAStatus,
    read_adapter,
)

__all__ = ["MAX_RANK", "LoRATables", "linear_targets"]

MAX_RANK = 256  # the widest rank tile of decodekit.kernels.lora


def linear_targets(model: torch.nn.Module, target_modules: Sequence[str] | None = None
                   ) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules inside ``model``'s decoder layers, by module name (in model
    order); with ``target_modules``, only those whose last name component is listed."""
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and id(m) in inside
             and (target_modules is None or name.rsplit(".", 1)[-1] in target_modules)}
    if target_modules is not None:
        missing = sorted(set(target_modules) - {n.rsplit(".", 1)[-1] for n in found})
        if missing:
            raise ValueError(f"target_modules: {missing} name no nn.Linear inside the decoder layers")
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear inside its decoder layers")
    return found


def _local(shape: tuple[int, int], shard: LinearShard | None) -> tuple[int, int]:
    """``(in, out)`` features of a layer's slice on this rank."""
    n_in, n_out = shape
    if shard is None:
        return n_in, n_out
    width = shard.stop - shard.start
    return (n_in, width) if shard.dim == 0 else (width, n_out)


def _cut(A: torch.Tensor, B: torch.Tensor, shard: LinearShard | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's ``A [r, in]`` / ``B [out, r]`` cut like its layer's weight on this rank."""
    if shard is None:
        return A, B
    if shard.dim == 0:
        return A, B[shard.start:shard.stop]
    return A[:, shard.start:shard.stop], B


class LoRATables:
    """Device tables of up to ``max_loras`` adapters over a model's linear layers.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM.
    max_loras : int
        Adapters loaded at once (slots ``1 .. max_loras``).
    max_lora_rank : int
        Largest adapter rank (1 to 256); every slot is this wide.
    target_modules : Sequence[str], optional
        Last name components of the linear layers to support (``["q_proj", "v_proj"]``);
        default: every ``nn.Linear`` inside the decoder layers.

    Attributes
    ----------
    target_names : tuple[str, ...]
        Module names of the tables, in model order (table ``m`` is ``target_names[m]``).
    A, B : list[Tensor]
        Per module ``[max_loras + 1, max_lora_rank, in]`` and ``[max_loras + 1, out, max_lora_rank]``
        (``in`` / ``out``: this rank's share of the layer's features under TP).
    scale : Tensor
        ``[len(target_names), max_loras + 1]`` fp32.
    shapes : dict[str, tuple[int, int]]
        Every target's whole ``(in, out)`` features (what an adapter's weights must fit).
    shards : dict[str, LinearShard | None]
        Each target's TP slice on this rank (None: whole).
    reduce_meshes : list
        Per module, the DeviceMesh over whose ranks its shrink is summed (row-wise shards), else None.
    """

    def __init__(self, model: torch.nn.Module, max_loras: int, max_lora_rank: int,
                 target_modules: Sequence[str] | None = None) -> None:
        for name, value, hi in (("max_loras", max_loras, None), ("max_lora_rank", max_lora_rank, MAX_RANK)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (hi and value > hi):
                raise ValueError(f"{name} must be an int in [1, {hi or 'inf'}], got {value!r}")
        if target_modules is not None and (isinstance(target_modules, str) or not target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {target_modules!r}")
        linears = linear_targets(model, target_modules)
        devices = {m.weight.device for m in linears.values()}
        if len(devices) != 1:
            raise ValueError(f"LoRA target layers must share one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.num_slots = max_loras + 1
        self.target_names = tuple(linears)
        self.shapes = {n: (m.in_features, m.out_features) for n, m in linears.items()}  # (in, out)
        self.shards = {n: linear_shard(m) for n, m in linears.items()}
        self.reduce_meshes = [sh.mesh if sh is not None and sh.dim == 1 else None
                              for sh in self.shards.values()]
        local = [_local(self.shapes[n], self.shards[n]) for n in linears]  # this rank's (in, out)
        self.model_modules = frozenset(n for n, _ in model.named_modules())
        R, L1 = max_lora_rank, self.num_slots
        layers = [(k, n, m.weight.dtype) for (k, n), m in zip(local, linears.values(), strict=True)]
        self.A = [torch.zeros(L1, R, k, dtype=dt, device=self.device) for k, _, dt in layers]
        self.B = [torch.zeros(L1, n, R, dtype=dt, device=self.device) for _, n, dt in layers]
        self.scale = torch.zeros(len(linears), L1, dtype=torch.float32, device=self.device)
        self._scale_host = [[0.0] * L1 for _ in linears]  # the same, on the host
        # off CUDA (the torch path): B's twin laid out [L1 * R, out], so a batch of many
        # adapters expands in one product without a transposing copy (see reference.lora_delta)
        self.Bt = None if self.device.type == "cuda" else [
            torch.zeros(L1 * R, n, dtype=dt, device=self.device) for _, n, dt in layers]
        # and A's twin [in, L1 * R] (slot l's A[l].T in columns l*R:(l+1)*R): the dense shrink
        # x @ At reads it in the layout a matrix product wants (half the time of A's transpose)
        self.At = None if self.Bt is None else [
            torch.zeros(k, L1 * R, dtype=dt, device=self.device) for k, _, dt in layers]
        # per module and slot: A[m][slot] and B[m][slot]^T ([R, in], [R, out]) as views made once
        # (the torch path's one-adapter batches read them every layer)
        self._views = [[(self.A[m][s] if self.At is None else self._at(m, s).T,
                         self.B[m][s].T if self.Bt is None else self._bt(m, s))
                        for s in range(L1)] for m in range(len(layers))]
        self._index = {n: i for i, n in enumerate(self.target_names)}
        self._slot_of: dict[str, int] = {}
        self._name_at: list[str | None] = [None] * L1
        self._users = [0] * L1
        self._slots_at: list[set[int]] = [set() for _ in self.target_names]  # slots with weights at m

    # -- queries -----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Loaded adapter names, by slot."""
        return tuple(n for n in self._name_at if n is not None)

    def slot_of(self, name: str) -> int:
        """The slot of loaded adapter ``name`` (``ValueError`` if none)."""
        if name not in self._slot_of:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded (loaded: {list(self.names)})")
        return self._slot_of[name]

    def name_of(self, slot: int) -> str | None:
        """The adapter in ``slot`` (None: free, or slot 0)."""
        return self._name_at[slot]

    def users(self, slot: int) -> int:
        """Request rows using ``slot`` (:meth:`acquire` minus :meth:`release`)."""
        return self._users[slot]

    def slots_at(self, module: int) -> frozenset[int]:
        """Slots whose adapter has weights at module ``module`` (an index into ``target_names``)."""
        return frozenset(self._slots_at[module])

    def slot_views(self, module: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [R, in], B^T [R, out])`` of ``slot`` at target ``module``: views of the tables."""
        return self._views[module][slot]

    def scale_of(self, module: int, slot: int) -> float:
        """``scale[module, slot]`` from the host's copy (no device read)."""
        return self._scale_host[module][slot]

    def targets(self, slots: set[int] | frozenset[int], module: int) -> bool:
        """Whether any of ``slots`` has weights at module ``module`` (cheap: per forward, per module)."""
        return not self._slots_at[module].isdisjoint(slots)

    # -- use by request rows -------------------------------------------------------------------
    def acquire(self, slot: int) -> None:
        """One more request row uses ``slot`` (a loaded adapter); it cannot be unloaded meanwhile."""
        if isinstance(slot, bool) or not isinstance(slot, int) or not 1 <= slot < self.num_slots \
                or self._name_at[slot] is None:
            raise ValueError(f"slot must be the slot of a loaded adapter, got {slot!r}")
        self._users[slot] += 1

    def release(self, slot: int) -> None:
        """Undo one :meth:`acquire`."""
        if not 1 <= slot < self.num_slots or self._users[slot] == 0:
            raise ValueError(f"slot {slot!r} is not in use")
        self._users[slot] -= 1

    # -- load / unload ---------------------------------------------------------------------------
    def read(self, path: str | os.PathLike[str]) -> LoRAAdapter:
        """Read and validate the peft adapter folder ``path`` against these tables
        (:func:`~decodekit.lora.adapters.read_adapter`; raises :class:`LoRAError`)."""
        return read_adapter(path, self.shapes, self.max_lora_rank, self.model_modules)

    def _free_slot(self, name: str) -> int:
        if not isinstance(name, str) or not name:
            raise LoRAError(LoRAStatus.LOAD_ERROR, f"lora_name must be a non-empty str, got {name!r}")
        if name in self._slot_of:
            raise LoRAError(LoRAStatus.LOAD_NAME_EXISTS, f"a LoRA adapter named {name!r} is already loaded")
        for slot in range(1, self.num_slots):
            if self._name_at[slot] is None:
                return slot
        raise LoRAError(LoRAStatus.LOAD_ERROR, f"all {self.max_loras} LoRA slots (max_loras) are in use: "
                        "unload an adapter first")

    def _check_fits(self, adapter: LoRAAdapter) -> None:
        for name, w in adapter.modules.items():
            if name not in self.shapes:
                raise LoRAError(LoRAStatus.LOAD_INVALID_ADAPTER,
                                f"target_modules: {name!r} is not one of this runtime's LoRA target layers")
            n_in, n_out = self.shapes[name]
            if w.rank > self.max_lora_rank:
                raise LoRAError(LoRAStatus.LOAD_INVALID_ADAPTER,
                                f"r: rank {w.rank} of {name!r} is above max_lora_rank {self.max_lora_rank}")
            if tuple(w.A.shape) != (w.rank, n_in) or tuple(w.B.shape) != (n_out, w.rank):
                raise LoRAError(LoRAStatus.LOAD_INVALID_ADAPTER, f"{name}: lora_A {tuple(w.A.shape)} / "
                                f"lora_B {tuple(w.B.shape)} do not fit the layer's [{n_out}, {n_in}] weight")

    def load(self, name: str, adapter: LoRAAdapter) -> int:
        """Copy ``adapter`` into a free slot under ``name``; returns the slot.

        Everything is checked before a table is written. Raises :class:`LoRAError`
        (``LOAD_NAME_EXISTS``, ``LOAD_ERROR`` when every slot is taken, ``LOAD_INVALID_ADAPTER``
        when it does not fit the tables).
        """
        slot = self._free_slot(name)
        if not isinstance(adapter, LoRAAdapter):
            raise LoRAError(LoRAStatus.LOAD_INVALID_ADAPTER,
                            f"expected a LoRAAdapter, got {type(adapter).__name__}")
        self._check_fits(adapter)
        try:
            with torch.no_grad():
                self._write(slot, adapter)
        except Exception as e:  # a device error: leave the slot empty and the others untouched
            self._zero(slot)
            raise LoRAError(LoRAStatus.LOAD_ERROR, f"copying {name!r} to the device failed: {e}") from e
        self._slot_of[name] = slot
        self._name_at[slot] = name
        return slot

    def _bt(self, module: int, slot: int) -> torch.Tensor:
        """``slot``'s block ``[R, out]`` of :attr:`Bt` at target ``module``."""
        R = self.max_lora_rank
        return self.Bt[module][slot * R:(slot + 1) * R]

    def _at(self, module: int, slot: int) -> torch.Tensor:
        """``slot``'s columns ``[in, R]`` of :attr:`At` at target ``module``."""
        R = self.max_lora_rank
        return self.At[module][:, slot * R:(slot + 1) * R]

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        scale = torch.zeros(len(self.target_names), dtype=torch.float32)
        for m, name in enumerate(self.target_names):
            self.A[m][slot].zero_()
            self.B[m][slot].zero_()
            if self.Bt is not None:
                self._bt(m, slot).zero_()
                self._at(m, slot).zero_()
            w = adapter.modules.get(name)
            if w is None:
                self._slots_at[m].discard(slot)
                continue
            a, b = _cut(w.A, w.B, self.shards[name])
            self.A[m][slot, : w.rank].copy_(a)
            self.B[m][slot, :, : w.rank].copy_(b)
            if self.Bt is not None:
                self._bt(m, slot)[: w.rank].copy_(b.T)
                self._at(m, slot)[:, : w.rank].copy_(a.T)
            scale[m] = w.scale
            self._slots_at[m].add(slot)
        self.scale[:, slot].copy_(scale)
        for m, value in enumerate(scale.tolist()):
            self._scale_host[m][slot] = value

    def _zero(self, slot: int) -> None:
        with torch.no_grad():
            for m in range(len(self.target_names)):
                self.A[m][slot].zero_()
                self.B[m][slot].zero_()
                if self.Bt is not None:
                    self._bt(m, slot).zero_()
                    self._at(m, slot).zero_()
                self._slots_at[m].discard(slot)
                self._scale_host[m][slot] = 0.0
            self.scale[:, slot].zero_()

    def load_path(self, name: str, path: str | os.PathLike[str] | None) -> int:
        """:meth:`read` then :meth:`load`; the name and a free slot are checked before reading."""
        self._free_slot(name)
        return self.load(name, self.read(path))

    def unload(self, name: str) -> None:
        """Free ``name``'s slot (zeroed). Raises :class:`LoRAError`: ``UNLOAD_NAME_NONEXISTENT``,
        or ``UNLOAD_ERROR`` while request rows use it."""
        if name not in self._slot_of:
            raise LoRAError(LoRAStatus.UNLOAD_NAME_NONEXISTENT, f"no LoRA adapter named {name!r} is loaded")
        slot = self._slot_of[name]
        if self._users[slot]:
            raise LoRAError(LoRAStatus.UNLOAD_ERROR,
                            f"LoRA adapter {name!r} is in use by {self._users[slot]} request(s)")
        self._zero(slot)
        del self._slot_of[name]
        self._name_at[slot] = None

    def handle(self, request: LoRARequest) -> LoRAResponse:
        """Serve a :class:`LoRARequest`; never raises."""
        if not isinstance(request, LoRARequest):
            return LoRAResponse(LoRAStatus.UNSPECIFIED_ERROR,
                                f"expected a LoRARequest, got {type(request).__name__}")
        load = request.operation is LoRAOperation.LOAD
        try:
            if load:
                slot = self.load_path(request.lora_name, request.lora_path)
                return LoRAResponse(LoRAStatus.SUCCESS,
                                    f"loaded LoRA adapter {request.lora_name!r} into slot {slot}")
            self.unload(request.lora_name)
            return LoRAResponse(LoRAStatus.SUCCESS, f"unloaded LoRA adapter {request.lora_name!r}")
        except LoRAError as e:
            return e.response()
        except Exception as e:  # noqa: BLE001 - an answer, whatever went wrong
            status = LoRAStatus.LOAD_ERROR if load else LoRAStatus.UNLOAD_ERROR
            return LoRAResponse(status, f"{type(e).__name__}: {e}")
