"""Stage 1: train the vanilla base LoRA that stage 2 freezes.

    python -m training.stage1 --demo                               # CPU demo, about a minute
    python -m training.stage1 --config run.toml [--resume [PATH]] [--set train.learning_rate=5e-5]
    torchrun --nproc_per_node 4 -m training.stage1 --config run.toml    # data parallel
    python -m training.stage1 --print-config                       # every key, its default and meaning

Output in ``output.dir``: ``<name>.safetensors`` (one DiT) or ``<name>_high_noise.safetensors`` +
``<name>_low_noise.safetensors`` (A14B pair): standard LoRAs in ComfyUI's key format, loadable by
LoraLoaderModelOnly and by ``moe_core`` as the base of a LoRA-MoE; ``checkpoints/`` (LoRA-MoE files + full
training state; ``--resume`` continues from the newest), ``metrics.jsonl``, ``loss.png``, ``config.toml``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from moe_core.comfy_runtime import ensure_comfy

log = logging.getLogger("training")


@dataclass
class Stage1Result:
    loras: dict[str, Path]
    out_dir: Path
    steps: int
    losses: list[float]
    checkpoint: Path | None
    metrics: Path
    plots: list[Path]
    trainer: Any = None
    data: Any = None


class TrainingSetupError(RuntimeError):
    """The run cannot start (output folder already used, incompatible data and model, ...)."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from .adapters import AdapterConfigError
    from .config import ConfigError
    from .data.labels import NoInstrumentError
    from .data.manifest import ManifestError
    from .data.video_io import VideoReadError
    from .encoders import EncoderFileError, NoUsableClipsError
    from .loop import ResumeError
    from .models import ModelFileError
    from moe_core.checkpoint import LoraMoEFormatError

    return (ConfigError, ManifestError, NoInstrumentError, ModelFileError, EncoderFileError, NoUsableClipsError,
            ResumeError, AdapterConfigError, TrainingSetupError, VideoReadError, LoraMoEFormatError)


# ------------------------------------------------------------------------------------------- building

def dit_specs(cfg) -> list[tuple[str, str]]:
    """``(set name, model spec)`` of the DiTs the run trains: ``default``, or the A14B pair's trained sides."""
    m = cfg.model
    if m.dit:
        return [("default", m.dit)]
    return [(n, m.dit_high if n == "high_noise" else m.dit_low) for n in ("high_noise", "low_noise")
            if n in m.train_dits and (m.dit_high if n == "high_noise" else m.dit_low)]


def resolve_family(cfg, log_fn: Callable[[str], None] | None = None):
    """The config with its family-dependent values settled from the DiT file(s) (header only, before any
    encoding): ``data.family`` (the cache's; a configured family other than the DiT's is refused),
    ``model.boundary`` ("auto": the family's, T2V 0.875 / I2V 0.9), ``data.max_frames`` and
    ``data.target_fps`` (0: the family's, 81 frames at 16 fps; TI2V 5B 121 at 24). Also refuses a TI2V 5B
    DiT given as an A14B pair and a pair of two families. Returns ``(cfg, family)``."""
    import dataclasses

    from moe_core.families import FAMILIES, ModelFamilyError, family_from_dims
    from .model_files import HeaderError, is_safetensors, read_header, wan_dit_layout
    from .models import ModelFileError, resolve_model_path

    m, d = cfg.model, cfg.data
    families, paths = {}, {}
    for name, spec in dit_specs(cfg):
        path = resolve_model_path(spec, f"{name} DiT" if name != "default" else "DiT")
        if not is_safetensors(path):
            continue  # .pt/.ckpt: the loaded model is checked instead
        try:
            header = read_header(path)
        except (OSError, HeaderError):
            continue  # precheck_dit names the file's problem
        layout = wan_dit_layout(header.shapes)
        if layout is None:
            continue
        try:
            families[name] = family_from_dims(layout.in_channels, layout.out_channels, f"DiT model {path}")
            paths[name] = path
        except ModelFamilyError as e:
            raise ModelFileError(str(e)) from None
    if not families:
        fam = FAMILIES["t2v" if d.family == "auto" else d.family]
    else:
        names = {f.name for f in families.values()}
        if len(names) > 1:
            raise TrainingSetupError("model.dit_high and model.dit_low are DiTs of different families ("
                                     + ", ".join(f"{n} {paths[n]}: {f.title}" for n, f in families.items())
                                     + "): an A14B pair is two DiTs of one model")
        fam = next(iter(families.values()))
    if m.dit_high and not fam.pair:
        raise TrainingSetupError(f"model.dit_high / model.dit_low hold {fam.title}, which is one DiT, not a "
                                 "high/low-noise pair: set model.dit instead")
    if d.family != "auto" and d.family != fam.name:
        raise TrainingSetupError(f"data.family = {d.family!r}, but the DiT is {fam.title} (family {fam.name!r}, "
                                 f"{fam.in_dim} input latent channels): the cache must be built for the DiT's "
                                 f"family; set data.family = \"{fam.name}\" or \"auto\"")
    boundary = m.boundary
    if boundary == "auto":
        boundary = fam.boundary if fam.boundary is not None else FAMILIES["t2v"].boundary
    elif fam.boundary is not None and m.dit_high and abs(boundary - fam.boundary) > 1e-9:
        other = next((f for f in FAMILIES.values() if f.boundary is not None and f.name != fam.name
                      and abs(boundary - f.boundary) < 1e-9), None)
        if other is not None:  # another pair's switch: almost surely a config copied from that model's
            raise TrainingSetupError(
                f"model.boundary = {boundary:g} is the {other.title} pair's switch, but the DiTs are {fam.title}, "
                f"which ComfyUI's workflows switch at t = {fam.boundary:g}: the low-noise DiT would never train "
                f"on the t it samples between the two; set model.boundary = \"auto\" (or another value on purpose)")
        if log_fn is not None:
            log_fn(f"warning: model.boundary = {boundary:g}, while {fam.title} switches DiTs at t = "
                   f"{fam.boundary:g} in ComfyUI's workflows (model.boundary = \"auto\" uses it)")
    if log_fn is not None:
        for key, value, want in (("data.max_frames", d.max_frames, fam.frames),
                                 ("data.target_fps", d.target_fps, float(fam.fps))):
            if value and value != want and fam.name == "ti2v":
                log_fn(f"warning: {key} = {value:g}, while {fam.title} makes {fam.frames}-frame clips at "
                       f"{fam.fps} fps (0 uses the family's)")
    data = dataclasses.replace(d, family=fam.name, max_frames=d.max_frames or fam.frames,
                               target_fps=d.target_fps or float(fam.fps))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, boundary=float(boundary)), data=data)
    return cfg, fam


def build_dits(cfg, device, seed: int, expert_names: Sequence[str], log_fn=print, make_bank=None,
               offload_idle: bool | None = None, dist=None):
    """Load the DiT(s) of ``cfg.model`` through ComfyUI and put a fresh trainable base LoRA on each (or the
    bank ``make_bank(name, diffusion_model, target_spec, index)`` returns: stage 2).

    ``offload_idle``: keep the idle DiT of a pair in host memory (None: ``model.offload_idle_dit``, "auto" taken
    as true). DiTs that stay on the device are moved there as soon as they are loaded, and under ``torchrun``
    the processes of a machine load one after the other, so host memory never holds every process's copy of
    the DiTs at once; offloaded DiTs are backed by their (memory-mapped, shared) files where the weights allow.
    """
    from .adapters import AdapterBank, TargetSpec, resolve_blocks, target_linears
    from .models import DiTSet, Placement, TrainableDiT, a14b_ranges, check_pair, load_dit, resolve_model_path
    import torch

    m = cfg.model
    if m.dit:
        specs = [("default", m.dit, (0.0, 1.0))]
    elif m.dit_high:
        ranges = a14b_ranges(float(m.boundary))
        specs = [(n, m.dit_high if n == "high_noise" else m.dit_low, ranges[n])
                 for n in ("high_noise", "low_noise") if n in m.train_dits]
    else:
        raise TrainingSetupError("no model given: set model.dit (one DiT) or model.dit_high + model.dit_low "
                                 "(WAN 2.2 A14B), or run the demo with --demo")
    paths = {name: resolve_model_path(spec, f"{name} DiT" if name != "default" else "DiT") for name, spec, _ in specs}
    offload = (m.offload_idle_dit is not False) if offload_idle is None else bool(offload_idle)
    offload = offload and len(specs) > 1 and device.type != "cpu"  # only the idle DiT of a pair is offloaded
    placement = Placement(device=device, offload_device=torch.device("cpu"), offload_idle=offload,
                          stream_blocks=m.stream_blocks)
    from .init_lora import init_lora_specs, load_init_lora

    init_specs = init_lora_specs(cfg, [name for name, _, _ in specs])
    dits, patchers = [], {}
    local_rank, local_world = _local_turn(dist)
    for _ in range(local_rank):  # wait for the processes of this machine before this one to finish loading
        dist.barrier()
    for i, (name, _, t_range) in enumerate(specs):
        log_fn(f"loading {name} DiT {paths[name]}")
        mp = load_dit(paths[name], m.weight_dtype, what=f"{name} DiT" if name != "default" else "DiT")
        patchers[name] = mp
        dm = mp.model.diffusion_model
        num_layers = len(dm.blocks)
        lo = cfg.lora
        spec = TargetSpec(blocks=resolve_blocks(lo.target_blocks, num_layers, "lora.target_blocks"),
                          ffn_blocks=resolve_blocks(lo.ffn_blocks, num_layers, "lora.ffn_blocks"),
                          projections=tuple(lo.projections), ranks=lo.ranks(), alpha=lo.alpha)
        ranks = spec.modules()
        if not ranks:
            raise TrainingSetupError("lora.target_blocks and lora.ffn_blocks select no module")
        if make_bank is not None:
            bank = make_bank(name, dm, spec, i)
        else:
            bank = AdapterBank.fresh_base(target_linears(dm, spec), ranks, lo.alpha, seed=seed + 7919 * i,
                                          num_experts=len(expert_names))
            if name in init_specs:
                key, path = init_specs[name]
                log_fn(f"  {name} LoRA starts from {path} ({key})")
                load_init_lora(bank, path, key, name, log_fn, diffusion_model=dm)
        bank.to(device)
        dits.append(TrainableDiT(name, mp, bank, t_range, placement, cfg.train.gradient_checkpointing,
                                 source=str(paths[name])))
        if not offload:
            dits[-1].activate()  # on the device now: its host copy is freed before the next DiT loads
        else:
            backed = dits[-1].back_with_file(paths[name])
            if backed:
                log_fn(f"  {name} DiT: {backed / 2 ** 30:.1f} GiB of its weights wait in host memory as "
                       "memory-mapped file pages (shared by the processes of this machine)")
    for _ in range(local_world - 1 - local_rank):  # let the next processes load
        dist.barrier()
    if len(patchers) == 2:
        check_pair(patchers["high_noise"], patchers["low_noise"], paths["high_noise"], paths["low_noise"])
    return DiTSet(dits, boundary=float(m.boundary) if m.dit_high else None), paths


def _local_turn(dist) -> tuple[int, int]:
    """(local rank, processes on this machine) under torchrun; (0, 1) otherwise."""
    import os

    if dist is None or not dist.enabled:
        return 0, 1
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def sampler_for(cfg, dits):
    from .objective import TimestepSampler

    o = cfg.objective
    sampler = TimestepSampler(o.timestep_sampling, o.shift, o.t_min, o.t_max, o.logit_scale)
    lo = min(d.t_range[0] for d in dits)
    hi = max(d.t_range[1] for d in dits)
    return sampler.restricted(lo, hi)


def loop_settings(cfg, total_steps: int):
    from .loop import LoopSettings

    t, o, out = cfg.train, cfg.objective, cfg.output
    return LoopSettings(seed=t.seed, total_steps=total_steps, batch_size=t.batch_size, grad_accum=t.grad_accum,
                        learning_rate=t.learning_rate, lr_scheduler=t.lr_scheduler, warmup_steps=t.warmup_steps,
                        min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay,
                        betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, max_grad_norm=t.max_grad_norm,
                        mixed_precision=t.mixed_precision, roi_weight=o.roi_weight, save_every=out.save_every,
                        keep_last=out.keep_last, log_every=out.log_every, progress=out.progress, plot=out.plot,
                        dit_learning_rates={"high_noise": t.learning_rate_high, "low_noise": t.learning_rate_low},
                        dit_max_steps={"high_noise": t.max_steps_high, "low_noise": t.max_steps_low},
                        dit_schedule=cfg.model.dit_schedule, dit_switch_every=cfg.model.dit_switch_every,
                        tensorboard=out.tensorboard, start_frame_probability=o.start_frame_probability)


def memory_plan(cfg, device, log_fn: Callable[[str], None] = print):
    """The memory estimate of the configured run (printed before any big file is loaded), and whether the idle
    DiT of a pair is offloaded (``model.offload_idle_dit = "auto"``: not when both DiTs and training fit in 80%
    of the GPU). Video tokens per sample from ``data.max_frames`` and ``data.target_area`` (the buckets' size)."""
    import torch

    from .adapters import TargetSpec, resolve_blocks
    from .memory import estimate_memory, fits, read_dit_header
    from .models import resolve_model_path

    m, lo, t = cfg.model, cfg.lora, cfg.train
    specs = [m.dit] if m.dit else [m.dit_high if n == "high_noise" else m.dit_low for n in m.train_dits]
    infos = [read_dit_header(resolve_model_path(s)) for s in specs]
    info = infos[0]
    spec = TargetSpec(resolve_blocks(lo.target_blocks, info.num_layers, "lora.target_blocks"),
                      resolve_blocks(lo.ffn_blocks, info.num_layers, "lora.ffn_blocks"), tuple(lo.projections),
                      lo.ranks(), lo.alpha)
    modules = spec.modules()
    params = len(infos) * sum(r * (info.dim + (info.ffn_dim if n.endswith("ffn.0") else info.dim))
                              for n, r in modules.items())
    moe = getattr(cfg, "moe", None)
    if moe is not None:  # stage 2: N experts train (16 bytes a parameter), the base is a float32 buffer (4)
        params = int(len(moe.expert_names) * moe.expert_rank_scale * params + params // 4)
    first = min(int(n.split(".")[1]) for n in modules) if modules else info.num_layers
    from moe_core.families import FAMILIES

    fam = FAMILIES[cfg.data.family if cfg.data.family != "auto" else info.family]
    frames = cfg.data.max_frames or fam.frames
    cell = 2 * fam.spatial_compression  # pixels per DiT token side: the VAE's compression x the 2x2 patches
    tokens = math.ceil(((frames - 1) // 4 + 1) * cfg.data.target_area / cell ** 2)
    encoders = sum(Path(p).stat().st_size for p in (cfg.data.vae, cfg.data.text_encoder) if p and Path(p).is_file())
    cuda = device.type == "cuda"
    compute = 2 if (t.mixed_precision == "bf16" or cuda) else 4
    kwargs = dict(weight_dtype=m.weight_dtype, cuda=cuda, stream_blocks=m.stream_blocks, trainable_params=params,
                  tokens=tokens, first_adapted=first, checkpointing=t.gradient_checkpointing,
                  compute_bytes=compute, batch_size=t.batch_size, encoder_bytes=encoders)
    offload = m.offload_idle_dit is not False and len(infos) > 1 and device.type != "cpu"
    note = ""
    if len(infos) > 1 and cuda and m.offload_idle_dit == "auto":
        total = torch.cuda.get_device_properties(device).total_memory
        offload = not fits(estimate_memory(infos, offload_idle=False, **kwargs), total)
        note = (f"; model.offload_idle_dit = auto: {'the idle DiT waits in host memory' if offload else 'both DiTs stay on the GPU'}"
                f" ({total / 2 ** 30:.0f} GiB GPU)")
    est = estimate_memory(infos, offload_idle=offload, **kwargs)
    log_fn(est.format() + note)
    return est, offload


def check_data_fits(dataset, family) -> None:
    """The cached windows are what the DiT's family reads: latents of its VAE (``out_dim`` channels: 16, or 48
    for TI2V 5B), and for I2V the start image's latent (``image_cond_latent``) beside each."""
    item = dataset[0]
    channels = item["latent"].shape[0]
    if channels != family.latent_channels:
        raise TrainingSetupError(f"the cached latents (data.vae, data.cache_dir; window of {item.get('name', '?')}) "
                                 f"have {channels} channels but {family.title} works on "
                                 f"{family.latent_channels}-channel latents: the VAE does not belong to this DiT "
                                 "(WAN 2.1 / 2.2 A14B use the WAN 2.1 VAE with 16 channels; the WAN 2.2 TI2V 5B "
                                 "model uses the 2.2 VAE with 48)")
    if family.conditioning == "concat_image":
        cond = item.get("image_cond_latent")
        if cond is None or tuple(cond.shape) != tuple(item["latent"].shape):
            raise TrainingSetupError(f"the cached window of {item.get('name', '?')} has "
                                     f"{'no' if cond is None else 'a ' + str(list(cond.shape))} image_cond_latent, "
                                     f"but {family.title} reads the start image's latent, shaped like the latent "
                                     f"{list(item['latent'].shape)}: the cache must be built with data.family = "
                                     "\"i2v\"")


def _check_output_dir(out_dir: Path, resume: str | None, overwrite: bool) -> None:
    from .loop import latest_checkpoint

    if resume is not None:
        return
    pointer = latest_checkpoint(out_dir) if out_dir.is_dir() else None
    if pointer is not None and not overwrite:
        raise TrainingSetupError(
            f"output.dir {out_dir} already holds a run (checkpoint at step {pointer.get('step')}). Continue it with "
            "--resume, choose another output.dir, or pass --overwrite to start again there (its checkpoints "
            "are then replaced as the new run reaches them)")
    if overwrite:  # a fresh run: its log starts empty and --resume must not find the old run's pointer
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        (out_dir / "checkpoints" / "latest.json").unlink(missing_ok=True)


def export_loras(trainer, cfg, out_dir: Path, dit_paths: dict[str, Path]) -> dict[str, Path]:
    """The base LoRA of each DiT as a standard LoRA file (ComfyUI key format)."""
    import torch
    from moe_core.lora_formats import save_lora

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.output.save_dtype]
    out = {}
    for d in trainer.dits:
        name = cfg.output.name if d.name == "default" else f"{cfg.output.name}_{d.name}"
        path = out_dir / f"{name}.safetensors"
        meta = {"wan_lora_moe_stage": "1", "wan_lora_moe_set": d.name,
                "wan_lora_moe_fingerprint": json.dumps(trainer._fingerprints[d.name]),
                "wan_lora_moe_dit": Path(dit_paths[d.name]).name, "wan_lora_moe_steps": str(trainer.step),
                "wan_lora_moe_t_range": json.dumps(list(d.t_range)),
                "wan_lora_moe_model": json.dumps(_model_info(d))}
        save_lora(d.bank.base_lora(), path, dtype=dtype, metadata=meta)
        out[d.name] = path
    return out


@dataclass
class Stage1Setup:
    """Everything :func:`run_stage1` builds before training (tests drive the trainer from here)."""

    cfg: Any
    trainer: Any
    prepared: Any
    dit_paths: dict[str, Path]
    dist: Any
    device: Any
    say: Callable[[str], None]


def setup_stage1(cfg, resume: str | None = None, overwrite: bool = False, encoders: tuple | None = None,
                 callbacks: Sequence[Callable[[int, dict], None]] = (), log_fn: Callable[[str], None] = print,
                 hooks: Any = None) -> Stage1Setup:
    """Process group, demo assets, data cache, DiTs with fresh adapters, trainer (resumed if asked).

    ``hooks`` (stage 2, :class:`training.stage2.Stage2Hooks`) supplies the expert names, the adapter bank of
    each DiT (``make_bank(name, diffusion_model, target_spec, index)``) and the trainer
    (``make_trainer(cfg, dits, dataset, sampler, out_dir, say, **common)``); the rest is shared.
    """
    ensure_comfy()
    import os

    import torch

    from .config import config_to_dict
    from .encoders import dataset_id, precheck_encoders, prepare
    from .determinism import init_distributed, resolve_device
    from .loop import Trainer, total_steps_for
    from .models import precheck_dit, resolve_model_path
    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.model.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = init_distributed(device, cfg.train.dist_timeout_minutes)
    say = log_fn if dist.is_main else (lambda *_: None)
    try:
        if cfg.demo.enabled:
            from .demo import prepare_demo

            if dist.is_main:
                cfg = prepare_demo(cfg, say)
            dist.barrier()
            if not dist.is_main:
                cfg = prepare_demo(cfg, lambda *_: None)
        out_dir = Path(cfg.output.dir)
        if dist.is_main:
            _check_output_dir(out_dir, resume, overwrite or cfg.demo.enabled)
        # fail on a wrong model file before spending time on encoding
        dit_files = []
        for key in ("dit", "dit_high", "dit_low"):
            spec = getattr(cfg.model, key)
            if spec and (key == "dit" or key.replace("dit_", "") + "_noise" in cfg.model.train_dits):
                what = {"dit": "DiT", "dit_high": "high_noise DiT", "dit_low": "low_noise DiT"}[key]
                dit_files.append(resolve_model_path(spec, what))
                precheck_dit(dit_files[-1], what)
        cfg, family = resolve_family(cfg, say)

        _, offload = memory_plan(cfg, device, say)

        # data: the main process encodes what is missing, the others then find everything cached
        video_enc, text_enc = encoders if encoders is not None else (None, None)
        text_dim = precheck_encoders(cfg.data, dit_files[0] if dit_files else None, video=video_enc is None,
                                     text=text_enc is None)
        prepared = None
        if dist.is_main:
            prepared = prepare(cfg.data, say, video_enc, text_enc, text_dim=text_dim)
            say(prepared.format())
        dist.barrier()
        if not dist.is_main:
            prepared = prepare(cfg.data, None, video_enc, text_enc, text_dim=text_dim)
        dataset = prepared.dataset

        expert_names = list(hooks.expert_names) if hooks is not None else list(DEFAULT_EXPERT_NAMES)
        dits, dit_paths = build_dits(cfg, device, cfg.train.seed, expert_names, say,
                                     make_bank=hooks.make_bank if hooks is not None else None, offload_idle=offload,
                                     dist=dist)
        check_data_fits(dataset, dits.dits[0].family)
        if dits.dits[0].family.name != family.name:  # a .pt/.ckpt file whose header could not tell
            raise TrainingSetupError(f"the DiT is {dits.dits[0].family.title}, but the data were prepared for "
                                     f"family {family.name!r}: set data.family = \"{dits.dits[0].family.name}\"")

        global_batch = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size
        sampler = sampler_for(cfg, dits)
        common = dict(dataset_id=dataset_id(prepared), dist=dist, callbacks=callbacks,
                      model_sets={d.name: {"model": _model_info(d)} for d in dits})
        if hooks is not None:  # stage 2: its own dataset split and trainer
            trainer = hooks.make_trainer(cfg, dits, dataset, sampler, out_dir, say, **common)
            dataset = trainer.dataset
            total = trainer.s.total_steps
        else:
            total = total_steps_for(cfg.train.epochs, cfg.train.max_steps, len(dataset), global_batch)
            trainer = Trainer(dits, dataset, sampler, loop_settings(cfg, total), out_dir, config_to_dict(cfg),
                              expert_names, **common)
        if not trainer.schedule.training(max(0, total - 1)):
            raise TrainingSetupError(f"train.max_steps_high / max_steps_low: no DiT trains after step "
                                     f"{max(cfg.train.max_steps_high, cfg.train.max_steps_low)}, but the run has "
                                     f"{total} steps")
        if resume is not None:
            trainer.resume(out_dir if resume == "auto" else resume)
        n_params = sum(p.numel() for p in trainer.params)
        high = (f", {sampler.fraction_above(dits.boundary):.0%} of samples on the high-noise DiT"
                if dits.boundary is not None and len(dits) == 2 else "")
        say(f"training {', '.join(dits.names)}: {len(dits.dits[0].bank.names)} adapted modules per DiT, "
            f"{n_params:,} trainable parameters; {len(dataset)} windows, global batch {global_batch} "
            f"({dist.world_size} process(es)), {total} steps from step {trainer.step}; t in "
            f"[{sampler.t_min:g}, {sampler.t_max:g}] ({sampler.sampling}, shift {sampler.shift:g}){high}; "
            f"device {device}")
        if len(dits) > 1:
            lrs = [f"{g['name']} {g['initial_lr']:g}" for g in trainer.optimizer.param_groups]
            every = f" (every {cfg.model.dit_switch_every} steps)" if cfg.model.dit_schedule != "per_sample" else ""
            say(f"A14B: model.dit_schedule = {cfg.model.dit_schedule}{every}; learning rates {', '.join(lrs)}"
                + "".join(f"; {n} trains the first {s} steps" for n, s in trainer.s.dit_max_steps.items() if s))
        from .validation_render import attach_renderer

        attach_renderer(trainer, cfg, say)  # output.render_every: clips every N steps, after the checkpoint
        return Stage1Setup(cfg, trainer, prepared, dit_paths, dist, device, say)
    except BaseException:
        if dist.initialized_here:
            torch.distributed.destroy_process_group()
        raise


def run_stage1(cfg, resume: str | None = None, overwrite: bool = False, encoders: tuple | None = None,
               callbacks: Sequence[Callable[[int, dict], None]] = (), log_fn: Callable[[str], None] = print
               ) -> Stage1Result:
    """Run stage 1 for a validated :class:`~training.config.Stage1Config` (the CLI and the tests call this).

    Args:
        resume: ``"auto"`` (newest checkpoint in output.dir), a ``.state.pt`` path or a run folder; None = new run.
        overwrite: allow a new run in an output.dir that already holds checkpoints.
        encoders: ``(video, text)`` encoders to use instead of the configured ones (tests).
        callbacks: ``fn(step, metrics)`` after each optimizer step.
    """
    import torch

    from .config import to_toml
    from moe_core.atomic import atomic_write_text

    setup = setup_stage1(cfg, resume, overwrite, encoders, callbacks, log_fn)
    cfg, trainer, dist, say = setup.cfg, setup.trainer, setup.dist, setup.say
    out_dir = Path(cfg.output.dir)
    try:
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "config.toml", to_toml(cfg))
        start = time.time()
        result = trainer.train()
        loras = export_loras(trainer, cfg, out_dir, setup.dit_paths) if dist.is_main else {}
        for d in trainer.dits:
            if all(float(p.detach().abs().max()) == 0.0 for n, p in d.bank.named_trainable() if n.endswith(".up")):
                say(f"warning: the {d.name} DiT received no training sample (its LoRA is all zeros): train "
                    "longer, or check objective.t_min/t_max against the A14B boundary")
        dist.barrier()
        if dist.is_main:
            say(f"done: {result.steps} steps in {time.time() - start:.1f} s; final loss {result.losses[-1]:.4f}"
                if result.losses else f"done: already at step {result.steps}")
            for name, path in loras.items():
                say(f"  LoRA ({name}): {path}")
            say(f"  metrics: {result.metrics}" + (f"; plot: {result.plots[0]}" if result.plots else ""))
        return Stage1Result(loras, out_dir, result.steps, result.losses, result.checkpoint, result.metrics,
                            result.plots, trainer, setup.prepared)
    finally:
        if dist.initialized_here:
            torch.distributed.destroy_process_group()


def _model_info(dit) -> dict[str, int]:
    from .models import model_info

    return model_info(dit.mp)


# -------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.stage1",
        description="Stage 1 of the WAN LoRA-MoE: train the vanilla base LoRA (frozen in stage 2).",
        epilog="Any config key can be overridden: --set train.learning_rate=5e-5 or --train.learning_rate 5e-5. "
               "Run with --print-config to see every key.")
    p.add_argument("--config", type=Path, help="TOML config (see training/configs/stage1.toml)")
    p.add_argument("--demo", action="store_true",
                   help="run the built-in CPU demo config (synthetic clips, tiny random models)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue the run in output.dir from its newest checkpoint, or from PATH (.state.pt)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an output.dir that holds one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print how much GPU and host memory the configured run needs (from the files' headers) "
                        "and exit")
    return p


def load_cli_config(args, extra_overrides: Sequence[str]):
    from .config import DEMO_TOML, Stage1Config, load_config

    overrides = list(args.overrides) + list(extra_overrides)
    if args.demo and args.config:
        raise SystemExit("error: give either --demo or --config, not both")
    if args.demo:
        return load_config(Stage1Config, text=DEMO_TOML, overrides=overrides)
    return load_config(Stage1Config, args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_comfy()
    from .config import ConfigError, Stage1Config, split_dotted_flags, to_toml

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rest, dotted = split_dotted_flags(argv, Stage1Config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    errors = _known_errors()
    try:
        cfg = load_cli_config(args, dotted)
        if args.print_config:
            print(to_toml(cfg), end="")
            return 0
        if args.estimate_memory:
            from .determinism import resolve_device

            cfg, _ = resolve_family(cfg)
            memory_plan(cfg, resolve_device(cfg.model.device), print)
            return 0
        if not args.config and not args.demo:
            print("error: give --config run.toml (or --demo for the CPU demo); --print-config shows every key",
                  file=sys.stderr)
            return 2
        run_stage1(cfg, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume (same config)", file=sys.stderr)
        return 130
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
