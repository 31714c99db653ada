"""Shared pieces of the training tests: a workspace of synthetic clips and tiny WAN DiT files, and configs.

The DiTs are ``wan_fixtures.tiny_wan_state_dict`` models (3 blocks, dim 128) written as .safetensors and
loaded by the trainer through ``comfy.sd.load_diffusion_model``; the clips are rendered by
``training.data.synthetic`` (48x32, 9 frames, Chinese captions, tip ROI boxes); the encoders are the data
pipeline's cheap stand-ins (``demo:pooling`` VAE, ``demo:hash`` text encoder).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import wan_fixtures

LAYERS = 3


@dataclass
class Workspace:
    root: Path
    manifest: Path
    cache: Path
    dit: Path
    dit_low: Path  # a second DiT (other weights): the low-noise half of a fake A14B pair


def write_dit(path: Path, seed: int = 0, num_layers: int = LAYERS) -> Path:
    sd = wan_fixtures.tiny_wan_state_dict(seed, num_layers=num_layers, dim=128, ffn_dim=256)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def make_workspace(root: Path, clips_per_class: int = 1) -> Workspace:
    from training.data.synthetic import make_synthetic_dataset

    manifest = make_synthetic_dataset(root / "data", n_per_class=clips_per_class, seed=5, width=48, height=32,
                                      fps=16.0, seconds=9 / 16)
    return Workspace(root, manifest, root / "cache", write_dit(root / "models" / "tiny_high.safetensors", 0),
                     write_dit(root / "models" / "tiny_low.safetensors", 1))


def config_dict(ws: Workspace, out_dir: Path, pair: bool = False, **sections) -> dict:
    """A small stage-1 config for the workspace; ``sections`` update sections, e.g. train={"max_steps": 3}."""
    cfg = {
        "model": ({"dit_high": str(ws.dit), "dit_low": str(ws.dit_low)} if pair else {"dit": str(ws.dit)}),
        "data": {"manifest": str(ws.manifest), "cache_dir": str(ws.cache), "vae": "demo:pooling",
                 "text_encoder": "demo:hash", "max_frames": 9, "target_area": 48 * 32},
        "lora": {"target_blocks": 2, "ffn_blocks": 1},
        "train": {"seed": 0, "max_steps": 4, "batch_size": 1, "grad_accum": 2, "learning_rate": 1e-3,
                  "mixed_precision": "no", "warmup_steps": 1, "lr_scheduler": "cosine"},
        "objective": {},
        "output": {"dir": str(out_dir), "name": "lora", "save_every": 0, "progress": False, "plot": False},
    }
    cfg = copy.deepcopy(cfg)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def stage1_config(ws: Workspace, out_dir: Path, pair: bool = False, **sections):
    from training.config import Stage1Config, config_from_dict

    return config_from_dict(Stage1Config, config_dict(ws, out_dir, pair, **sections), "test config")


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
