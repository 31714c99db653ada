"""Synthetic laparoscopy-like clips with known instrument tips, for tests and the demo.

Real surgical clips cannot ship with the repository, yet the data path (decode, resample, bucket, ROI,
labels, cache) and a demo training run need clips whose content and ROI are known exactly. Each clip is a
pinkish tissue texture with vessels and fat blobs, and one instrument entering from the image border whose
tip moves smoothly; the tip's shape depends on its class so experts have something to tell apart:

* Scissors (0): two thin blades opening and closing around a pivot;
* Hook/Electrocautery (1): a black-sleeved shaft with an L-shaped metal tip;
* Suction (2): a wide light tube with a round open tip;
* Other (3), a grasper: two short thick parallel jaws opening and closing.

Everything is deterministic from the seed; rendering is numpy + OpenCV drawing (8 clips in well under a
second), writing is H.264 mp4 through imageio-ffmpeg. ROI boxes enclose the tip (not the whole shaft), in
source-frame pixels, one per frame, as the manifest's ``roi_boxes`` wants them.

``HashTextEncoder`` and ``PoolingVideoEncoder`` are cheap deterministic stand-ins for UMT5-XXL and the WAN VAE
with the real output shapes, for tests and CPU demos of the cache and training loop.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_core.atomic import atomic_write_text
from .manifest import write_manifest
from .video_io import write_video

#: Shape drawn for each expert index (DEFAULT_EXPERT_NAMES order).
INSTRUMENT_SHAPES = ("scissors", "hook", "suction", "grasper")

#: Caption templates per expert index; each names exactly that expert's instrument.
CAPTIONS: tuple[tuple[str, ...], ...] = (
    ("腹腔镜手术中，剪刀剪开组织并游离筋膜。", "术者使用剪刀沿血管旁剪切组织。"),
    ("腹腔镜手术中，电凝钩沿组织平面移动并电凝止血。", "电凝钩切割组织，创面少量渗血。"),
    ("腹腔镜手术中，吸引器吸除术野积血。", "吸引管清理术野，保持视野清晰。"),
    ("腹腔镜手术中，抓钳抓取并牵拉组织。", "抓钳提起组织，暴露手术平面。"),
)

#: A caption with no instrument keyword (for testing the no-instrument report).
NO_INSTRUMENT_CAPTION = "腹腔镜下观察腹腔，组织表面光滑，未见明显出血。"


@dataclass
class SyntheticClip:
    """Rendered frames (uint8 RGB ``[N, H, W, 3]``), tip boxes per frame, caption, expert index, fps."""

    frames: np.ndarray
    boxes: list[list[float]]
    tips: np.ndarray
    caption: str
    label: int
    fps: float


def _cv2():
    import cv2

    return cv2


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    small = rng.random((max(2, cells * height // max(height, width)), max(2, cells * width // max(height, width))))
    return _cv2().resize(small.astype(np.float32), (width, height), interpolation=_cv2().INTER_CUBIC)


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Tissue-like float32 RGB ``[H, W, 3]`` in [0, 255]: red-pink texture, dark vessels, yellowish fat."""
    cv2 = _cv2()
    shade = 0.6 * _smooth_noise(rng, height, width, 4) + 0.4 * _smooth_noise(rng, height, width, 12)
    base = np.array([190.0, 80.0, 90.0]) * (0.75 + 0.5 * shade[..., None])
    base += rng.normal(0.0, 4.0, size=(height, width, 1))
    img = np.clip(base, 0, 255).astype(np.float32)
    overlay = np.zeros_like(img)
    weight = np.zeros((height, width), np.float32)
    for _ in range(rng.integers(1, 4)):  # fat blobs
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(width // 10 + 1, width // 4 + 2)),
                int(rng.integers(height // 10 + 1, height // 4 + 2)))
        blob = np.zeros((height, width), np.float32)
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
        overlay += blob[..., None] * np.array([225.0, 190.0, 120.0], np.float32)
        weight += blob
    for _ in range(rng.integers(2, 5)):  # vessels: random walks
        point = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        angle = rng.uniform(0, 2 * math.pi)
        pts = [point.copy()]
        for _ in range(12):
            angle += rng.normal(0, 0.35)
            point = point + (max(width, height) / 10) * np.array([math.cos(angle), math.sin(angle)])
            pts.append(point.copy())
        vessel = np.zeros((height, width), np.float32)
        cv2.polylines(vessel, [np.round(np.array(pts)).astype(np.int32)], False, 1.0,
                      max(1, min(width, height) // 40), cv2.LINE_AA)
        overlay += vessel[..., None] * np.array([110.0, 20.0, 35.0], np.float32)
        weight += vessel
    weight = cv2.GaussianBlur(weight, (0, 0), 0.8)
    overlay = cv2.GaussianBlur(overlay, (0, 0), 0.8) / np.maximum(weight[..., None], 1e-3)  # mean colour
    mix = np.clip(weight, 0, 0.85)[..., None]
    img = img * (1 - mix) + overlay * mix
    return np.clip(img, 0, 255).astype(np.float32)


def _tip_path(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """Smooth tip positions ``[n, 2]`` inside the central part of the frame."""
    t = np.arange(n) / max(n - 1, 1)
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    ax, ay = width * rng.uniform(0.1, 0.2), height * rng.uniform(0.1, 0.2)
    fx, fy = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
    px, py = rng.uniform(0, 2 * math.pi, size=2)
    return np.stack([cx + ax * np.sin(2 * math.pi * fx * t + px), cy + ay * np.sin(2 * math.pi * fy * t + py)], 1)


def _draw_instrument(img: np.ndarray, shape: str, entry: np.ndarray, tip: np.ndarray, phase: float,
                     scale: float) -> np.ndarray:
    """Draw shaft and tip on ``img`` (in place); return the tip's outline points ``[k, 2]`` for the ROI."""
    cv2 = _cv2()
    d = tip - entry
    d = d / max(np.linalg.norm(d), 1e-6)
    nrm = np.array([-d[1], d[0]])
    metal, dark, sleeve = (200, 200, 205), (60, 60, 65), (25, 25, 28)
    shaft_w = max(2, int(round(0.09 * scale)))
    head = 0.22 * scale  # length of the tip part
    base = tip - d * head  # where the shaft ends and the tip starts

    def line(a, b, color, width):
        cv2.line(img, tuple(int(round(v * 16)) for v in a), tuple(int(round(v * 16)) for v in b), color,
                 max(1, int(width)), cv2.LINE_AA, shift=4)

    opening = 0.5 + 0.5 * math.sin(phase)  # 0 closed .. 1 open
    if shape == "scissors":
        line(entry, base, metal, shaft_w)
        pts = [base]
        for sign in (-1, 1):
            ang = sign * math.radians(4 + 22 * opening)
            blade = d * math.cos(ang) + nrm * math.sin(ang)
            end = base + blade * head * 1.15
            line(base, end, (230, 230, 235), max(1, shaft_w // 2))
            pts.append(end)
    elif shape == "hook":
        line(entry, base, sleeve, shaft_w)
        bend = tip
        hook_end = tip + nrm * head * 0.6
        line(base, bend, metal, max(1, shaft_w // 2))
        line(bend, hook_end, metal, max(1, shaft_w // 2))
        pts = [base, bend, hook_end]
    elif shape == "suction":
        wide = int(shaft_w * 1.6)
        line(entry, tip, (215, 215, 210), wide)
        radius = max(2.0, wide * 0.65)
        cv2.circle(img, tuple(int(round(v * 16)) for v in tip), int(round(radius * 16)), dark, -1, cv2.LINE_AA, 4)
        pts = [base, tip + (d + nrm) * radius, tip + (d - nrm) * radius, tip - (d + nrm) * radius]
    elif shape == "grasper":
        line(entry, base, metal, shaft_w)
        gap = (0.3 + 0.6 * opening) * head
        pts = [base]
        for sign in (-1, 1):
            start = base + sign * nrm * gap * 0.5
            end = start + d * head
            line(base, start, (170, 170, 175), max(1, shaft_w // 2))
            line(start, end, (170, 170, 175), max(2, int(shaft_w * 0.8)))
            pts.extend([start, end])
    else:
        raise ValueError(f"unknown instrument shape {shape!r}")
    return np.array(pts, dtype=np.float64)


def render_clip(label: int, seed: int = 0, width: int = 96, height: int = 64, fps: float = 16.0,
                seconds: float = 2.0, caption: str | None = None, background_seed: int | None = None
                ) -> SyntheticClip:
    """Render one clip of expert ``label`` (index into DEFAULT_EXPERT_NAMES).

    ``boxes[i]`` is ``[x0, y0, x1, y1]`` around the tip in frame ``i`` (2 px margin, clipped to the frame).
    ``background_seed`` puts every clip on the same tissue (a controlled set where only the instrument and
    its motion differ, as the stage-2 specialisation test wants); None draws the tissue from ``seed``.
    """
    if not 0 <= label < len(INSTRUMENT_SHAPES):
        raise ValueError(f"label must be 0..{len(INSTRUMENT_SHAPES) - 1}, got {label}")
    rng = np.random.default_rng([seed, label])
    n = max(1, int(round(seconds * fps)))
    background = render_background(rng if background_seed is None else np.random.default_rng(background_seed),
                                   height, width)
    tips = _tip_path(rng, n, width, height)
    side = int(rng.integers(0, 4))  # entry border: left, right, top, bottom
    along = rng.uniform(0.2, 0.8)
    entry = {0: (-5.0, along * height), 1: (width + 5.0, along * height),
             2: (along * width, -5.0), 3: (along * width, height + 5.0)}[side]
    entry = np.array(entry)
    speed = rng.uniform(0.25, 0.45)  # jaw/blade cycles per frame (radians scale below)
    scale = float(min(width, height))
    frames = np.empty((n, height, width, 3), np.uint8)
    boxes: list[list[float]] = []
    for i in range(n):
        img = background.copy()
        img += rng.normal(0.0, 2.0, size=(height, width, 1)).astype(np.float32)  # sensor noise
        canvas = np.clip(img, 0, 255).astype(np.uint8)
        pts = _draw_instrument(canvas, INSTRUMENT_SHAPES[label], entry + tips[i] * 0.05, tips[i],
                               phase=i * speed * 2.0, scale=scale)
        frames[i] = canvas
        margin = 2.0 + 0.05 * scale
        x0, y0 = np.maximum(pts.min(0) - margin, 0)
        x1, y1 = np.minimum(pts.max(0) + margin, [width, height])
        boxes.append([round(float(x0), 2), round(float(y0), 2), round(float(x1), 2), round(float(y1), 2)])
    if caption is None:
        options = CAPTIONS[label]
        caption = options[int(rng.integers(0, len(options)))]
    return SyntheticClip(frames=frames, boxes=boxes, tips=tips, caption=caption, label=label, fps=fps)


def write_clip(clip: SyntheticClip, out_dir: str | os.PathLike, name: str) -> Path:
    """Write ``<name>.mp4`` and its caption ``<name>.txt`` (UTF-8) into ``out_dir``; returns the mp4 path."""
    out_dir = Path(out_dir)
    video = write_video(out_dir / f"{name}.mp4", clip.frames, clip.fps)
    atomic_write_text(out_dir / f"{name}.txt", clip.caption + "\n")
    return video


def make_synthetic_dataset(root: str | os.PathLike, n_per_class: int = 2, seed: int = 0, width: int = 96,
                           height: int = 64, fps: float | Sequence[float] = 16.0, seconds: float = 2.0,
                           with_labels: bool = False, manifest_name: str = "manifest.jsonl",
                           background_seed: int | None = None, one_caption_per_class: bool = False) -> Path:
    """Render ``n_per_class`` clips per expert into ``root/clips`` and write ``root/<manifest_name>``.

    Args:
        fps: one rate, or a sequence cycled over the clips (e.g. ``(16, 24)`` to exercise resampling).
        with_labels: also write ``instrument_label``; without it labels come from the captions.
        background_seed: one tissue background for every clip (see :func:`render_clip`).
        one_caption_per_class: every clip of an instrument gets that instrument's first caption (the hashing
            text stand-in gives unrelated embeddings to different captions, so a held-out clip with an unseen
            caption would carry no learnable instrument information).

    Returns:
        The manifest path. Entries carry ``fps``, ``num_frames`` and per-frame ``roi_boxes``.
    """
    root = Path(root)
    rates = [float(fps)] if isinstance(fps, (int, float)) else [float(f) for f in fps]
    entries = []
    k = 0
    for label in range(len(INSTRUMENT_SHAPES)):
        for j in range(n_per_class):
            rate = rates[k % len(rates)]
            clip = render_clip(label, seed=seed * 1000 + k, width=width, height=height, fps=rate, seconds=seconds,
                               background_seed=background_seed,
                               caption=CAPTIONS[label][0] if one_caption_per_class else None)
            name = f"{INSTRUMENT_SHAPES[label]}_{j:02d}"
            write_clip(clip, root / "clips", name)
            entry = {"video_path": f"clips/{name}.mp4", "caption": clip.caption,
                     "duration": round(len(clip.frames) / rate, 4), "source": "synthetic",
                     "fps": rate, "num_frames": len(clip.frames), "roi_boxes": clip.boxes}
            if with_labels:
                entry["instrument_label"] = label
            entries.append(entry)
            k += 1
    return write_manifest(entries, root / manifest_name)


# ------------------------------------------------------------------------------ stand-in encoders

class HashTextEncoder:
    """Deterministic stand-in for UMT5-XXL: a ``[length, dim]`` tensor seeded by the caption's hash.

    The real WAN text encoder cannot be made small through ComfyUI's loaders (its config is fixed at
    billions of parameters), so tests and the CPU demo inject this instead. Equal captions give equal
    tensors, different captions different ones; ``calls`` counts encodings (cache tests rely on it).
    """

    def __init__(self, length: int = 8, dim: int = 4096, identity: str = "hash-text-v1"):
        self.length, self.dim, self.identity = length, dim, identity
        self.calls = 0

    def __call__(self, caption: str):
        import hashlib

        import torch

        self.calls += 1
        seed = int.from_bytes(hashlib.sha256(caption.encode("utf-8")).digest()[:8], "little")
        return torch.randn(self.length, self.dim, generator=torch.Generator().manual_seed(seed))


class PoolingVideoEncoder:
    """Cheap deterministic stand-in for the WAN VAE with its shapes: ``[F, H, W, 3] -> [C, F', H/s, W/s]``.

    Frames are grouped like the WAN VAE groups time (frame 0, then groups of 4), average-pooled s x s, and
    mapped 3 -> ``channels`` by a fixed random matrix. The defaults (16 channels, 8x) stand in for the WAN 2.1
    VAE; :meth:`for_family` gives the one of a ``moe_core.families`` model (``ti2v``: 48 channels, 16x, the
    WAN 2.2 VAE). ``calls`` counts encodings.
    """

    def __init__(self, channels: int = 16, identity: str | None = None, seed: int = 0, compression: int = 8):
        import torch

        if identity is None:
            identity = "pooling-vae-v1" if (channels, compression) == (16, 8) else \
                f"pooling-vae-v1-c{channels}-s{compression}"
        self.identity = identity
        self.calls = 0
        self.latent_channels = int(channels)
        self.spatial_compression = int(compression)
        self.projection = torch.randn(channels, 3, generator=torch.Generator().manual_seed(seed))

    @classmethod
    def for_family(cls, family: str = "t2v", seed: int = 0) -> "PoolingVideoEncoder":
        """The stand-in with the latent channels and spatial compression of ``family``'s VAE."""
        from moe_core.families import FAMILIES

        fam = FAMILIES[family]
        return cls(channels=fam.latent_channels, seed=seed, compression=fam.spatial_compression)

    def __call__(self, frames):
        import torch
        import torch.nn.functional as F

        self.calls += 1
        x = frames.permute(3, 0, 1, 2).float() * 2 - 1  # [3, F, H, W]
        groups = [x[:, :1]] + [x[:, i:i + 4] for i in range(1, x.shape[1], 4)]
        pooled = torch.stack([F.avg_pool2d(g.mean(1), self.spatial_compression) for g in groups], 1)
        return torch.einsum("oc,cfhw->ofhw", self.projection, pooled)


__all__ = ["CAPTIONS", "HashTextEncoder", "INSTRUMENT_SHAPES", "NO_INSTRUMENT_CAPTION", "PoolingVideoEncoder",
           "SyntheticClip", "make_synthetic_dataset", "render_background", "render_clip", "write_clip"]
