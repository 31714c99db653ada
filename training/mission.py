"""The whole job in one command: data -> stage 1 -> stage 2 -> clips from the bundled workflow -> report.

    bash scripts/demo.sh                       # = python -m training.mission: the embedded demo config, CPU
    bash scripts/demo.sh --fast                # the same, smaller and shorter (CI)
    bash scripts/demo.sh --config my.toml      # the real pipeline on your clips and WAN 2.2 A14B files
    python -m training.mission --print-config  # the resolved config (a starting point for my.toml)

Five steps, each announced with its time:

1. data: the synthetic clips (demo) or the manifest of the config;
2. models and cache: the demo's tiny random A14B-style DiT pair and random WAN 2.1 VAE (demo), then VAE
   latents and text embeddings cached as the trainer caches them;
3. training: stage 1 (the base LoRA of each DiT), then stage 2 on it (experts + learned router, held-out
   validation): ``training.stage1.run_stage1`` and ``training.stage2.run_stage2`` as their CLIs run them;
4. clips: the bundled A14B workflow run by a ComfyUI server of its own (``training.generate``): one clip per
   instrument, one routed automatically by the learned router, one with the experts off;
5. report: one folder with the clips, a contact sheet, gate schedules, expert usage, loss curves and
   ``report.html`` / ``report.md`` (``training.mission_report``).

The config is one TOML file. Sections of the stage configs (``[model]``, ``[data]``, ``[lora]``, ``[train]``,
``[demo]``, ``[moe]``...) apply to both stages; ``[stage1.<section>]`` and ``[stage2.<section>]`` apply to one
(e.g. ``[stage1.train] max_steps``). ``[mission]`` and ``[generate]`` are this module's. Overrides:
``--set stage2.train.max_steps=10``, ``--set generate.steps=6``, ``--set data.cache_dir=...``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import logging
import shutil
import sys
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from moe_core.comfy_runtime import ensure_comfy

from .config import ConfigError, config_from_dict, doc, parse_value


MISSION_TOML = """\
# The mission demo (`bash scripts/demo.sh`): synthetic clips, a tiny random WAN 2.2 A14B-style DiT pair and a
# random WAN 2.1 VAE, stage 1, stage 2, six clips from the bundled workflow in a headless ComfyUI, a report.
# Tiny random models make no useful videos: the run shows that every part of the pipeline works together.
# The text encoder is a hashing stand-in for UMT5-XXL (which cannot be made small).

[mission]
out_dir = "outputs/demo/report"
comfy_dir = "outputs/demo/comfyui"

[demo]
enabled = true
work_dir = "outputs/demo"
clips_per_class = 4
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
batch_size = 1
grad_accum = 2
mixed_precision = "no"
gradient_checkpointing = true
cpu_threads = 1

[stage1.train]
max_steps = 40
learning_rate = 1e-2
lr_scheduler = "cosine"
warmup_steps = 4

[stage1.output]
dir = "outputs/demo/stage1"
name = "demo_stage1"
save_every = 0

[stage2.train]
max_steps = 40
learning_rate = 1e-2
lr_scheduler = "cosine"
warmup_steps = 4

[stage2.router]
warm_start_steps = 100

[stage2.validation]
holdout_fraction = 0.25

[stage2.output]
dir = "outputs/demo/stage2"
name = "demo_lora_moe"
save_every = 0

[generate]
steps = 8
"""

#: ``--fast`` (CI): fewer clips, a 2-block DiT pair, fewer training and sampler steps.
FAST_TOML = """\
[demo]
clips_per_class = 2
width = 32
height = 32
frames = 5
dit_layers = 2

[data]
max_frames = 5
target_area = 1024

[stage1.train]
max_steps = 12
warmup_steps = 2

[stage2.train]
max_steps = 12
warmup_steps = 2

[stage2.router]
warm_start_steps = 50

[stage2.validation]
holdout_fraction = 0.5

[generate]
steps = 4
"""


# ------------------------------------------------------------------------------------------- config

@dataclass
class MissionSection:
    """Where the mission writes what it makes."""

    out_dir: str = doc("the report folder: clips, contact sheet, pictures, report.html / report.md",
                       "outputs/mission/report")
    comfy_dir: str = doc("base directory of the ComfyUI server that renders the clips (the model files are "
                         "linked into its models/ folders; ComfyUI's own output/ and temp/ go there)",
                         "outputs/mission/comfyui")


@dataclass
class GenerateSection:
    """The clips: the bundled workflow with these values substituted."""

    workflow: str = doc("the UI workflow to run (an A14B graph with two Load LoRA-MoE nodes and a Router)",
                        "workflows/wan22_a14b_t2v_lora_moe.json")
    steps: int = doc("sampler steps (the high/low-noise split moves to where t falls below model.boundary)", 20)
    shift: float = doc("ModelSamplingSD3 shift", 8.0)
    cfg: float = doc("CFG scale (0: the workflow's)", 0.0)
    seed: int = doc("noise seed (-1: the workflow's)", -1)
    width: int = doc("clip width (0: demo.width in the demo, else the workflow's 832)", 0)
    height: int = doc("clip height (0: demo.height in the demo, else the workflow's 480)", 0)
    frames: int = doc("frames per clip, 4n+1 (0: demo.frames in the demo, else the workflow's 81)", 0)
    instrument_prompts: list[str] = doc(
        "one prompt per expert, in moe.expert_names order (empty: a training-style caption naming each "
        "instrument)", factory=list)
    auto_prompt: str = doc("prompt of the auto-routed and experts-off clips (empty: the workflow's prompt)", "")
    auto_router: Literal["rule-based", "learned-from-file"] = doc(
        "Router mode of the auto-routed clip (instrument clips use rule-based: their prompt names one)",
        "learned-from-file")
    device: Literal["auto", "cpu", "gpu"] = doc("where ComfyUI renders (auto: the GPU if there is one)", "auto")
    cpu_threads: int = doc("torch threads of the ComfyUI server on the CPU (0: torch's default)", 0)
    timeout_s: float = doc("longest wait for one clip, in seconds", 1800.0)


@dataclass
class MissionOwnConfig:
    mission: MissionSection = field(default_factory=MissionSection)
    generate: GenerateSection = field(default_factory=GenerateSection)

    def validate(self) -> None:
        g = self.generate
        if g.steps < 2:
            raise ConfigError(f"config: generate.steps: must be >= 2 (one per DiT at least), got {g.steps}")
        if g.shift <= 0 or g.cfg < 0 or g.timeout_s <= 0 or g.cpu_threads < 0:
            raise ConfigError("config: generate.shift and generate.timeout_s must be > 0, generate.cfg and "
                              "generate.cpu_threads >= 0")
        if g.frames and (g.frames - 1) % 4:
            raise ConfigError(f"config: generate.frames: must be 4n+1, got {g.frames}")
        if (g.width and g.width % 16) or (g.height and g.height % 16):
            raise ConfigError("config: generate.width / generate.height: must be multiples of 16")


@dataclass
class MissionConfig:
    """The resolved mission: one config per stage plus the mission's own sections."""

    stage1: Any
    stage2: Any
    own: MissionOwnConfig
    raw: dict[str, Any]
    source: str
    fast: bool = False

    @property
    def demo(self) -> bool:
        return bool(self.stage1.demo.enabled)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _stage_classes():
    from .config import Stage1Config
    from .stage2_config import Stage2Config

    return Stage1Config, Stage2Config


def _section_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def apply_mission_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """``a.b=v`` / ``stage2.a.b=v`` overrides on the raw mission dict (keys are checked when it is built)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. stage1.train.max_steps=10 or "
                              "generate.steps=6")
        key, text = item.split("=", 1)
        parts = [p.strip().replace("-", "_") for p in key.strip().lstrip("-").split(".")]
        expected = 3 if parts[0] in ("stage1", "stage2") else 2
        if len(parts) != expected or not all(parts):
            raise ConfigError(f"override {item!r}: the key must be section.key, stage1.section.key or "
                              "stage2.section.key")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a table")
        node[parts[-1]] = parse_value(text.strip())
    return raw


def build_mission_config(raw: dict, source: str, fast: bool = False) -> MissionConfig:
    """Split a mission dict into the two stage configs and the mission's own; every key is checked."""
    s1_cls, s2_cls = _stage_classes()
    s1_sections, s2_sections = _section_names(s1_cls), _section_names(s2_cls)
    own_sections = _section_names(MissionOwnConfig)
    valid = sorted(set(s1_sections) | set(s2_sections) | set(own_sections) | {"stage1", "stage2"})
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(f'[{k}]' for k in unknown)}; valid: "
                          f"{', '.join(f'[{k}]' for k in valid)}")
    for stage, sections in (("stage1", s1_sections), ("stage2", s2_sections)):
        if not isinstance(raw.get(stage, {}), dict):
            raise ConfigError(f"{source}: [{stage}] must be a table of sections")
        bad = [k for k in raw.get(stage, {}) if k not in sections]
        if bad:
            raise ConfigError(f"{source}: unknown section(s) {', '.join(f'[{stage}.{k}]' for k in bad)}; valid: "
                              f"{', '.join(f'[{stage}.{k}]' for k in sections)}")

    def stage_dict(stage: str, sections: list[str]) -> dict:
        shared = {k: v for k, v in raw.items() if k in sections}
        return _deep_merge(shared, raw.get(stage, {}))

    cfg1 = config_from_dict(s1_cls, stage_dict("stage1", s1_sections), f"{source} (stage 1)")
    cfg2 = config_from_dict(s2_cls, stage_dict("stage2", s2_sections), f"{source} (stage 2)")
    own = config_from_dict(MissionOwnConfig, {k: raw.get(k, {}) for k in own_sections}, source)
    if Path(cfg1.output.dir).resolve() == Path(cfg2.output.dir).resolve():
        raise ConfigError(f"{source}: stage1.output.dir and stage2.output.dir are the same folder "
                          f"({cfg1.output.dir}): give each stage its own")
    if cfg1.demo.enabled != cfg2.demo.enabled:
        raise ConfigError(f"{source}: demo.enabled differs between the stages")
    if not cfg1.demo.enabled and not (cfg1.model.dit_high and cfg1.model.dit_low):
        raise ConfigError(f"{source}: model.dit_high and model.dit_low: the mission trains and renders a WAN 2.2 "
                          "A14B pair (the bundled workflow has two DiTs); set both (or run the demo)")
    if sorted(cfg1.model.train_dits) != ["high_noise", "low_noise"]:
        raise ConfigError(f"{source}: model.train_dits: the mission trains both DiTs of the pair")
    return MissionConfig(cfg1, cfg2, own, raw, source, fast)


def load_mission_config(path: str | Path | None = None, overrides: Sequence[str] = (), fast: bool = False
                        ) -> MissionConfig:
    """The embedded demo (``path`` None, optionally ``fast``) or a mission TOML file, plus overrides."""
    if path is None:
        raw, source = tomllib.loads(MISSION_TOML), "<embedded demo config>"
        if fast:
            raw, source = _deep_merge(raw, tomllib.loads(FAST_TOML)), "<embedded demo config, --fast>"
    else:
        from .config import read_toml

        if fast:
            raise ConfigError("--fast is the demo's CI mode: give it without --config")
        raw, source = read_toml(path), str(path)
    if overrides:
        raw = apply_mission_overrides(raw, overrides)
        source += " + command-line overrides"
    return build_mission_config(raw, source, fast)


def mission_toml(mc: MissionConfig) -> str:
    """The resolved mission as TOML: shared sections, then each stage's differences, then [mission]/[generate]."""
    from .config import config_to_dict, to_toml

    d1, d2 = config_to_dict(mc.stage1), config_to_dict(mc.stage2)
    lines = [f"# resolved from {mc.source}", "# stage 1 (the sections below apply to both stages unless "
             "[stage2.*] says otherwise)", to_toml(mc.stage1, comments=False).rstrip(), ""]
    from .config import _toml_value

    for section, values in d2.items():
        diff = {k: v for k, v in values.items() if d1.get(section, {}).get(k, object()) != v}
        if diff:
            lines.append(f"[stage2.{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in diff.items()]
            lines.append("")
    lines.append(to_toml(mc.own, comments=False).rstrip())
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- running

@dataclass
class StepTimer:
    """Announces the five steps and keeps their durations (shown at the end and in the report)."""

    log_fn: Callable[[str], None]
    total: int = 5
    times: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    @contextmanager
    def step(self, index: int, title: str):
        self.log_fn(f"\n=== [{index}/{self.total}] {title} ===")
        start = time.monotonic()
        yield
        self.times[title] = time.monotonic() - start
        self.log_fn(f"--- {title}: {self.times[title]:.1f} s (total {time.monotonic() - self.t0:.0f} s)")


@dataclass
class MissionResult:
    out_dir: Path
    report_html: Path
    report_md: Path
    clips: list
    lora_moe: Path
    stage1_loras: dict[str, Path]
    times: dict[str, float]
    seconds: float


def _free_memory() -> None:
    gc.collect()
    try:
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()
    except Exception:  # pragma: no cover
        pass


MARKER = ".wan_lora_moe_report"


def _prepare_out_dir(out_dir: Path) -> None:
    """An empty report folder; one of ours from an earlier run is emptied, anything else is refused."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).is_file():
            raise ConfigError(f"mission.out_dir {out_dir} is not empty and not a report folder of an earlier run: "
                              "choose another folder (it would be overwritten)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by python -m training.mission; emptied on every run\n")


def _server_device(choice: str) -> bool:
    """True for a CPU server."""
    import torch

    if choice == "cpu":
        return True
    if choice == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("generate.device = \"gpu\" but torch sees no CUDA device")
        return False
    return not torch.cuda.is_available()


def run_mission(mc: MissionConfig, resume: bool = False, overwrite: bool = False,
                log_fn: Callable[[str], None] = print) -> MissionResult:
    """Run the five steps (see the module docstring); returns where everything is."""
    ensure_comfy()
    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
    from .data.synthetic import CAPTIONS, INSTRUMENT_SHAPES
    from .comfy_server import ComfyServer
    from .demo import demo_clips, prepare_demo
    from .encoders import prepare
    from .generate import ClipSpec, ModelFiles, RenderSettings, boundary_step, link_models, load_api_workflow
    from .generate import prepare_custom_nodes, render_clips
    from .mission_report import write_mission_report
    from .models import resolve_model_path
    from .stage1 import run_stage1
    from .stage2 import run_stage2

    timer = StepTimer(log_fn)
    own, gen = mc.own.mission, mc.own.generate
    out_dir = Path(own.out_dir)
    _prepare_out_dir(out_dir)
    cfg1, cfg2 = mc.stage1, mc.stage2
    mode = ("demo (--fast)" if mc.fast else "demo") if mc.demo else f"config {mc.source}"
    log_fn(f"WAN LoRA-MoE mission: {mode}; everything it shows will be in {out_dir}")
    if mc.demo:
        log_fn("(tiny random models on synthetic clips: the run shows the pipeline working end to end; the "
               "videos it makes are noise, not surgery)")

    with timer.step(1, "data"):
        if mc.demo:
            manifest = demo_clips(cfg1, log_fn)
            log_fn(f"{4 * cfg1.demo.clips_per_class} synthetic clips ({cfg1.demo.clips_per_class} per instrument) "
                   f"with Chinese captions and tip boxes: {manifest}")
        else:
            log_fn(f"manifest: {cfg1.data.manifest}")

    with timer.step(2, "models and cache"):
        if mc.demo:
            cfg1 = prepare_demo(cfg1, log_fn, pair=True)
            cfg2 = dataclasses.replace(cfg2, model=cfg1.model,
                                       data=dataclasses.replace(cfg2.data, manifest=cfg1.data.manifest,
                                                                vae=cfg1.data.vae,
                                                                text_encoder=cfg1.data.text_encoder))
            log_fn(f"DiT pair (random, {cfg1.demo.dit_layers} blocks, dim {cfg1.demo.dit_dim}): "
                   f"{cfg1.model.dit_high}, {cfg1.model.dit_low}; VAE (random WAN 2.1): {cfg1.data.vae}; "
                   "text encoder: the hashing stand-in")
        prepared = prepare(cfg1.data, log_fn)
        log_fn(prepared.format())
        data_summary = prepared.format()
        del prepared

    # The server starts while training runs when both share the CPU (its start-up is mostly imports); on a
    # GPU it starts after training, so that it never competes with training for GPU memory.
    cpu_server = _server_device(gen.device)
    server_dir = Path(own.comfy_dir)
    server = ComfyServer(server_dir, cpu=cpu_server, threads=gen.cpu_threads or None)
    prepare_custom_nodes(server_dir, demo_encoder=mc.demo)
    try:
        with timer.step(3, "training: stage 1, then stage 2"):
            launched_early = False
            s1 = run_stage1(cfg1, resume="auto" if resume else None, overwrite=overwrite or mc.demo, log_fn=log_fn)
            stage1 = {"loras": dict(s1.loras), "steps": s1.steps, "losses": list(s1.losses), "plots": list(s1.plots),
                      "metrics": s1.metrics, "out_dir": s1.out_dir}
            del s1
            _free_memory()
            if cpu_server:
                # ComfyUI imports while stage 2 trains (stage 2 runs one torch thread on tiny models)
                server.launch()
                launched_early = True
            log_fn("")
            s2 = run_stage2(cfg2, base_loras=stage1["loras"], resume="auto" if resume else None,
                            overwrite=overwrite or mc.demo, log_fn=log_fn)
            stage2 = {"lora_moe": s2.lora_moe, "steps": s2.steps, "losses": list(s2.losses), "plots": list(s2.plots),
                      "metrics": s2.metrics, "out_dir": s2.out_dir, "validation": s2.validation,
                      "ema_check": s2.ema_check}
            del s2
            _free_memory()

        with timer.step(4, "clips from the bundled workflow in ComfyUI"):
            if not launched_early:
                server.launch()
            log_fn(f"ComfyUI server {server.url} (base directory {server_dir}, log {server.log_path})")
            server.wait_ready()
            log_fn(f"ComfyUI ready ({server.startup_s:.0f} s after launch)")
            files = ModelFiles(resolve_model_path(cfg1.model.dit_high, "high_noise DiT"),
                               resolve_model_path(cfg1.model.dit_low, "low_noise DiT"), _resolve(cfg1.data.vae, "vae"),
                               Path(stage2["lora_moe"]),
                               None if mc.demo else _resolve(cfg1.data.text_encoder, "text_encoders"))
            names = link_models(server_dir, files)
            api = load_api_workflow(server, Path(gen.workflow))
            settings = RenderSettings(
                steps=gen.steps, shift=gen.shift, cfg=gen.cfg or None, seed=None if gen.seed < 0 else gen.seed,
                width=gen.width or (cfg1.demo.width if mc.demo else _workflow_value(api, "width")),
                height=gen.height or (cfg1.demo.height if mc.demo else _workflow_value(api, "height")),
                frames=gen.frames or (cfg1.demo.frames if mc.demo else _workflow_value(api, "length")),
                boundary=cfg1.model.boundary)
            split = boundary_step(settings.steps, settings.shift, settings.boundary)
            log_fn(f"{settings.width}x{settings.height}, {settings.frames} frames, {settings.steps} steps (high-noise "
                   f"DiT steps 0-{split - 1}, low-noise DiT steps {split}-{settings.steps - 1}), shift {settings.shift:g}")
            expert_names = list(cfg2.moe.expert_names)
            prompts = list(gen.instrument_prompts)
            if not prompts:
                if expert_names != list(DEFAULT_EXPERT_NAMES):
                    raise ConfigError("generate.instrument_prompts: give one prompt per expert of moe.expert_names "
                                      f"{expert_names} (the built-in ones name the four default instruments)")
                prompts = [c[0] for c in CAPTIONS]
            if len(prompts) != len(expert_names):
                raise ConfigError(f"generate.instrument_prompts: {len(prompts)} prompt(s) for {len(expert_names)} "
                                  f"experts {expert_names}")
            auto_prompt = gen.auto_prompt or _workflow_value(api, "value", "PrimitiveStringMultiline")
            clip_names = (list(INSTRUMENT_SHAPES) if expert_names == list(DEFAULT_EXPERT_NAMES)
                          else [_slug(n) for n in expert_names])
            specs = [ClipSpec(f"{i + 1}_{name}", prompt, "rule-based", purpose=f"{expert} (its prompt names it)")
                     for i, (name, expert, prompt) in enumerate(zip(clip_names, expert_names, prompts))]
            n = len(specs)
            specs.append(ClipSpec(f"{n + 1}_auto_routed", auto_prompt, gen.auto_router,
                                  purpose=f"the workflow's prompt, {gen.auto_router} routing", keep_schedules=True))
            specs.append(ClipSpec(f"{n + 2}_experts_off", auto_prompt, experts_off=True,
                                  purpose="the same prompt and seed, experts off (base LoRA only)"))
            clips = render_clips(server, api, specs, settings, names, out_dir, gen.timeout_s, log_fn)
    finally:
        server.stop()

    with timer.step(5, "report"):
        md, page = write_mission_report(
            out_dir, mc=mc, mode=mode, clips=clips, settings=settings, split=split, expert_names=expert_names,
            stage1=stage1, stage2=stage2, data_summary=data_summary, times=timer.times, config_text=mission_toml(mc),
            log_fn=log_fn)
    seconds = time.monotonic() - timer.t0
    log_fn(f"\nDone in {seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timer.times.items()) + ").")
    log_fn(f"Everything is in {out_dir}/:")
    log_fn("  report.html          open it in a browser (report.md says the same in text)")
    log_fn(f"  contact_sheet.png    frames of the {len(clips)} clips; the clips: " +
           ", ".join(c.video.name for c in clips))
    log_fn("  gate_schedule_*.png, expert_usage.png, loss_*.png, stage2_*.png, prompts/ (the API graphs run)")
    log_fn(f"LoRA-MoE file: {stage2['lora_moe']} (ComfyUI: models/lora_moe/, then the bundled workflow)")
    return MissionResult(out_dir, page, md, clips, Path(stage2["lora_moe"]), stage1["loras"], timer.times, seconds)


def _resolve(spec: str, folder: str) -> Path:
    from .encoders import resolve_in_folder

    return resolve_in_folder(spec, folder, {"vae": "VAE", "text_encoders": "text encoder"}[folder])


def _workflow_value(api: dict, key: str, class_type: str = "EmptyHunyuanLatentVideo") -> Any:
    for node in api.values():
        if node["class_type"] == class_type and key in node["inputs"]:
            return node["inputs"][key]
    raise ConfigError(f"generate.workflow: no {class_type} node with '{key}' in the workflow")


def _slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "_" for c in name).strip("_") or "expert"


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.mission (bash scripts/demo.sh)",
        description="The whole WAN LoRA-MoE job in one command: data, stage 1, stage 2, clips rendered by the "
                    "bundled A14B workflow in a headless ComfyUI, and a report. Without --config: the CPU demo on "
                    "synthetic clips and tiny random models.")
    p.add_argument("--config", type=Path, help="a mission TOML (python -m training.mission --print-config shows "
                                               "the demo's; set model.dit_high/dit_low and data.* for a real run)")
    p.add_argument("--fast", action="store_true", help="the demo, smaller and shorter (CI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key: section.key=v (both stages), stage1.section.key=v, stage2.section.key=v, "
                        "generate.key=v, mission.key=v (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue both stages from their newest checkpoints")
    p.add_argument("--overwrite", action="store_true", help="start the stages again in output folders that hold "
                                                            "runs (always so in the demo)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_comfy()
    from moe_core.routing import RoutingError
    from .comfy_server import ServerError
    from .generate import GenerationError
    from .stage1 import _known_errors
    from .stage2 import BaseLoraError
    from .stage2_eval import HoldoutError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    errors = _known_errors() + (BaseLoraError, HoldoutError, RoutingError, GenerationError, ServerError)
    try:
        mc = load_mission_config(args.config, args.overrides, args.fast)
        if args.print_config:
            print(mission_toml(mc), end="")
            return 0
        run_mission(mc, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
