"""The ablation config: one TOML file, checked key by key before anything runs (``training.config`` machinery).

Sections: ``[ablation]`` (folders, workflow, which arms), ``[models]`` (the DiT pair, VAE, text encoder and the
LoRA-MoE files), ``[render]`` (prompts, seeds, sampler values), ``[evaluation]`` (the real clips and the
optional TorchScript models of ``training.evaluation``), ``[report]`` (pictures), and an optional ``[sha256]``
table of checksums keyed like the files (``models.dit_high = "<hex>"``; a list for a list of files).

Every error names the config key: a missing file (``models.lora_moe: model file not found: ...``), a checksum
that does not match (``sha256.models.vae``), an unknown arm (``ablation.arms[2]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..config import ConfigError, apply_overrides, config_from_dict, doc, read_toml
from ..encoders import DEMO_TEXT


@dataclass
class AblationSection:
    """Where the run writes, the workflow it renders, and which arms."""

    out_dir: str = doc("the run's folder: clips/<arm>/, evaluation/, pictures, report.html / report.json; a run "
                       "into the same folder resumes (finished clips are not rendered again)", "outputs/ablation")
    comfy_dir: str = doc("base directory of the ComfyUI server that renders the clips (model files are linked into "
                         "its models/ folders)", "outputs/ablation/comfyui")
    workflow: str = doc("the UI workflow rendered for every arm (the bundled A14B graph: two Load LoRA-MoE, a Router, "
                        "two Timestep Band nodes)", "workflows/wan22_a14b_t2v_lora_moe.json")
    arms: list[str] = doc("arms by name (empty: every arm the files allow); groups: forced, n_experts, roi; see "
                          "docs/ablation.md", factory=list)
    reference: str = doc("the arm every other arm is paired against in the evaluation", "base_only")


@dataclass
class ModelsSection:
    """Model files (paths; relative to the working directory). Optional checksums go in [sha256]."""

    dit_high: str = doc("WAN 2.2 A14B high-noise DiT (.safetensors)", "")
    dit_low: str = doc("WAN 2.2 A14B low-noise DiT (.safetensors)", "")
    vae: str = doc("WAN 2.1 VAE (.safetensors)", "")
    text_encoder: str = doc(f"UMT5-XXL text encoder (.safetensors), or \"{DEMO_TEXT}\" for the demo's hashing "
                            "stand-in", "")
    lora_moe: str = doc("the LoRA-MoE file of every arm except n_experts_* and roi_*", "")
    expert_count_files: list[str] = doc("further LoRA-MoE files with other numbers of experts: one arm "
                                        "n_experts_<N> each (routed as the experts arm)", factory=list)
    roi_weighted: str = doc("a LoRA-MoE trained with the ROI-weighted loss (arm roi_weighted; needs roi_uniform)", "")
    roi_uniform: str = doc("the same trained with a uniform loss (arm roi_uniform; needs roi_weighted)", "")
    boundary: float = doc("A14B timestep boundary between the two DiTs (0.875 for t2v)", 0.875)


@dataclass
class RenderSection:
    """What is rendered for every arm: each prompt at each seed."""

    prompts: list[str] = doc("the prompts (each names the instrument it shows)", factory=list)
    instruments: list[str] = doc("the instrument of each prompt, by expert name (empty: the one its keywords name, "
                                 "when they name exactly one)", factory=list)
    seeds: list[int] = doc("noise seeds: every prompt is rendered with each", factory=lambda: [0])
    steps: int = doc("sampler steps (the high/low-noise split moves to where t falls below models.boundary)", 20)
    shift: float = doc("ModelSamplingSD3 shift", 8.0)
    cfg: float = doc("CFG scale (0: the workflow's)", 0.0)
    width: int = doc("clip width (0: the workflow's)", 0)
    height: int = doc("clip height (0: the workflow's)", 0)
    frames: int = doc("frames per clip, 4n+1 (0: the workflow's)", 0)
    device: Literal["auto", "cpu", "gpu"] = doc("where ComfyUI renders (auto: the GPU if there is one)", "auto")
    cpu_threads: int = doc("torch threads of the ComfyUI server on the CPU (0: torch's default)", 0)
    timeout_s: float = doc("longest wait for one clip, in seconds", 1800.0)


@dataclass
class EvaluationSection:
    """training.evaluation on every arm (docs/evaluation.md); a model left empty skips its metric."""

    real: str = doc("real clips: a folder of videos or a training manifest (.jsonl); the ceiling, and FVD's "
                    "reference (empty: no real set)", "")
    i3d: str = doc("StyleGAN-V i3d_torchscript.pt for FVD/KVD", "")
    i3d_sha256: str = doc("its SHA-256", "")
    classifier: str = doc("TorchScript instrument classifier (identity metrics)", "")
    classifier_sha256: str = doc("its SHA-256", "")
    classifier_input: Literal["frame", "roi"] = doc("whole frames or tip-box crops", "frame")
    detector: str = doc("TorchScript tip detector (PCK, IoU, detection rate)", "")
    detector_sha256: str = doc("its SHA-256", "")
    temporal: bool = doc("warped PSNR and motion (optical flow)", True)
    flow_scale: float = doc("optical flow on frames scaled by this (DIS needs 12 px or more after scaling)", 0.5)
    workers: int = doc("clips evaluated in parallel threads", 1)
    bootstrap: int = doc("bootstrap replicates of every interval", 2000)
    cluster: Literal["video", "prompt"] = doc("bootstrap clusters: each clip, or all seeds of a prompt", "video")
    level: float = doc("interval level", 0.95)
    seed: int = doc("bootstrap seed", 0)
    min_clips: int = doc("fewest readable clips a set needs", 2)


@dataclass
class ReportSection:
    """The pictures of the report."""

    sheet_seeds: list[int] = doc("seeds shown in the contact sheets and x-t slices (empty: the first seed)",
                                 factory=list)
    slice_row: float = doc("x-t slices: the pixel row, as a fraction of the height (0 top, 1 bottom)", 0.5)
    router_levels: int = doc("noise levels t (evenly over [0, 1]) of the router-vs-instrument confusion", 21)


@dataclass
class Sections:
    """The TOML sections the generic loader checks (``[sha256]`` is a free table, checked here)."""

    ablation: AblationSection = field(default_factory=AblationSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    render: RenderSection = field(default_factory=RenderSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    report: ReportSection = field(default_factory=ReportSection)


@dataclass
class AblationConfig:
    ablation: AblationSection = field(default_factory=AblationSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    render: RenderSection = field(default_factory=RenderSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    report: ReportSection = field(default_factory=ReportSection)
    sha256: dict[str, Any] = field(default_factory=dict)  # the [sha256] table, flattened to file keys
    source: str = "config"

    def validate(self) -> None:
        r, m = self.render, self.models
        for key in ("dit_high", "dit_low", "vae", "text_encoder", "lora_moe"):
            if not getattr(m, key).strip():
                raise ConfigError(f"config: models.{key} is empty: the ablation renders the A14B workflow and "
                                  "needs every model file")
        if not r.prompts or any(not p.strip() for p in r.prompts):
            raise ConfigError("config: render.prompts: give at least one prompt, none of them empty")
        if r.instruments and len(r.instruments) != len(r.prompts):
            raise ConfigError(f"config: render.instruments: {len(r.instruments)} name(s) for {len(r.prompts)} "
                              "prompt(s): give one per prompt, or none")
        if not r.seeds or len(set(r.seeds)) != len(r.seeds) or any(s < 0 for s in r.seeds):
            raise ConfigError(f"config: render.seeds: give distinct seeds >= 0, got {r.seeds}")
        if r.steps < 2:
            raise ConfigError(f"config: render.steps: must be >= 2 (one per DiT at least), got {r.steps}")
        if not (r.shift > 0 and r.cfg >= 0 and r.timeout_s > 0 and r.cpu_threads >= 0):
            raise ConfigError("config: render.shift and render.timeout_s must be > 0, render.cfg and "
                              "render.cpu_threads >= 0")
        if r.frames and (r.frames < 1 or (r.frames - 1) % 4):
            raise ConfigError(f"config: render.frames: must be 4n+1, got {r.frames}")
        if (r.width and r.width % 16) or (r.height and r.height % 16) or r.width < 0 or r.height < 0:
            raise ConfigError("config: render.width / render.height: must be multiples of 16")
        if not 0.0 < m.boundary < 1.0:
            raise ConfigError(f"config: models.boundary: must be in (0, 1), got {m.boundary}")
        if bool(m.roi_weighted) != bool(m.roi_uniform):
            have, lack = (("roi_weighted", "roi_uniform") if m.roi_weighted else ("roi_uniform", "roi_weighted"))
            raise ConfigError(f"config: models.{have} is set but models.{lack} is empty: ROI-weighted vs uniform "
                              "compares two trained files; give both, or neither")
        e = self.evaluation
        if not 0.1 <= e.flow_scale <= 1.0:
            raise ConfigError(f"config: evaluation.flow_scale: must be in [0.1, 1], got {e.flow_scale}")
        if e.workers < 1 or e.bootstrap < 0 or e.min_clips < 1 or not 0 < e.level < 1:
            raise ConfigError("config: evaluation.workers and evaluation.min_clips must be >= 1, evaluation.bootstrap "
                              ">= 0, evaluation.level in (0, 1)")
        rep = self.report
        unknown = [s for s in rep.sheet_seeds if s not in r.seeds]
        if unknown:
            raise ConfigError(f"config: report.sheet_seeds: {unknown} not in render.seeds {r.seeds}")
        if not (math.isfinite(rep.slice_row) and 0.0 <= rep.slice_row <= 1.0) or rep.router_levels < 2:
            raise ConfigError("config: report.slice_row must be in [0, 1] and report.router_levels >= 2")
        self._validate_sha256()

    def _validate_sha256(self) -> None:
        files = self.file_keys()
        for key, value in self.sha256.items():
            if key not in files:
                raise ConfigError(f"config: sha256.{key}: no such file key; checksums are keyed like the files: "
                                  f"{', '.join(sorted(k for k in files))}")
            want = files[key]
            if isinstance(want, list):
                if not isinstance(value, list) or len(value) != len(want) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"config: sha256.{key}: give a list of {len(want)} checksum(s) (one per file of "
                                      f"{key}, \"\" to skip one), got {value!r}")
            elif not isinstance(value, str):
                raise ConfigError(f"config: sha256.{key}: a hex string, got {value!r}")

    def file_keys(self) -> dict[str, str | list[str]]:
        """The model files by config key (``models.x``), as written in the config."""
        m = self.models
        out: dict[str, str | list[str]] = {f"models.{k}": getattr(m, k) for k in
                                           ("dit_high", "dit_low", "vae", "text_encoder", "lora_moe")}
        out["models.expert_count_files"] = list(m.expert_count_files)
        out["models.roi_weighted"], out["models.roi_uniform"] = m.roi_weighted, m.roi_uniform
        return out

    def checksum(self, key: str, index: int | None = None) -> str | None:
        value = self.sha256.get(key)
        if index is not None and isinstance(value, list):
            value = value[index]
        return value or None


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def ablation_config_from_dict(data: dict, source: str) -> AblationConfig:
    data = dict(data)
    sha = data.pop("sha256", {})
    if not isinstance(sha, dict):
        raise ConfigError(f"{source}: [sha256] must be a table (models.dit_high = \"<hex>\"), got {sha!r}")
    built = config_from_dict(Sections, data, source)
    cfg = AblationConfig(built.ablation, built.models, built.render, built.evaluation, built.report,
                         _flatten(sha), source)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None
    return cfg


def load_ablation_config(path: str | Path, overrides: Sequence[str] = ()) -> AblationConfig:
    """The config file plus ``section.key=value`` overrides, every key checked."""
    data, source = read_toml(path), str(path)
    if overrides:
        sha = data.pop("sha256", None)
        data = apply_overrides(data, overrides, Sections)
        if sha is not None:
            data["sha256"] = sha
        source += " + command-line overrides"
    return ablation_config_from_dict(data, source)


__all__ = ["AblationConfig", "DEMO_TEXT", "Sections", "ablation_config_from_dict", "load_ablation_config"]
