"""Routers: from a prompt (and the noise level) to expert probabilities.

Three sources, one output shape (a probability vector over the file's experts):
- rule-based: instrument keywords in the prompt, shared equally among the instruments found;
- learned: the file's small MLP over the rule logits and t, so it starts from the teacher and may deviate;
- manual: gates fixed by hand (Gate Override), which win over both;
- cycle: one expert per sampler step, in turn (the training-free "LoRA Switch" baseline): step k of a sampling
  run gives expert k mod N gate 1 (``moe_core.gating.GateController`` knows the step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import torch

from .vocabulary import DEFAULT_EXPERT_NAMES, DEFAULT_FALLBACK, detect_instruments, keywords_for

RouterMode = Literal["rule", "learned", "manual", "cycle"]
UncondPolicy = Literal["same", "off"]
#: Where the teacher weights come from: the prompt's keywords, the start image's classifier
#: (``moe_core.image_routing``), or the mean of both.
RouteSource = Literal["prompt", "image", "prompt+image"]
_SOURCE_TEXT = {"prompt": "", "image": " from the start image", "prompt+image": " from the prompt and the start image"}

#: Floor of the rule probabilities before taking logs, so absent instruments get a finite logit.
RULE_LOGIT_FLOOR = 1e-3


class RoutingError(ValueError):
    """A prompt or gate setting that cannot be routed (empty prompt, unknown expert, all-zero gates)."""


@dataclass(frozen=True)
class Routing:
    """What the Router / Gate Override nodes hand to Load LoRA-MoE.

    `weights` maps expert names to the rule teacher's probabilities (rule, learned) or to the fixed gates
    (manual). Names, not indices, so a routing built without the file is checked against the file's
    experts when the model is patched.

    A routing from the start image (`source` "image" or "prompt+image", ``moe_core.image_routing``) keeps
    the classifier's class probabilities in `image_classes` (class name -> probability, the classifier's
    temperature applied), so Load LoRA-MoE can map them onto the file's own experts again.
    """

    mode: RouterMode
    weights: dict[str, float]
    top_k: int = 2
    temperature: float = 1.0
    detected: tuple[str, ...] = ()
    prompt: str = ""
    uncond: UncondPolicy = "same"
    note: str = field(default="", compare=False)
    source: RouteSource = "prompt"
    image_classes: tuple[tuple[str, float], ...] = ()
    classifier: str = ""  # the classifier file's name, for descriptions

    def with_uncond(self, uncond: UncondPolicy) -> "Routing":
        return replace(self, uncond=uncond)

    def describe(self, gates: dict[str, float] | None = None) -> str:
        """One human-readable line: what was detected and the gates (the routing's weights if none given)."""
        gates = self.weights if gates is None else gates
        shown = ", ".join(f"{k} {v:.2f}" for k, v in gates.items() if v >= 0.005)
        found = ", ".join(self.detected) if self.detected else "none"
        note = f" ({self.note})" if self.note else ""
        extra = " (the file's learned router refines these per noise level)" if self.mode == "learned" else ""
        if self.mode == "cycle":
            shown, extra = "one expert per sampler step, in turn", ""
        return (f"[{self.mode}]{_SOURCE_TEXT.get(self.source, '')} instruments: {found}{note} -> gates: "
                f"{shown or 'all off'}{extra}")


def rule_route(prompt: str, expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES, *,
               keywords: dict[str, list[str]] | None = None, fallback: str = DEFAULT_FALLBACK,
               top_k: int = 2, temperature: float = 1.0, mode: RouterMode = "rule") -> Routing:
    """Route a prompt by instrument keywords.

    Several instruments in one prompt share the mass equally. A prompt naming no instrument goes to
    `fallback`: an expert name (default "Other", the catch-all family), "off" (experts off, base LoRA only),
    or "error".
    """
    if prompt is None or not prompt.strip():
        raise RoutingError("the prompt is empty: the router needs the text that names the instrument")
    _check_topk_temperature(top_k, temperature, len(expert_names))
    kw = keywords_for(list(expert_names), keywords)
    found = detect_instruments(prompt, kw)
    note = ""
    if found:
        weights = {n: (1.0 / len(found) if n in found else 0.0) for n in expert_names}
    elif fallback == "off":
        weights = {n: 0.0 for n in expert_names}
        note = "no instrument keyword: experts off"
    elif fallback == "error":
        raise RoutingError(
            f"no instrument keyword in the prompt {prompt!r}; known instruments: "
            + "; ".join(f"{n}: {', '.join(k[:4])}" for n, k in kw.items()))
    elif fallback in expert_names:
        weights = {n: (1.0 if n == fallback else 0.0) for n in expert_names}
        note = f"no instrument keyword: fallback to {fallback}"
    else:
        raise RoutingError(f"fallback {fallback!r} is not an expert name nor 'off'/'error'; experts: "
                           f"{list(expert_names)}")
    return Routing(mode=mode, weights=weights, top_k=top_k, temperature=temperature,
                   detected=tuple(found), prompt=prompt, note=note)


def manual_route(weights: dict[str, float], *, base: Routing | None = None) -> Routing:
    """Fixed gates, normalised to sum 1. Negative or all-zero weights are refused."""
    bad = {k: v for k, v in weights.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise RoutingError(f"gate weights must be finite and >= 0, got {bad}")
    total = sum(weights.values())
    if total <= 0:
        raise RoutingError("all gate weights are zero: set at least one expert above 0")
    norm = {k: v / total for k, v in weights.items()}
    detected = tuple(k for k, v in norm.items() if v > 0)
    if base is None:
        return Routing(mode="manual", weights=norm, top_k=len(norm), detected=detected)
    return replace(base, mode="manual", weights=norm, top_k=len(norm), detected=detected,
                   note="gates overridden by hand", source="prompt", image_classes=())


def cycle_route(*, base: Routing | None = None) -> Routing:
    """Cycle the experts per sampler step ("LoRA Switch"): no weights, the file's experts taken in order."""
    note = "cycling experts per sampler step (LoRA Switch)"
    if base is None:
        return Routing(mode="cycle", weights={}, top_k=1, note=note)
    return replace(base, mode="cycle", weights={}, top_k=1, note=note, source="prompt", image_classes=())


def _check_topk_temperature(top_k: int, temperature: float, n: int) -> None:
    if not 1 <= int(top_k) <= n:
        raise RoutingError(f"top_k must be between 1 and the number of experts ({n}), got {top_k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise RoutingError(f"temperature must be > 0, got {temperature}")


def rule_logits(probs: torch.Tensor) -> torch.Tensor:
    """The learned router's input: logs of the rule teacher's distribution, floored so absent instruments
    get a finite value. Its softmax is also the teacher that training's KL term pulls the router toward."""
    return torch.log(probs.clamp_min(RULE_LOGIT_FLOOR))


def teacher_distribution(teacher: torch.Tensor) -> torch.Tensor:
    """The KL target: softmax of the floored rule logits (no exact zeros, so KL(router || teacher) is finite)."""
    return torch.softmax(rule_logits(teacher), dim=-1)


class LearnedRouter(torch.nn.Module):
    """The 64-hidden MLP over [rule logits, t] trained toward the rule teacher (stage 2)."""

    def __init__(self, num_experts: int, hidden: int = 64):
        super().__init__()
        self.num_experts = num_experts
        self.fc1 = torch.nn.Linear(num_experts + 1, hidden)
        self.fc2 = torch.nn.Linear(hidden, num_experts)

    def forward(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Expert logits for rule logits [B, N] at noise level t [B]."""
        h = torch.cat([logits, t.reshape(-1, 1).to(logits.dtype)], dim=-1)
        return self.fc2(torch.nn.functional.silu(self.fc1(h)))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "LearnedRouter":
        hidden, inp = sd["fc1.weight"].shape
        router = cls(inp - 1, hidden)
        router.load_state_dict({k: v.float() for k, v in sd.items()})
        return router.eval().requires_grad_(False)

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """Detached float32 CPU copies, as ``moe_core.checkpoint`` stores a router."""
        return {k: v.detach().float().cpu().clone() for k, v in self.state_dict().items()}


def expert_vector(routing: Routing, expert_names: Sequence[str]) -> torch.Tensor:
    """The routing's weights in the file's expert order; a name the file lacks is an error."""
    unknown = [k for k, v in routing.weights.items() if k not in expert_names and v > 0]
    if unknown:
        raise RoutingError(f"routing names experts {unknown} that this LoRA-MoE file does not have; "
                           f"its experts are {list(expert_names)}")
    return torch.tensor([float(routing.weights.get(n, 0.0)) for n in expert_names], dtype=torch.float32)


def rule_gates(routing: Routing, expert_names: Sequence[str]) -> dict[str, float]:
    """The rule router's gates for a routing (temperature, top-k), by expert name.

    What the UI previews before a file is chosen; a learned router starts from these and adjusts them per
    noise level, so they are shown for learned routings too.
    """
    gates = raw_gates(replace(routing, mode="rule"), expert_names, 1.0, None)
    return dict(zip(expert_names, gates.tolist()))


def raw_gates(routing: Routing, expert_names: Sequence[str], sigma: float, router: LearnedRouter | None,
              max_gate: float = 1.0, clip_level: bool = False) -> torch.Tensor:
    """Gates of one routing at one noise level, before EMA and band (one row of :func:`moe_core.gating.route`)."""
    from .gating import GateSettings, route

    w = expert_vector(routing, expert_names)
    settings = GateSettings(temperature=routing.temperature, top_k=routing.top_k, max_gate=max_gate,
                            clip_level=clip_level)
    with torch.no_grad():
        return route(w[None], torch.tensor([float(sigma)]), routing.mode, router, settings).gates[0]
