"""The timestep band: how strongly experts act at each noise level.

Experts shape instruments, which form at mid-to-high noise; at low noise (fine texture) they are switched
off. The band is a function of the noise level sigma (equal to WAN's normalised timestep t under flow
matching), never of step indices, so it means the same for a KSamplerAdvanced split, for any scheduler
and shift, and for each of the two A14B DiTs that see only their slice of the schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


class BandError(ValueError):
    """An invalid band definition."""


@dataclass(frozen=True)
class TimestepBand:
    """Piecewise-constant factor over t in [0, 1]: `levels[i] = (t_start, factor)` holds until the next start.

    Below the first start the factor is 0.
    """

    levels: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise BandError("a band needs at least one (t_start, factor) level")
        prev = -1.0
        for i, lv in enumerate(self.levels):
            if len(lv) != 2:
                raise BandError(f"band level {i} must be (t_start, factor), got {lv!r}")
            t, f = float(lv[0]), float(lv[1])
            if not (math.isfinite(t) and 0.0 <= t <= 1.0):
                raise BandError(f"band level {i}: t_start must be in [0, 1], got {t}")
            if not (math.isfinite(f) and 0.0 <= f <= 1.0):
                raise BandError(f"band level {i}: factor must be in [0, 1], got {f}")
            if t <= prev:
                raise BandError(f"band level {i}: t_start {t} must be greater than the previous {prev}")
            prev = t

    def factor(self, t: float) -> float:
        out = 0.0
        for start, f in self.levels:
            if t >= start:
                out = f
        return out

    def factors(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row factors for a tensor of noise levels."""
        out = torch.zeros_like(t, dtype=torch.float32)
        for start, f in self.levels:
            out = torch.where(t.float() >= start, torch.full_like(out, f), out)
        return out

    def to_json(self) -> list[list[float]]:
        return [[float(t), float(f)] for t, f in self.levels]

    @classmethod
    def from_json(cls, data: Sequence[Sequence[float]]) -> "TimestepBand":
        try:
            return cls(tuple((float(t), float(f)) for t, f in data))
        except (TypeError, ValueError) as e:
            if isinstance(e, BandError):
                raise
            raise BandError(f"a band is a list of [t_start, factor] pairs, got {data!r}") from e

    def describe(self) -> str:
        parts, starts = [], [s for s, _ in self.levels] + [1.0]
        if self.levels[0][0] > 0:
            parts.append(f"t<{self.levels[0][0]:g}: off")
        for (s, f), e in zip(self.levels, starts[1:]):
            parts.append(f"{s:g}<=t<{e:g}: {f:.0%}" if e > s else f"t>={s:g}: {f:.0%}")
        return ", ".join(parts)


def three_level_band(start: float = 0.2, mid: float = 0.6, mid_factor: float = 0.5,
                     end: float = 1.0) -> TimestepBand:
    """The seeds' band: off below `start`, `mid_factor` up to `mid`, full up to `end`, off above it."""
    if not 0.0 <= start <= mid <= end <= 1.0:
        raise BandError(f"need 0 <= start <= mid <= end <= 1, got start={start}, mid={mid}, end={end}")
    levels: list[tuple[float, float]] = []
    if mid > start:
        levels.append((start, mid_factor))
    if end > mid:
        levels.append((mid, 1.0))
    if end < 1.0:
        levels.append((end, 0.0))
    if not levels:
        raise BandError("the band is empty: start, mid and end leave no range where experts act")
    return TimestepBand(tuple(levels))


DEFAULT_BAND = three_level_band()
ALWAYS_ON = TimestepBand(((0.0, 1.0),))
