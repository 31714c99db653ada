"""Stage-2 configuration: the stage-1 sections (with stage 2's defaults) plus the mixture's own sections.

Stage 2 trains the experts and the learned router on top of the frozen stage-1 base. Its defaults are the
seeds' stage-2 settings: 20 epochs, lr 5e-5, batch 1 x 8 accumulation, t in [0.2, 1.0]; KL to the rule
teacher 1.0, entropy 0.02, load balance 0.1, ROI 3.0. ``python -m training.stage2 --print-config`` prints
every key with its default and meaning (the same machinery as stage 1: :mod:`training.config`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from moe_core.band import BandError, TimestepBand
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES, DEFAULT_FALLBACK

from .config import (DataSection, DemoSection, LoraSection, ModelSection, ObjectiveSection,
                     OutputSection, TrainSection, _fail, doc, validate_common)


@dataclass
class Stage2TrainSection(TrainSection):
    """Optimisation (seeds, stage 2: 20 epochs, lr 5e-5, batch 1, accumulation 8)."""

    epochs: float = doc("passes over the cached training windows (ignored when max_steps > 0)", 20.0)
    learning_rate: float = doc("AdamW learning rate of the experts", 5e-5)


@dataclass
class Stage2ObjectiveSection(ObjectiveSection):
    """Flow matching as WAN is trained; stage 2 trains where the experts act (t >= 0.2)."""

    t_min: float = doc("lowest noise level trained (the band's start: experts are off below it)", 0.2)
    roi_weight: float = doc("not used by stage 2, whose ROI term is loss.roi (a separate term, not a weighting)",
                            3.0)


@dataclass
class Stage2OutputSection(OutputSection):
    """Where results go."""

    dir: str = doc("output folder (checkpoints, final LoRA-MoE, metrics, plots)", "outputs/stage2")
    name: str = doc("file name stem of the final LoRA-MoE", "lora_moe")


@dataclass
class MoESection:
    """The mixture: experts, their strengths and the band they act in (written as the file's defaults)."""

    expert_names: list[str] = doc("experts, in file order (2, 3, 5... experts train as well as the default 4)",
                                  factory=lambda: list(DEFAULT_EXPERT_NAMES))
    expert_keywords: list[str] = doc(
        "router keywords for custom expert names, one \"Name: kw1, kw2\" entry per expert (default names use "
        "the built-in Chinese/English vocabulary)", factory=list)
    no_instrument: str = doc("captions naming no instrument route to this expert (default the catch-all "
                             "\"Other\"), or \"error\"", DEFAULT_FALLBACK)
    alpha_base: float = doc("gain of the frozen base LoRA while training and the file's default; 1.0 is the gain "
                            "stage 1 trained it at, so step 0 reproduces the stage-1 model exactly", 1.0)
    alpha_expert: float = doc("gain of the experts (file default)", 1.0)
    band: list[list[float]] = doc("[t_start, factor] levels where experts act (the seeds' three levels: off "
                                  "below 0.2, 50% to 0.6, 100% above)",
                                  factory=lambda: [[0.2, 0.5], [0.6, 1.0]])
    top_k: int = doc("experts kept per row (ties at the k-th value are all kept)", 2)
    temperature: float = doc("router softmax temperature", 1.0)
    ema_beta: float = doc("EMA of the gates across sampler steps at inference (file default; set to 0 by the "
                          "trainer's EMA check when the learned router varies with t too much for it)", 0.9)
    expert_rank_scale: float = doc("expert rank = stage-1 rank of the projection x this (1: same ranks)", 1.0)
    expert_alpha: float = doc("LoRA alpha of the experts (0: the base LoRA's alpha per module)", 0.0)
    rank_dropout: float = doc("probability of dropping each expert rank component per sample while training "
                              "(0: off)", 0.0)


@dataclass
class RouterSection:
    """The learned router: a 64-hidden MLP per DiT over [rule logits, t], trained with the experts."""

    routing: Literal["learned", "rule", "hard_label"] = doc(
        "gates while training: learned (the router, trained jointly), rule (the keyword teacher), hard_label "
        "(the clip's label, the seeds' stage B; the router still learns from the teacher)", "learned")
    train: Literal["joint", "router_only", "experts_only"] = doc(
        "what is trained: joint (experts + router), router_only (experts frozen: the seeds' stage 3, "
        "continue from a stage-2 file with --init-moe), experts_only", "joint")
    hidden: int = doc("router hidden width", 64)
    learning_rate: float = doc("router learning rate (0: train.learning_rate)", 1e-3)
    warm_start_steps: int = doc("Adam steps distilling the fresh router toward the teacher before training "
                                "(so it starts at the teacher's choice)", 200)
    max_gate: float = doc("cap on any one gate, against collapse (the seeds suggest 0.9; 1: no cap)", 1.0)
    clip_level: bool = doc("router ignores t (fed t = 1): one gate vector per clip, constant over the steps",
                           False)
    ema_tolerance: float = doc("largest gap between EMA'd and per-step gates the EMA check accepts before it "
                               "writes ema_beta = 0 into the file", 0.05)


@dataclass
class LossSection:
    """Loss weights; each term is logged on its own (metrics.jsonl, loss plots)."""

    diffusion: float = doc("plain flow-matching MSE", 1.0)
    roi: float = doc("ROI term sum(roi*e^2)/sum(roi) on the instrument-tip cells (0: off)", 3.0)
    teacher_kl: float = doc("KL(router || teacher) on the pre-top-k softmax", 1.0)
    entropy: float = doc("hinge max(0, entropy_target - H(mean routing)): penalises expert usage whose entropy "
                         "falls below the target (collapse), never sharpens or softens single rows", 0.02)
    entropy_target: float = doc("target entropy of the step's mean routing, in nats (the seeds' collapse "
                                "threshold 0.5; ln 4 = 1.386 is uniform over 4 experts)", 0.5)
    load_balance: float = doc("Switch-style load balance sum_e f_e*P_e/q_e over the whole optimizer step (f: "
                              "top-k dispatch fraction, P: mean probability, q: the teacher's label "
                              "frequencies); 1 at balance", 0.1)
    identity: float = doc("identity loss: cross-entropy of a TorchScript instrument classifier on the predicted "
                          "clean latent (0: off; needs identity_classifier)", 0.0)
    identity_classifier: str = doc("TorchScript file: latent [B, C, F, H, W] -> logits [B, experts]", "")
    temporal: float = doc("temporal consistency: predicted clean latents' frame differences match the clip's, "
                          "inside the ROI (0: off; needs ROI boxes)", 0.0)


@dataclass
class ValidationSection:
    """The held-out split: a validation loss at fixed noise per DiT and per forced expert."""

    holdout_fraction: float = doc("fraction of clips of each instrument held out (at least one per "
                                  "instrument that has two or more clips)", 0.2)
    holdout_clips: list[str] = doc("clip names to hold out instead of the fraction", factory=list)
    every: int = doc("validate every N optimizer steps (0: only at the start and the end)", 0)
    t_values: list[float] = doc("fixed noise levels of the validation loss (each DiT takes those in its range)",
                                factory=lambda: [0.3, 0.5, 0.7, 0.9, 0.95])
    seed: int = doc("seed of the validation noise", 1234)
    early_stopping_patience: int = doc("stop when the held-out loss has not improved for this many "
                                       "validations (0: off)", 0)


@dataclass
class MonitorSection:
    """The seeds' warnings: ROI plateau, routing collapse, one expert taking over."""

    roi_plateau_epochs: int = doc("warn when the ROI loss has not improved by 1% for this many epochs", 5)
    min_entropy: float = doc("warn when the routing entropy (of the mean routing) falls below this", 0.5)
    max_usage: float = doc("warn when one expert takes more than this share of the routing", 0.7)
    stop_on_warning: bool = doc("stop training (with a checkpoint) at the first warning", False)
    balanced_sampler: bool = doc("draw windows class-balanced (deterministic, resumable) instead of "
                                 "shuffled epochs", False)


@dataclass
class Stage2Config:
    """Stage 2: experts + learned router on the frozen stage-1 base."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: Stage2TrainSection = field(default_factory=Stage2TrainSection)
    objective: Stage2ObjectiveSection = field(default_factory=Stage2ObjectiveSection)
    output: Stage2OutputSection = field(default_factory=Stage2OutputSection)
    moe: MoESection = field(default_factory=MoESection)
    router: RouterSection = field(default_factory=RouterSection)
    loss: LossSection = field(default_factory=LossSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    demo: DemoSection = field(default_factory=DemoSection)

    def validate(self) -> None:
        validate_common(self)
        validate_stage2(self)

    def band(self) -> TimestepBand:
        return TimestepBand.from_json(self.moe.band)

    def keywords(self) -> dict[str, list[str]] | None:
        return parse_keywords(self.moe.expert_keywords, self.moe.expert_names)


def parse_keywords(entries: list[str], names: list[str]) -> dict[str, list[str]] | None:
    """``["Name: kw1, kw2", ...]`` -> ``{"Name": ["kw1", "kw2"]}`` (None when empty)."""
    if not entries:
        return None
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, words = entry.partition(":")
        name = name.strip()
        kws = [w.strip() for w in words.replace("，", ",").split(",") if w.strip()]
        if not sep or not name or not kws:
            raise _fail("config", "moe.expert_keywords", f"{entry!r}: write \"Name: keyword1, keyword2\"")
        if name not in names:
            raise _fail("config", "moe.expert_keywords", f"{name!r} is not in moe.expert_names {names}")
        out[name] = kws
    return out


def validate_stage2(cfg: Stage2Config, where: str = "config") -> None:
    m, r, lo, v, mo = cfg.moe, cfg.router, cfg.loss, cfg.validation, cfg.monitor
    if len(m.expert_names) < 2 or len(set(m.expert_names)) != len(m.expert_names) or not all(m.expert_names):
        raise _fail(where, "moe.expert_names", f"need two or more distinct names, got {m.expert_names}")
    parse_keywords(m.expert_keywords, m.expert_names)
    if m.no_instrument != "error" and m.no_instrument not in m.expert_names:
        raise _fail(where, "moe.no_instrument", f"{m.no_instrument!r} is neither an expert name "
                                                f"({m.expert_names}) nor \"error\"")
    try:
        TimestepBand.from_json(m.band)
    except BandError as e:
        raise _fail(where, "moe.band", str(e)) from None
    if not 1 <= m.top_k <= len(m.expert_names):
        raise _fail(where, "moe.top_k", f"must be between 1 and the number of experts, got {m.top_k}")
    for key, value in {"moe.temperature": m.temperature, "moe.expert_rank_scale": m.expert_rank_scale,
                       "router.hidden": r.hidden}.items():
        if not (value > 0 and math.isfinite(value)):
            raise _fail(where, key, f"must be > 0, got {value}")
    if not 0.0 <= m.ema_beta < 1.0:
        raise _fail(where, "moe.ema_beta", f"must be in [0, 1), got {m.ema_beta}")
    if not 0.0 <= m.rank_dropout < 1.0:
        raise _fail(where, "moe.rank_dropout", f"must be in [0, 1), got {m.rank_dropout}")
    if m.alpha_base < 0 or m.alpha_expert <= 0 or m.expert_alpha < 0:
        raise _fail(where, "moe.alpha_base", "alpha_base must be >= 0, alpha_expert > 0, expert_alpha >= 0")
    if not 0.0 < r.max_gate <= 1.0:
        raise _fail(where, "router.max_gate", f"must be in (0, 1], got {r.max_gate}")
    if r.learning_rate < 0 or r.warm_start_steps < 0 or r.ema_tolerance <= 0:
        raise _fail(where, "router.learning_rate", "learning_rate and warm_start_steps must be >= 0, "
                                                   "ema_tolerance > 0")
    for key in ("diffusion", "roi", "teacher_kl", "entropy", "load_balance", "identity", "temporal"):
        if getattr(lo, key) < 0:
            raise _fail(where, f"loss.{key}", f"must be >= 0, got {getattr(lo, key)}")
    if lo.identity > 0 and not lo.identity_classifier:
        raise _fail(where, "loss.identity_classifier", "loss.identity > 0 needs a TorchScript instrument "
                                                       "classifier file (or set loss.identity = 0)")
    if not 0.0 <= v.holdout_fraction < 1.0:
        raise _fail(where, "validation.holdout_fraction", f"must be in [0, 1), got {v.holdout_fraction}")
    if not v.t_values or any(not 0.0 < t <= 1.0 for t in v.t_values):
        raise _fail(where, "validation.t_values", f"need noise levels in (0, 1], got {v.t_values}")
    if v.every < 0 or v.early_stopping_patience < 0:
        raise _fail(where, "validation.every", "every and early_stopping_patience must be >= 0")
    if not 0.0 < mo.max_usage <= 1.0 or mo.min_entropy < 0 or mo.roi_plateau_epochs < 0:
        raise _fail(where, "monitor.max_usage", "max_usage in (0, 1], min_entropy and roi_plateau_epochs >= 0")


__all__ = ["LossSection", "MoESection", "MonitorSection", "RouterSection", "Stage2Config", "ValidationSection",
           "parse_keywords", "validate_stage2"]
