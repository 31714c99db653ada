"""The mission's configuration: one TOML for both stages, the clips and the report (``training.mission``).

Sections of the stage configs (``[model]``, ``[data]``, ``[lora]``, ``[train]``, ``[demo]``, ``[moe]``...)
apply to both stages; ``[stage1.<section>]`` and ``[stage2.<section>]`` to one of them (e.g.
``[stage1.train] max_steps``); ``[mission]`` and ``[generate]`` are the mission's own. Every key is checked by
the stage configs' own machinery (``training.config.config_from_dict``): unknown keys are errors naming the
valid ones. ``MISSION_TOML`` is the embedded demo, ``FAST_TOML`` what ``--fast`` changes in it.
"""
from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

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
clips_per_class = 3
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


__all__ = ["FAST_TOML", "GenerateSection", "MISSION_TOML", "MissionConfig", "MissionOwnConfig", "MissionSection",
           "apply_mission_overrides", "build_mission_config", "load_mission_config", "mission_toml"]
