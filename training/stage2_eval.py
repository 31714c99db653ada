"""Stage 2's held-out split and validation: does each expert specialise, and does the router agree?

The split is by clip (all windows of a clip on one side), per instrument, seeded, so it is the same in every
process and on resume. Validation runs each held-out window at fixed noise levels (each DiT takes those in
its range) with fixed noise, once per *variant*: the trained routing, experts off (the frozen stage-1 base),
and each expert forced (gate 1 × band). Variants ride as rows of one batch (the fused forward takes per-row
gains), so a full validation costs one forward per window and noise level.

The result is the loss matrix ``forced expert × clip class`` (specialisation: each class's lowest loss on
its own expert, below the base's), losses per DiT, and the share of held-out (caption, t) pairs on which
the learned router's top choice is an instrument the caption names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from moe_core.gating import route, slot_gains
from moe_core.routing import RoutingError, rule_route
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

from .determinism import _mix
from .moe_losses import flow_terms


class HoldoutError(ValueError):
    """A held-out split that cannot be made (names no clip, or leaves no clip to train on)."""


@dataclass(frozen=True)
class ClipMeta:
    name: str
    caption: str
    instrument_label: int | None


def clip_meta(dataset, index: int) -> ClipMeta:
    """Name, caption and manifest label of a window, without loading its tensors when the dataset allows."""
    entries = getattr(dataset, "entries", None)
    if entries is not None:
        rec = entries[index].record
        return ClipMeta(rec.name, rec.caption, getattr(rec, "instrument_label", None))
    item = dataset[index]
    return ClipMeta(str(item.get("name", index)), str(item.get("caption", "")), item.get("instrument_label"))


def routing_targets(dataset, names: Sequence[str], keywords: dict | None, no_instrument: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: the rule teacher's weights for its caption (exactly what the Router node computes from
    that text) and a one-hot label (the manifest's instrument label if given, else the caption's first
    instrument). Captions naming no instrument go to ``no_instrument`` or, with "error", fail together."""
    n = len(names)
    teacher, label, missing = [], [], []
    fallback = "error" if no_instrument == "error" else no_instrument
    for i in range(len(dataset)):
        meta = clip_meta(dataset, i)
        try:
            r = rule_route(meta.caption if meta.caption.strip() else "-", list(names), keywords=keywords,
                           fallback=fallback)
        except RoutingError:
            missing.append(meta.name)
            continue
        w = torch.tensor([r.weights[k] for k in names], dtype=torch.float32)
        teacher.append(w)
        lab = meta.instrument_label if (meta.instrument_label is not None and list(names) ==
                                        list(DEFAULT_EXPERT_NAMES)) else int(w.argmax())
        label.append(torch.nn.functional.one_hot(torch.tensor(int(lab)), n).float())
    if missing:
        shown = "\n".join(f"  - {c}" for c in sorted(set(missing))[:20])
        raise RoutingError(f"{len(set(missing))} clip(s) have captions naming no instrument and moe.no_instrument "
                           f"is \"error\" (name an instrument in the caption, or set moe.no_instrument to an "
                           f"expert such as \"Other\"):\n{shown}")
    return torch.stack(teacher), torch.stack(label)


def holdout_split(dataset, label: torch.Tensor, fraction: float, clip_names: Sequence[str], seed: int
                  ) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): whole clips, ``fraction`` of each instrument's clips (at least one
    where an instrument has two or more clips), or the named clips."""
    clips: dict[str, list[int]] = {}
    for i in range(len(dataset)):
        clips.setdefault(clip_meta(dataset, i).name, []).append(i)
    if clip_names:
        unknown = [c for c in clip_names if c not in clips]
        if unknown:
            raise HoldoutError(f"validation.holdout_clips names clips not in the data: {unknown[:5]} (clip names "
                               f"are the manifest names, e.g. {sorted(clips)[:3]})")
        held = set(clip_names)
    elif fraction > 0:
        by_class: dict[int, list[str]] = {}
        for name, idx in sorted(clips.items()):
            by_class.setdefault(int(label[idx[0]].argmax()), []).append(name)
        held = set()
        for c, names in sorted(by_class.items()):
            if len(names) < 2:
                continue
            k = max(1, round(fraction * len(names)))
            gen = torch.Generator().manual_seed(_mix(seed, 0x401D, c))
            order = torch.randperm(len(names), generator=gen).tolist()
            held.update(names[j] for j in order[:k])
        if not held:
            raise HoldoutError(f"the held-out split is empty: validation.holdout_fraction = {fraction} holds out "
                               f"no clip because no instrument has two or more clips ({len(clips)} clips). Add "
                               "clips, name clips in validation.holdout_clips, or set holdout_fraction = 0 "
                               "(no validation)")
    else:
        return list(range(len(dataset))), []
    train = [i for name, idx in clips.items() if name not in held for i in idx]
    val = [i for name, idx in clips.items() if name in held for i in idx]
    if not train:
        raise HoldoutError("the held-out split leaves no clip to train on (validation.holdout_clips / "
                           "holdout_fraction)")
    return sorted(train), sorted(val)


class Subset(torch.utils.data.Dataset):
    """Windows ``indices`` of a dataset; keeps ``entries`` so captions are read without loading tensors."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)
        if hasattr(dataset, "entries"):
            self.entries = [dataset.entries[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]


class Validator:
    """Validation of a :class:`~training.stage2_loop.Stage2Trainer` on the held-out windows."""

    def __init__(self, dataset, teacher: torch.Tensor, label: torch.Tensor, t_values: Sequence[float], seed: int,
                 every: int = 0, patience: int = 0):
        if len(dataset) == 0:
            raise HoldoutError("the held-out split is empty")
        self.dataset = dataset
        self.teacher = teacher
        self.label = label
        self.t_values = [float(t) for t in t_values]
        self.seed = int(seed)
        self.every = int(every)
        self.patience = int(patience)

    def _variants(self, trainer, dit, teacher: torch.Tensor, label: torch.Tensor, t: torch.Tensor, full: bool
                  ) -> tuple[list[str], torch.Tensor]:
        spec = trainer.spec
        routed = spec.gains(spec.routed(teacher, label, t, trainer.routers.get(dit.name)), t)
        n = teacher.shape[-1]
        base = torch.zeros(1, 1 + n)
        base[0, 0] = spec.alpha_base
        names, gains = ["routed", "base"], [routed.cpu(), base]
        if full:
            band = spec.band.factors(t.cpu())
            for e in range(n):
                onehot = torch.nn.functional.one_hot(torch.tensor([e]), n).float()
                gains.append(slot_gains(onehot, band, spec.alpha_base, spec.alpha_expert))
                names.append(f"expert{e}")
        return names, torch.cat(gains)

    @torch.no_grad()
    def run(self, trainer, full: bool) -> dict[str, Any]:
        """Losses of every variant per held-out window and noise level (plain MSE and ROI term)."""
        records = []
        agree, pairs = 0, 0
        for dit in trainer.dits:
            ts = [(k, t) for k, t in enumerate(self.t_values) if dit.owns(t)]
            if not ts:
                continue
            trainer.dits.activate(dit)
            device = dit.placement.device
            for i in range(len(self.dataset)):
                item = self.dataset[i]
                latent = item["latent"].float()[None]
                image_cond = item.get("image_cond_latent")
                image_cond = None if image_cond is None else image_cond.float()[None]
                context = item["context"].float()[None].to(device)
                roi = item["roi_latent"].float()[None].to(device) if item.get("has_roi", False) else None
                teacher, label = self.teacher[i:i + 1], self.label[i:i + 1]
                for k, t_val in ts:
                    t = torch.tensor([t_val])
                    names, gains = self._variants(trainer, dit, teacher, label, t, full)
                    v = gains.shape[0]
                    gen = torch.Generator().manual_seed(_mix(self.seed, i, k))
                    noise = torch.randn(item["latent"].shape, generator=gen)[None]
                    # I2V: the window's start image; TI2V: validated as image-to-video (start frame kept clean)
                    sample = dit.flow_sample(latent, noise, t, image_cond, torch.tensor([True]))
                    rep = lambda x: None if x is None else x.expand(v, *x.shape[1:])  # noqa: E731
                    with dit.adapters(gains.to(device)):
                        pred = dit.predict(rep(sample.x_t), rep(sample.t), rep(context), trainer.autocast,
                                           rep(sample.concat), rep(sample.denoise_mask))
                    plain, roi_term = flow_terms(pred, rep(sample.target), rep(roi), rep(sample.denoise_mask))
                    records.append({"dit": dit.name, "t": t_val, "class": int(label.argmax()),
                                    "plain": dict(zip(names, plain.tolist())),
                                    "roi": dict(zip(names, roi_term.tolist())) if roi is not None else None})
                    router = trainer.routers.get(dit.name)
                    if router is not None:
                        probs = route(teacher, t, "learned", router, trainer.spec.settings).probs
                        agree += int(teacher[0, int(probs.argmax())] > 0)
                        pairs += 1
        return {"records": records, "router_agreement": agree / pairs if pairs else None}

    def periodic(self, trainer) -> dict[str, float]:
        """The held-out loss with the trained routing and with experts off, for the metrics log."""
        out = self.run(trainer, full=False)
        recs = out["records"]
        if not recs:
            return {}
        metrics = {"val_loss": _mean(r["plain"]["routed"] for r in recs),
                   "val_loss_base": _mean(r["plain"]["base"] for r in recs)}
        for name in sorted({r["dit"] for r in recs}):
            metrics[f"val_loss_{name}"] = _mean(r["plain"]["routed"] for r in recs if r["dit"] == name)
        if out["router_agreement"] is not None:
            metrics["val_router_agreement"] = out["router_agreement"]
        return metrics

    def full(self, trainer) -> dict[str, Any]:
        """The specialisation report: loss matrix (forced expert × class), base and routed per class."""
        out = self.run(trainer, full=True)
        recs = out["records"]
        names = list(trainer.expert_names)
        n = len(names)
        classes = sorted({r["class"] for r in recs})
        report: dict[str, Any] = {"experts": names, "classes": [names[c] for c in classes],
                                  "t_values": self.t_values, "windows": len(self.dataset),
                                  "router_agreement": out["router_agreement"]}
        for kind in ("plain", "roi"):
            if kind == "roi" and not any(r["roi"] for r in recs):
                continue
            rows = [r for r in recs if r[kind] is not None]
            matrix = [[_mean(r[kind][f"expert{e}"] for r in rows if r["class"] == c) for c in classes]
                      for e in range(n)]
            base = [_mean(r[kind]["base"] for r in rows if r["class"] == c) for c in classes]
            routed = [_mean(r[kind]["routed"] for r in rows if r["class"] == c) for c in classes]
            own_best = [min(range(n), key=lambda e: matrix[e][j]) == c for j, c in enumerate(classes)]
            beats_base = [matrix[c][j] < base[j] for j, c in enumerate(classes)]
            report[kind] = {"matrix": matrix, "base": base, "routed": routed,
                            "diagonal_dominant": all(own_best), "own_expert_best": own_best,
                            "own_expert_beats_base": beats_base}
        per_dit = {}
        for name in sorted({r["dit"] for r in recs}):
            sub = [r for r in recs if r["dit"] == name]
            per_dit[name] = {"routed": _mean(r["plain"]["routed"] for r in sub),
                             "base": _mean(r["plain"]["base"] for r in sub),
                             **{f"expert{e}": _mean(r["plain"][f"expert{e}"] for r in sub) for e in range(n)}}
        report["per_dit"] = per_dit
        report["val_loss"] = _mean(r["plain"]["routed"] for r in recs)
        report["val_loss_base"] = _mean(r["plain"]["base"] for r in recs)
        return report


def _mean(values) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else math.nan


__all__ = ["ClipMeta", "HoldoutError", "Subset", "Validator", "clip_meta", "holdout_split", "routing_targets"]
