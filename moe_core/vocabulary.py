"""The instrument vocabulary: one table shared by inference routing and training labels.

Training derives labels from captions with the same keywords the Router node uses at inference, so a
caption that trains the Hook expert is a prompt that routes to it. Keep this the single source.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Instrument:
    """An expert family: its name in files and UIs, and the keywords that detect it in a prompt."""

    name: str
    chinese: str
    keywords: tuple[str, ...]


# Order is the expert order of files built with the defaults (expert 0..3).
DEFAULT_INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("Scissors", "剪刀", ("剪刀", "剪切", "组织剪", "scissors", "scissor")),
    Instrument(
        "Hook/Electrocautery",
        "电凝钩",
        ("电凝钩", "双极电凝", "电凝", "电钩", "钩", "hook", "electrocautery", "cautery", "bipolar"),
    ),
    Instrument("Suction", "吸引", ("吸引", "吸引器", "冲洗吸引", "suction", "aspirator", "irrigation")),
    Instrument(
        "Other",
        "其他",
        ("抓钳", "戳卡", "分离钳", "持针器", "钛夹", "施夹钳", "超声刀", "纱布", "grasper", "forceps",
         "trocar", "dissector", "needle holder", "clip applier", "harmonic", "gauze"),
    ),
)

DEFAULT_EXPERT_NAMES: tuple[str, ...] = tuple(i.name for i in DEFAULT_INSTRUMENTS)

#: The expert a prompt with no instrument keyword routes to: "Other" is the catch-all family.
DEFAULT_FALLBACK = "Other"


def keywords_for(expert_names: list[str] | tuple[str, ...],
                 custom: dict[str, list[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """Keywords per expert name: a file's own table wins, else the default vocabulary by name."""
    known = {i.name: i.keywords for i in DEFAULT_INSTRUMENTS}
    out: dict[str, tuple[str, ...]] = {}
    for name in expert_names:
        if custom and name in custom:
            out[name] = tuple(k.lower() for k in custom[name])
        elif name in known:
            out[name] = known[name]
        else:
            out[name] = (name.lower(),)
    return out


def detect_instruments(text: str, keywords: dict[str, tuple[str, ...]]) -> list[str]:
    """Expert names whose keywords occur in `text`, in expert order.

    Longer keywords are matched first and their span is consumed, so "电凝钩" counts once for Hook and
    "抓钳" never reads as a hook because of a stray "钩" elsewhere in the same word.
    """
    lowered = text.lower()
    consumed = [False] * len(lowered)
    found: set[str] = set()
    pairs = sorted(((kw, name) for name, kws in keywords.items() for kw in kws), key=lambda p: -len(p[0]))
    for kw, name in pairs:
        start = lowered.find(kw)
        while start != -1:
            span = range(start, start + len(kw))
            if not any(consumed[i] for i in span):
                for i in span:
                    consumed[i] = True
                found.add(name)
            start = lowered.find(kw, start + 1)
    return [n for n in keywords if n in found]
