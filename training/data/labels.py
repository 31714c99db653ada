"""Instrument labels for training clips: a primary expert and a teacher distribution for the router.

Labels come from the manifest's ``instrument_label`` when present (taken as ground truth: one-hot),
otherwise from the caption with ``moe_core.vocabulary.detect_instruments``, the same keyword table the
Router node uses on prompts, so a caption that trains an expert is a prompt that routes to it. A caption
naming several instruments gives equal teacher shares to each and its first detected (expert order, as
``detect_instruments`` returns them) as primary. Captions naming none are reported by name and handled by a
policy: ``skip`` the clip, ``fallback`` to ``DEFAULT_FALLBACK`` ("Other", the catch-all), or ``error``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

from moe_core.vocabulary import DEFAULT_EXPERT_NAMES, DEFAULT_FALLBACK, detect_instruments, keywords_for

from .manifest import ClipRecord

NoInstrumentPolicy = Literal["skip", "fallback", "error"]
LabelOrigin = Literal["manifest", "caption", "fallback"]


class NoInstrumentError(ValueError):
    """Raised by policy ``error`` when captions name no instrument; lists every such clip."""

    def __init__(self, clips: Sequence[str]):
        self.clips = list(clips)
        shown = "\n".join(f"  - {c}" for c in self.clips)
        super().__init__(f"{len(self.clips)} clip(s) have no instrument_label and no instrument keyword in "
                         f"their caption (use policy 'skip' or 'fallback', or label them):\n{shown}")


@dataclass(frozen=True)
class ClipLabel:
    """``primary`` expert index, ``teacher`` distribution over experts (sums to 1), and where it came from."""

    primary: int
    teacher: tuple[float, ...]
    origin: LabelOrigin
    experts: tuple[str, ...]


def _multi_hot(indices: Sequence[int], n: int) -> tuple[float, ...]:
    share = 1.0 / len(indices)
    return tuple(share if i in indices else 0.0 for i in range(n))


def detect_label(caption: str, expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                 custom_keywords: Mapping[str, Sequence[str]] | None = None) -> ClipLabel | None:
    """Label from a caption's instrument keywords, or None when it names no instrument."""
    keywords = keywords_for(list(expert_names), dict(custom_keywords) if custom_keywords else None)
    found = detect_instruments(caption, keywords)
    if not found:
        return None
    indices = [list(expert_names).index(name) for name in found]
    return ClipLabel(primary=indices[0], teacher=_multi_hot(indices, len(expert_names)), origin="caption",
                     experts=tuple(found))


def label_for(record: ClipRecord, expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
              custom_keywords: Mapping[str, Sequence[str]] | None = None,
              policy: NoInstrumentPolicy = "fallback", fallback: str = DEFAULT_FALLBACK) -> ClipLabel | None:
    """Label of one clip; None means "skip it" (policy ``skip``). Policy ``error`` raises NoInstrumentError."""
    names = list(expert_names)
    if record.instrument_label is not None:
        i = record.instrument_label
        return ClipLabel(primary=i, teacher=_multi_hot([i], len(names)), origin="manifest", experts=(names[i],))
    label = detect_label(record.caption, names, custom_keywords)
    if label is not None:
        return label
    if policy == "skip":
        return None
    if policy == "error":
        raise NoInstrumentError([record.name])
    i = _fallback_index(names, fallback)
    return ClipLabel(primary=i, teacher=_multi_hot([i], len(names)), origin="fallback", experts=(names[i],))


def _fallback_index(names: list[str], fallback: str) -> int:
    if fallback not in names:
        raise ValueError(f"fallback expert {fallback!r} is not one of the experts {names}")
    return names.index(fallback)


@dataclass
class LabelReport:
    """Labels of a dataset plus what a researcher needs to check them before training.

    Attributes:
        labelled: ``(record, label)`` for every clip that will be trained on, in manifest order.
        no_instrument: clips (names as in the manifest) whose caption names no instrument and that had no
            ``instrument_label``, whatever the policy did with them.
        skipped: the subset of ``no_instrument`` dropped by policy ``skip``.
        counts: clips per expert by primary label. ``teacher_mass``: summed teacher shares per expert.
    """

    expert_names: tuple[str, ...]
    policy: NoInstrumentPolicy
    labelled: list[tuple[ClipRecord, ClipLabel]] = field(default_factory=list)
    no_instrument: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return label_distribution((label for _, label in self.labelled), self.expert_names)

    @property
    def teacher_mass(self) -> dict[str, float]:
        mass = dict.fromkeys(self.expert_names, 0.0)
        for _, label in self.labelled:
            for name, share in zip(self.expert_names, label.teacher):
                mass[name] += share
        return mass

    @property
    def multi_instrument(self) -> list[str]:
        return [r.name for r, label in self.labelled if sum(1 for s in label.teacher if s > 0) > 1]

    def format(self) -> str:
        """Human-readable summary: counts per expert, multi-instrument clips, clips with no instrument."""
        total = len(self.labelled)
        lines = [f"labels: {total} clip(s) labelled"]
        mass = self.teacher_mass
        for name, count in self.counts.items():
            lines.append(f"  {name:<22} {count:4d} primary  teacher mass {mass[name]:6.2f}")
        if self.multi_instrument:
            lines.append(f"  {len(self.multi_instrument)} clip(s) name several instruments (shared teacher)")
        if self.no_instrument:
            action = {"skip": "skipped", "fallback": "labelled as fallback", "error": "rejected"}[self.policy]
            lines.append(f"  {len(self.no_instrument)} clip(s) name no instrument ({action}):")
            lines.extend(f"    - {name}" for name in self.no_instrument)
        return "\n".join(lines)


def label_distribution(labels: Iterable[ClipLabel], expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES
                       ) -> dict[str, int]:
    """Number of clips per expert, by primary label (every expert listed, zeros included)."""
    counts = dict.fromkeys(expert_names, 0)
    for label in labels:
        counts[expert_names[label.primary]] += 1
    return counts


def assign_labels(records: Iterable[ClipRecord], expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                  custom_keywords: Mapping[str, Sequence[str]] | None = None,
                  policy: NoInstrumentPolicy = "fallback", fallback: str = DEFAULT_FALLBACK) -> LabelReport:
    """Label every clip and collect the report.

    Raises:
        NoInstrumentError: with policy ``error``, listing *all* unlabelled clips at once.
        ValueError: unknown policy, or a fallback name that is not an expert.
    """
    if policy not in ("skip", "fallback", "error"):
        raise ValueError(f"no-instrument policy must be skip, fallback or error, not {policy!r}")
    names = tuple(expert_names)
    if policy == "fallback":
        _fallback_index(list(names), fallback)
    report = LabelReport(expert_names=names, policy=policy)
    for record in records:
        label = label_for(record, names, custom_keywords, policy="skip")
        if label is None:
            report.no_instrument.append(record.name)
            if policy == "skip":
                report.skipped.append(record.name)
                continue
            if policy == "error":
                continue
            label = label_for(record, names, custom_keywords, policy="fallback", fallback=fallback)
        report.labelled.append((record, label))
    if policy == "error" and report.no_instrument:
        raise NoInstrumentError(report.no_instrument)
    return report
