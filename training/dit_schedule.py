"""Which DiT each optimizer step trains (WAN 2.2 A14B pairs), decided from (seed, step) alone.

Each A14B DiT owns a side of the noise-level boundary, and on a GPU that cannot hold both, the idle one
waits in host memory. How the samples of a step are spread over the two decides how often a 14B DiT has
to be copied to the GPU:

* ``per_sample``: each sample's own ``t`` picks its DiT (the plain flow-matching distribution). With 8
  accumulated samples and ~30% of them high-noise, almost every step needs both DiTs.
* ``alternate``: the whole step trains one DiT, the DiTs taking turns every ``switch_every`` steps
  (ai-toolkit's ``switch_boundary_every``); ``t`` is drawn within that DiT's range. Each DiT gets half of the
  steps, whatever its share of the ``t`` distribution.
* ``proportional``: the whole step trains one DiT, chosen at random (anew every ``switch_every`` steps) with
  its share of the ``t`` distribution (the high-noise DiT's ~30% with shift 3), so over many steps each DiT
  sees the samples ``per_sample`` would give it, in whole batches.

With two DiTs and the DiT already on the device going first, a step switches at most once: ``per_sample``
and ``alternate`` every 1 step switch in nearly every step, ``proportional`` in ~42% of the steps (2·0.3·0.7),
and ``switch_every = N`` divides that by about N.

A DiT can also stop early (``train.max_steps_high`` / ``max_steps_low``): from that step on, its side of
the range is no longer drawn.

Everything here is a function of (seed, step): all processes of a data-parallel run agree on the DiT
without talking, and a resumed run makes the same choices as an uninterrupted one.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from .determinism import _mix, sample_generator
from .objective import TimestepSampler

DiTSchedulePolicy = Literal["per_sample", "alternate", "proportional"]
DIT_SCHEDULES = ("per_sample", "alternate", "proportional")


class DiTSchedule:
    """The DiT(s) of each step and the noise-level distribution their samples are drawn from.

    Args:
        policy: one of :data:`DIT_SCHEDULES`.
        sampler: the run's timestep distribution (already restricted to the union of the DiTs' ranges).
        ranges: the noise range ``[lo, hi)`` each DiT owns, in DiT order.
        seed: the run's seed.
        max_steps: per DiT, the number of optimizer steps it trains (0: all).
        switch_every: ``alternate`` / ``proportional`` keep their choice for this many steps.
    """

    def __init__(self, policy: str, sampler: TimestepSampler, ranges: Sequence[tuple[float, float]], seed: int,
                 max_steps: Sequence[int] | None = None, switch_every: int = 1):
        if policy not in DIT_SCHEDULES:
            raise ValueError(f"dit_schedule must be one of {DIT_SCHEDULES}, not {policy!r}")
        if switch_every < 1:
            raise ValueError(f"switch_every must be >= 1, got {switch_every}")
        self.policy = policy
        self.switch_every = int(switch_every)
        self.sampler = sampler
        self.ranges = [(float(lo), float(hi)) for lo, hi in ranges]
        self.seed = int(seed)
        self.max_steps = [int(m) for m in (max_steps or [0] * len(self.ranges))]
        if len(self.max_steps) != len(self.ranges):
            raise ValueError("one max_steps value per DiT")
        self._samplers: dict[tuple[int, ...], TimestepSampler | None] = {}
        self.shares = [self._mass(lo, hi) for lo, hi in self.ranges]

    def _mass(self, lo: float, hi: float) -> float:
        """Probability of t in [lo, hi) under the run's sampler."""
        s = self.sampler
        lo, hi = max(lo, s.t_min), min(hi, s.t_max)
        if lo >= hi:
            return 0.0
        return (s.fraction_above(lo) if lo > s.t_min else 1.0) - (s.fraction_above(hi) if hi < s.t_max else 0.0)

    def training(self, step: int) -> list[int]:
        """Indices of the DiTs that still train at ``step`` and have samples to train on."""
        return [i for i, m in enumerate(self.max_steps) if (m == 0 or step < m) and self.shares[i] > 0]

    def step_dit(self, step: int) -> int | None:
        """The one DiT that trains at ``step`` (None: ``per_sample`` with several DiTs, each sample decides)."""
        active = self.training(step)
        if not active:
            raise ValueError(f"no DiT trains at step {step} (train.max_steps_high / max_steps_low end before the "
                             "run does)")
        if len(active) == 1:
            return active[0]
        if self.policy == "per_sample":
            return None
        block = step // self.switch_every
        if self.policy == "alternate":
            return active[block % len(active)]
        gen = torch.Generator().manual_seed(_mix(self.seed, 0xD175, block))
        u = float(torch.rand(1, generator=gen, dtype=torch.float64))
        total = sum(self.shares[i] for i in active)
        acc = 0.0
        for i in active:
            acc += self.shares[i] / total
            if u < acc:
                return i
        return active[-1]

    def sampler_for(self, step: int) -> TimestepSampler:
        """The distribution the samples of ``step`` are drawn from: the run's, truncated to the DiT(s) training."""
        one = self.step_dit(step)
        key = (one,) if one is not None else tuple(self.training(step))
        if key not in self._samplers:
            if len(key) == len(self.ranges):
                self._samplers[key] = self.sampler
            else:
                lo = min(self.ranges[i][0] for i in key)
                hi = max(self.ranges[i][1] for i in key)
                self._samplers[key] = self.sampler.restricted(lo, hi)
        return self._samplers[key]


def owner(ranges: Sequence[tuple[float, float]], t: float) -> int:
    """Index of the range that owns noise level ``t`` (``[lo, hi)``, the top range closed at 1)."""
    for i, (lo, hi) in enumerate(ranges):
        if lo <= t < hi or (hi >= 1.0 and t == 1.0):
            return i
    raise ValueError(f"no DiT owns noise level t={t} (ranges {list(ranges)})")


def group_order(dit_indices: Sequence[int], active: int | None) -> list[int]:
    """The order in which a step visits its DiTs: the one already on the device first (so a step switches at
    most once), then the others in index order."""
    present = sorted(set(dit_indices))
    first = active if active is not None else (present[0] if present else None)
    return sorted(present, key=lambda i: (i != first, i))


def simulate_switches(schedule: DiTSchedule, positions_per_step: int, steps: int, start: int = 0) -> list[int]:
    """DiT switches (activations of a DiT other than the one on the device) per optimizer step, counted with the
    trainer's own choices: :meth:`DiTSchedule.sampler_for`, the per-sample generators and :func:`group_order`.

    ``positions_per_step`` is one process's samples per step. Used by ``bench/bench_train_step.py`` for sizes
    that cannot run here, and checked against a real run by the tests.
    """
    active: int | None = None
    out = []
    for step in range(start, start + steps):
        fixed = schedule.step_dit(step)
        if fixed is not None:
            dits = [fixed]
        else:
            sampler = schedule.sampler_for(step)
            dits = [owner(schedule.ranges, float(sampler.sample(sample_generator(schedule.seed, position), 1)[0]))
                    for position in range(step * positions_per_step, (step + 1) * positions_per_step)]
        switches = 0
        for i in group_order(dits, active):
            if active is not None and i != active:
                switches += 1
            active = i
        out.append(switches)
    return out


__all__ = ["DIT_SCHEDULES", "DiTSchedule", "group_order", "owner", "simulate_switches"]
