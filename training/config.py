"""Training configuration: TOML files checked against dataclasses, with command-line overrides.

A config is a TOML file of sections (``[model]``, ``[data]``, ``[lora]``, ``[train]``, ``[objective]``,
``[output]``, ``[demo]``). Every key has a default (the seeds' hyperparameters for stage 1), a type and a
one-line description; ``python -m training.stage1 --print-config`` prints them all as a commented TOML.

* Unknown sections or keys are errors that list the valid ones (a typo never silently trains with a
  default).
* Values are type-checked (an int is accepted where a float is expected) and range-checked.
* Any key can be overridden from the command line, as ``--set train.learning_rate=5e-5`` (repeatable) or as
  a dotted flag ``--train.learning_rate 5e-5``. The value is read as a TOML value (``5e-5``, ``true``,
  ``[30, 31]``, ``"text"``); anything that is not valid TOML is taken as a plain string (paths).
* Relative paths are relative to the working directory the command runs in.

The stage-2 trainer (next issue) adds its own sections with the same machinery (:func:`load_config`).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin



class ConfigError(ValueError):
    """A configuration problem; the message names the file or flag, the key and what is allowed."""


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its description (shown by ``--print-config`` and in docs/training.md)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# ------------------------------------------------------------------------------------------ sections

@dataclass
class ModelSection:
    """Which DiT(s) to train and how their weights are held."""

    dit: str = doc("one WAN DiT: the TI2V 5B model, or one WAN 2.1/2.2 DiT; a .safetensors path or a file name in "
                   "ComfyUI's models/diffusion_models (leave empty for an A14B pair)", "")
    dit_high: str = doc("WAN 2.2 A14B (T2V or I2V) high-noise DiT (path or name); trained for t >= boundary", "")
    dit_low: str = doc("WAN 2.2 A14B (T2V or I2V) low-noise DiT (path or name); trained for t < boundary", "")
    boundary: Union[float, Literal["auto"]] = doc(
        "A14B timestep boundary between the two DiTs; auto: the family's (T2V 0.875, I2V 0.9)", "auto")
    train_dits: list[str] = doc("which DiTs of an A14B pair to train: [\"high_noise\", \"low_noise\"] or one of "
                                "them (the timestep range then shrinks to that DiT's side)",
                                factory=lambda: ["high_noise", "low_noise"])
    weight_dtype: Literal["default", "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"] = doc(
        "storage dtype of the frozen DiT weights (default: ComfyUI's choice, bf16/fp16 on GPU, fp32 on CPU; "
        "fp8_e4m3fn halves memory for 24 GB cards)", "default")
    device: str = doc("compute device: auto (cuda if available), cpu, cuda, cuda:N", "auto")
    offload_idle_dit: Union[bool, Literal["auto"]] = doc(
        "keep the A14B DiT that is not training in host memory (true), keep both on the GPU (false), or auto: "
        "both on the GPU when the memory estimate printed at start fits in 80% of it", "auto")
    dit_schedule: Literal["per_sample", "alternate", "proportional"] = doc(
        "A14B: per_sample (each sample's t picks its DiT, both DiTs in most steps), alternate (one DiT per "
        "optimizer step, taking turns) or proportional (one DiT per step, chosen with its share of the t "
        "distribution); one DiT per step avoids swapping offloaded DiTs within a step", "per_sample")
    dit_switch_every: int = doc("alternate / proportional: keep the chosen DiT for this many optimizer steps "
                                "(fewer swaps of an offloaded DiT; ai-toolkit's switch_boundary_every)", 1)
    stream_blocks: int = doc("leading frozen blocks whose weights stay on the CPU and are streamed to the GPU "
                             "each step (block offloading for 24 GB cards; must be < first adapted block)", 0)


@dataclass
class DataSection:
    """Clips, encoders and the latent/text cache (see docs/data.md)."""

    manifest: str = doc("JSONL manifest of clips (python -m training.build_manifest writes one)", "")
    cache_dir: str = doc("folder of cached VAE latents and text embeddings (reused across runs)", "cache")
    vae: str = doc("WAN VAE (wan_2.1_vae.safetensors): a path or a file name in ComfyUI's models/vae", "")
    text_encoder: str = doc("UMT5-XXL text encoder: a path or a file name in ComfyUI's models/text_encoders",
                            "")
    family: Literal["auto", "t2v", "i2v", "ti2v"] = doc(
        "model family the cache is built for (t2v, i2v: also the start-image latent of each window, ti2v: WAN 2.2 "
        "VAE latents); auto: the DiT's, read from its file; another value than the DiT's is refused", "auto")
    extraction_mode: Literal["head", "uniform", "sliding"] = doc(
        "windows per clip: head (one from the start), uniform (num_windows spread), sliding (every stride)",
        "head")
    max_frames: int = doc("frames per window (4n+1); 0: the family's (81 = 5 s at 16 fps; TI2V 5B 121 = 5 s at "
                          "24 fps)", 0)
    min_frames: int = doc("clips with fewer frames (after resampling to target_fps) are skipped", 5)
    num_windows: int = doc("windows per clip in uniform mode", 3)
    stride: int = doc("window stride in sliding mode (0 = the window length)", 0)
    target_fps: float = doc("frame rate clips are resampled to; 0: the family's (16; TI2V 5B 24)", 0.0)
    target_area: int = doc("bucket area in pixels (480*832 = WAN's 480p)", 480 * 832)
    bucket_step: int = doc("bucket sizes are multiples of this many pixels (raised to a multiple of the family's "
                           "token size: 16, TI2V 5B 32)", 16)
    no_instrument: Literal["fallback", "skip", "error"] = doc(
        "captions naming no instrument: fallback (label 'Other'), skip the clip, or error", "fallback")
    latent_dtype: Literal["fp32", "bf16"] = doc("storage dtype of cached latents", "fp32")
    text_dtype: Literal["fp32", "bf16"] = doc("storage dtype of cached text embeddings", "bf16")


@dataclass
class LoraSection:
    """Where the LoRA goes and its ranks (seeds: last 8 blocks' attention, ffn.0 in the last 3)."""

    target_blocks: Union[int, str, list[int]] = doc(
        "blocks whose attention projections get a LoRA: a count of last blocks (8 or \"last_8\"), \"all\", "
        "or a list of indices", "last_8")
    ffn_blocks: Union[int, str, list[int]] = doc("blocks whose ffn.0 gets a LoRA (count, \"last_3\", list or "
                                                 "\"none\")", "last_3")
    projections: list[str] = doc("attention projections adapted in target_blocks",
                                 factory=lambda: ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                  "cross_attn.q", "cross_attn.k", "cross_attn.v",
                                                  "cross_attn.o"])
    rank_q: int = doc("rank of q projections", 8)
    rank_k: int = doc("rank of k projections", 4)
    rank_v: int = doc("rank of v projections", 4)
    rank_o: int = doc("rank of o projections", 4)
    rank_ffn: int = doc("rank of ffn.0", 4)
    alpha: float = doc("LoRA alpha (scale = alpha / rank), as in the seeds' lora_alpha", 1.0)
    init_weights: str = doc("start from an existing LoRA (musubi-tuner/kohya, diffusers or ComfyUI keys; a path or "
                            "a name in ComfyUI's models/loras): its modules and ranks must fit the targets above, "
                            "its alphas are kept; for an A14B pair it initialises both DiTs", "")
    init_weights_high: str = doc("A14B: LoRA to start the high-noise DiT from (overrides init_weights)", "")
    init_weights_low: str = doc("A14B: LoRA to start the low-noise DiT from (overrides init_weights)", "")

    def ranks(self) -> dict[str, int]:
        return {"q": self.rank_q, "k": self.rank_k, "v": self.rank_v, "o": self.rank_o, "ffn": self.rank_ffn}


@dataclass
class TrainSection:
    """Optimisation (seeds, stage 1: 10 epochs, lr 1e-4, batch 1, accumulation 8)."""

    seed: int = doc("seed of adapter init, data order, noise and timesteps", 42)
    epochs: float = doc("passes over the cached windows (ignored when max_steps > 0)", 10.0)
    max_steps: int = doc("optimizer steps to train (0: derived from epochs)", 0)
    batch_size: int = doc("windows per micro-batch per process", 1)
    grad_accum: int = doc("micro-batches accumulated per optimizer step", 8)
    learning_rate: float = doc("AdamW learning rate", 1e-4)
    learning_rate_high: float = doc("A14B: learning rate of the high-noise DiT's LoRA (0: learning_rate)", 0.0)
    learning_rate_low: float = doc("A14B: learning rate of the low-noise DiT's LoRA (0: learning_rate)", 0.0)
    max_steps_high: int = doc("A14B: the high-noise DiT trains only in the first N optimizer steps, then its "
                              "samples go to the low-noise DiT (0: every step)", 0)
    max_steps_low: int = doc("A14B: the low-noise DiT trains only in the first N optimizer steps (0: every step)",
                             0)
    lr_scheduler: Literal["constant", "cosine"] = doc("learning-rate schedule after warm-up", "constant")
    warmup_steps: int = doc("linear warm-up steps", 0)
    min_lr_ratio: float = doc("cosine schedule: final lr as a fraction of learning_rate", 0.0)
    weight_decay: float = doc("AdamW weight decay", 0.01)
    adam_beta1: float = doc("AdamW beta1", 0.9)
    adam_beta2: float = doc("AdamW beta2", 0.999)
    adam_eps: float = doc("AdamW epsilon", 1e-8)
    max_grad_norm: float = doc("gradient clipping norm (0: off)", 1.0)
    mixed_precision: Literal["bf16", "no"] = doc("bf16 autocast for the forward pass, or no (the model's dtype, "
                                                 "e.g. float32 on CPU)", "bf16")
    gradient_checkpointing: bool = doc("recompute adapted blocks in the backward pass (saves memory)", True)
    cpu_threads: int = doc("torch CPU threads (0: torch's default); the CPU demo uses 1, its matrices are tiny", 0)
    dist_timeout_minutes: float = doc("torchrun: how long a process waits for the others (e.g. while the first one "
                                      "caches latents) before the process group gives up", 60.0)


@dataclass
class ObjectiveSection:
    """Flow matching as WAN is trained."""

    timestep_sampling: Literal["shift", "uniform", "logit_normal"] = doc(
        "how t is drawn: shift (uniform then shifted), uniform, logit_normal (then shifted)", "shift")
    shift: float = doc("flow shift s of t' = s*t / (1 + (s-1)*t) (3.0: more high-noise steps)", 3.0)
    t_min: float = doc("lowest noise level trained (stage 2 uses 0.2)", 0.0)
    t_max: float = doc("highest noise level trained", 1.0)
    logit_scale: float = doc("spread of logit_normal sampling", 1.0)
    roi_weight: float = doc("loss weight of latent cells inside the instrument-tip ROI (1: plain MSE)", 3.0)
    start_frame_probability: float = doc(
        "TI2V 5B: share of samples trained as image-to-video (latent frame 0 kept clean as the start image, per-frame "
        "timesteps, loss on the other frames); the rest train as text-to-video (all frames noised)", 0.5)


@dataclass
class OutputSection:
    """Where results go."""

    dir: str = doc("output folder (checkpoints, final LoRA, metrics, plots)", "outputs/stage1")
    name: str = doc("file name stem of the final LoRA(s)", "stage1_lora")
    save_every: int = doc("write a checkpoint every N optimizer steps (0: only at the end)", 100)
    keep_last: int = doc("keep only the newest N step checkpoints (0: keep all)", 0)
    log_every: int = doc("append a metrics line every N optimizer steps", 1)
    save_dtype: Literal["fp32", "bf16", "fp16"] = doc("dtype of the exported LoRA file(s)", "fp32")
    plot: bool = doc("draw loss-curve PNGs at the end", True)
    progress: bool = doc("show a progress bar", True)
    tensorboard: bool = doc("also write TensorBoard event files (output.dir/tensorboard; needs the tensorboard "
                            "package, else a warning)", True)
    render_every: int = doc("validation renders every N optimizer steps: one short clip per instrument sampled "
                            "through ComfyUI's sampler with the current weights, decoded with data.vae, saved as "
                            "renders/step_N/<instrument>.mp4 (0: off; needs a real VAE, not a demo: stand-in)", 0)
    render_steps: int = doc("sampler steps of a validation render (euler, simple, shift 8; an A14B pair splits them "
                            "at model.boundary as the bundled workflow does)", 8)
    render_seed: int = doc("noise seed of the validation renders (the same noise at every render, so they compare)",
                           0)
    render_cfg: float = doc("CFG scale of the validation renders: 1 samples the prompt alone; above 1 the negative "
                            "is an all-zero text embedding (no text encoder is loaded while training)", 1.0)
    render_start_image: str = doc("image-to-video (I2V / TI2V) renders: the start image of every render (a PNG/JPEG "
                                  "path); empty: each instrument's first training window's first frame", "")


@dataclass
class DemoSection:
    """The out-of-the-box demo: synthetic clips + tiny random models, on the CPU in about a minute."""

    enabled: bool = doc("create the demo data and models in work_dir and fill in empty model/data paths",
                        False)
    work_dir: str = doc("folder for the demo's clips, models and cache", "outputs/demo")
    clips_per_class: int = doc("synthetic clips per instrument", 1)
    width: int = doc("clip width in pixels", 48)
    height: int = doc("clip height in pixels", 32)
    frames: int = doc("frames per clip (4n+1)", 9)
    dit_layers: int = doc("blocks of the tiny random DiT", 4)
    dit_dim: int = doc("width of the tiny random DiT (128 per head)", 128)


@dataclass
class Stage1Config:
    """Stage 1: the vanilla base LoRA."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    output: OutputSection = field(default_factory=OutputSection)
    demo: DemoSection = field(default_factory=DemoSection)

    def validate(self) -> None:
        validate_common(self)


# ------------------------------------------------------------------------------------------ checks

def _fail(where: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {message}")


def validate_common(cfg: Any, where: str = "config") -> None:
    """Range checks shared by the stages (types were checked when the config was built)."""
    m, t, o, lo, out, d = cfg.model, cfg.train, cfg.objective, cfg.lora, cfg.output, cfg.data
    if m.dit and (m.dit_high or m.dit_low):
        raise _fail(where, "model.dit", "give either model.dit (one DiT) or model.dit_high + model.dit_low "
                                        "(WAN 2.2 A14B), not both")
    if bool(m.dit_high) != bool(m.dit_low):
        raise _fail(where, "model.dit_high" if not m.dit_high else "model.dit_low",
                    "an A14B pair needs both model.dit_high and model.dit_low")
    if m.boundary != "auto" and not 0.0 < m.boundary < 1.0:
        raise _fail(where, "model.boundary", f"must be in (0, 1) or \"auto\", got {m.boundary}")
    if not 0.0 <= o.start_frame_probability <= 1.0:
        raise _fail(where, "objective.start_frame_probability", f"must be in [0, 1], got {o.start_frame_probability}")
    bad = [x for x in m.train_dits if x not in ("high_noise", "low_noise")]
    if bad or not m.train_dits or len(set(m.train_dits)) != len(m.train_dits):
        raise _fail(where, "model.train_dits", f"must be a non-empty list of \"high_noise\"/\"low_noise\", "
                                               f"got {m.train_dits}")
    if m.stream_blocks < 0:
        raise _fail(where, "model.stream_blocks", "must be >= 0")
    if m.dit_switch_every < 1:
        raise _fail(where, "model.dit_switch_every", f"must be >= 1, got {m.dit_switch_every}")
    pair_only = {"train.learning_rate_high": t.learning_rate_high, "train.learning_rate_low": t.learning_rate_low,
                 "train.max_steps_high": t.max_steps_high, "train.max_steps_low": t.max_steps_low,
                 "lora.init_weights_high": lo.init_weights_high, "lora.init_weights_low": lo.init_weights_low}
    for key, value in pair_only.items():
        if value and not m.dit_high:
            raise _fail(where, key, "applies to a WAN 2.2 A14B pair (model.dit_high + model.dit_low); for one DiT "
                                    f"use {key.rsplit('_', 1)[0]}")
    for key in ("train.learning_rate_high", "train.learning_rate_low"):
        value = pair_only[key]
        if not (value >= 0 and math.isfinite(value)):
            raise _fail(where, key, f"must be >= 0 (0: train.learning_rate), got {value}")
    for key in ("train.max_steps_high", "train.max_steps_low"):
        if pair_only[key] < 0:
            raise _fail(where, key, f"must be >= 0 (0: every step), got {pair_only[key]}")
    if not (t.dist_timeout_minutes > 0 and math.isfinite(t.dist_timeout_minutes)):
        raise _fail(where, "train.dist_timeout_minutes", f"must be > 0, got {t.dist_timeout_minutes}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", m.device):
        raise _fail(where, "model.device", f"{m.device!r}: use auto, cpu, cuda or cuda:N")
    positive = {"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "lora.rank_q": lo.rank_q, "lora.rank_k": lo.rank_k, "lora.rank_v": lo.rank_v,
                "lora.rank_o": lo.rank_o, "lora.rank_ffn": lo.rank_ffn, "output.log_every": out.log_every,
                "output.render_steps": out.render_steps}
    for key, value in positive.items():
        if value < 1:
            raise _fail(where, key, f"must be >= 1, got {value}")
    for key, value in {"train.max_steps": t.max_steps, "train.warmup_steps": t.warmup_steps,
                       "output.save_every": out.save_every, "output.keep_last": out.keep_last,
                       "output.render_every": out.render_every, "output.render_seed": out.render_seed,
                       "train.cpu_threads": t.cpu_threads,
                       "data.stride": d.stride}.items():
        if value < 0:
            raise _fail(where, key, f"must be >= 0, got {value}")
    if not (out.render_cfg > 0 and math.isfinite(out.render_cfg)):
        raise _fail(where, "output.render_cfg", f"must be > 0 (1: no negative pass), got {out.render_cfg}")
    if out.render_every and d.vae.startswith("demo:"):
        raise _fail(where, "output.render_every", f"validation renders decode with data.vae, but data.vae = {d.vae!r} "
                                                  "is a stand-in that cannot decode: give the WAN VAE file, or set "
                                                  "output.render_every = 0")
    if t.max_steps == 0 and not (t.epochs > 0 and math.isfinite(t.epochs)):
        raise _fail(where, "train.epochs", f"must be > 0 when train.max_steps is 0, got {t.epochs}")
    if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):
        raise _fail(where, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise _fail(where, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    for key, value in {"train.adam_beta1": t.adam_beta1, "train.adam_beta2": t.adam_beta2}.items():
        if not 0.0 <= value < 1.0:
            raise _fail(where, key, f"must be in [0, 1), got {value}")
    for key, value in {"train.weight_decay": t.weight_decay, "train.max_grad_norm": t.max_grad_norm}.items():
        if value < 0:
            raise _fail(where, key, f"must be >= 0, got {value}")
    if t.adam_eps <= 0:
        raise _fail(where, "train.adam_eps", f"must be > 0, got {t.adam_eps}")
    if not 0.0 <= o.t_min < o.t_max <= 1.0:
        raise _fail(where, "objective.t_min", f"need 0 <= t_min < t_max <= 1, got [{o.t_min}, {o.t_max}]")
    if o.shift <= 0 or o.logit_scale <= 0:
        raise _fail(where, "objective.shift", "shift and logit_scale must be > 0")
    if o.roi_weight < 1.0:
        raise _fail(where, "objective.roi_weight", f"must be >= 1 (1 = plain MSE), got {o.roi_weight}")
    if lo.alpha <= 0:
        raise _fail(where, "lora.alpha", f"must be > 0, got {lo.alpha}")
    if not lo.projections:
        raise _fail(where, "lora.projections", "must name at least one projection")
    from .adapters import ATTENTION_PROJECTIONS

    unknown = [p for p in lo.projections if p not in ATTENTION_PROJECTIONS]
    if unknown:
        raise _fail(where, "lora.projections", f"unknown {unknown}; valid: {list(ATTENTION_PROJECTIONS)}")
    if not out.name or "/" in out.name or "\\" in out.name:
        raise _fail(where, "output.name", f"must be a plain file name stem, got {out.name!r}")
    if d.max_frames and (d.max_frames < 1 or (d.max_frames - 1) % 4):
        raise _fail(where, "data.max_frames", f"must be 4n+1 (e.g. 81) or 0 (the family's), got {d.max_frames}")
    if d.target_fps < 0 or not math.isfinite(d.target_fps):
        raise _fail(where, "data.target_fps", f"must be > 0 or 0 (the family's), got {d.target_fps}")
    dm = cfg.demo
    if dm.frames < 1 or (dm.frames - 1) % 4:
        raise _fail(where, "demo.frames", f"must be 4n+1, got {dm.frames}")
    if dm.width % 16 or dm.height % 16 or dm.width < 16 or dm.height < 16:
        raise _fail(where, "demo.width", "demo width and height must be multiples of 16")


# ---------------------------------------------------------------------------------- generic machinery

C = TypeVar("C")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _sections(cls: type) -> dict[str, type]:
    return {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise TypeError with a short reason."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise TypeError(f"must be one of {', '.join(json.dumps(a) for a in get_args(tp))}, got {value!r}")
        return value
    if origin is Union:
        for option in get_args(tp):
            try:
                return _coerce(value, option)
            except TypeError:
                continue
        raise TypeError(f"must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"must be a {_type_name(tp)}, got {value!r}")
        return [_coerce(v, get_args(tp)[0]) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")


def _close(word: str, candidates: Sequence[str]) -> list[str]:
    """The candidates spelled most like ``word`` (a typo's likely intent): the best, and up to two as close."""
    found = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    scores = [difflib.SequenceMatcher(None, word, c).ratio() for c in found]
    return [c for c, r in zip(found, scores) if r >= scores[0] - 0.02]


def _did_you_mean(matches: Sequence[str], fmt: str = "{}") -> str:
    return f"did you mean {' or '.join(fmt.format(m) for m in matches)}? " if matches else ""


def suggest_keys(key: str, cls: type) -> list[str]:
    """Valid ``section.key`` names close to a misspelled ``key`` (``train.learning_rat``, ``learning_rate``,
    ``trian.learning_rate``)."""
    keys = valid_keys(cls)
    section, _, name = key.rpartition(".")
    names = {k: k.split(".", 1)[1] for k in keys}
    if section in _sections(cls):  # right section, misspelled name
        found = _close(name, [n for k, n in names.items() if k.startswith(section + ".")])
        return [f"{section}.{n}" for n in found]
    if not section:  # no section: the name in any section
        return [k for k in keys if names[k] == name] or [k for n in _close(name, names.values())
                                                         for k in keys if names[k] == n]
    return _close(key, keys)


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build and validate a config of schema ``cls`` from nested dicts; unknown keys are errors."""
    sections = _sections(cls)
    unknown = [k for k in data if k not in sections]
    if unknown:
        hint = _did_you_mean(_close(unknown[0], sections), "[{}]")
        raise ConfigError(f"{source}: unknown section(s) {', '.join(f'[{k}]' for k in unknown)}; {hint}valid "
                          f"sections: {', '.join(f'[{k}]' for k in sections)}")
    built = {}
    for name, section_cls in sections.items():
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys, got {values!r}")
        hints = _hints(section_cls)
        fields = [f.name for f in dataclasses.fields(section_cls)]
        bad = [k for k in values if k not in fields]
        if bad:
            hint = _did_you_mean([f"{name}.{k}" for b in bad for k in _close(b, fields)])
            raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in bad)}; {hint}valid keys "
                              f"in [{name}]: {', '.join(fields)}")
        kwargs = {}
        for key, value in values.items():
            try:
                kwargs[key] = _coerce(value, hints[key])
            except TypeError as e:
                raise ConfigError(f"{source}: {name}.{key} {e}") from None
        built[name] = section_cls(**kwargs)
    cfg = cls(**built)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None
    return cfg


def config_to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    return {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def parse_value(text: str) -> Any:
    """A command-line value as TOML (numbers, booleans, lists, quoted strings), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def valid_keys(cls: type) -> list[str]:
    return [f"{s}.{f.name}" for s, sc in _sections(cls).items() for f in dataclasses.fields(sc)]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cls: type) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to nested config dicts (a copy).

    An unknown key names the close valid ones (``difflib``), else the valid keys of its section, else the
    sections: a short message, not the whole schema.
    """
    data = json.loads(json.dumps(data))
    keys = valid_keys(cls)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.learning_rate=5e-5)")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if key not in keys:
            close = suggest_keys(key, cls)
            section = key.rpartition(".")[0]
            sections = _sections(cls)
            if close:
                listing = _did_you_mean(close).strip()
            elif section in sections:
                names = [f.name for f in dataclasses.fields(sections[section])]
                listing = f"valid keys in [{section}]: {', '.join(names)}"
            else:
                listing = f"keys are section.name, with sections {', '.join(sections)}"
            raise ConfigError(f"override {item!r}: unknown key {key!r}; {listing} (--print-config shows every key "
                              "with its meaning)")
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = parse_value(text.strip())
    return data


def split_dotted_flags(argv: Sequence[str], cls: type) -> tuple[list[str], list[str]]:
    """Separate ``--section.key value`` / ``--section.key=value`` flags (returned as overrides) from the rest."""
    sections = set(_sections(cls))
    rest, overrides = [], []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        m = re.fullmatch(r"--([A-Za-z_]+)\.([A-Za-z_-]+)(?:=(.*))?", arg, re.S)
        if m and m.group(1) in sections:
            key = f"{m.group(1)}.{m.group(2)}"
            if m.group(3) is not None:
                overrides.append(f"{key}={m.group(3)}")
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"flag {arg} needs a value")
                overrides.append(f"{key}={argv[i + 1]}")
                i += 1
        elif m:
            hint = _did_you_mean(suggest_keys(f"{m.group(1)}.{m.group(2).replace('-', '_')}", cls), "--{}")
            raise ConfigError(f"unknown flag {arg}: no section [{m.group(1)}]; {hint}valid sections: "
                              f"{', '.join(sorted(sections))}")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read it ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (),
                text: str | None = None) -> C:
    """A validated config of schema ``cls`` from a TOML file (or TOML ``text``) plus overrides."""
    if path is not None:
        data, source = read_toml(path), str(path)
    elif text is not None:
        try:
            data, source = tomllib.loads(text), "<embedded config>"
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"embedded config: invalid TOML: {e}") from None
    else:
        data, source = {}, "<defaults>"
    if overrides:
        data = apply_overrides(data, overrides, cls)
        source += " + command-line overrides"
    return config_from_dict(cls, data, source)


# -------------------------------------------------------------------------------------------- TOML out

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Any, comments: bool = True) -> str:
    """The config as TOML text (with each key's description and type as comments)."""
    lines = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if lines:
            lines.append("")
        if comments and section.__doc__:
            lines.append(f"# {section.__doc__.strip().splitlines()[0]}")
        lines.append(f"[{f.name}]")
        hints = _hints(type(section))
        for sf in dataclasses.fields(section):
            if comments:
                lines.append(f"# {sf.metadata.get('doc', '')} ({_type_name(hints[sf.name])})")
            lines.append(f"{sf.name} = {_toml_value(getattr(section, sf.name))}")
    return "\n".join(lines) + "\n"


def config_hash(cfg: Any, ignore: Sequence[str] = ()) -> str:
    data = config_to_dict(cfg)
    for key in ignore:
        s, k = key.split(".", 1)
        data.get(s, {}).pop(k, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def reference_table(cls: type) -> str:
    """Markdown table of every key: default, type, description (docs/training.md)."""
    cfg = cls()
    rows = ["| key | default | type | meaning |", "|---|---|---|---|"]
    for s, sc in _sections(cls).items():
        section = getattr(cfg, s)
        hints = _hints(sc)
        for f in dataclasses.fields(sc):
            default = _toml_value(getattr(section, f.name)).replace("|", "\\|")
            rows.append(f"| `{s}.{f.name}` | `{default}` | {_type_name(hints[f.name]).replace('|', 'or')} | "
                        f"{f.metadata.get('doc', '').replace('|', '/')} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------- embedded demo

DEMO_TOML = """\
# The demo run: `python -m training.stage1 --demo` (this exact config is embedded in training/config.py).
# It renders synthetic laparoscopy-like clips, writes a tiny random WAN DiT and a random WAN 2.1 VAE into
# outputs/demo/, caches latents (the text encoder is a hashing stand-in for UMT5-XXL, which cannot be made
# small), trains a few dozen steps on the CPU and writes the LoRA, the metrics log and the loss plot.
# Nothing it produces is a useful model: it shows that the whole pipeline runs.

[demo]
enabled = true
work_dir = "outputs/demo"
clips_per_class = 1
width = 48
height = 32
frames = 9
dit_layers = 4
dit_dim = 128

[data]
cache_dir = "outputs/demo/cache"
max_frames = 9
target_area = 1536

[lora]
target_blocks = 2
ffn_blocks = 1

[train]
seed = 0
max_steps = 40
batch_size = 1
grad_accum = 2
learning_rate = 1e-2
lr_scheduler = "cosine"
warmup_steps = 4
mixed_precision = "no"
gradient_checkpointing = true
cpu_threads = 1

[output]
dir = "outputs/demo/run"
name = "demo_lora"
save_every = 20
"""


def demo_config(overrides: Sequence[str] = ()) -> Stage1Config:
    return load_config(Stage1Config, text=DEMO_TOML, overrides=overrides)


__all__ = ["ConfigError", "DEMO_TOML", "DataSection", "DemoSection", "LoraSection", "ModelSection",
           "ObjectiveSection", "OutputSection", "Stage1Config", "TrainSection", "apply_overrides", "config_from_dict",
           "config_hash", "config_to_dict", "demo_config", "load_config", "parse_value", "reference_table",
           "split_dotted_flags", "to_toml", "valid_keys", "validate_common"]
