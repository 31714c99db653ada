"""Trainable LoRA(-MoE) adapters on a WAN DiT, run through the exact forward ComfyUI inference uses.

Inference (``moe_core.patch``) puts an object patch on each target Linear's ``forward``: a
``moe_core.patch.LoraMoEForward`` that calls the layer's own class forward, then
``moe_core.fused.lora_moe_delta(y, x, A_all, B_all, scales)`` with ``A_all``/``B_all`` from
``moe_core.fused.stack_adapters``. Training installs *the same class* on the same Linears (through
``ModelPatcher.add_object_patch``, as inference does), with an :class:`AdapterBank` as its runtime: at the
start of every model call the bank rebuilds ``A_all``/``B_all`` from its parameters with ``stack_adapters``
(``torch.cat``, differentiable) and turns the batch's gains into per-row scales with ``expand_gains``. So
the arithmetic that is trained is, operation for operation, the arithmetic that runs in ComfyUI.

A bank holds one :class:`ProjectionSlots` per target module: slot 0 is the base LoRA, slot ``1 + e`` expert
``e``; each slot is absent, frozen (buffers) or trainable (parameters). Stage 1 trains the base slot alone;
stage 2 freezes it and trains experts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from moe_core.checkpoint import Adapter, AdapterSet, ProjectionAdapters
from moe_core.fused import SlotLayout, expand_gains, stack_adapters

#: Projection kinds and the module names they cover inside ``blocks.N``.
ATTENTION_PROJECTIONS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                         "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")
FFN_PROJECTIONS = ("ffn.0",)
_BLOCK_MODULE = re.compile(r"^blocks\.(\d+)\.")


class AdapterConfigError(ValueError):
    """Target modules or ranks that do not fit the model."""


@dataclass(frozen=True)
class TargetSpec:
    """Which Linears get adapters and with which rank.

    Attributes:
        blocks: block indices whose attention projections are adapted.
        ffn_blocks: block indices whose ``ffn.0`` is adapted.
        projections: attention projections adapted in ``blocks`` (default: self/cross q, k, v, o).
        ranks: rank per projection letter: ``q``, ``k``, ``v``, ``o`` and ``ffn``.
        alpha: LoRA alpha of every slot (scale = alpha / rank).
    """

    blocks: tuple[int, ...]
    ffn_blocks: tuple[int, ...]
    projections: tuple[str, ...]
    ranks: Mapping[str, int]
    alpha: float

    def rank_of(self, projection: str) -> int:
        kind = "ffn" if projection.startswith("ffn") else projection.rsplit(".", 1)[-1]
        if kind not in self.ranks:
            raise AdapterConfigError(f"no rank configured for projection {projection!r} (kind {kind!r})")
        return int(self.ranks[kind])

    def modules(self) -> dict[str, int]:
        """``{module path: rank}`` in block order (attention projections, then ffn.0)."""
        out: dict[str, int] = {}
        for b in sorted(set(self.blocks) | set(self.ffn_blocks)):
            if b in self.blocks:
                for p in self.projections:
                    out[f"blocks.{b}.{p}"] = self.rank_of(p)
            if b in self.ffn_blocks:
                for p in FFN_PROJECTIONS:
                    out[f"blocks.{b}.{p}"] = self.rank_of(p)
        return out


def resolve_blocks(spec: int | str | Sequence[int], num_layers: int, what: str) -> tuple[int, ...]:
    """Block indices from ``8`` / ``"last_8"`` (the last 8 blocks, all of them in a shallower model), ``"all"``,
    ``"none"``, or a list of indices."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return tuple(range(num_layers))
        if text == "none":
            return ()
        m = re.fullmatch(r"last_?(\d+)", text)
        if not m:
            raise AdapterConfigError(f"{what} = {spec!r}: use a number of last blocks (8 or \"last_8\"), "
                                     "\"all\", \"none\" or a list of block indices")
        spec = int(m.group(1))
    if isinstance(spec, bool):
        raise AdapterConfigError(f"{what} = {spec!r} is not a block count or list")
    if isinstance(spec, int):
        if spec < 0:
            raise AdapterConfigError(f"{what} = {spec}: a block count cannot be negative")
        # as moe_core.targets.default_targets: "the last 8" of a shallower model is all of its blocks
        return tuple(range(max(0, num_layers - spec), num_layers))
    blocks = tuple(int(b) for b in spec)
    bad = [b for b in blocks if not 0 <= b < num_layers]
    if bad:
        raise AdapterConfigError(f"{what}: block indices {bad} out of range 0..{num_layers - 1}")
    if len(set(blocks)) != len(blocks):
        raise AdapterConfigError(f"{what}: duplicate block indices in {list(blocks)}")
    return tuple(sorted(blocks))


def block_of(module: str) -> int:
    m = _BLOCK_MODULE.match(module)
    if not m:
        raise AdapterConfigError(f"module {module!r} is not inside a DiT block")
    return int(m.group(1))


# ------------------------------------------------------------------------------------------------ slots

class Slot(torch.nn.Module):
    """One LoRA: ``down`` [rank, in], ``up`` [out, rank], ``alpha``; parameters if trainable, else buffers."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, trainable: bool):
        super().__init__()
        self.alpha = float(alpha)
        self.trainable = bool(trainable)
        if trainable:
            self.down = torch.nn.Parameter(down.detach().clone().float())
            self.up = torch.nn.Parameter(up.detach().clone().float())
        else:
            self.register_buffer("down", down.detach().clone().float())
            self.register_buffer("up", up.detach().clone().float())

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def adapter(self) -> Adapter:
        """A ``moe_core`` Adapter viewing this slot's tensors (no copy: gradients flow through it)."""
        return Adapter(self.down, self.up, self.alpha)

    @classmethod
    def new(cls, in_features: int, out_features: int, rank: int, alpha: float, generator: torch.Generator
            ) -> "Slot":
        """A fresh trainable LoRA as PEFT / musubi-tuner initialise it: down Kaiming-uniform, up zero (ΔW = 0)."""
        down = torch.empty(rank, in_features)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        return cls(down, torch.zeros(out_features, rank), alpha, trainable=True)


class ProjectionSlots(torch.nn.Module):
    """The slots of one Linear: ``slots[0]`` base, ``slots[1 + e]`` expert e (None: absent)."""

    def __init__(self, in_features: int, out_features: int, slots: Sequence[Slot | None]):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.slots = torch.nn.ModuleList([s if s is not None else torch.nn.Identity() for s in slots])
        self._present = [s is not None for s in slots]
        if not any(self._present):
            raise AdapterConfigError("a projection needs at least one adapter slot")

    def slot(self, i: int) -> Slot | None:
        return self.slots[i] if self._present[i] else None

    @property
    def num_slots(self) -> int:
        return len(self._present)

    def adapters(self) -> list[Adapter | None]:
        return [self.slot(i).adapter() if self._present[i] else None for i in range(self.num_slots)]

    def layout(self) -> SlotLayout:
        return SlotLayout(tuple(self.slot(i).rank if self._present[i] else 0 for i in range(self.num_slots)))

    def to_projection_adapters(self) -> ProjectionAdapters:
        """Detached CPU float32 copies, as ``moe_core.checkpoint`` stores them."""
        copies = [None if a is None else Adapter(a.down.detach().float().cpu().clone(),
                                                 a.up.detach().float().cpu().clone(), a.alpha)
                  for a in self.adapters()]
        return ProjectionAdapters(self.in_features, self.out_features, copies[0], copies[1:])


# ------------------------------------------------------------------------------------------------ bank

class AdapterBank(torch.nn.Module):
    """All adapter slots of one DiT, and the runtime the patched Linear forwards read.

    ``LoraMoEForward`` (moe_core.patch) reads ``bank.ab[index]`` and ``bank.scales[layout_id]``;
    :meth:`begin` sets both for one model call and :meth:`end` clears them. Keep them set until the
    backward pass is done when gradient checkpointing recomputes blocks.
    """

    def __init__(self, names: Sequence[str], projections: Sequence[ProjectionSlots], num_experts: int):
        super().__init__()
        if len(names) != len(projections):
            raise ValueError("one ProjectionSlots per module name")
        if len(set(names)) != len(names):
            raise AdapterConfigError("duplicate module names in the adapter bank")
        self.names = list(names)
        self.projections = torch.nn.ModuleList(projections)
        self.num_experts = int(num_experts)
        for p in projections:
            if p.num_slots != 1 + self.num_experts:
                raise AdapterConfigError(f"every projection needs 1 + {self.num_experts} slots")
        layouts = [p.layout() for p in projections]
        self.layouts = list(dict.fromkeys(layouts))
        self.layout_ids = [self.layouts.index(l) for l in layouts]
        self._slot_index = [l.slot_index() for l in self.layouts]
        self.ab: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.scales: list[torch.Tensor] | None = None

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def fresh_base(cls, linears: Mapping[str, torch.nn.Linear], ranks: Mapping[str, int], alpha: float,
                   seed: int, num_experts: int = 0) -> "AdapterBank":
        """Stage 1: a trainable base LoRA on each module (and ``num_experts`` absent expert slots).

        Initialisation draws from one generator seeded with ``seed`` in module order, so every process
        of a data-parallel run starts from identical weights.
        """
        gen = torch.Generator().manual_seed(int(seed))
        names, projs = [], []
        for name, layer in linears.items():
            slot = Slot.new(layer.in_features, layer.out_features, int(ranks[name]), alpha, gen)
            names.append(name)
            projs.append(ProjectionSlots(layer.in_features, layer.out_features, [slot] + [None] * num_experts))
        return cls(names, projs, num_experts)

    @classmethod
    def from_adapter_set(cls, aset: AdapterSet, num_experts: int, trainable_slots: Iterable[int] = ()
                         ) -> "AdapterBank":
        """A bank holding an existing adapter set; slots listed in ``trainable_slots`` become parameters."""
        trainable = set(trainable_slots)
        names, projs = [], []
        for name, pa in aset.modules.items():
            slots = [None if a is None else Slot(a.down, a.up, a.alpha, i in trainable)
                     for i, a in enumerate([pa.base, *pa.experts])]
            names.append(name)
            projs.append(ProjectionSlots(pa.in_features, pa.out_features, slots))
        return cls(names, projs, num_experts)

    # -- parameters and export --------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable tensors in a fixed order (module order, slot order, down before up)."""
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        for name, proj in zip(self.names, self.projections):
            for i in range(proj.num_slots):
                s = proj.slot(i)
                if s is not None and s.trainable:
                    out.append((f"{name}.slot{i}.down", s.down))
                    out.append((f"{name}.slot{i}.up", s.up))
        return out

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def to_adapter_set(self, set_name: str, fingerprint: list[float] | None = None,
                       sigma_range: tuple[float, float] | None = None, model: dict | None = None,
                       router: dict[str, torch.Tensor] | None = None) -> AdapterSet:
        modules = {n: p.to_projection_adapters() for n, p in zip(self.names, self.projections)}
        return AdapterSet(set_name, modules, router=router, sigma_range=sigma_range, fingerprint=fingerprint,
                          model=dict(model or {}))

    def base_lora(self) -> dict[str, Adapter]:
        """The base slot of every module as a plain LoRA (``moe_core.lora_formats.save_lora`` input)."""
        out = {}
        for name, proj in zip(self.names, self.projections):
            pa = proj.to_projection_adapters()
            if pa.base is not None:
                out[name] = pa.base
        return out

    @torch.no_grad()
    def load_adapter_set(self, aset: AdapterSet, source: str = "<checkpoint>") -> None:
        """Copy the tensors of ``aset`` into this bank's slots (exactly: same dtype float32, no rounding)."""
        missing = [n for n in self.names if n not in aset.modules]
        extra = [n for n in aset.modules if n not in self.names]
        if missing or extra:
            raise AdapterConfigError(f"{source}: adapter set '{aset.name}' does not match the configured target "
                                     f"modules (missing {missing[:4]}, unexpected {extra[:4]}); was it trained "
                                     "with other [lora] settings?")
        for name, proj in zip(self.names, self.projections):
            pa = aset.modules[name]
            for i, a in enumerate([pa.base, *pa.experts]):
                s = proj.slot(i)
                if (s is None) != (a is None):
                    raise AdapterConfigError(f"{source}: module {name} slot {i} presence differs from the config")
                if s is None:
                    continue
                if tuple(a.down.shape) != tuple(s.down.shape) or tuple(a.up.shape) != tuple(s.up.shape):
                    raise AdapterConfigError(f"{source}: module {name} slot {i} has shapes {tuple(a.down.shape)}/"
                                             f"{tuple(a.up.shape)}, the config gives {tuple(s.down.shape)}/"
                                             f"{tuple(s.up.shape)} (other ranks?)")
                s.down.copy_(a.down.to(s.down.dtype))
                s.up.copy_(a.up.to(s.up.dtype))
                s.alpha = float(a.alpha)

    # -- runtime (read by moe_core.patch.LoraMoEForward) --------------------------------------------

    def begin(self, gains: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        """Stack every module's slots (differentiably) and expand the per-row gains ``[B, 1 + N]``."""
        if gains.ndim != 2 or gains.shape[1] != 1 + self.num_experts:
            raise ValueError(f"gains must be [batch, 1 + {self.num_experts}], got {tuple(gains.shape)}")
        ab = []
        for proj in self.projections:
            a_all, b_all = stack_adapters(proj.adapters())
            ab.append((a_all.to(device, dtype), b_all.to(device, dtype)))
        gains = gains.to(device, dtype)
        self.ab = ab
        self.scales = [expand_gains(gains, s.to(device)) for s in self._slot_index]

    def end(self) -> None:
        self.ab = None
        self.scales = None

    # -- installation on a ComfyUI ModelPatcher ----------------------------------------------------

    def install(self, model_patcher) -> None:
        """Object-patch every target Linear's ``forward`` with ``moe_core.patch.LoraMoEForward``.

        The patches take effect when ComfyUI applies object patches (``ModelPatcher.patch_model``);
        :class:`training.models.TrainableDiT` does that when it places the model on its device.
        """
        from moe_core.patch import LoraMoEForward

        for i, name in enumerate(self.names):
            layer = model_patcher.get_model_object(f"diffusion_model.{name}")
            model_patcher.add_object_patch(f"diffusion_model.{name}.forward",
                                           LoraMoEForward(layer, self, i, self.layout_ids[i]))


def target_linears(diffusion_model: torch.nn.Module, spec: TargetSpec) -> dict[str, torch.nn.Linear]:
    """The Linear layers named by ``spec`` in a WAN DiT, checked to exist."""
    out = {}
    for name, _ in spec.modules().items():
        try:
            layer = diffusion_model.get_submodule(name)
        except AttributeError:
            raise AdapterConfigError(f"the model has no module {name!r}: is it a WAN DiT?") from None
        if not isinstance(layer, torch.nn.Linear):
            raise AdapterConfigError(f"{name} is a {type(layer).__name__}, not a Linear layer")
        out[name] = layer
    return out


__all__ = ["ATTENTION_PROJECTIONS", "AdapterBank", "AdapterConfigError", "FFN_PROJECTIONS", "ProjectionSlots",
           "Slot", "TargetSpec", "block_of", "resolve_blocks", "target_linears"]
