"""Small TorchScript models with the evaluation interfaces, and clip folders with known content.

The networks are tiny and deterministic, but they are real TorchScript files loaded through the same
``torch.jit.load`` path as a user's I3D, detector or classifier, and each one checks the calling convention
it is given (an I3D called with ``rescale=True`` or with values outside [-1, 1] fails).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from training.data.synthetic import render_clip, write_clip
from training.data.video_io import write_video


class TinyI3D(torch.nn.Module):
    """I3D convention: ``[B, 3, 16, 224, 224]`` in [-1, 1], kwargs rescale/resize False, return_features True.

    Features: per-frame channel means of four horizontal bands (3 x 4 x 16 = 192 values) through a fixed
    random projection to ``dim``.
    """

    def __init__(self, dim: int = 24, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(192, dim, generator=g) / 14.0, requires_grad=False)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert not rescale, "frames must already be in [-1, 1]"
        assert not resize, "frames must already be 224x224"
        assert return_features, "FVD uses the pre-softmax features"
        assert x.shape[1] == 3 and x.shape[2] == 16 and x.shape[3] == 224 and x.shape[4] == 224
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        pooled = torch.nn.functional.adaptive_avg_pool3d(x, (16, 4, 1))  # [B, 3, 16, 4, 1]
        return pooled.flatten(1) @ self.proj


class BrightestSpotDetector(torch.nn.Module):
    """Tip detector interface: ``[B, 3, H, W]`` in [0, 1] -> ``[B, 7]`` (score, tip x, tip y, box).

    The tip is the brightest pixel (centre of the pixel), the score its brightness, the box the tip +- 4 px.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(1)
        w = grey.shape[2]
        value, idx = grey.flatten(1).max(1)
        ys = torch.div(idx, w, rounding_mode="floor").to(torch.float32) + 0.5
        xs = (idx % w).to(torch.float32) + 0.5
        return torch.stack([value, xs, ys, xs - 4, ys - 4, xs + 4, ys + 4], 1)


class ColourClassifier(torch.nn.Module):
    """Classifier interface: ``[B, 3, S, S]`` in [0, 1] -> logits over 4 classes by dominant colour.

    Class 0 red, 1 green, 2 blue, 3 grey (all channels alike). Black padding does not change the winner.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((2, 3))
        spread = m.max(1).values - m.min(1).values
        return torch.stack([m[:, 0] - m[:, 1] - m[:, 2], m[:, 1] - m[:, 0] - m[:, 2],
                            m[:, 2] - m[:, 0] - m[:, 1], 0.2 - spread], 1) * 20


def save_script(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; users still ship it
        torch.jit.script(module).save(str(path))
    return path


def write_synthetic_arm(folder: Path, seed_offset: int = 0, prompts: int = 4, seeds: int = 2, width: int = 64,
                        height: int = 48, seconds: float = 1.25, annotate: bool = True) -> list[Path]:
    """Synthetic laparoscopy clips ``p<label>_seed<k>.mp4`` (one prompt per instrument), with a sidecar
    (tip boxes, tip points, instrument name) when ``annotate``."""
    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

    paths = []
    for label in range(prompts):
        for seed in range(seeds):
            clip = render_clip(label % 4, seed=seed + seed_offset, width=width, height=height, seconds=seconds)
            name = f"p{label}_seed{seed}"
            paths.append(write_clip(clip, folder, name))
            if annotate:
                (folder / f"{name}.json").write_text(json.dumps(
                    {"roi_boxes": clip.boxes, "tips": clip.tips.tolist(),
                     "instrument": DEFAULT_EXPERT_NAMES[label % 4]}), encoding="utf-8")
    return paths


def write_plain_clip(path: Path, frames: int = 12, width: int = 64, height: int = 48, fps: float = 16.0,
                     seed: int = 0) -> Path:
    """A small clip of smooth random texture (for input-checking tests)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return write_video(path, [np.roll(base, i, axis=1) for i in range(frames)], fps)
