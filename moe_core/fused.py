"""The fused LoRA-MoE projection: every adapter of a Linear in two matmuls.

For one projection with a base adapter and N experts,

    y = W x + a_base·ΔW_base x + Σ_e g_e·a_e·ΔW_e x  =  W x + B_all · diag(s) · A_all x

with A_all = [down_base; down_1; ...] (R × in), B_all = [up_base·α/r, up_1·α/r, ...] (out × R) and the per-row
scale vector s (R) repeating each slot's gain over its rank. The cost is two skinny matmuls whatever the
number of experts, and the gains are a tensor, so changing gates every step never recompiles a graph.
Training and inference both call `lora_moe_delta`, so they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .checkpoint import Adapter, ProjectionAdapters


@dataclass(frozen=True)
class SlotLayout:
    """Which gain each row of A_all uses: slot 0 is the base, slot 1+e is expert e."""

    ranks: tuple[int, ...]  # rank per slot, 0 where the slot is absent

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    def slot_index(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.ranks)), torch.tensor(self.ranks, dtype=torch.long))


def layout_of(proj: ProjectionAdapters) -> SlotLayout:
    return SlotLayout(tuple(a.rank if a is not None else 0 for a in [proj.base, *proj.experts]))


def stack_adapters(adapters: Sequence[Adapter | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """A_all, B_all for slots in order, with each slot's alpha/rank folded into B. Differentiable."""
    present = [a for a in adapters if a is not None]
    a_all = torch.cat([a.down for a in present], dim=0)
    b_all = torch.cat([a.up * a.scale for a in present], dim=1)
    return a_all, b_all


def lora_moe_delta(y: torch.Tensor, x: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                   scales: torch.Tensor) -> torch.Tensor:
    """y + B_all · diag(s) · A_all x, with s per batch row ([B, R]) or shared ([1, R] / [R]).

    The addition is folded into the second matmul (addmm's beta), so the base output is read once.
    """
    h = torch.nn.functional.linear(x, a_all)
    if scales.ndim == 1:
        scales = scales[None]
    if scales.shape[0] not in (1, h.shape[0]):
        raise ValueError(f"LoRA-MoE scales have {scales.shape[0]} rows for a batch of {h.shape[0]}")
    h = h * scales.reshape(scales.shape[0], *([1] * (h.ndim - 2)), scales.shape[-1])
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b_all.t())
    return out.view(y.shape)


def expand_gains(gains: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """Per-row slot gains [B, 1+N] to per-row rank scales [B, R] for one layout."""
    return gains.index_select(-1, slot_index)
