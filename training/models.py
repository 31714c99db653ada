"""WAN DiTs for training, loaded through ComfyUI's own loaders, with the adapters installed.

* :func:`resolve_model_path` takes a path, or a file name in ComfyUI's ``models/diffusion_models`` (or the
  legacy ``models/unet``) folders as ``folder_paths`` knows them; nothing is ever downloaded.
* :func:`load_dit` runs ``comfy.sd.load_diffusion_model`` (what the UNETLoader node runs) and checks that the
  result is a WAN 2.2 DiT of a supported family (``moe_core.families``: T2V / I2V A14B, TI2V 5B), naming the
  file in every error.
* :class:`TrainableDiT` is one DiT being trained: its ``ModelPatcher``, its :class:`~training.adapters.AdapterBank`
  (object patches with ``moe_core``'s forward), the noise range it owns, device placement (idle DiT on the
  CPU, optional streaming of the first blocks' weights for 24 GB cards) and the forward used by the loop:
  frozen blocks in front of the first adapted block run under ``torch.no_grad``, the adapted blocks (and any
  after them) under gradient checkpointing, both through ComfyUI's own block-replacement hook
  (``transformer_options["patches_replace"]["dit"]``), so WAN's forward itself is untouched.
* :class:`DiTSet` is the set trained in one run: one DiT (``default``), or the WAN 2.2 A14B pair
  (``high_noise`` for t >= boundary, ``low_noise`` below; the boundary is the family's: 0.875 T2V, 0.9 I2V).
* :class:`FlowSample` is one micro-batch as the DiT sees it in ComfyUI's sampler, built by
  :meth:`TrainableDiT.flow_sample`: the noisy latent and, per family, the image conditioning (I2V: mask and
  start-image latent concatenated by the model's own ``concat_cond``; TI2V: the start frame kept clean and its
  per-frame timesteps from the model's own ``process_timestep``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint

from moe_core.checkpoint import A14B_BOUNDARY
from moe_core.families import ModelFamily, ModelFamilyError, family_of_model

from .adapters import AdapterBank, block_of
from .moe_losses import predicted_clean
from .objective import noisy_input

log = logging.getLogger("training.models")

WEIGHT_DTYPES = {
    "default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}
MODEL_FOLDERS = ("diffusion_models", "unet")


class ModelFileError(ValueError):
    """A model file that cannot be used for training; the message names the file and says why."""


# ------------------------------------------------------------------------------------------- loading

def _folder_paths():
    import folder_paths  # ComfyUI's top-level module (on sys.path after ensure_comfy)

    return folder_paths


def resolve_model_path(spec: str, what: str = "DiT", base_dir: str | os.PathLike | None = None) -> Path:
    """A model file from a path (absolute, or relative to ``base_dir``/the working directory) or a name
    in ComfyUI's ``diffusion_models`` / ``unet`` folders."""
    if not spec or not str(spec).strip():
        raise ModelFileError(f"no {what} model given")
    candidates = [Path(spec).expanduser()]
    if base_dir is not None and not Path(spec).is_absolute():
        candidates.insert(0, Path(base_dir) / spec)
    for c in candidates:
        if c.is_file():
            return c.absolute()
        if c.exists():
            raise ModelFileError(f"{what} model {c}: not a file")
    searched: list[str] = []
    try:
        fp = _folder_paths()
        for folder in MODEL_FOLDERS:
            hit = fp.get_full_path(folder, str(spec))
            if hit:
                return Path(hit).absolute()
            searched.extend(fp.get_folder_paths(folder))
        names = sorted({n for folder in MODEL_FOLDERS for n in fp.get_filename_list(folder)})
    except Exception as e:  # pragma: no cover - folder_paths unavailable
        names = []
        searched.append(f"(ComfyUI model folders unavailable: {e})")
    listing = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "none"
    raise ModelFileError(
        f"{what} model {spec!r} not found: it is neither an existing file nor a model name in ComfyUI's "
        f"folders ({', '.join(searched) or 'none'}). Models found there: {listing}")


def precheck_dit(path: str | os.PathLike, what: str = "DiT") -> None:
    """Cheap check (header only) that a file looks like a WAN DiT, so a wrong file fails before caching."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return  # .ckpt/.pt: only the full load can tell
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception as e:
        raise ModelFileError(f"{what} model {path}: not a readable safetensors file (truncated download or another "
                             f"format): {e}") from None
    if not any(k.endswith("head.modulation") for k in keys) or not any(".self_attn.q.weight" in k for k in keys):
        sample = ", ".join(keys[:3])
        kind = ("a LoRA" if any("lora" in k for k in keys[:50]) else
                "a VAE" if any(k.startswith(("encoder.", "decoder.")) for k in keys[:50]) else
                "a text encoder" if any("encoder.block" in k or "shared.weight" in k for k in keys[:50]) else
                "not a WAN DiT")
        raise ModelFileError(f"{what} model {path}: this looks like {kind} (keys such as {sample}); a WAN DiT "
                             "has blocks.N.self_attn.q.weight and head.modulation")


def load_dit(path: str | os.PathLike, weight_dtype: str = "default", what: str = "DiT"):
    """Load a WAN DiT through ``comfy.sd.load_diffusion_model``; returns a ``ModelPatcher``.

    Raises:
        ModelFileError: unreadable or corrupt file, not a diffusion model, not WAN, or not text-to-video.
    """
    import comfy.ldm.wan.model
    import comfy.sd

    path = Path(path)
    if weight_dtype not in WEIGHT_DTYPES:
        raise ModelFileError(f"weight_dtype {weight_dtype!r} is not one of {sorted(WEIGHT_DTYPES)}")
    if not path.is_file():
        raise ModelFileError(f"{what} model {path}: file not found")
    precheck_dit(path, what)
    options = {}
    if WEIGHT_DTYPES[weight_dtype] is not None:
        options["dtype"] = WEIGHT_DTYPES[weight_dtype]
    try:
        mp = comfy.sd.load_diffusion_model(str(path), model_options=options)
    except Exception as e:  # ComfyUI raises RuntimeError/ValueError/safetensors errors with varied texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(
            f"{what} model {path}: ComfyUI cannot load it as a diffusion model ({first}). Expected a WAN 2.1/2.2 "
            "text-to-video DiT .safetensors (e.g. wan2.2_t2v_high_noise_14B_fp16.safetensors), not a VAE, text "
            "encoder, LoRA or truncated download.") from e
    dm = getattr(mp.model, "diffusion_model", None)
    if not isinstance(dm, comfy.ldm.wan.model.WanModel):
        raise ModelFileError(f"{what} model {path}: ComfyUI detected {type(mp.model).__name__} "
                             f"({type(dm).__name__}), not a WAN DiT")
    if getattr(dm, "model_type", "t2v") != "t2v" or type(dm) is not comfy.ldm.wan.model.WanModel:
        raise ModelFileError(f"{what} model {path}: a WAN {getattr(dm, 'model_type', '?')} / {type(dm).__name__} "
                             "model (CLIP-vision image embeddings, VACE, camera or audio inputs); this trainer "
                             "trains WAN 2.2 T2V A14B, I2V A14B and TI2V 5B DiTs")
    try:
        family_of_model(dm, f"{what} model {path}")
    except ModelFamilyError as e:
        raise ModelFileError(str(e)) from None
    return mp


def model_info(mp) -> dict[str, int | str]:
    """The DiT's shape and family, as LoRA-MoE files record it (``wan_lora_moe_model``, adapter sets' ``model``)."""
    dm = mp.model.diffusion_model
    return {"dim": int(dm.dim), "num_layers": len(dm.blocks), "ffn_dim": int(dm.blocks[0].ffn_dim),
            "in_dim": int(dm.patch_embedding.in_channels), "out_dim": int(dm.out_dim),
            "family": family_of_model(dm).name}


def recorded_family_problem(source: str, record, diffusion_model) -> str | None:
    """Why adapters recorded for a model (a stage-1 LoRA's ``wan_lora_moe_model`` metadata, a LoRA-MoE set's
    ``model``) do not fit ``diffusion_model``'s family; None when they fit or record no family. The block names
    and, for T2V/I2V A14B, every adapted layer's shape are the same in the families, so only the record tells."""
    from moe_core.families import family_mismatch, family_of_record

    if isinstance(record, str):
        import json

        try:
            record = json.loads(record)
        except ValueError:
            return None
    if not isinstance(record, dict):
        return None
    try:
        recorded = family_of_record(record)
    except ModelFamilyError as e:
        return f"{source}: {e}"
    return family_mismatch(source, recorded, family_of_model(diffusion_model))


@dataclass
class FlowSample:
    """One micro-batch as the DiT meets it in ComfyUI's sampler, and what the loss compares.

    Attributes:
        x_t: the noisy latents [B, C, F, H, W] (TI2V with a start frame: latent frame 0 is the clean start latent,
            as the sampler's ``KSamplerX0Inpaint`` puts it back before every model call).
        target: the velocity ``noise - x0`` [B, C, F, H, W].
        t: the noise level [B] of the generated frames: what the gates see (the sampler's ``sigmas``).
        x0: the normalised clean latents (``process_latent_in``).
        concat: I2V: the 20 channels (4 mask + 16 start-image latent) that ``model_base.WAN21.concat_cond``
            appends to ``x_t`` (ComfyUI passes them as ``c_concat``); None otherwise.
        denoise_mask: TI2V with a start frame: [B, 1, F, H, W], 0 on the kept start frame, 1 on the generated
            frames (``Wan22ImageToVideoLatent``'s ``noise_mask``); None when every frame is generated.
    """

    x_t: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    concat: torch.Tensor | None = None
    denoise_mask: torch.Tensor | None = None

    @property
    def loss_weights(self) -> torch.Tensor | None:
        """[B, 1, F, H, W] weights that leave the kept start frame out of the loss (None: all frames count)."""
        return self.denoise_mask

    def clean_estimate(self, velocity: torch.Tensor) -> torch.Tensor:
        """x0 from a velocity, with the kept start frame as the sampler returns it (the clean start latent)."""
        x0_hat = predicted_clean(self.x_t, velocity, self.t)
        if self.denoise_mask is None:
            return x0_hat
        return x0_hat * self.denoise_mask + self.x0.float() * (1.0 - self.denoise_mask)


# ------------------------------------------------------------------------------------------ one DiT

@dataclass
class Placement:
    """Where weights live while training.

    Attributes:
        device: compute device.
        offload_device: where an idle DiT waits (the CPU).
        offload_idle: move the DiT that is not training right now to ``offload_device`` (A14B pairs).
        stream_blocks: number of leading blocks whose weights stay on ``offload_device`` and are copied to
            the device layer by layer in each forward (ComfyUI's lowvram casting). They run without
            autograd, so nothing of them is kept for the backward pass.
    """

    device: torch.device
    offload_device: torch.device
    offload_idle: bool = True
    stream_blocks: int = 0


class TrainableDiT:
    """One DiT with its adapter bank: placement, forward for training, fingerprint."""

    def __init__(self, name: str, model_patcher, bank: AdapterBank, t_range: tuple[float, float],
                 placement: Placement, gradient_checkpointing: bool = True, source: str = "<memory>"):
        self.name = name
        self.mp = model_patcher
        self.bank = bank
        self.t_range = (float(t_range[0]), float(t_range[1]))
        self.placement = placement
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.source = source
        self.first_adapted = min(block_of(n) for n in bank.names)
        num_layers = len(self.diffusion_model.blocks)
        if placement.stream_blocks > self.first_adapted:
            raise ValueError(f"stream_blocks = {placement.stream_blocks}, but block {self.first_adapted} is "
                             "adapted: only blocks in front of the first adapted block can be streamed")
        self.num_layers = num_layers
        self._patches_applied = False
        self._active = False
        self._host: dict[tuple[int, str], tuple[torch.nn.Module, str, torch.Tensor, bool]] = {}
        self.mp.model.requires_grad_(False)
        bank.install(self.mp)
        self._block_patches = self._make_block_patches()

    @property
    def diffusion_model(self) -> torch.nn.Module:
        return self.mp.model.diffusion_model

    @property
    def compute_dtype(self) -> torch.dtype:
        model = self.mp.model
        return model.manual_cast_dtype if model.manual_cast_dtype is not None else model.get_dtype()

    def owns(self, t: float) -> bool:
        lo, hi = self.t_range
        return lo <= t < hi or (hi >= 1.0 and t == 1.0)

    # -- placement ----------------------------------------------------------------------------------

    def _apply_object_patches(self) -> None:
        if not self._patches_applied:
            self.mp.patch_model(load_weights=False)  # ComfyUI applies the object patches (our forwards)
            self._patches_applied = True

    def activate(self) -> bool:
        """Make this DiT ready to run: object patches applied, weights and adapters on the device.

        Returns whether weights were copied to the device (what a DiT switch costs when the idle DiT waits in
        host memory)."""
        self._apply_object_patches()
        if self._active:
            return False
        device, stream = self.placement.device, self.placement.stream_blocks
        keep_host = self.placement.offload_idle and device != self.placement.offload_device
        dm = self.diffusion_model
        streamed = set()
        for i in range(stream):
            for m in dm.blocks[i].modules():
                streamed.add(id(m))
                if hasattr(m, "comfy_cast_weights"):  # comfy.ops layer: cast weights per call
                    if not hasattr(m, "prev_comfy_cast_weights"):
                        m.prev_comfy_cast_weights = m.comfy_cast_weights
                    m.comfy_cast_weights = True
        moved = False
        for m in dm.modules():
            if id(m) in streamed:
                continue
            for name, p in list(m.named_parameters(recurse=False)):
                if p.device != device:
                    if keep_host:
                        self._host[(id(m), name)] = (m, name, p.data, True)
                    p.data = p.data.to(device)
                    moved = True
            for name, b in list(m.named_buffers(recurse=False)):
                if b.device != device:
                    if keep_host:
                        self._host[(id(m), name)] = (m, name, b, False)
                    setattr(m, name, b.to(device))
                    moved = True
        if stream and device.type == "cuda":
            for i in range(stream):
                for p in dm.blocks[i].parameters():
                    if not p.data.is_pinned():
                        p.data = p.data.pin_memory()
        self.bank.to(device)
        self._active = True
        return moved

    def deactivate(self) -> None:
        """Send the weights back to host memory (the idle DiT of an A14B pair), if the placement offloads.

        The frozen weights never change, so their host copies (kept by :meth:`activate`, or file-backed by
        :meth:`back_with_file`) are simply put back: nothing is copied from the device."""
        if not self._active:
            return
        off = self.placement.offload_device
        if self.placement.offload_idle and off != self.placement.device:
            for m, name, host, is_param in self._host.values():
                if is_param:
                    getattr(m, name).data = host
                else:
                    setattr(m, name, host)
            self._host.clear()
            self.diffusion_model.to(off)  # anything without a host copy; the adapters stay (optimizer state)
            if self.placement.device.type == "cuda":
                torch.cuda.empty_cache()
        self._active = False

    def back_with_file(self, path: str | os.PathLike) -> int:
        """Let host-resident weights that equal a tensor of the model file be read-only views of that file.

        Safetensors are memory-mapped: such weights live in the page cache, which every process of a
        ``torchrun`` job on the machine shares and the kernel can drop and re-read, instead of a private copy
        per process. Weights converted on loading (another dtype) keep their private copy. Returns the bytes
        now backed by the file.
        """
        path = Path(path)
        if path.suffix.lower() not in (".safetensors", ".sft"):
            return 0
        from safetensors import safe_open

        backed = 0
        dm = self.diffusion_model
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            prefix = next((k[: -len("head.modulation")] for k in keys if k.endswith("head.modulation")), "")
            for m_name, m in dm.named_modules():
                for name, p in list(m.named_parameters(recurse=False)):
                    key = f"{prefix}{m_name}.{name}" if m_name else f"{prefix}{name}"
                    if key not in keys or p.device.type != "cpu":
                        continue
                    view = f.get_tensor(key)
                    if view.dtype == p.dtype and view.shape == p.shape and torch.equal(view, p.data):
                        p.data = view
                        backed += view.numel() * view.element_size()
        return backed

    def release(self) -> None:
        """Undo ComfyUI's object patches (the layers get their plain forwards back)."""
        if self._patches_applied:
            self.mp.unpatch_model(unpatch_weights=False)
            self._patches_applied = False

    # -- forward ------------------------------------------------------------------------------------

    def _make_block_patches(self) -> dict:
        """ComfyUI ``patches_replace['dit']`` entries: no_grad in front, checkpointing from the first adapted block."""
        patches = {}

        def frozen(args, extra):
            with torch.no_grad():
                return extra["original_block"](args)

        def checkpointed_block(block: torch.nn.Module):
            # ComfyUI's own `original_block` closure reads the loop variable `block` late, so when the
            # backward pass recomputes it, it would run the *last* block. Call the block module directly,
            # exactly as ComfyUI's block_wrap does (t2v: no image context, context_img_len None).
            def patch(args, extra):
                def run(img):
                    return block(img, context=args["txt"], e=args["vec"], freqs=args["pe"], context_img_len=None,
                                 transformer_options=args["transformer_options"])

                if not torch.is_grad_enabled():
                    return {"img": run(args["img"])}
                return {"img": torch.utils.checkpoint.checkpoint(run, args["img"], use_reentrant=False)}

            return patch

        for i in range(self.num_layers):
            if i < self.first_adapted:
                patches[("double_block", i)] = frozen
            elif self.gradient_checkpointing:
                patches[("double_block", i)] = checkpointed_block(self.diffusion_model.blocks[i])
        return patches

    @contextlib.contextmanager
    def adapters(self, gains: torch.Tensor) -> Iterator[None]:
        """Scope of one model call *and its backward pass*: the bank's stacked adapters and scales are set."""
        self.bank.begin(gains, self.placement.device, self.compute_dtype)
        try:
            yield
        finally:
            self.bank.end()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                autocast_dtype: torch.dtype | None = None, concat: torch.Tensor | None = None,
                denoise_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The DiT's velocity prediction (float32) for noisy latents ``x_t`` [B, C, F, H, W] at noise ``t`` [B].

        Inputs are prepared as ComfyUI's ``BaseModel._apply_model`` prepares them: ``concat`` (I2V, from
        :meth:`flow_sample`) appended to the latents on the channel axis, latents and context cast to the
        model's compute dtype, timestep ``1000 * t`` in float32, turned into per-frame timesteps by the model's
        own ``process_timestep`` when a TI2V ``denoise_mask`` keeps a start frame. Call inside :meth:`adapters`.
        """
        if self.bank.ab is None:
            raise RuntimeError("TrainableDiT.predict must run inside `with dit.adapters(gains):`")
        device, dtype = self.placement.device, self.compute_dtype
        x = x_t.to(device)
        if concat is not None:
            x = torch.cat([x, concat.to(device, x.dtype)], dim=1)
        x = x.to(dtype)
        ctx = context.to(device, dtype)
        timestep = (t.to(device=device, dtype=torch.float32) * 1000.0)
        if denoise_mask is not None:
            timestep = self.mp.model.process_timestep(timestep, x=x_t, denoise_mask=denoise_mask.to(device, dtype))
        opts = {"patches_replace": {"dit": self._block_patches}}
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                out = self.diffusion_model(x, timestep, ctx, transformer_options=opts)
        else:
            out = self.diffusion_model(x, timestep, ctx, transformer_options=opts)
        return out.float()

    def predict_sample(self, sample: FlowSample, context: torch.Tensor,
                       autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`predict` for a :class:`FlowSample` (its latents, noise level and image conditioning)."""
        return self.predict(sample.x_t, sample.t, context, autocast_dtype, sample.concat, sample.denoise_mask)

    @property
    def family(self) -> ModelFamily:
        return family_of_model(self.diffusion_model)

    def flow_sample(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    image_cond: torch.Tensor | None = None, start_frame: torch.Tensor | None = None) -> FlowSample:
        """The DiT's input for raw VAE ``latents`` [B, C, F, H, W], ``noise`` and noise levels ``t`` [B], as
        ComfyUI's sampler builds it for this DiT's family (each step calls the loaded model's own code).

        * T2V: ``x_t = (1 - t)·x0 + t·noise`` with ``x0 = process_latent_in(latents)``.
        * I2V: the same ``x_t`` plus the conditioning of core ``WanImageToVideo``: ``image_cond`` [B, 16, F, H, W]
          (the raw VAE latent of the start image followed by 0.5-gray frames) and a mask of ones with latent
          frame 0 at 0, turned into the 20 extra input channels by ``model_base.WAN21.concat_cond``.
        * TI2V: rows with ``start_frame`` [B] (bool) keep latent frame 0 clean (the start image's latent, as core
          ``Wan22ImageToVideoLatent`` writes it and the sampler keeps it) and get a ``denoise_mask`` that is 0
          there; the loss then leaves that frame out. Rows without are plain text-to-video samples.
        """
        device = self.placement.device
        x0 = self.process_latent_in(latents.to(device).float())
        x_t, target = noisy_input(x0, noise.to(device), t.to(device))
        fam = self.family
        concat = mask = None
        if fam.conditioning == "concat_image":
            if image_cond is None:
                raise ValueError(f"the {fam.title} DiT needs the start image's latent (image_cond_latent) of every "
                                 "sample: rebuild the cache for this family")
            mask = torch.ones_like(x0[:, :1])
            mask[:, :, 0] = 0.0  # WanImageToVideo: 0 on the latent frame of the start image
            concat = self.mp.model.concat_cond(noise=x_t, concat_latent_image=image_cond.to(device).float().clone(),
                                               concat_mask=mask, device=device)
            mask = None
        elif fam.conditioning == "latent_image" and start_frame is not None and bool(start_frame.any()):
            mask = torch.ones_like(x0[:, :1])
            mask[start_frame.to(device), :, 0] = 0.0
            full = mask.expand_as(x0)  # the sampler's mask, one per latent channel (prepare_mask)
            x_t = x_t * full + x0 * (1.0 - full)  # KSamplerX0Inpaint; WAN22.scale_latent_inpaint is the latent
        return FlowSample(x_t, target, t.to(device), x0, concat, mask)

    def process_latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the normalised latents the DiT works on (what ComfyUI's sampler does first)."""
        return self.mp.model.process_latent_in(latent)

    def fingerprint(self) -> list[float]:
        from moe_core.patch import model_fingerprint

        return model_fingerprint(self.mp)


class DiTSet:
    """The DiTs trained in one run, each owning a noise range: one ``default`` DiT, or the A14B pair."""

    def __init__(self, dits: Sequence[TrainableDiT], boundary: float | None = None):
        if not dits:
            raise ValueError("no DiT to train")
        self.dits = list(dits)
        self.boundary = boundary
        self._active: TrainableDiT | None = None
        self.moves = 0
        self.move_seconds = 0.0

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dits]

    def __iter__(self):
        return iter(self.dits)

    def __len__(self) -> int:
        return len(self.dits)

    def by_name(self, name: str) -> TrainableDiT:
        for d in self.dits:
            if d.name == name:
                return d
        raise KeyError(name)

    def index_for(self, t: float) -> int:
        for i, d in enumerate(self.dits):
            if d.owns(t):
                return i
        raise ValueError(f"no DiT owns noise level t={t} (ranges {[d.t_range for d in self.dits]})")

    def activate(self, dit: TrainableDiT) -> TrainableDiT:
        """Make ``dit`` the one on the device; the previous one goes to the offload device.

        ``moves`` / ``move_seconds`` count the activations that copied weights to the device and their time."""
        if self._active is not dit:
            if self._active is not None:
                self._active.deactivate()
            start = time.perf_counter()
            if dit.activate():
                if dit.placement.device.type == "cuda":
                    torch.cuda.synchronize(dit.placement.device)
                self.moves += 1
                self.move_seconds += time.perf_counter() - start
            self._active = dit
        return dit

    def release(self) -> None:
        for d in self.dits:
            d.deactivate()
            d.release()
        self._active = None


def a14b_ranges(boundary: float = A14B_BOUNDARY) -> dict[str, tuple[float, float]]:
    """Noise ranges of the WAN 2.2 A14B pair: the high-noise DiT from the boundary up, the low-noise one below."""
    if not 0.0 < boundary < 1.0:
        raise ValueError(f"the A14B boundary must be in (0, 1), got {boundary}")
    return {"high_noise": (boundary, 1.0), "low_noise": (0.0, boundary)}


def check_pair(high, low, high_path: Path, low_path: Path) -> None:
    """The two DiTs of an A14B pair must have the same architecture and must not be the same weights."""
    hi, lo = model_info(high), model_info(low)
    if hi != lo:
        raise ModelFileError(f"the high-noise DiT {high_path} ({hi}) and the low-noise DiT {low_path} ({lo}) "
                             "have different architectures: they are not a WAN 2.2 A14B pair")
    from moe_core.patch import model_fingerprint

    if high_path.resolve() == low_path.resolve() or model_fingerprint(high) == model_fingerprint(low):
        raise ModelFileError(f"the high-noise and low-noise DiTs are the same weights ({high_path}, {low_path}); "
                             "give the two different A14B files")


__all__ = ["DiTSet", "MODEL_FOLDERS", "ModelFileError", "Placement", "TrainableDiT", "WEIGHT_DTYPES",
           "FlowSample", "a14b_ranges", "check_pair", "load_dit", "model_info", "precheck_dit", "recorded_family_problem",
           "resolve_model_path"]
