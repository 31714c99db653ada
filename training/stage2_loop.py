"""The stage-2 trainer: experts and routers trained together through the gate function inference runs.

:class:`Stage2Trainer` is the shared :class:`~training.loop.Trainer` (data order, per-position randomness,
micro-batching, data parallel, checkpoints, exact resume) with three additions:

* gates: every micro-batch computes its rows' gates with :func:`moe_core.gating.route` and
  :func:`moe_core.gating.slot_gains` (router → temperature softmax → top-k → cap → × band(t) × alpha), the
  functions the sampler calls, so the trained file samples exactly as it was trained. With ``learned``
  routing the diffusion loss reaches the router through those gates;
* losses: flow matching and the ROI term on their own, KL to the rule teacher, the step-level load balance
  and entropy hinge (:mod:`training.moe_losses`), optional identity and temporal terms;
* monitoring: expert usage, routing entropy, per-expert sample counts, the seeds' warnings, and a held-out
  validation at fixed noise per DiT and per forced expert (:mod:`training.stage2_eval`).

The base LoRA is a buffer of the adapter banks (never a parameter, never in the optimizer); the routers are
the ``extra_parameters`` of the trainer, in a param group of their own learning rate.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from moe_core.band import TimestepBand
from moe_core.checkpoint import LoraMoE, MoEDefaults
from moe_core.gating import GateSettings, Routed, route, slot_gains
from moe_core.routing import LearnedRouter, teacher_distribution

from .determinism import _mix
from .loop import Trainer, lr_lambda
from .models import TrainableDiT
from .moe_losses import entropy, flow_terms, kl_to_teacher, step_routing, temporal_term

log = logging.getLogger("training")


@dataclass
class GateSpec:
    """How training routes: the routing mode of the gates, the gate settings, band and alphas."""

    routing: str  # "learned" | "rule" | "hard_label"
    settings: GateSettings
    band: TimestepBand
    alpha_base: float
    alpha_expert: float

    def routed(self, teacher: torch.Tensor, label: torch.Tensor, t: torch.Tensor,
               router: LearnedRouter | None) -> Routed:
        """The gates that scale the experts for these rows (hard labels: the clip's label, no top-k)."""
        if self.routing == "hard_label":
            return route(label, t, "manual", None, self.settings)
        return route(teacher, t, self.routing, router, self.settings)

    def gains(self, routed: Routed, t: torch.Tensor) -> torch.Tensor:
        return slot_gains(routed.gates, self.band.factors(t.detach().float().cpu()).to(routed.gates.device),
                          self.alpha_base, self.alpha_expert)


@dataclass
class LossWeights:
    diffusion: float = 1.0
    roi: float = 3.0
    teacher_kl: float = 1.0
    entropy: float = 0.02
    entropy_target: float = 0.5
    load_balance: float = 0.1
    identity: float = 0.0
    temporal: float = 0.0
    rank_dropout: float = 0.0


@dataclass
class Targets:
    """Per dataset index: the rule teacher's weights for its caption and its label (one-hot)."""

    teacher: torch.Tensor  # [len(dataset), N]
    label: torch.Tensor  # [len(dataset), N], one-hot of the primary instrument
    names: list[str]

    @property
    def primary(self) -> list[int]:
        return self.label.argmax(-1).tolist()

    def frequencies(self) -> torch.Tensor:
        """The teacher's mean distribution over the training set: the load-balance target q."""
        return self.teacher.mean(0)


@dataclass
class MonitorState:
    """What the warnings and early stopping remember (saved in checkpoints for exact resume)."""

    epoch: int = 0
    epoch_roi: list[float] = field(default_factory=list)  # [sum, count] of the running epoch
    epoch_probs: list[float] = field(default_factory=list)
    epoch_gates: list[float] = field(default_factory=list)
    roi_history: list[float] = field(default_factory=list)
    best_val: float | None = None
    bad_validations: int = 0
    warned: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)  # warnings whose condition still holds (said once)


class Stage2Trainer(Trainer):
    """Trains expert slots and routers; see the module docstring."""

    def __init__(self, *args, routers: dict[str, LearnedRouter], spec: GateSpec, weights: LossWeights,
                 targets: Targets, router_lr: float, defaults: MoEDefaults, expert_keywords: dict | None = None,
                 train_router: bool = True, monitor: Any = None, validator: Any = None,
                 classifier: torch.jit.ScriptModule | None = None, balanced_order: Any = None, **kwargs):
        self.routers = routers
        self.train_router = bool(train_router) and bool(routers)
        router_params = [p for r in routers.values() for p in r.parameters()] if self.train_router else []
        for r in routers.values():
            r.requires_grad_(self.train_router)
        super().__init__(*args, extra_parameters=router_params, **kwargs)
        self.spec = spec
        self.w = weights
        self.targets = targets
        self.defaults = defaults
        self.expert_keywords = expert_keywords
        self.monitor_cfg = monitor
        self.validator = validator
        self.classifier = classifier
        self.teacher_q = teacher_distribution(targets.teacher)  # floored rule softmax: the KL target per row
        self.label_freq = targets.frequencies()
        self.mon = MonitorState()
        self._step_stats = None
        self._sums: dict[str, float] = {}
        if balanced_order is not None:
            self.order = balanced_order
        if router_params:
            self._router_param_group(router_params, router_lr or self.s.learning_rate)

    # -- optimizer ----------------------------------------------------------------------------------

    def _router_param_group(self, params: list[torch.nn.Parameter], lr: float) -> None:
        """Move the routers into a param group of their own learning rate (the schedule applies to it too)."""
        ids = {id(p) for p in params}
        for g in self.optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        self.optimizer.param_groups = [g for g in self.optimizer.param_groups if g["params"]]
        defaults = {k: v for k, v in self.optimizer.defaults.items() if k != "lr"}
        self.optimizer.add_param_group({**defaults, "params": params, "lr": lr, "name": "router"})
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.s))

    # -- rows -----------------------------------------------------------------------------------------

    def _row_targets(self, rows: Sequence[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
        idx = torch.tensor([self.order.index(r["position"]) for r in rows])
        return (self.targets.teacher[idx].to(device), self.targets.label[idx].to(device),
                self.teacher_q[idx].to(device))

    def _router_probs(self, name: str, teacher: torch.Tensor, t: torch.Tensor, routed: Routed) -> torch.Tensor:
        """The learned router's pre-top-k distribution for these rows (what KL, balance and entropy see);
        without a learned router, the distribution of the gates' own router."""
        router = self.routers.get(name)
        if router is None or self.spec.routing == "learned":
            return routed.probs
        return route(teacher, t, "learned", router, self.spec.settings).probs

    # -- step-level routing statistics ----------------------------------------------------------------

    @torch.no_grad()
    def begin_step(self, rows: list[dict]) -> None:
        """Routing statistics of the whole step (all processes): the load-balance and entropy surrogates."""
        n = len(self.expert_names)
        probs_sum, gates_sum = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        counts = torch.zeros(n, dtype=torch.float64)
        for dit_index, chunk in self._groups(rows):
            dit = self.dits.dits[dit_index]
            teacher, label, _ = self._row_targets(chunk, torch.device("cpu"))
            t = torch.stack([r["t"] for r in chunk]).float()
            routed = self.spec.routed(teacher, label, t, self.routers.get(dit.name))
            probs = self._router_probs(dit.name, teacher, t, routed)
            probs_sum += probs.double().sum(0)
            gates_sum += routed.gates.double().sum(0)
            counts += label.double().sum(0)
        stats = torch.cat([probs_sum, gates_sum, counts])
        if self.dist.enabled:
            stats = stats.to(self.params[0].device)
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
            stats = stats.cpu()
        probs_sum, gates_sum, counts = stats[:n].float(), stats[n:2 * n].float(), stats[2 * n:]
        use_router = self.train_router
        self._step_stats = step_routing(probs_sum, gates_sum, self.global_batch, self.label_freq,
                                        self.w.load_balance if use_router else 0.0,
                                        self.w.entropy if use_router else 0.0, self.w.entropy_target)
        self._step_counts = counts
        self._sums = {k: 0.0 for k in ("diffusion", "roi", "teacher_kl", "identity", "temporal")}

    # -- one micro-batch --------------------------------------------------------------------------------

    def _rank_dropout(self, dit: TrainableDiT, rows: Sequence[dict]) -> None:
        """Drop expert rank components per row (scaled by 1/(1-p)); the base slot is never dropped."""
        p = self.w.rank_dropout
        bank = dit.bank
        gen = torch.Generator().manual_seed(_mix(self.s.seed, 0xD80, rows[0]["position"]))
        scaled = []
        for scales, slot_index in zip(bank.scales, bank._slot_index):
            expert_cols = (slot_index > 0).to(scales.device)
            keep = (torch.rand(scales.shape, generator=gen) >= p).to(scales.device, scales.dtype) / (1.0 - p)
            scaled.append(scales * torch.where(expert_cols, keep, torch.ones_like(keep)))
        bank.scales = scaled

    def _run_chunk(self, dit: TrainableDiT, rows: list[dict]) -> torch.Tensor:
        device = dit.placement.device
        sample = self.flow_sample(dit, rows)  # the DiT's input per family, as ComfyUI's sampler builds it
        x0, target, t, keep = sample.x0, sample.target, sample.t, sample.loss_weights
        context = torch.stack([r["item"]["context"].float() for r in rows]).to(device)
        roi = None
        if any(r["item"].get("has_roi", False) for r in rows):
            roi = torch.stack([r["item"]["roi_latent"].float() if r["item"].get("has_roi", False)
                               else torch.zeros(r["item"]["latent"].shape[1:]) for r in rows]).to(device)
        teacher, label, teacher_q = self._row_targets(rows, device)
        router = self.routers.get(dit.name)
        routed = self.spec.routed(teacher, label, t, router)
        gains = self.spec.gains(routed, t)
        G = self.global_batch
        with dit.adapters(gains):
            if self.w.rank_dropout > 0:
                self._rank_dropout(dit, rows)
            pred = dit.predict_sample(sample, context, self.autocast)  # gates above use t, the sampler's sigma
            plain, roi_term = flow_terms(pred, target, roi, keep)
            flow = self.w.diffusion * plain + self.w.roi * roi_term
            total = flow.sum() / G
            self._sums["diffusion"] += float(plain.detach().sum())
            self._sums["roi"] += float(roi_term.detach().sum())
            if self.train_router:
                probs = self._router_probs(dit.name, teacher, t, routed)
                kl = kl_to_teacher(probs, teacher_q)
                total = total + self.w.teacher_kl * kl.sum() / G
                total = total + (probs * self._step_stats.coefficients.to(probs)).sum()
                self._sums["teacher_kl"] += float(kl.detach().sum())
            if self.classifier is not None or self.w.temporal > 0:
                x0_pred = sample.clean_estimate(pred)  # a kept TI2V start frame is the clean latent
                if self.classifier is not None:
                    logits = self.classifier(x0_pred)
                    ce = torch.nn.functional.cross_entropy(logits.float(), label.argmax(-1), reduction="none")
                    total = total + self.w.identity * ce.sum() / G
                    self._sums["identity"] += float(ce.detach().sum())
                if self.w.temporal > 0 and roi is not None:
                    tt = temporal_term(x0_pred, x0, roi)
                    total = total + self.w.temporal * tt.sum() / G
                    self._sums["temporal"] += float(tt.detach().sum())
            total.backward()
        return flow.detach().float().cpu()

    # -- after the step --------------------------------------------------------------------------------

    def finish_step(self, metrics: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
        names = list(self._sums)
        sums = torch.tensor([self._sums[k] for k in names], dtype=torch.float64)
        if self.dist.enabled:
            sums = sums.to(self.params[0].device)
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
            sums = sums.cpu()
        G = self.global_batch
        st = self._step_stats
        for k, v in zip(names, sums.tolist()):
            if k in ("identity", "temporal") and not getattr(self.w, k):
                continue
            metrics[f"{k}_loss" if k in ("diffusion", "roi") else k] = v / G
        if self.train_router:
            metrics["load_balance"] = st.balance
            metrics["entropy_hinge"] = st.entropy_hinge
            metrics["loss_total"] = (metrics["loss"] + self.w.teacher_kl * metrics["teacher_kl"]
                                     + self.w.load_balance * st.balance + self.w.entropy * st.entropy_hinge)
        metrics["usage_entropy"] = st.usage_entropy
        for e, name in enumerate(self.expert_names):
            metrics[f"usage/{name}"] = float(st.dispatch[e])
            metrics[f"prob/{name}"] = float(st.mean_probs[e])
            metrics[f"samples/{name}"] = int(self._step_counts[e])
        self._monitor(metrics, st)
        if self.validator is not None and self.validator.every and self.step % self.validator.every == 0 \
                and self.step < self.s.total_steps:
            metrics.update(self.validator.periodic(self))
            self._early_stopping(metrics.get("val_loss"))
        return metrics

    def _monitor(self, metrics: dict[str, Any], st) -> None:
        """Per-epoch checks of the seeds: ROI plateau, routing entropy, one expert taking over."""
        cfg = self.monitor_cfg
        if cfg is None:
            return
        n = len(self.expert_names)
        m = self.mon
        if not m.epoch_probs:
            m.epoch_probs, m.epoch_gates, m.epoch_roi = [0.0] * n, [0.0] * n, [0.0, 0.0]
        m.epoch_probs = [a + float(b) * self.global_batch for a, b in zip(m.epoch_probs, st.mean_probs)]
        m.epoch_gates = [a + float(b) * self.global_batch for a, b in zip(m.epoch_gates, st.dispatch)]
        m.epoch_roi = [m.epoch_roi[0] + metrics.get("roi_loss", 0.0) * self.global_batch,
                       m.epoch_roi[1] + self.global_batch]
        epoch = self.step * self.global_batch // len(self.dataset)
        if epoch == m.epoch:
            return
        m.epoch = epoch
        total = max(m.epoch_roi[1], 1.0)
        probs = torch.tensor(m.epoch_probs) / total
        gates = torch.tensor(m.epoch_gates) / total
        m.roi_history.append(m.epoch_roi[0] / total)
        m.epoch_probs, m.epoch_gates, m.epoch_roi = [0.0] * n, [0.0] * n, [0.0, 0.0]
        h = float(entropy(probs))
        top = int(gates.argmax())
        metrics["epoch_usage_entropy"] = h
        metrics["epoch_max_usage"] = float(gates[top])
        found: dict[str, str] = {}
        p = cfg.roi_plateau_epochs
        hist = m.roi_history
        if p and len(hist) > p and min(hist[-p:]) > 0.99 * min(hist[:-p]):
            found["roi"] = f"the ROI loss has not improved by 1% for {p} epochs (best {min(hist):.4g})"
        if self.train_router and h < cfg.min_entropy:
            found["entropy"] = f"routing entropy {h:.3f} fell below {cfg.min_entropy} (collapse?)"
        if float(gates[top]) > cfg.max_usage:
            found[f"usage:{top}"] = (f"expert {self.expert_names[top]} takes {float(gates[top]):.0%} of the "
                                     f"routing (over {cfg.max_usage:.0%})")
        warnings = [text for key, text in found.items() if key not in m.active]  # each said when it starts
        m.active = list(found)
        if warnings:
            metrics["warnings"] = warnings
            for w in warnings:
                log.warning("warning at epoch %d: %s", epoch, w)
                m.warned.append(f"epoch {epoch}: {w}")
            if cfg.stop_on_warning:
                self.stop_requested = "monitor.stop_on_warning: " + "; ".join(warnings)

    def _early_stopping(self, val_loss: float | None) -> None:
        patience = self.validator.patience if self.validator is not None else 0
        if val_loss is None:
            return
        m = self.mon
        if m.best_val is None or val_loss < m.best_val:
            m.best_val, m.bad_validations = val_loss, 0
        else:
            m.bad_validations += 1
            if patience and m.bad_validations >= patience:
                self.stop_requested = (f"early stopping: the held-out loss has not improved for {patience} "
                                       f"validations (best {m.best_val:.5g})")

    # -- evaluation on fixed training samples ----------------------------------------------------------

    def eval_gains(self, dit: TrainableDiT, rows: list[dict], t: torch.Tensor) -> torch.Tensor:
        """:meth:`Trainer.evaluate`'s gains: the trained gates of these rows at their t."""
        teacher, label, _ = self._row_targets(rows, t.device)
        return self.spec.gains(self.spec.routed(teacher, label, t, self.routers.get(dit.name)), t)

    # -- checkpoints ------------------------------------------------------------------------------------

    def lora_moe(self) -> LoraMoE:
        moe = super().lora_moe()
        for name, router in self.routers.items():
            if name in moe.sets:
                moe.sets[name].router = router.state_dict_cpu()
        moe.defaults = self.defaults
        moe.expert_keywords = self.expert_keywords
        return moe

    def training_state(self, weights_name: str) -> dict[str, Any]:
        state = super().training_state(weights_name)
        state["stage2"] = json.dumps({"monitor": self.mon.__dict__})
        return state

    def restore_extra(self, state: dict[str, Any], moe: LoraMoE) -> None:
        for name, router in self.routers.items():
            sd = moe.sets[name].router
            if sd is None:
                from .loop import ResumeError

                raise ResumeError(f"{moe.source}: set '{name}' holds no router to resume")
            with torch.no_grad():
                for k, v in router.state_dict().items():
                    v.copy_(sd[k].to(v.dtype))
        extra = json.loads(state.get("stage2", "{}"))
        if "monitor" in extra:
            self.mon = MonitorState(**extra["monitor"])


__all__ = ["GateSpec", "LossWeights", "MonitorState", "Stage2Trainer", "Targets"]
