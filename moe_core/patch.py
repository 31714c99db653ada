"""Patching a ComfyUI WAN ModelPatcher with a LoRA-MoE.

Each target Linear gets an object patch on its `forward` that calls the layer's own class forward (so fp8,
scaled fp8, manual casting and lowvram stay ComfyUI's) and adds the fused adapter term. A keyed
DIFFUSION_MODEL wrapper computes the gates once per model call and hands them to those forwards; an
OUTER_SAMPLE wrapper resets the EMA per sampling run. Everything lives on the returned clone: the input
model is untouched, and ComfyUI removes the object patches when another clone of the model is loaded.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping

import torch

import comfy.model_patcher
from comfy.patcher_extension import WrappersMP

from .band import TimestepBand
from .checkpoint import AdapterSet, LoraMoE
from .dit_info import FINGERPRINT_SIZE, closest_fingerprint, fingerprint_of
from .families import ModelFamilyError, family_mismatch, family_of_model, family_of_record, pair_boundary
from .fused import expand_gains, layout_of, lora_moe_delta, stack_adapters
from .gating import GateConfig, GateController
from .routing import LearnedRouter, Routing, expert_vector

KEY = "wan_lora_moe"
AdapterChoice = Literal["auto", "default", "high_noise", "low_noise"]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class LoraMoEModelError(ValueError):
    """The model and the LoRA-MoE file do not fit together."""


class AdapterWeights:
    """The stacked adapter tensors of one set; ComfyUI moves them with the model (`model_patches_to`)."""

    def __init__(self, aset: AdapterSet):
        self.modules = list(aset.modules)
        layouts = [layout_of(p) for p in aset.modules.values()]
        self.layouts = list(dict.fromkeys(layouts))
        self.layout_ids = [self.layouts.index(l) for l in layouts]
        self._slot_index = [l.slot_index() for l in self.layouts]
        self._ab = [tuple(t.float() for t in stack_adapters([p.base, *p.experts])) for p in aset.modules.values()]
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}

    def to(self, device_or_dtype: torch.device | torch.dtype | str) -> "AdapterWeights":
        if isinstance(device_or_dtype, torch.dtype):
            if device_or_dtype not in _FLOAT_DTYPES:  # fp8 storage: adapters keep computing in float
                return self
            self._ab = [(a.to(dtype=device_or_dtype), b.to(dtype=device_or_dtype)) for a, b in self._ab]
        else:
            self._ab = [(a.to(device_or_dtype), b.to(device_or_dtype)) for a, b in self._ab]
            self._slot_index = [s.to(device_or_dtype) for s in self._slot_index]
        self._cast.clear()
        return self

    def __deepcopy__(self, memo: dict) -> "AdapterWeights":
        return self  # shared by clones: ModelPatcher.clone deep-copies model_options

    def for_compute(self, device: torch.device, dtype: torch.dtype) -> tuple[list, list]:
        """(A, B) per module and slot indices per layout, on `device` in `dtype`, cast once and cached."""
        a0 = self._ab[0][0]
        if a0.device == device and a0.dtype == dtype:
            return self._ab, self._slot_index
        key = (device, dtype)
        if key not in self._cast:
            self._cast[key] = ([(a.to(device, dtype), b.to(device, dtype)) for a, b in self._ab],
                               [s.to(device) for s in self._slot_index])
        return self._cast[key]

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self._ab)


class MoERuntime:
    """Per-clone runtime: the gate controller plus the tensors the patched forwards read during a call."""

    def __init__(self, weights: AdapterWeights, controller: GateController):
        self.weights = weights
        self.controller = controller
        self.ab: list | None = None
        self.scales: list | None = None

    @torch.compiler.disable
    def begin(self, x: torch.Tensor, timestep: torch.Tensor, transformer_options: dict) -> None:
        """Set the gains of this forward from the noise level of the clip being generated, one per batch row.

        Which noise level: the sampler's sigma (`transformer_options["sigmas"]`, WAN's t = sigma), the
        noise level of the frames being generated; without it (a direct `apply_model` call), the largest
        timestep of the row / 1000. The two agree for every WAN 2.2 family: under TI2V 5B
        (`WAN22.process_timestep`) the DiT receives per-frame timesteps [B, F] in which the start-image frame
        has t = 0 and the generated frames the sampler's t, so the row maximum is again the generated
        frames' level. Gates and band are per clip, never per token: the start frame's t = 0 must not switch
        the experts off for the whole clip (docs/nodes.md, "Which noise level the gates use")."""
        sigmas = transformer_options.get("sigmas")
        if sigmas is not None and x.shape[0] % sigmas.numel() == 0:
            sigma_rows = sigmas.reshape(-1).repeat(x.shape[0] // sigmas.numel())
        else:  # WAN's timestep is sigma * 1000 (flow matching)
            sigma_rows = timestep.reshape(x.shape[0], -1).amax(dim=1) / 1000.0
        gains = self.controller.gains(sigma_rows, transformer_options.get("cond_or_uncond"),
                                      transformer_options.get("sample_sigmas"))
        ab, slot_index = self.weights.for_compute(x.device, x.dtype)
        gains = gains.to(x.device, x.dtype)
        self.scales = [expand_gains(gains, s) for s in slot_index]
        self.ab = ab

    @torch.compiler.disable
    def end(self) -> None:
        self.ab = None
        self.scales = None

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        x, timestep = args[0], args[1]
        opts = kwargs.get("transformer_options")
        if opts is None:
            opts = next((a for a in args[2:] if isinstance(a, dict)), {})
        self.begin(x, timestep, opts)
        try:
            return executor(*args, **kwargs)
        finally:
            self.end()

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.controller.reset()
        return executor(*args, **kwargs)


class LoraMoEForward:
    """The object patch for one Linear's `forward`."""

    def __init__(self, layer: torch.nn.Module, runtime: MoERuntime, index: int, layout_id: int):
        self._layer = weakref.ref(layer)  # a strong ref would make layer -> forward -> layer a cycle
        self._class_forward = type(layer).forward
        self.runtime = runtime
        self.index = index
        self.layout_id = layout_id

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self._class_forward(self._layer(), x, *args, **kwargs)
        rt = self.runtime
        if rt.ab is None:
            raise RuntimeError("a LoRA-MoE layer ran outside the diffusion model's forward, so no gates were "
                               "set; call the model through ComfyUI (apply_model / a sampler)")
        a, b = rt.ab[self.index]
        return lora_moe_delta(y, x, a, b, rt.scales[self.layout_id])


@dataclass(frozen=True)
class MoEPatchInfo:
    """Attached to a patched clone, so later nodes (Timestep Band) can re-install with other settings."""

    moe: LoraMoE
    set_name: str
    config: GateConfig
    weights: AdapterWeights
    runtime: MoERuntime

    def on_model_patcher_clone(self) -> "MoEPatchInfo":
        return self


# ------------------------------------------------------------------------------------------ model checks

#: The adapter sets as the Load LoRA-MoE node's adapter_set widget names them (messages use these words;
#: `select_adapter_set` accepts either spelling).
SET_LABELS = {"default": "single-DiT", "high_noise": "high-noise", "low_noise": "low-noise"}


def model_fingerprint(model: comfy.model_patcher.ModelPatcher, n: int = FINGERPRINT_SIZE) -> list[float]:
    """A few values of `head.modulation`: tells the high-noise and the low-noise A14B DiT apart."""
    return fingerprint_of(model.get_model_object("diffusion_model.head.modulation"), n)


def _labels(names) -> str:
    return " and ".join(SET_LABELS.get(n, n) for n in names)


def _shape(model: dict) -> str:
    known = {k: "?" if model.get(k) is None else model[k] for k in ("num_layers", "dim")}
    return f"{known['num_layers']} layers of width {known['dim']}"


def adapter_set_problem(source: str, fingerprinted: Mapping[str, bool], choice: str) -> str | None:
    """Why `choice` ("auto", a set name or its label) cannot pick a set of a file holding the sets
    `fingerprinted` (set name -> whether it records its DiT's fingerprint), known before any model is seen;
    None if it can, or if only the model can tell. Load LoRA-MoE asks this when it validates a prompt."""
    if choice != "auto":
        name = {label: n for n, label in SET_LABELS.items()}.get(choice, choice)
        if name in fingerprinted:
            return None
        held = "one set for a single DiT" if list(fingerprinted) == ["default"] else f"{_labels(fingerprinted)} sets"
        return (f"{source} has no {SET_LABELS.get(name, repr(choice))} adapter set: it holds {held}; set "
                "adapter_set to auto")
    if len(fingerprinted) > 1 and not any(fingerprinted.values()):
        return (f"{source} holds {_labels(fingerprinted)} adapter sets but does not record which DiT each belongs "
                "to, so adapter_set 'auto' cannot choose: set adapter_set to high-noise for the high-noise DiT and "
                "low-noise for the low-noise DiT (or rebuild the file with `python -m moe_core.assemble ... "
                "--dit high_noise:<DiT file> --dit low_noise:<DiT file>`)")
    return None


def select_adapter_set(moe: LoraMoE, model: comfy.model_patcher.ModelPatcher, choice: str = "auto") -> str:
    """The adapter set for this model: as chosen, or the one whose recorded DiT fingerprint the model has,
    or the only one. `choice` is a set name or its widget label (`high-noise`)."""
    problem = adapter_set_problem(moe.source, {n: bool(s.fingerprint) for n, s in moe.sets.items()}, choice)
    if problem:
        raise LoraMoEModelError(problem)
    if choice != "auto":
        return {label: n for n, label in SET_LABELS.items()}.get(choice, choice)
    if len(moe.sets) == 1:
        return next(iter(moe.sets))
    hit = closest_fingerprint(model_fingerprint(model), {n: s.fingerprint for n, s in moe.sets.items()})
    if hit is None:
        raise LoraMoEModelError(
            f"{moe.source}: this model's weights are none of the DiTs its {_labels(moe.sets)} sets were "
            "trained for (another WAN model, or another DiT file?), so adapter_set 'auto' cannot choose: set "
            "adapter_set to high-noise or low-noise by hand if this is the right model")
    return hit


def check_model(model: comfy.model_patcher.ModelPatcher, moe: LoraMoE, set_name: str) -> None:
    """The model is the WAN DiT the set was built for: the recorded model family (T2V, I2V A14B, TI2V 5B: the
    block names are the same in all three, so only this tells them apart), depth and width, and every adapted
    module a Linear of the recorded size. Files recording no family or input width are not checked for it."""
    aset = moe.sets[set_name]
    label = SET_LABELS.get(set_name, set_name)
    dm = model.get_model_object("diffusion_model")
    blocks, width = getattr(dm, "blocks", None), getattr(dm, "dim", None)
    if blocks is None or width is None:
        raise LoraMoEModelError(f"{moe.source}: the model is a {type(dm).__name__}, not a WAN diffusion model")
    try:
        recorded = family_of_record(aset.model)
        if recorded is not None:
            problem = family_mismatch(f"{moe.source} ({label} set)" if len(moe.sets) > 1 else moe.source,
                                      recorded, family_of_model(dm))
            if problem:
                raise LoraMoEModelError(problem)
    except ModelFamilyError as e:
        raise LoraMoEModelError(f"{moe.source}: {e}") from None
    have = {"num_layers": len(blocks), "dim": int(width)}
    want = {k: aset.model.get(k) for k in have}
    if any(v is not None and int(v) != have[k] for k, v in want.items()):
        raise LoraMoEModelError(
            f"{moe.source}: its {label} set was built for a WAN DiT with {_shape(want)}, but this model has "
            f"{_shape(have)}: a LoRA-MoE only fits the model it was trained for")
    for module, proj in aset.modules.items():
        try:
            layer = model.get_model_object(f"diffusion_model.{module}")
        except AttributeError:
            raise LoraMoEModelError(
                f"{moe.source}: its {label} set adapts '{module}', which this model does not have "
                f"(a LoRA-MoE for another model?)") from None
        if not isinstance(layer, torch.nn.Linear):
            raise LoraMoEModelError(f"{moe.source}: '{module}' is a {type(layer).__name__}, not a Linear layer")
        if (layer.in_features, layer.out_features) != (proj.in_features, proj.out_features):
            raise LoraMoEModelError(
                f"{moe.source}: its {label} set adapts '{module}' as {proj.in_features}->{proj.out_features}, "
                f"but the model's layer is {layer.in_features}->{layer.out_features}: this LoRA-MoE was built "
                "for a model of other dimensions")


# ------------------------------------------------------------------------------------------------ apply

def apply_lora_moe(model: comfy.model_patcher.ModelPatcher, moe: LoraMoE, *, adapter_set: str = "auto",
                   alpha_base: float | None = None, alpha_expert: float | None = None,
                   routing: Routing | None = None, band: TimestepBand | None = None,
                   ema_beta: float | None = None, uncond: str = "same") -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` carrying the LoRA-MoE. Without a routing the experts stay off (base LoRA only)."""
    set_name = select_adapter_set(moe, model, adapter_set)
    check_model(model, moe, set_name)
    d = moe.defaults
    config = GateConfig(
        alpha_base=d.alpha_base if alpha_base is None else float(alpha_base),
        alpha_expert=d.alpha_expert if alpha_expert is None else float(alpha_expert),
        routing=routing, band=d.band if band is None else band,
        ema_beta=d.ema_beta if ema_beta is None else float(ema_beta), uncond=uncond, max_gate=d.max_gate,
        clip_level=d.clip_level)
    patched = model.clone()
    install(patched, moe, set_name, config, AdapterWeights(moe.sets[set_name]))
    return patched


def install(m: comfy.model_patcher.ModelPatcher, moe: LoraMoE, set_name: str, config: GateConfig,
            weights: AdapterWeights) -> MoEPatchInfo:
    """(Re)install a LoRA-MoE on the clone `m`, replacing any LoRA-MoE it already carries."""
    if config.routing is not None:
        expert_vector(config.routing, moe.expert_names)  # fail now, not at the first step
    aset = moe.sets[set_name]
    router = LearnedRouter.from_state_dict(aset.router) if aset.router is not None else None
    if config.routing is not None and config.routing.mode == "learned" and router is None:
        raise LoraMoEModelError(f"{moe.source}: router mode 'learned' but set '{set_name}' has no learned router")
    previous: MoEPatchInfo | None = m.get_attachment(KEY)
    if previous is not None:
        for module in previous.weights.modules:
            m.object_patches.pop(f"diffusion_model.{module}.forward", None)
    runtime = MoERuntime(weights, GateController(moe.expert_names, config, router))
    for i, module in enumerate(weights.modules):
        layer = m.get_model_object(f"diffusion_model.{module}")
        m.add_object_patch(f"diffusion_model.{module}.forward",
                           LoraMoEForward(layer, runtime, i, weights.layout_ids[i]))
    for kind, fn in ((WrappersMP.DIFFUSION_MODEL, runtime.diffusion_model_wrapper),
                     (WrappersMP.OUTER_SAMPLE, runtime.outer_sample_wrapper)):
        m.remove_wrappers_with_key(kind, KEY)
        m.add_wrapper_with_key(kind, KEY, fn)
    m.model_options["transformer_options"].setdefault("patches", {})[KEY] = [weights]
    info = MoEPatchInfo(moe, set_name, config, weights, runtime)
    m.set_attachments(KEY, info)
    return info


def moe_info(model: comfy.model_patcher.ModelPatcher) -> MoEPatchInfo:
    info = model.get_attachment(KEY) if hasattr(model, "get_attachment") else None
    if info is None:
        raise LoraMoEModelError("this MODEL carries no LoRA-MoE: connect it through 'Load LoRA-MoE' first")
    return info


def reconfigure(model: comfy.model_patcher.ModelPatcher, **changes: Any) -> comfy.model_patcher.ModelPatcher:
    """A clone with some gate settings changed (band, routing, alphas, ema_beta, uncond)."""
    info = moe_info(model)
    m = model.clone()
    install(m, info.moe, info.set_name, replace(info.config, **changes), info.weights)
    return m


def boundary_of(model: comfy.model_patcher.ModelPatcher) -> float | None:
    """The high-/low-noise boundary (noise level t) of the A14B DiT this patched model is, for pictures: the
    model family's (T2V 0.875, I2V 0.9), else the one its set records; None for a single-DiT set (TI2V 5B)."""
    info = moe_info(model)
    if info.set_name not in ("high_noise", "low_noise"):
        return None
    try:
        fam = family_of_model(model.get_model_object("diffusion_model"))
    except (ModelFamilyError, AttributeError):
        fam = None
    if fam is not None and fam.boundary is not None:
        return fam.boundary
    return pair_boundary(info.moe.sets[info.set_name].model)


def gate_trace(model: comfy.model_patcher.ModelPatcher) -> list[dict]:
    """The gates of every step of the last sampling run of this patched model (for tests and plots)."""
    return moe_info(model).runtime.controller.trace
