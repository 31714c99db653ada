"""Process and randomness plumbing of the training loop: torch.distributed set-up, and the seeded data order,
per-sample generators and RNG snapshots that make a resumed run, or N processes, equal one uninterrupted run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device, timeout_minutes: float = 60.0) -> Distributed:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): nccl on GPUs, gloo on CPU.

    ``timeout_minutes`` bounds every wait for the other processes (collectives and barriers). The default of
    torch (10 minutes for nccl) is shorter than the first caching of a real dataset, during which the other
    processes wait at a barrier; ``train.dist_timeout_minutes`` sets it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=float(timeout_minutes)), **kwargs)
        here = True
    return Distributed(rank=rank, world_size=world, local_rank=local, initialized_here=here)


class InterruptGuard:
    """Ctrl-C (SIGINT) and SIGTERM during training become a ``KeyboardInterrupt`` at a point where the training
    state is whole, so the interrupted run can save its last finished step exactly once.

    * Inside :meth:`critical` (the optimizer update, a checkpoint write) a signal is only recorded and raised
      when the section ends: a step is never half applied, a save never cut short by the second signal
      ``torchrun`` forwards.
    * With ``defer`` (the processes of a data-parallel run other than the first) a signal is only recorded;
      the loop calls :meth:`check` after each step. Those processes therefore finish the collectives the first
      process may be waiting in, and the first process, which saves, is never left hanging in one.

    Handlers are installed only in the main thread and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, defer: bool = False):
        self.defer = defer
        self.requested: str = ""
        self._critical = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        if not self.defer and not self._critical:
            raise KeyboardInterrupt

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def critical(self):
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self.requested and not self.defer:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"model.device = {spec!r} but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


# ------------------------------------------------------------------------------------ data order, RNG

class DataOrder:
    """Sample positions to dataset indices: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("the dataset is empty")
        self.size, self.seed = int(size), int(seed)
        self._perms: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(_mix(self.seed, 0x5EED, epoch))
            self._perms = {epoch: torch.randperm(self.size, generator=gen).tolist()}
        return self._perms[epoch]

    def index(self, position: int) -> int:
        return self.permutation(position // self.size)[position % self.size]


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generator(seed: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, position))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    np_state = {**np_state, "state": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                      for k, v in np_state["state"].items()}}
    state = {"python": random.getstate(), "numpy": json.dumps(np_state), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    np_state = json.loads(state["numpy"])
    np_state["state"] = {k: (np.array(v, dtype=np.uint32) if isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
