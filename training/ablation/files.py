"""The model files of an ablation, checked before any work: each exists, matches its optional SHA-256, and
each LoRA-MoE file is a valid file with the two adapter sets of the A14B workflow. Errors name the config key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moe_core.checkpoint import LoraMoE, LoraMoEFormatError, load_lora_moe

from ..config import ConfigError
from ..evaluation.features import check_model_file
from .config import DEMO_TEXT, AblationConfig

A14B_SETS = ("high_noise", "low_noise")


@dataclass
class ModelPaths:
    """Checked paths by config key (``models.dit_high``, ``models.expert_count_files[1]``...), and the loaded
    LoRA-MoE files by the same keys."""

    paths: dict[str, Path]
    moes: dict[str, LoraMoE] = field(default_factory=dict)
    demo_text: bool = False  # the demo's hashing text encoder (no file)

    def identity(self, key: str) -> list:
        """What decides whether a finished render is still valid: the resolved path, size and mtime."""
        p = self.paths[key]
        st = os.stat(p)
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _check(key: str, spec: str, sha: str | None) -> Path:
    """``check_model_file`` with the config key as the role: its errors start with the key."""
    return check_model_file(spec, sha, key).absolute()


def check_model_files(cfg: AblationConfig, log_fn: Callable[[str], None] = print) -> ModelPaths:
    """Every file of ``[models]``: present, checksum (when given), LoRA-MoE files loaded and checked."""
    m = cfg.models
    paths: dict[str, Path] = {}
    for name in ("dit_high", "dit_low", "vae", "lora_moe"):
        key = f"models.{name}"
        paths[key] = _check(key, getattr(m, name), cfg.checksum(key))
    demo_text = m.text_encoder.strip() == DEMO_TEXT
    if not demo_text:
        key = "models.text_encoder"
        paths[key] = _check(key, m.text_encoder, cfg.checksum(key))
    for i, spec in enumerate(m.expert_count_files):
        paths[f"models.expert_count_files[{i}]"] = _check(f"models.expert_count_files[{i}]", spec,
                                                          cfg.checksum("models.expert_count_files", i))
    for name in ("roi_weighted", "roi_uniform"):
        if getattr(m, name):
            paths[f"models.{name}"] = _check(f"models.{name}", getattr(m, name), cfg.checksum(f"models.{name}"))
    files = ModelPaths(paths, demo_text=demo_text)
    for key, path in paths.items():
        if key.startswith(("models.lora_moe", "models.expert_count_files", "models.roi_")):
            try:
                moe = load_lora_moe(path)
            except LoraMoEFormatError as e:
                raise ConfigError(f"{key}: not a usable LoRA-MoE file: {e}") from None
            missing = [s for s in A14B_SETS if s not in moe.sets]
            if missing:
                raise ConfigError(f"{key}: {path} has the adapter set(s) {sorted(moe.sets)}, but the A14B workflow "
                                  f"needs {list(A14B_SETS)} (one per DiT); missing: {missing}")
            files.moes[key] = moe
    log_fn("model files: " + ", ".join(f"{k.split('.', 1)[1]} {p.name}" for k, p in paths.items())
           + ("; text encoder: the demo's hashing stand-in" if demo_text else ""))
    return files


__all__ = ["A14B_SETS", "ModelPaths", "check_model_files"]
