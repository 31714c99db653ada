"""The training loop shared by stage 1 and stage 2.

What one optimizer step does (global batch ``G = batch_size * grad_accum * world_size`` windows):

1. The step covers sample *positions* ``[k*G, (k+1)*G)`` of an endless stream; position ``p`` is window
   ``perm(epoch)[p % N]`` with ``epoch = p // N`` and ``perm`` a permutation seeded by (seed, epoch). Process
   ``r`` of ``W`` takes positions ``k*G + m*W*B + r*B + [0, B)`` for micro-step ``m``.
2. Each position gets its own generator, seeded by (seed, position): it draws the noise level ``t`` and then
   the noise. So the randomness of a sample depends on nothing but its position: not on the process that
   runs it, how rows are batched, or whether the run was interrupted. That is what makes data-parallel runs
   match single-process runs and ``--resume`` exact.
3. The process's rows are grouped by the DiT that owns their ``t`` (A14B: the DiT on the device goes first,
   so the pair switches at most once per step; ``training.dit_schedule`` may give a whole step to one DiT,
   chosen from (seed, step)) and by tensor shape (buckets), and run in chunks of at most
   ``batch_size`` rows: forward through the DiT with the adapters (``moe_core``'s fused forward), ROI-weighted
   flow-matching loss per sample, scaled by ``1/G``, backward.
4. Data parallel: the gradients of all trainable tensors are summed over processes with one
   ``torch.distributed.all_reduce`` (what DDP does, without wrapping a 14B model whose parameters DDP would
   broadcast); then clipping, AdamW (one parameter group per DiT, with its own learning rate, and one for
   any extra parameters), the schedule.

Checkpoints (every ``save_every`` steps and at the end) are a LoRA-MoE file written with ``moe_core``
(``checkpoints/step_000100.safetensors``) and the full training state beside it (``.state.pt``: optimizer,
scheduler, RNG states of python/numpy/torch, data position, config), both written atomically, then
``checkpoints/latest.json`` pointing at the pair (written last, so it never points at half a checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from moe_core.checkpoint import LoraMoE, load_lora_moe, save_lora_moe
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

from moe_core.atomic import atomic_path, atomic_write_text
from .determinism import DataOrder, Distributed, InterruptGuard, rng_state, sample_generator, set_rng_state
from .dit_schedule import DiTSchedule, group_order
from .models import DiTSet, FlowSample, TrainableDiT
from .objective import TimestepSampler, frame_weights, per_sample_loss, roi_weights
from .tensorboard_log import log_scalars, open_writer

log = logging.getLogger("training")

STATE_FORMAT = "wan-lora-moe-train-state"
STATE_VERSION = 1
#: Config keys that may change between an interrupted run and its resume (they do not change the maths).
RESUME_MUTABLE_KEYS = ("output.save_every", "output.keep_last", "output.log_every", "output.plot",
                       "output.progress", "train.cpu_threads", "model.device", "model.offload_idle_dit",
                       "model.stream_blocks", "output.tensorboard", "train.dist_timeout_minutes",
                       "lora.init_weights", "lora.init_weights_high", "lora.init_weights_low",
                       "model.dit", "model.dit_high", "model.dit_low", "data.manifest", "data.cache_dir",
                       "data.vae", "data.text_encoder", "demo.work_dir", "demo.enabled", "output.render_every",
                       "output.render_steps", "output.render_seed", "output.render_cfg",
                       "output.render_start_image")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, corrupt, or from another configuration)."""


# ------------------------------------------------------------------------------------------ settings

@dataclass
class LoopSettings:
    seed: int = 42
    total_steps: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    roi_weight: float = 3.0
    save_every: int = 0
    keep_last: int = 0
    log_every: int = 1
    progress: bool = True
    plot: bool = True
    #: per DiT name: its learning rate (absent or 0: ``learning_rate``) and optimizer steps it trains (0: all)
    dit_learning_rates: dict[str, float] = field(default_factory=dict)
    dit_max_steps: dict[str, int] = field(default_factory=dict)
    dit_schedule: str = "per_sample"
    dit_switch_every: int = 1
    tensorboard: bool = False
    #: TI2V 5B: share of samples conditioned on their start frame (latent frame 0 kept clean); the rest train
    #: as plain text-to-video samples
    start_frame_probability: float = 0.5


# ---------------------------------------------------------------------------------------- schedules

def lr_lambda(settings: LoopSettings) -> Callable[[int], float]:
    warm, total = settings.warmup_steps, settings.total_steps
    floor = settings.min_lr_ratio

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if settings.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# -------------------------------------------------------------------------------------- checkpoints

def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    pointer = checkpoint_dir(out_dir) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        return json.loads(pointer.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{pointer}: unreadable ({e}); point --resume at a .state.pt file instead") from None


def atomic_torch_save(obj: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return path


# ------------------------------------------------------------------------------------------- trainer

GainsFn = Callable[[Sequence[dict], TrainableDiT], torch.Tensor]


def base_only_gains(num_experts: int) -> GainsFn:
    """Stage 1: the base slot at gain 1, experts (absent) at 0."""
    def gains(items: Sequence[dict], dit: TrainableDiT) -> torch.Tensor:
        g = torch.zeros(len(items), 1 + num_experts)
        g[:, 0] = 1.0
        return g

    return gains


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    out_dir: Path
    checkpoint: Path | None
    metrics: Path
    plots: list[Path] = field(default_factory=list)
    interrupted: bool = False


class Trainer:
    """Trains the adapter banks of a :class:`~training.models.DiTSet` on a dataset of cached windows.

    Args:
        dits: the DiT(s) with their adapter banks.
        dataset: indexable; items are dicts with ``latent`` [C, F, H, W] (raw VAE latent), ``context``
            [L, 4096], optional ``roi_latent`` [F, H, W] and ``has_roi`` (``training.data.CachedClipDataset``).
        sampler: the timestep distribution (restricted to the union of the trained DiTs' ranges).
        settings: optimisation and output settings.
        out_dir: where checkpoints, metrics and plots go.
        config: the resolved config as nested dicts (stored in checkpoints; checked on resume).
        expert_names: expert names of the LoRA-MoE checkpoint files.
        gains: per-row slot gains for a group of items (stage 1: base only).
        dataset_id: fingerprint of the dataset (order and content); a resume with another dataset is refused.
        dist: the process group (``init_distributed``).
        callbacks: called as ``fn(step, metrics)`` after every optimizer step (tests use it to interrupt).
        extra_parameters: further trainable tensors (stage 2's router) optimised alongside the adapters.
    """

    def __init__(self, dits: DiTSet, dataset, sampler: TimestepSampler, settings: LoopSettings, out_dir: str | Path,
                 config: dict[str, Any], expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                 gains: GainsFn | None = None, dataset_id: str = "", dist: Distributed | None = None,
                 callbacks: Sequence[Callable[[int, dict], None]] = (),
                 extra_parameters: Sequence[torch.nn.Parameter] = (),
                 model_sets: dict[str, dict] | None = None):
        self.dits = dits
        self.dataset = dataset
        self.sampler = sampler
        self.s = settings
        self.out_dir = Path(out_dir)
        self.config = config
        self.expert_names = list(expert_names)
        self.gains = gains or base_only_gains(len(self.expert_names))
        self.dataset_id = dataset_id
        self.dist = dist or Distributed()
        self.callbacks = list(callbacks)
        self.model_sets = model_sets or {}
        self.order = DataOrder(len(dataset), settings.seed)
        self.global_batch = settings.batch_size * settings.grad_accum * self.dist.world_size
        self.params: list[torch.nn.Parameter] = []
        groups = []  # one AdamW group per DiT (its own learning rate), then the extra parameters at learning_rate
        for d in dits:
            ps = d.bank.trainable_parameters()
            if ps:
                lr = settings.dit_learning_rates.get(d.name) or settings.learning_rate
                groups.append({"params": ps, "lr": lr, "name": d.name})
        extra = list(extra_parameters)
        if extra:
            groups.append({"params": extra, "lr": settings.learning_rate, "name": "extra"})
        for g in groups:
            self.params.extend(g["params"])
        if not self.params:
            raise ValueError("nothing to train: no trainable adapter parameters")
        self.optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=settings.betas,
                                           eps=settings.eps, weight_decay=settings.weight_decay)
        self.schedule = DiTSchedule(settings.dit_schedule, sampler, [d.t_range for d in dits], settings.seed,
                                    [settings.dit_max_steps.get(d.name, 0) for d in dits], settings.dit_switch_every)
        self.interrupts: InterruptGuard | None = None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(settings))
        self.step = 0
        self.stop_requested = ""  # set by a hook (early stopping, monitor.stop_on_warning) to end training
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.autocast = {"bf16": torch.bfloat16}.get(settings.mixed_precision)
        self._fingerprints = {d.name: d.fingerprint() for d in dits}
        # TI2V 5B: each sample draws whether it is conditioned on its start frame (latent frame 0)
        self._start_frames = dits.dits[0].family.conditioning == "latent_image"

    # -- one step ---------------------------------------------------------------------------------------

    def _positions(self, step: int) -> list[int]:
        """This process's sample positions for optimizer step ``step``."""
        B, W, r = self.s.batch_size, self.dist.world_size, self.dist.rank
        base = step * self.global_batch
        return [base + m * W * B + r * B + j for m in range(self.s.grad_accum) for j in range(B)]

    def _prepare_row(self, position: int, sampler: TimestepSampler | None = None) -> dict[str, Any]:
        """One sample: dataset item, noise level, noise and DiT, all from (seed, position).

        ``t`` comes from the step's distribution (:class:`~training.dit_schedule.DiTSchedule`: the run's
        sampler, or its restriction to the one DiT the step trains), unless ``sampler`` is given (evaluation).
        """
        item = self.dataset[self.order.index(position)]
        gen = sample_generator(self.s.seed, position)
        fixed = None
        if sampler is None:
            step = position // self.global_batch
            sampler, fixed = self.schedule.sampler_for(step), self.schedule.step_dit(step)
        t = sampler.sample(gen, 1)[0]
        noise = torch.randn(item["latent"].shape, generator=gen, dtype=torch.float32)
        dit_index = fixed if fixed is not None else self.dits.index_for(float(t))
        row = {"item": item, "t": t, "noise": noise, "dit": dit_index, "position": position}
        if self._start_frames:  # TI2V: drawn after the noise, so the other families' streams are unchanged
            drawn = bool(torch.rand(1, generator=gen, dtype=torch.float64)[0] < self.s.start_frame_probability)
            # a one-latent-frame window would be all start frame: nothing left to learn, trained as text-to-video
            row["start_frame"] = drawn and item["latent"].shape[1] > 1
        return row

    def _groups(self, rows: list[dict]) -> list[tuple[int, list[dict]]]:
        """Rows grouped by (DiT, latent shape, context shape, TI2V start frame or not); the DiT already on the
        device first. Start-frame rows run apart from plain ones, so every chunk is one ComfyUI forward (per-frame
        timesteps with a start frame, one timestep per row without)."""
        active = self.dits._active
        order = group_order([r["dit"] for r in rows], self.dits.dits.index(active) if active is not None else None)
        keyed: dict[tuple, list[dict]] = {}
        for row in rows:
            key = (order.index(row["dit"]), row["dit"], tuple(row["item"]["latent"].shape),
                   tuple(row["item"]["context"].shape), row.get("start_frame", False))
            keyed.setdefault(key, []).append(row)
        out = []
        for key in sorted(keyed):
            group = keyed[key]
            for i in range(0, len(group), self.s.batch_size):
                out.append((key[1], group[i:i + self.s.batch_size]))
        return out

    def flow_sample(self, dit: TrainableDiT, rows: list[dict]) -> FlowSample:
        """The rows' DiT input as ComfyUI's sampler builds it for the DiT's family (:meth:`TrainableDiT.flow_sample`):
        latents, noise, t, and the start image (I2V: ``image_cond_latent``; TI2V: latent frame 0, when drawn)."""
        latents = torch.stack([r["item"]["latent"].float() for r in rows])
        noise = torch.stack([r["noise"] for r in rows])
        t = torch.stack([r["t"] for r in rows])
        image_cond = None
        if dit.family.conditioning == "concat_image":
            missing = [r["item"].get("name", "?") for r in rows if r["item"].get("image_cond_latent") is None]
            if missing:
                raise ValueError(f"cached window(s) of {', '.join(missing)} hold no image_cond_latent, which the "
                                 f"{dit.family.title} DiT needs: rebuild the cache with this DiT (data.family)")
            image_cond = torch.stack([r["item"]["image_cond_latent"].float() for r in rows])
        start = torch.tensor([bool(r.get("start_frame", False)) for r in rows])
        return dit.flow_sample(latents, noise, t, image_cond, start)

    def _run_chunk(self, dit: TrainableDiT, rows: list[dict]) -> torch.Tensor:
        """Forward + backward for rows of one DiT and shape; returns their per-sample losses (detached)."""
        device = dit.placement.device
        sample = self.flow_sample(dit, rows)
        context = torch.stack([r["item"]["context"].float() for r in rows]).to(device)
        weights = None
        if self.s.roi_weight != 1.0 and any(r["item"].get("has_roi", False) for r in rows):
            roi = torch.stack([r["item"]["roi_latent"].float() if r["item"].get("has_roi", False)
                               else torch.zeros(r["item"]["latent"].shape[1:]) for r in rows]).to(device)
            weights = roi_weights(roi, self.s.roi_weight)
        weights = frame_weights(weights, sample.loss_weights)
        gains = self.gains([r["item"] for r in rows], dit)
        with dit.adapters(gains):
            pred = dit.predict_sample(sample, context, self.autocast)
            losses = per_sample_loss(pred, sample.target, weights)
            (losses.sum() / self.global_batch).backward()
        return losses.detach().float().cpu()

    def _all_reduce_grads(self) -> None:
        """Sum gradients over processes; a tensor no process produced a gradient for keeps ``grad = None``
        (so AdamW skips it exactly as a single process would, e.g. the A14B DiT that got no sample)."""
        present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [present.to(grads[0].device)])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        for p, count in zip(self.params, flat[offset:].tolist()):
            if count == 0:
                p.grad = None

    def train_step(self) -> dict[str, Any]:
        step = self.step
        start = time.perf_counter()
        rows = [self._prepare_row(p) for p in self._positions(step)]
        self.begin_step(rows)
        moves, move_s = self.dits.moves, self.dits.move_seconds
        sums = torch.zeros(2 * len(self.dits.dits) + 1, dtype=torch.float64)  # per DiT: loss sum, count; t sum
        for dit_index, chunk in self._groups(rows):
            dit = self.dits.activate(self.dits.dits[dit_index])
            losses = self._run_chunk(dit, chunk)
            sums[2 * dit_index] += float(losses.double().sum())
            sums[2 * dit_index + 1] += len(chunk)
        sums[-1] = float(sum(float(r["t"]) for r in rows))
        if self.dist.enabled:
            self._all_reduce_grads()
            reduced = sums.to(self.params[0].device)  # nccl reduces CUDA tensors only
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
            sums = reduced.cpu()
        grad_norm = float("nan")
        if self.s.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm))
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        first = self.optimizer.param_groups[0]
        lr = self.s.learning_rate * first["lr"] / first["initial_lr"]  # the schedule's factor on learning_rate
        with self.interrupts.critical() if self.interrupts is not None else contextlib.nullcontext():
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        total_loss = float(sum(sums[2 * i] for i in range(len(self.dits.dits)))) / self.global_batch
        elapsed = time.perf_counter() - start
        metrics: dict[str, Any] = {
            "step": self.step, "epoch": round(self.step * self.global_batch / len(self.dataset), 4),
            "loss": total_loss, "lr": lr, "grad_norm": grad_norm, "t_mean": float(sums[-1]) / self.global_batch,
            "step_time_s": round(elapsed, 4), "samples_per_s": round(self.global_batch / max(elapsed, 1e-9), 3)}
        if len(self.dits.dits) > 1:
            for i, d in enumerate(self.dits.dits):
                n = int(sums[2 * i + 1])
                metrics[f"loss_{d.name}"] = float(sums[2 * i]) / n if n else None
                metrics[f"samples_{d.name}"] = n
                if d.name in lrs:
                    metrics[f"lr_{d.name}"] = lrs[d.name]
            # DiT weights copied to the device in this step, and the seconds it took (see model.dit_schedule)
            metrics["dit_loads"] = self.dits.moves - moves
            metrics["dit_load_s"] = round(self.dits.move_seconds - move_s, 4)
        return self.finish_step(metrics, rows)

    def begin_step(self, rows: list[dict]) -> None:
        """Hook before the step's first micro-batch (stage 2 gathers the step's routing statistics here)."""

    def finish_step(self, metrics: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
        """Hook after the optimizer step: add metrics (stage 2: loss terms, expert usage, warnings)."""
        return metrics

    @torch.no_grad()
    def evaluate(self, num_samples: int = 8, seed: int = 12345) -> float:
        """Mean loss over fixed samples (dataset items, noise and t drawn from ``seed``), without training.

        The same ``seed`` gives the same samples before and after training, so the difference is the
        adapters' doing, not the noise of the training loss.
        """
        saved = self.s.seed
        self.s.seed = seed
        try:
            rows = [self._prepare_row(p, self.sampler) for p in range(num_samples)]
        finally:
            self.s.seed = saved
        total = 0.0
        for dit_index, chunk in self._groups(rows):
            dit = self.dits.activate(self.dits.dits[dit_index])
            sample = self.flow_sample(dit, chunk)
            context = torch.stack([r["item"]["context"].float() for r in chunk]).to(dit.placement.device)
            with dit.adapters(self.eval_gains(dit, chunk, sample.t)):
                pred = dit.predict_sample(sample, context, self.autocast)
            total += float(per_sample_loss(pred, sample.target, sample.loss_weights).sum())
        return total / num_samples

    def eval_gains(self, dit: TrainableDiT, rows: list[dict], t: torch.Tensor) -> torch.Tensor:
        """Slot gains of evaluation rows (stage 2 overrides it with its trained gates)."""
        return self.gains([r["item"] for r in rows], dit)

    # -- checkpoints --------------------------------------------------------------------------------

    def lora_moe(self) -> LoraMoE:
        sets = {}
        for d in self.dits:
            extra = self.model_sets.get(d.name, {})
            sets[d.name] = d.bank.to_adapter_set(d.name, fingerprint=self._fingerprints[d.name],
                                                 sigma_range=d.t_range if len(self.dits) > 1 or d.name != "default"
                                                 else None, model=extra.get("model"), router=extra.get("router"))
        return LoraMoE(self.expert_names, sets)

    def training_state(self, weights_name: str) -> dict[str, Any]:
        pos = self.step * self.global_batch
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step,
                "total_steps": self.s.total_steps, "global_batch": self.global_batch,
                "world_size": self.dist.world_size, "batch_size": self.s.batch_size,
                "grad_accum": self.s.grad_accum, "samples_seen": pos, "dataset_size": len(self.dataset),
                "epoch": pos // len(self.dataset), "position_in_epoch": pos % len(self.dataset),
                "dataset_id": self.dataset_id, "seed": self.s.seed, "weights": weights_name,
                "dit_sets": self.dits.names, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                "config": json.dumps(self.config, sort_keys=True), "time": time.time()}

    def save_checkpoint(self, tag: str | None = None, barrier: bool = True) -> Path:
        """Write ``checkpoints/<tag>.safetensors`` + ``<tag>.state.pt`` and point ``latest.json`` at them.

        ``barrier=False``: the first process writes without waiting for the others (an interrupted run, whose
        other processes may be gone)."""
        ckdir = checkpoint_dir(self.out_dir)
        tag = tag or f"step_{self.step:06d}"
        weights = ckdir / f"{tag}.safetensors"
        state = ckdir / f"{tag}.state.pt"
        if self.dist.is_main:
            save_lora_moe(self.lora_moe(), weights)
            atomic_torch_save(self.training_state(weights.name), state)
            atomic_write_text(ckdir / "latest.json",
                              json.dumps({"step": self.step, "weights": weights.name, "state": state.name}) + "\n")
            self._prune(ckdir)
        if barrier:
            self.dist.barrier()
        return state

    def _prune(self, ckdir: Path) -> None:
        if self.s.keep_last <= 0:
            return
        steps = sorted(ckdir.glob("step_*.state.pt"))
        for old in steps[:-self.s.keep_last]:
            stem = old.name[: -len(".state.pt")]
            for p in (old, ckdir / f"{stem}.safetensors"):
                p.unlink(missing_ok=True)

    def resume(self, state_path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, RNG and data position from a checkpoint."""
        state_path = Path(state_path)
        if state_path.is_dir():  # a run folder (its checkpoints/latest.json) or a checkpoints folder
            ckdir = checkpoint_dir(state_path) if (state_path / "checkpoints").is_dir() else state_path
            pointer = latest_checkpoint(ckdir.parent) if ckdir.name == "checkpoints" else None
            if pointer is None:
                raise ResumeError(f"{state_path}: no checkpoint to resume from (no checkpoints/latest.json); "
                                  "start without --resume")
            state_path = ckdir / pointer["state"]
        if not state_path.is_file():
            raise ResumeError(f"{state_path}: checkpoint state file not found")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ResumeError(f"{state_path}: not a readable training state ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ResumeError(f"{state_path}: not a training state written by this trainer")
        if state.get("version") != STATE_VERSION:
            raise ResumeError(f"{state_path}: state version {state.get('version')} is not supported")
        self._check_compatible(state, state_path)
        weights = state_path.parent / state["weights"]
        moe = load_lora_moe(weights)
        for d in self.dits:
            if d.name not in moe.sets:
                raise ResumeError(f"{weights}: has no adapter set {d.name!r} (holds {list(moe.sets)})")
            d.bank.load_adapter_set(moe.sets[d.name], source=str(weights))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. a checkpoint from before per-DiT parameter groups
            raise ResumeError(f"{state_path}: its optimizer state does not fit this run ({e})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.restore_extra(state, moe)
        if self.dist.is_main:
            self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d (epoch %d, position %d)", state_path, self.step, state["epoch"],
                 state["position_in_epoch"])

    def restore_extra(self, state: dict[str, Any], moe: LoraMoE) -> None:
        """Hook on resume, after weights and optimizer: stage 2 restores its routers and monitor state."""

    def _check_compatible(self, state: dict, path: Path) -> None:
        problems = []
        if state["global_batch"] != self.global_batch:
            problems.append(f"global batch {state['global_batch']} (now {self.global_batch}: batch_size x "
                            "grad_accum x processes)")
        if state["dataset_size"] != len(self.dataset) or (self.dataset_id and state["dataset_id"] != self.dataset_id):
            problems.append(f"dataset ({state['dataset_size']} windows then, {len(self.dataset)} now, or other "
                            "clips/cache settings)")
        if state["dit_sets"] != self.dits.names:
            problems.append(f"DiTs {state['dit_sets']} (now {self.dits.names})")
        old = json.loads(state["config"])
        for section, values in self.config.items():
            for key, value in values.items():
                name = f"{section}.{key}"
                if name in RESUME_MUTABLE_KEYS:
                    continue
                before = old.get(section, {}).get(key, value)
                if before != value:
                    problems.append(f"{name} = {before!r} then, {value!r} now")
        if problems:
            raise ResumeError(f"{path}: cannot resume exactly, the run differs from the checkpoint's:\n  - "
                              + "\n  - ".join(problems)
                              + f"\nKeys that may change on resume: {', '.join(RESUME_MUTABLE_KEYS)}")

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
        atomic_write_text(self.metrics_path, "".join(x + "\n" for x in kept))

    # -- the loop -------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = None
        if self.dist.is_main and self.s.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.s.total_steps, initial=self.step, desc="training", unit="step",
                       dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
        losses: list[float] = []
        ema = None
        checkpoint = None
        interrupted = False
        tensorboard = open_writer(self.out_dir, self.step) if self.dist.is_main and self.s.tensorboard else None
        # Ctrl-C / SIGTERM: the first process stops at once (outside an optimizer update) and saves the last
        # finished step; the others finish their step, so no collective the first one waits in is abandoned.
        self.interrupts = InterruptGuard(defer=not self.dist.is_main).__enter__()  # left in `finally`, after a save
        try:
            with torch.inference_mode(False), torch.enable_grad():
                while self.step < self.s.total_steps:
                    metrics = self.train_step()
                    losses.append(metrics["loss"])
                    ema = metrics["loss"] if ema is None else 0.9 * ema + 0.1 * metrics["loss"]
                    if self.dist.is_main and (self.step % self.s.log_every == 0 or self.step == self.s.total_steps):
                        with open(self.metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(metrics) + "\n")
                        if tensorboard is not None:
                            log_scalars(tensorboard, metrics, self.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", avg=f"{ema:.4f}", lr=f"{metrics['lr']:.2e}")
                        bar.update(1)
                    if self.s.save_every and self.step % self.s.save_every == 0 and self.step < self.s.total_steps:
                        with self.interrupts.critical():
                            checkpoint = self.save_checkpoint()
                    for cb in self.callbacks:
                        cb(self.step, metrics)
                    self.interrupts.check()
                    if self.stop_requested:
                        log.warning("stopping at step %d: %s", self.step, self.stop_requested)
                        break
                with self.interrupts.critical():
                    checkpoint = self.save_checkpoint("final")
        except KeyboardInterrupt:
            interrupted = True
            if self.dist.is_main and self.step > 0:
                pointer = latest_checkpoint(self.out_dir)
                if pointer is None or pointer.get("step") != self.step:
                    self.interrupts.defer = True  # a second signal (torchrun forwards Ctrl-C) waits for the save
                    checkpoint = self.save_checkpoint(barrier=False)
                    log.warning("interrupted: saved step %d to %s; continue with --resume", self.step, checkpoint)
            raise
        except Exception:
            if self.dist.enabled and self.interrupts is not None and self.interrupts.requested:
                raise KeyboardInterrupt from None  # a collective failed because another process stopped first
            raise
        finally:
            self.interrupts.__exit__(None, None, None)
            self.interrupts = None
            if bar is not None:
                bar.close()
            if tensorboard is not None:
                tensorboard.close()
            self.dits.release()
        plots = []
        if self.dist.is_main and self.s.plot:
            from .plots import plot_metrics

            plots = plot_metrics(self.metrics_path, self.out_dir)
        return TrainResult(self.step, losses, self.out_dir, checkpoint, self.metrics_path, plots, interrupted)


def total_steps_for(epochs: float, max_steps: int, dataset_size: int, global_batch: int) -> int:
    if max_steps > 0:
        return int(max_steps)
    return max(1, math.ceil(epochs * dataset_size / global_batch))


__all__ = ["LoopSettings", "RESUME_MUTABLE_KEYS", "ResumeError", "TrainResult", "Trainer", "base_only_gains",
           "latest_checkpoint", "lr_lambda", "total_steps_for"]
