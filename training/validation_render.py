"""Validation renders while training (``output.render_every``): one short clip per instrument, every N steps.

A loss curve says little about what a video model has learned; a clip does. Every ``render_every`` optimizer
steps (after that step's checkpoint, on the first process; the others wait at a barrier) the trainer samples
one clip per instrument and writes ``renders/step_000100/<instrument>.mp4`` (at the family's fps: 16, TI2V 24),
a ``contact_sheet.png`` of their frames and ``render.json`` (each clip's caption, window and start image) into
``output.dir``.

What a render runs, so that it shows the file as ComfyUI would sample it at that step:

* the prompt is the cached text embedding of one training window per instrument (the first window labelled
  with it; no text encoder is loaded while training), the latent has that window's size;
* ComfyUI's own sampler (``comfy.sample.sample``, what KSampler / KSamplerAdvanced run: euler, simple
  schedule) on a clone of the trained DiT's ModelPatcher with ComfyUI's ``ModelSamplingSD3`` shift; an A14B
  pair is split at ``model.boundary`` into a high-noise and a low-noise KSamplerAdvanced pass as the bundled
  workflow does (``training.generate.boundary_step``; the boundary the pair trains with: T2V 0.875, I2V 0.9);
* image-to-video families are conditioned by ComfyUI's own core nodes, as their workflows do: I2V A14B by
  ``WanImageToVideo`` (the start image encoded into ``concat_latent_image`` + ``concat_mask`` of both
  conditionings), TI2V 5B by ``Wan22ImageToVideoLatent`` (the start image's latent in latent frame 0 and a
  ``noise_mask`` that keeps it). The start image is ``output.render_start_image``, or else the first frame of the
  instrument's window, cut from its clip as the cache cut it (same bucket, so the render's size);
* the adapters are ``moe_core.patch``'s inference runtime (``MoERuntime``: its DIFFUSION_MODEL wrapper computes
  each call's gains with ``moe_core.gating.GateController`` and ``LoraMoEForward`` adds them), reading the
  adapter bank's *current* tensors: stage 1 the base LoRA at gain 1; stage 2 the file defaults the run will
  write, the learned router of that DiT (``learned`` routing of the caption; ``rule`` without a router);
* decoding with ``data.vae`` loaded as ComfyUI's VAELoader does (``comfy.sd.VAE``).

The trainer keeps its DiTs where it placed them: ComfyUI is told that the weights are loaded already, so
``load_models_gpu`` moves nothing and only applies the clone's object patches, which are taken off again after
each pass (the trainer's own object patches are off meanwhile: ComfyUI's clones share one backup of the layers'
forwards, ``ModelPatcher.clone``); then the DiT that was on the device goes back there with the trainer's
patches, and the RNG states are restored. Training after a render is exactly what it would have been without
it (``tests/test_validation_render.py`` compares metrics, LoRAs and RNG states with a run without renders).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger("training")

SHIFT = 8.0  # ModelSamplingSD3 shift of the bundled workflow
FPS = 16.0
SAMPLER, SCHEDULER = "euler", "simple"  # the bundled workflow's KSamplerAdvanced


@dataclass(frozen=True)
class RenderSettings:
    """``output.render_*`` of the config, plus what the bundled workflow fixes."""

    every: int
    steps: int = 8
    seed: int = 0
    cfg: float = 1.0
    shift: float = SHIFT
    fps: float = FPS

    @classmethod
    def from_config(cls, cfg, fps: float = FPS) -> "RenderSettings":
        """``fps``: the model family's (``ModelFamily.fps``), the rate its clips play at."""
        o = cfg.output
        return cls(o.render_every, o.render_steps, o.render_seed, o.render_cfg, fps=float(fps))

    def due(self, step: int) -> bool:
        return bool(self.every) and step > 0 and step % self.every == 0


@dataclass
class RenderPrompt:
    """One clip to render: the instrument, its training window's caption, text embedding and latent size;
    for image-to-video families also the start image and where it came from."""

    instrument: str
    caption: str
    context: torch.Tensor  # [L, 4096]
    latent_shape: tuple[int, ...]  # [C, F, H, W]
    window: str
    start_image: torch.Tensor | None = None  # [1, H, W, 3] in [0, 1], an IMAGE as ComfyUI passes it
    start_source: str = ""  # "<clip> window <i> frame 0 (source frame <n>)" or the file's path


# ------------------------------------------------------------------------------------------ prompts

def _primaries(trainer) -> list[int | None]:
    """Each training window's instrument (index into ``trainer.expert_names``), None where it has none."""
    targets = getattr(trainer, "targets", None)
    if targets is not None:  # stage 2: the labels it trains with
        return list(targets.primary)
    dataset = trainer.dataset
    labels, entries = getattr(dataset, "labels", None), getattr(dataset, "entries", None)
    if labels and entries is not None:  # stage 1: the data pipeline's labels, read without loading tensors
        found = [labels.get(e.record.video_path) for e in entries]
        return [None if lab is None else int(lab.primary) for lab in found]
    return [dataset[i].get("primary") for i in range(len(dataset))]


def _entry(dataset, index: int):
    """The cache entry (``LatentEntry``) behind item ``index`` of a dataset or a ``Subset`` of one; None for
    datasets without entries."""
    while hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # torch.utils.data.Subset
        index, dataset = int(dataset.indices[index]), dataset.dataset
    entries = getattr(dataset, "entries", None)
    return entries[index] if entries is not None else None


def read_start_image(path: str | Path) -> torch.Tensor:
    """An image file as ComfyUI's LoadImage gives it: ``[1, H, W, 3]`` float RGB in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"output.render_start_image = {str(path)!r}: cannot read it as an image ({e})") from e
    return torch.from_numpy(rgb)[None]


def window_start_image(entry, extraction) -> tuple[torch.Tensor, str]:
    """The first frame of a cached window, cut from its clip exactly as the cache cut it (``load_clip`` with the
    run's ``ExtractionConfig``: same resampling and bucket), as ``[1, H, W, 3]`` in [0, 1]; and a line naming it."""
    from .data.video_io import frames_to_tensor, load_clip

    clip = load_clip(entry.record.video_path, extraction)
    window = next((w for w in clip.windows if w.index == entry.window_index), None)
    if window is None:
        raise ValueError(f"clip {entry.record.video_path} no longer has window {entry.window_index} (changed since it "
                         "was cached?): set output.render_start_image")
    image = frames_to_tensor(window.frames[:1], "unit").float()
    return image, (f"{entry.record.name} window {entry.window_index} frame 0 (source frame "
                   f"{int(window.source_indices[0])})")


def render_prompts(trainer, extraction=None, start_image: str | Path | None = None) -> list[RenderPrompt]:
    """The first training window of each instrument, in expert order (instruments without a window: none).

    Image-to-video families (``trainer.dits``' family) also get a start image: the file ``start_image`` for
    every instrument, else the window's first frame (``extraction``: the cache's ``ExtractionConfig``).
    """
    names = list(trainer.expert_names)
    first: dict[int, int] = {}
    for i, primary in enumerate(_primaries(trainer)):
        if primary is not None and 0 <= primary < len(names) and primary not in first:
            first[primary] = i
            if len(first) == len(names):
                break
    image_conditioned = trainer.dits.dits[0].family.image_conditioned
    from_file = read_start_image(start_image) if image_conditioned and start_image else None
    prompts = []
    for e in sorted(first):
        item = trainer.dataset[first[e]]
        if "context" not in item:
            raise ValueError(f"window {item.get('name', first[e])} has no cached text embedding to render with")
        prompt = RenderPrompt(names[e], str(item.get("caption", "")), item["context"].float(),
                              tuple(item["latent"].shape), str(item.get("name", first[e])))
        if from_file is not None:
            prompt.start_image, prompt.start_source = from_file, str(start_image)
        elif image_conditioned:
            entry = _entry(trainer.dataset, first[e])
            if entry is None or extraction is None:
                raise ValueError(f"window {prompt.window}: no clip to take the start image of an image-to-video "
                                 "render from: set output.render_start_image")
            prompt.start_image, prompt.start_source = window_start_image(entry, extraction)
        prompts.append(prompt)
    return prompts


# ------------------------------------------------------------------------------------------- gates

def gate_config(trainer, dit, prompt: RenderPrompt, experts: bool = True, alpha_base: float | None = None):
    """(``GateConfig``, learned router or None) of one DiT for one prompt, as the run's file would sample it.

    Stage 1 (no ``trainer.defaults``): the base LoRA at gain 1, experts off, as it trains. Stage 2: the file
    defaults and the DiT's learned router with ``learned`` routing of the caption (``rule`` without a router).
    ``experts=False`` / ``alpha_base`` force the experts off or the base's strength (tests, comparisons).
    """
    from moe_core.band import ALWAYS_ON
    from moe_core.gating import GateConfig
    from moe_core.routing import rule_route

    d = getattr(trainer, "defaults", None)
    if d is None:
        return GateConfig(alpha_base=1.0 if alpha_base is None else float(alpha_base), alpha_expert=1.0,
                          routing=None, band=ALWAYS_ON), None
    router = getattr(trainer, "routers", {}).get(dit.name)
    routing = None
    if experts:
        routing = rule_route(prompt.caption or prompt.instrument, list(trainer.expert_names),
                             keywords=getattr(trainer, "expert_keywords", None), fallback=prompt.instrument,
                             top_k=d.top_k, temperature=d.temperature,
                             mode="learned" if router is not None else "rule")
    return GateConfig(alpha_base=d.alpha_base if alpha_base is None else float(alpha_base),
                      alpha_expert=d.alpha_expert, routing=routing, band=d.band, ema_beta=d.ema_beta,
                      uncond="same", max_gate=d.max_gate, clip_level=d.clip_level), router


class _LiveAdapters:
    """The adapter bank's current tensors behind ``moe_core.patch.AdapterWeights``' interface: stacked (with
    ``moe_core.fused.stack_adapters``, as the bank stacks them for training) once per device and dtype."""

    def __init__(self, bank):
        self.bank = bank
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}

    def for_compute(self, device: torch.device, dtype: torch.dtype) -> tuple[list, list]:
        from moe_core.fused import stack_adapters

        key = (device, dtype)
        if key not in self._cache:
            with torch.no_grad():
                ab = [tuple(t.detach().to(device, dtype) for t in stack_adapters(p.adapters()))
                      for p in self.bank.projections]
            self._cache[key] = (ab, [s.to(device) for s in self.bank._slot_index])
        return self._cache[key]


def render_model(dit, expert_names: Sequence[str], config, router, shift: float = SHIFT):
    """A clone of the DiT's ModelPatcher that samples with the bank's current adapters and ``config``'s gates,
    with ComfyUI's ModelSamplingSD3 ``shift``; the trainer's own patcher is untouched."""
    from comfy.patcher_extension import WrappersMP
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from moe_core.gating import GateController
    from moe_core.patch import KEY, LoraMoEForward, MoERuntime

    bank = dit.bank
    runtime = MoERuntime(_LiveAdapters(bank), GateController(list(expert_names), config, router))
    m = dit.mp.clone()
    m.load_device = dit.placement.device  # sample where the trainer keeps the weights
    for i, module in enumerate(bank.names):
        layer = m.get_model_object(f"diffusion_model.{module}")
        m.add_object_patch(f"diffusion_model.{module}.forward",
                           LoraMoEForward(layer, runtime, i, bank.layout_ids[i]))
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, runtime.diffusion_model_wrapper)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, runtime.outer_sample_wrapper)
    return ModelSamplingSD3().patch(m, shift)[0]


_LOAD_STATE = ("device", "model_loaded_weight_memory", "model_lowvram", "current_weight_patches_uuid")


@contextlib.contextmanager
def weights_in_place(patcher, device: torch.device):
    """ComfyUI samples ``patcher`` with the weights where the trainer put them.

    The trainer places its DiTs itself (``TrainableDiT.activate``: idle DiT in host memory, streamed blocks),
    without ComfyUI's bookkeeping. Recorded as fully loaded on ``device``, the model is one that
    ``load_models_gpu`` only re-patches (``ModelPatcher.partially_load`` returns before moving a weight or
    setting a lowvram flag), so sampling neither moves weights nor changes how the layers cast them. Afterwards
    the clone's object patches come off (ComfyUI puts back the layers' own forwards: take the trainer's patches
    off before, and put them back after), ComfyUI forgets the model, and the bookkeeping is as before.
    """
    import comfy.model_management as mm

    model = patcher.model
    saved = {k: getattr(model, k) for k in _LOAD_STATE}
    model.device = device
    model.model_loaded_weight_memory = max(1, patcher.model_size())
    model.model_lowvram = False
    model.current_weight_patches_uuid = patcher.patches_uuid
    try:
        yield patcher
    finally:
        for loaded in [lm for lm in mm.current_loaded_models if lm.model is patcher]:
            mm.current_loaded_models.remove(loaded)
            if loaded.model_finalizer is not None:
                loaded.model_finalizer.detach()
                loaded.model_finalizer = None
        patcher.unpatch_model(device_to=None, unpatch_weights=False)
        for k, v in saved.items():
            setattr(model, k, v)


# ------------------------------------------------------------------------------------------ sampling

def segments(dits, steps: int, shift: float = SHIFT) -> list[tuple[object, int, int]]:
    """``(DiT, start_step, last_step)`` passes: the A14B pair split at its boundary (the high-noise DiT's
    KSamplerAdvanced, then the low-noise one's), one DiT for every step otherwise (also a pair's one DiT when
    ``model.train_dits`` trains only it)."""
    if len(dits) == 2 and dits.boundary is not None:
        from .generate import boundary_step

        split = boundary_step(steps, shift, dits.boundary)
        passes = [(dits.by_name("high_noise"), 0, split), (dits.by_name("low_noise"), split, steps)]
        return [p for p in passes if p[2] > p[1]]
    return [(dits.dits[0], 0, steps)]


def node_inputs(family, prompt: RenderPrompt, vae=None) -> tuple[list, list, dict]:
    """``(positive, negative, latent)`` as the family's workflow hands them to KSampler(Advanced).

    T2V: the caption's embedding, an all-zero one, an empty latent (EmptyHunyuanLatentVideo). I2V: both
    conditionings through core ``WanImageToVideo`` with the start image; TI2V: the empty-text conditionings and
    core ``Wan22ImageToVideoLatent``'s latent (start image in latent frame 0) and ``noise_mask``. The nodes encode
    with ``vae`` (``data.vae``); ComfyUI forgets it afterwards, as after decoding.
    """
    positive = [[prompt.context[None].float(), {}]]
    negative = [[torch.zeros_like(prompt.context[None]).float(), {}]]
    c, f, h, w = prompt.latent_shape
    if not family.image_conditioned:
        return positive, negative, {"samples": torch.zeros((1, c, f, h, w))}
    if prompt.start_image is None or vae is None:
        raise ValueError(f"{family.title} renders need a start image and the VAE (render of {prompt.instrument})")
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent, WanImageToVideo

    size = dict(width=w * family.spatial_compression, height=h * family.spatial_compression, length=1 + 4 * (f - 1),
                batch_size=1, start_image=prompt.start_image)
    with torch.no_grad(), _forgotten(vae):
        if family.conditioning == "concat_image":
            positive, negative, latent = WanImageToVideo.execute(positive, negative, vae, **size).args
        else:
            latent = Wan22ImageToVideoLatent.execute(vae, **size).args[0]
    return positive, negative, latent


def sample_prompt(trainer, prompt: RenderPrompt, settings: RenderSettings, experts: bool = True,
                  alpha_base: float | None = None, vae=None, inputs: tuple | None = None) -> torch.Tensor:
    """The sampled latent ``[1, C, F, H, W]`` (VAE space, as KSampler returns it) of one prompt.

    Like ComfyUI's ``common_ksampler``: seeded noise on the workflow's latent (:func:`node_inputs`; ``inputs``
    when the caller made them already, else made with ``vae``), its ``noise_mask``, ``comfy.sample.sample``
    per pass (the second pass of a pair adds no noise and continues from the first one's leftover noise).
    """
    import comfy.sample

    dits = trainer.dits
    positive, negative, latent = inputs if inputs is not None else node_inputs(dits.dits[0].family, prompt, vae)
    x, noise_mask = latent["samples"], latent.get("noise_mask")
    passes = segments(dits, settings.steps, settings.shift)
    try:
        for k, (dit, start, end) in enumerate(passes):
            dits.activate(dit)
            # ComfyUI's clones share one backup of the layers' own forwards: the trainer's object patches
            # come off first, or taking the clone's off would leave the plain forwards behind them
            dit.release()
            config, router = gate_config(trainer, dit, prompt, experts, alpha_base)
            was_training = router.training if router is not None else False
            if router is not None:
                router.eval()
            try:
                model = render_model(dit, trainer.expert_names, config, router, settings.shift)
                x = comfy.sample.fix_empty_latent_channels(model, x)
                noise = (comfy.sample.prepare_noise(x, settings.seed) if k == 0
                         else torch.zeros(x.size(), dtype=x.dtype, layout=x.layout, device="cpu"))
                with torch.no_grad(), weights_in_place(model, dit.placement.device):
                    x = comfy.sample.sample(model, noise, settings.steps, settings.cfg, SAMPLER, SCHEDULER,
                                            positive, negative, x, denoise=1.0, disable_noise=k > 0,
                                            start_step=start, last_step=end, force_full_denoise=k == len(passes) - 1,
                                            noise_mask=noise_mask, disable_pbar=True, seed=settings.seed)
            finally:
                if router is not None:
                    router.train(was_training)
    finally:
        if dits._active is not None:
            dits._active.activate()  # the DiT on the device gets the trainer's object patches back
    return x.float().cpu()


# ------------------------------------------------------------------------------------------ decoding

def load_vae(path: str | Path):
    """``data.vae`` as ComfyUI's VAELoader loads it (the caching pipeline's loader); returns a ``comfy.sd.VAE``."""
    from .data.cache import ComfyVAEEncoder

    return ComfyVAEEncoder.from_file(path).vae


@contextlib.contextmanager
def _forgotten(vae):
    """ComfyUI forgets ``vae`` when the block ends (it goes back to host memory, leaving the device to training)."""
    import comfy.model_management as mm

    try:
        yield vae
    finally:
        for loaded in [lm for lm in mm.current_loaded_models if lm.model is vae.patcher]:
            mm.current_loaded_models.remove(loaded)
            loaded.model_unload()


def decode(vae, latent: torch.Tensor) -> np.ndarray:
    """uint8 RGB frames ``[F, H, W, 3]`` as VAEDecode + SaveVideo make them; ComfyUI then forgets the VAE."""
    with torch.no_grad(), _forgotten(vae):
        images = vae.decode(latent)
    images = images.reshape(-1, *images.shape[-3:])
    return (images.float() * 255).clamp(0, 255).byte().cpu().numpy()


def _slug(name: str) -> str:
    from .mission import _slug as slug

    return slug(name)


# ------------------------------------------------------------------------------------------ renderer

class ValidationRenderer:
    """The trainer callback (``fn(step, metrics)``) that renders every ``settings.every`` steps."""

    def __init__(self, trainer, settings: RenderSettings, vae_path: str | Path,
                 log_fn: Callable[[str], None] = print, extraction=None, start_image: str | Path | None = None):
        self.trainer = trainer
        self.settings = settings
        self.vae_path = Path(vae_path)
        self.say = log_fn
        self.extraction = extraction  # the cache's ExtractionConfig: where image-to-video start frames come from
        self.start_image = start_image  # output.render_start_image (None / "": from the data)
        self.vae = None
        self.prompts: list[RenderPrompt] | None = None
        self.inputs: dict[str, tuple] = {}  # node_inputs by instrument (the start image's encoding is fixed)
        self.latents: dict[str, torch.Tensor] = {}  # of the last render, by instrument
        self.rendered: list[Path] = []  # folders written

    def __call__(self, step: int, metrics: dict) -> None:
        if not self.settings.due(step):
            return
        if self.trainer.dist.is_main:
            try:
                self.render(step)
            except Exception as e:  # a diagnostic: the step's checkpoint is written, training goes on
                log.warning("validation render at step %d failed (%s: %s); training continues", step,
                            type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
        self.trainer.dist.barrier()

    def render(self, step: int) -> Path:
        """Render every prompt with the weights as they are now into ``renders/step_<step>/``."""
        from moe_core.atomic import atomic_path

        from .data.video_io import write_video
        from .determinism import rng_state, set_rng_state
        from .report import contact_sheet

        start = time.perf_counter()
        out = Path(self.trainer.out_dir) / "renders" / f"step_{step:06d}"
        out.mkdir(parents=True, exist_ok=True)
        if self.prompts is None:
            self.prompts = render_prompts(self.trainer, self.extraction, self.start_image)
        if self.vae is None:
            self.vae = load_vae(self.vae_path)
        family = self.trainer.dits.dits[0].family
        dits = self.trainer.dits
        active = dits._active
        state = rng_state()  # ComfyUI's noise seeds the global generator: training must not notice
        rows = []
        try:
            for prompt in self._progress(self.prompts, step):
                if prompt.instrument not in self.inputs:
                    self.inputs[prompt.instrument] = node_inputs(family, prompt, self.vae)
                latent = sample_prompt(self.trainer, prompt, self.settings, inputs=self.inputs[prompt.instrument])
                self.latents[prompt.instrument] = latent
                frames = decode(self.vae, latent)
                write_video(out / f"{_slug(prompt.instrument)}.mp4", frames, self.settings.fps)
                rows.append((prompt.instrument, frames))
            if rows:
                with atomic_path(out / "contact_sheet.png") as tmp:
                    contact_sheet(rows, tmp)
                with atomic_path(out / "render.json") as tmp:
                    tmp.write_text(json.dumps(self._record(step, family), indent=1), encoding="utf-8")
        finally:
            set_rng_state(state)
            if active is not None:
                dits.activate(active).activate()  # back on the device, with the trainer's object patches
        self.rendered.append(out)
        self.say(f"step {step}: rendered {len(rows)} validation clip(s) into {out} "
                 f"({time.perf_counter() - start:.1f} s)")
        return out

    def _record(self, step: int, family) -> dict:
        """What ``render.json`` says: the settings and, per clip, its caption, window and start image."""
        s = self.settings
        return {"step": step, "family": family.name, "steps": s.steps, "seed": s.seed, "cfg": s.cfg,
                "shift": s.shift, "fps": s.fps, "boundary": self.trainer.dits.boundary,
                "clips": [{"instrument": p.instrument, "file": f"{_slug(p.instrument)}.mp4", "caption": p.caption,
                           "window": p.window, **({"start_image": p.start_source} if p.start_source else {})}
                          for p in self.prompts or []]}

    def _progress(self, prompts: list[RenderPrompt], step: int):
        if not getattr(self.trainer.s, "progress", False):
            return prompts
        from tqdm import tqdm

        return tqdm(prompts, desc=f"rendering step {step}", unit="clip", leave=False, dynamic_ncols=True)


def attach_renderer(trainer, cfg, log_fn: Callable[[str], None] = print) -> ValidationRenderer | None:
    """Add the validation renderer to ``trainer.callbacks`` when ``output.render_every`` asks for it; the VAE
    file is found now (a missing one fails before training), loaded at the first render."""
    family = trainer.dits.dits[0].family
    settings = RenderSettings.from_config(cfg, family.fps)
    if not settings.every:
        return None
    from .encoders import extraction_config, resolve_in_folder

    path = resolve_in_folder(cfg.data.vae, "vae", "VAE")
    start_image = getattr(cfg.output, "render_start_image", "") if family.image_conditioned else ""
    if start_image:
        read_start_image(start_image)  # an unreadable file fails now, not at the first render
    renderer = ValidationRenderer(trainer, settings, path, log_fn, extraction_config(cfg.data, family.name),
                                  start_image or None)
    if trainer.dist.is_main:  # a file ComfyUI cannot load fails now, not at the first render
        from .encoders import EncoderFileError

        try:
            renderer.vae = load_vae(path)
        except Exception as e:
            raise EncoderFileError(f"data.vae = {str(path)!r}: ComfyUI cannot load it as a VAE for "
                                   f"output.render_every ({type(e).__name__}: {e})") from e
    trainer.callbacks.append(renderer)
    start = (f"; start image {start_image}" if start_image else "; start image: the first frame of each "
             "instrument's first window") if family.image_conditioned else ""
    log_fn(f"validation renders every {settings.every} steps: one clip per instrument, {settings.steps} sampler "
           f"steps, cfg {settings.cfg:g}, seed {settings.seed}{start}, into {Path(cfg.output.dir) / 'renders'}")
    return renderer


__all__ = ["RenderPrompt", "RenderSettings", "ValidationRenderer", "attach_renderer", "decode", "gate_config",
           "load_vae", "node_inputs", "read_start_image", "render_model", "render_prompts", "sample_prompt",
           "segments", "weights_in_place", "window_start_image"]
