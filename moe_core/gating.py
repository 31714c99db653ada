"""Gates: the one function that turns routing inputs into per-row slot gains, for training and inference.

    teacher weights w [B, N] (from the prompt's instrument keywords) and noise level t [B]
      -> router: rule (w itself, at the temperature) or learned (MLP over [log w, t]), softmax   = probs
      -> top-k (ties at the k-th value are all kept, never broken arbitrarily), optional max-gate cap = gates
      -> × band factor(t), × alpha                                                                = slot gains

:func:`route` and :func:`slot_gains` are that path; training calls them with gradients (stage 2 trains the
router through them), and the sampler's :class:`GateController` calls the same two, adding only the EMA of
the gates across sampler steps in between. So a file samples exactly as it was trained.

The controller lives on one patched model clone. It keeps no global state: EMA and trace are reset at the
start of every sampling run (the OUTER_SAMPLE wrapper), and a "step" is recognised by its noise level, so
several model calls in one step (CFG halves run separately, second-order samplers) share one EMA update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .band import TimestepBand
from .routing import LearnedRouter, Routing, RouterMode, RoutingError, UncondPolicy, raw_gates, rule_logits


@dataclass(frozen=True)
class GateSettings:
    """How router probabilities become gates: temperature, top-k, the max-gate cap, clip-level routing.

    ``max_gate`` < 1 caps every gate (against one expert taking everything) and hands the excess to the other
    kept experts; ``clip_level`` feeds the learned router t = 1 at every step, so its gates do not vary with
    the noise level (then the EMA across steps changes nothing).
    """

    temperature: float = 1.0
    top_k: int = 2
    max_gate: float = 1.0
    clip_level: bool = False


@dataclass
class Routed:
    """``probs``: the router's distribution before top-k (what KL, entropy and load balance see);
    ``gates``: after top-k and the cap (what scales the experts, before band and alpha)."""

    probs: torch.Tensor
    gates: torch.Tensor


def topk_gates(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest probabilities and renormalise them to sum 1. Differentiable.

    Every entry equal to the k-th largest value is kept too, so ties never decide (a prompt naming three
    instruments under top-2 keeps all three); zeros are never kept; rows of zeros stay zero.
    """
    if k >= probs.shape[-1]:
        kept = probs
    else:
        kth = probs.detach().topk(k, dim=-1).values[..., -1:]
        kept = torch.where((probs.detach() >= kth) & (probs.detach() > 0), probs, torch.zeros_like(probs))
    total = kept.sum(-1, keepdim=True)
    return torch.where(total > 0, kept / total.clamp_min(1e-12), kept)


def cap_gates(gates: torch.Tensor, max_gate: float) -> torch.Tensor:
    """Cap gates at ``max_gate`` and share the excess among the row's other kept experts (as far as they
    have room below the cap); with a single kept expert the row then sums to ``max_gate``."""
    if max_gate >= 1.0:
        return gates
    capped = gates.clamp(max=max_gate)
    excess = (gates - capped).sum(-1, keepdim=True)
    room = torch.where(gates > 0, max_gate - capped, torch.zeros_like(capped))
    share = room / room.sum(-1, keepdim=True).clamp_min(1e-12)
    return capped + torch.minimum(excess * share, room)


def route(teacher: torch.Tensor, t: torch.Tensor, mode: RouterMode, router: LearnedRouter | None,
          settings: GateSettings) -> Routed:
    """Router probabilities and gates for teacher weights [B, N] at noise levels t [B]. Differentiable.

    - ``rule``: the teacher at the temperature (``w^(1/T)`` normalised): experts the prompt does not name
      get exactly 0.
    - ``learned``: softmax of the MLP's logits / T over ``[log max(w, 1e-3), t]``.
    - ``manual``: the weights as given (Gate Override), no top-k.
    - ``cycle``: 1/N each, the mean over one cycle (the sampler's :class:`GateController` gives each step its
      one expert; a gate against t alone has no step to choose by).
    Rows whose teacher is all zero (no instrument, fallback "off") stay zero whatever the router says.
    """
    teacher = teacher.float()
    off = teacher.sum(-1, keepdim=True) <= 0
    if mode == "manual":
        probs = teacher
        gates = teacher
    elif mode == "cycle":
        probs = gates = torch.full_like(teacher, 1.0 / teacher.shape[-1])
    else:
        if mode == "rule":
            logits = torch.where(teacher > 0, torch.log(teacher.clamp_min(1e-30)),
                                 torch.full_like(teacher, float("-inf")))
        elif mode == "learned":
            if router is None:
                raise RoutingError("router mode 'learned' but this LoRA-MoE file holds no learned router for "
                                   "the selected adapter set; use the rule-based router")
            t_in = torch.ones_like(t, dtype=torch.float32) if settings.clip_level else t.float()
            p = next(router.parameters())
            logits = router(rule_logits(teacher).to(p.device, p.dtype), t_in.reshape(-1).to(p.device, p.dtype))
            logits = logits.float().to(teacher.device)
        else:
            raise RoutingError(f"unknown router mode {mode!r}")
        safe = torch.where(off, torch.zeros_like(logits), logits)  # no softmax of a row of -inf
        probs = torch.where(off, torch.zeros_like(safe), torch.softmax(safe / settings.temperature, dim=-1))
        gates = cap_gates(topk_gates(probs, settings.top_k), settings.max_gate)
    return Routed(probs, gates)


def slot_gains(gates: torch.Tensor, band_factors: torch.Tensor, alpha_base: float, alpha_expert: float
               ) -> torch.Tensor:
    """Per-row slot gains ``[alpha_base, alpha_expert·g_1·band, ...]`` ([B, 1 + N]) for the fused forward."""
    rows = gates * band_factors.reshape(-1, 1).to(gates)
    base = torch.full((rows.shape[0], 1), float(alpha_base), dtype=rows.dtype, device=rows.device)
    return torch.cat([base, float(alpha_expert) * rows], dim=1)


@dataclass(frozen=True)
class GateConfig:
    alpha_base: float
    alpha_expert: float
    routing: Routing | None
    band: TimestepBand
    ema_beta: float = 0.9
    uncond: UncondPolicy = "same"
    max_gate: float = 1.0
    clip_level: bool = False


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
        step = None
        if sample_sigmas is not None and sample_sigmas.numel():
            step = int((sample_sigmas.float().cpu() - sigma).abs().argmin())
        if routing is not None and routing.mode == "cycle":
            # LoRA Switch: expert (step mod N) alone, switched hard (no EMA); the step counts within this
            # sampling run (each KSamplerAdvanced of an A14B split starts its own cycle)
            raw = torch.zeros(n)
            raw[(len(self.trace) if step is None else step) % n] = 1.0
            self._ema = raw
        else:
            raw = (raw_gates(routing, self.expert_names, sigma, self.router, self.config.max_gate,
                             self.config.clip_level) if routing else torch.zeros(n))
            beta = self.config.ema_beta
            self._ema = raw if self._ema is None else beta * self._ema + (1.0 - beta) * raw
        self._last_sigma = sigma
        band = self.config.band.factor(sigma)
        self.trace.append({"step": step, "sigma": sigma, "raw": raw.tolist(), "ema": self._ema.tolist(),
                           "band": band, "gates": (self._ema * band).tolist(), "rows": []})
        return self._ema

    def gains(self, sigma_rows: torch.Tensor, cond_or_uncond: Sequence[int] | None,
              sample_sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """Slot gains for each batch row: [alpha_base, alpha_expert·g_1·band, ...]."""
        sigma_rows = sigma_rows.detach().float().cpu().reshape(-1)
        ema = self._step_gates(float(sigma_rows.max()), sample_sigmas)
        rows = ema[None, :].expand(sigma_rows.shape[0], -1)
        if self.config.uncond == "off" and cond_or_uncond:
            per_chunk = rows.shape[0] // len(cond_or_uncond)
            is_uncond = torch.tensor([c == 1 for c in cond_or_uncond]).repeat_interleave(per_chunk)
            rows = torch.where(is_uncond[:, None], torch.zeros_like(rows), rows)
        band = self.config.band.factors(sigma_rows)
        self.trace[-1]["rows"].append({"cond_or_uncond": list(cond_or_uncond or []),
                                       "gates": (rows * band[:, None]).tolist()})
        return slot_gains(rows, band, self.config.alpha_base, self.config.alpha_expert)
