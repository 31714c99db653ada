"""The learned routers of stage 2: one 64-hidden MLP per DiT, created deterministically and warm-started.

A fresh router outputs near-uniform gates; before the first training step it is distilled toward the rule
teacher (Adam on KL(router || teacher) over the training captions' teacher vectors and a grid of noise levels
in its DiT's range), so training starts from the teacher's choice and the experts are not trained under
random routing. With ``router.warm_start_steps = 0`` it starts as initialised.
"""
from __future__ import annotations

from typing import Callable

import torch

from moe_core.gating import GateSettings, route
from moe_core.routing import LearnedRouter, teacher_distribution

from .determinism import _mix
from .moe_losses import kl_to_teacher


class RouterSetupError(ValueError):
    """Learned routing asked for without a router to train or load."""


def new_router(num_experts: int, hidden: int, seed: int, index: int) -> LearnedRouter:
    """A router initialised from its own seed (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix(seed, 0x7077, index))
        return LearnedRouter(num_experts, hidden)


def warm_start(router: LearnedRouter, teachers: torch.Tensor, t_range: tuple[float, float],
               settings: GateSettings, steps: int, seed: int) -> tuple[float, float]:
    """Distil ``router`` toward the teacher on every distinct teacher vector × 16 noise levels in ``t_range``.

    Returns (mean KL after, share of inputs whose top choice is an instrument the teacher names).
    """
    distinct = torch.unique(teachers, dim=0)
    ts = torch.linspace(t_range[0], t_range[1], 16)
    w = distinct.repeat_interleave(len(ts), 0)
    t = ts.repeat(len(distinct))
    q = teacher_distribution(w)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(_mix(seed, 0x3A7))
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = kl_to_teacher(route(w, t, "learned", router, settings).probs, q).mean()
            loss.backward()
            opt.step()
    with torch.no_grad():
        probs = route(w, t, "learned", router, settings).probs
        kl = float(kl_to_teacher(probs, q).mean())
        agree = float((w.gather(1, probs.argmax(1, keepdim=True)) > 0).float().mean())
    return kl, agree


def make_routers(cfg, dits, targets, preloaded: dict[str, LearnedRouter], settings: GateSettings,
                 train_router: bool, say: Callable[[str], None]) -> dict[str, LearnedRouter]:
    """One router per trained DiT: loaded (``--init-moe``) or new and warm-started; none when neither learned
    routing nor router training is asked for."""
    r = cfg.router
    if not train_router and r.routing != "learned" and not preloaded:
        return {}
    routers: dict[str, LearnedRouter] = {}
    for i, dit in enumerate(dits):
        if dit.name in preloaded:
            routers[dit.name] = preloaded[dit.name].train()
            continue
        if not train_router:
            raise RouterSetupError(f"router.routing = \"learned\" with router.train = \"experts_only\" needs a "
                                   f"trained router for the {dit.name} DiT: give --init-moe with one, or train it")
        router = new_router(len(targets.names), r.hidden, cfg.train.seed, i)
        lo = max(dit.t_range[0], cfg.objective.t_min)
        hi = min(dit.t_range[1], cfg.objective.t_max)
        if r.warm_start_steps:
            kl, agree = warm_start(router, targets.teacher, (lo, hi), settings, r.warm_start_steps, cfg.train.seed)
            say(f"router ({dit.name}): warm-started toward the rule teacher in {r.warm_start_steps} steps: KL "
                f"{kl:.4f}, top choice named by the caption on {agree:.0%} of (caption, t) inputs")
        routers[dit.name] = router.train()
    return routers


__all__ = ["RouterSetupError", "make_routers", "new_router", "warm_start"]
