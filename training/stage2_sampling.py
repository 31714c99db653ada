"""A class-balanced sample order for stage 2 (``monitor.balanced_sampler``): deterministic and resumable.

Like :class:`training.determinism.DataOrder` it maps a sample *position* to a dataset index and depends on
nothing but (seed, epoch), so data-parallel processes agree and ``--resume`` continues the same sequence.
Each epoch of ``N`` positions draws, for every position, an instrument uniformly and then one of that
instrument's windows, cycling through a shuffled list per instrument (no window repeats before its class
has been exhausted).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .determinism import _mix


class BalancedOrder:
    def __init__(self, classes: Sequence[int], seed: int):
        if not classes:
            raise ValueError("the dataset is empty")
        self.size = len(classes)
        self.seed = int(seed)
        self.by_class: dict[int, list[int]] = {}
        for i, c in enumerate(classes):
            self.by_class.setdefault(int(c), []).append(i)
        self.class_ids = sorted(self.by_class)
        self._epoch: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(_mix(self.seed, 0xBA1, epoch))
            picks = torch.randint(len(self.class_ids), (self.size,), generator=gen).tolist()
            queues = {c: [] for c in self.class_ids}
            out = []
            for k in picks:
                c = self.class_ids[k]
                if not queues[c]:
                    members = self.by_class[c]
                    queues[c] = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
                out.append(queues[c].pop())
            self._epoch = (epoch, out)
        return self._epoch[1]

    def index(self, position: int) -> int:
        return self.permutation(position // self.size)[position % self.size]


__all__ = ["BalancedOrder"]
