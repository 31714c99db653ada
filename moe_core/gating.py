"""Per-step gates: router output -> top-k -> EMA across the sampler's steps -> times the band factor.

The controller lives on one patched model clone. It keeps no global state: EMA and trace are reset at the
start of every sampling run (the OUTER_SAMPLE wrapper), and a "step" is recognised by its noise level, so
several model calls in one step (CFG halves run separately, second-order samplers) share one EMA update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .band import TimestepBand
from .routing import LearnedRouter, Routing, UncondPolicy, raw_gates


@dataclass(frozen=True)
class GateConfig:
    alpha_base: float
    alpha_expert: float
    routing: Routing | None
    band: TimestepBand
    ema_beta: float = 0.9
    uncond: UncondPolicy = "same"


class GateController:
    """Turns (routing, sigma, CFG layout) into per-row slot gains [B, 1 + N] for one forward."""

    def __init__(self, expert_names: Sequence[str], config: GateConfig, router: LearnedRouter | None):
        if not 0.0 <= config.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {config.ema_beta}")
        if config.uncond not in ("same", "off"):
            raise ValueError(f"uncond must be 'same' or 'off', got {config.uncond!r}")
        self.expert_names = list(expert_names)
        self.config = config
        self.router = router
        self.trace: list[dict] = []  # one entry per step of the last sampling run
        self.reset()

    def reset(self) -> None:
        self._ema: torch.Tensor | None = None
        self._last_sigma: float | None = None
        self.trace = []

    def _step_gates(self, sigma: float, sample_sigmas: torch.Tensor | None) -> torch.Tensor:
        if self._last_sigma is not None and sigma == self._last_sigma:
            return self._ema
        n = len(self.expert_names)
        routing = self.config.routing
        raw = raw_gates(routing, self.expert_names, sigma, self.router) if routing else torch.zeros(n)
        beta = self.config.ema_beta
        self._ema = raw if self._ema is None else beta * self._ema + (1.0 - beta) * raw
        self._last_sigma = sigma
        step = None
        if sample_sigmas is not None and sample_sigmas.numel():
            step = int((sample_sigmas.float().cpu() - sigma).abs().argmin())
        band = self.config.band.factor(sigma)
        self.trace.append({"step": step, "sigma": sigma, "raw": raw.tolist(), "ema": self._ema.tolist(),
                           "band": band, "gates": (self._ema * band).tolist(), "rows": []})
        return self._ema

    def gains(self, sigma_rows: torch.Tensor, cond_or_uncond: Sequence[int] | None,
              sample_sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """Slot gains for each batch row: [alpha_base, alpha_expert·g_1·band, ...]."""
        sigma_rows = sigma_rows.detach().float().cpu().reshape(-1)
        ema = self._step_gates(float(sigma_rows.max()), sample_sigmas)
        rows = ema[None, :] * self.config.band.factors(sigma_rows)[:, None]
        if self.config.uncond == "off" and cond_or_uncond:
            per_chunk = rows.shape[0] // len(cond_or_uncond)
            is_uncond = torch.tensor([c == 1 for c in cond_or_uncond]).repeat_interleave(per_chunk)
            rows = torch.where(is_uncond[:, None], torch.zeros_like(rows), rows)
        self.trace[-1]["rows"].append({"cond_or_uncond": list(cond_or_uncond or []), "gates": rows.tolist()})
        base = torch.full((rows.shape[0], 1), float(self.config.alpha_base))
        return torch.cat([base, float(self.config.alpha_expert) * rows], dim=1)
