"""How frames are fitted to a network's input size, and how its coordinates map back.

Video networks take square inputs (I3D: 224x224). WAN renders 832x480: a short-side resize plus centre crop
(the usual FVD protocol) keeps the middle 480x480 and throws away the frame sides, exactly where laparoscopic
instruments enter, so the feature network would never see them. The modes:

* ``letterbox`` (default): scale the long side to the target, pad the rest (black); geometry kept, nothing cut;
* ``stretch``: resize the whole frame to the target, ignoring the aspect ratio; nothing cut, shapes squashed;
* ``center-crop``: scale the short side to the target and crop the middle (the classic protocol; cuts sides).

Downscaling uses area filtering (cv2.INTER_AREA), upscaling bilinear. Every report states the mode used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ResizeMode = Literal["letterbox", "stretch", "center-crop"]
RESIZE_MODES: tuple[str, ...] = ("letterbox", "stretch", "center-crop")

PROTOCOL_TEXT = {
    "letterbox": "long side scaled to {w}x{h}, short side padded with black (whole frame kept, aspect kept)",
    "stretch": "whole frame resized to {w}x{h} (nothing cut, aspect ratio not kept)",
    "center-crop": "short side scaled to the target, centre {w}x{h} cropped (frame sides cut)",
}


def describe(mode: str, width: int, height: int) -> str:
    """One line for reports: what ``mode`` does to a frame at this target size."""
    return PROTOCOL_TEXT[mode].format(w=width, h=height) + "; area filter when downscaling"


@dataclass(frozen=True)
class Fit:
    """Map a ``src`` (w, h) frame into an ``out`` (w, h) input: scale, then place at ``offset`` (may be < 0)."""

    src: tuple[int, int]
    out: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]
    resized: tuple[int, int]

    @classmethod
    def make(cls, src: tuple[int, int], out: tuple[int, int], mode: str) -> "Fit":
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, not {mode!r}")
        sw, sh = src
        ow, oh = out
        if mode == "stretch":
            return cls(src, out, (ow / sw, oh / sh), (0.0, 0.0), (ow, oh))
        factor = min(ow / sw, oh / sh) if mode == "letterbox" else max(ow / sw, oh / sh)
        rw, rh = max(1, round(sw * factor)), max(1, round(sh * factor))
        return cls(src, out, (rw / sw, rh / sh), ((ow - rw) // 2, (oh - rh) // 2), (rw, rh))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Fit one ``[H, W, C]`` uint8 image into ``out`` (padding black)."""
        import cv2

        if (image.shape[1], image.shape[0]) != self.src:
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, expected {self.src[0]}x{self.src[1]}")
        shrink = self.resized[0] * self.resized[1] < self.src[0] * self.src[1]
        scaled = image if self.resized == self.src else cv2.resize(
            image, self.resized, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out = np.zeros((self.out[1], self.out[0]) + image.shape[2:], dtype=image.dtype)
        ox, oy = int(self.offset[0]), int(self.offset[1])
        # Intersection of the scaled image (placed at ox, oy) with the output canvas.
        x0, y0 = max(ox, 0), max(oy, 0)
        x1, y1 = min(ox + self.resized[0], self.out[0]), min(oy + self.resized[1], self.out[1])
        out[y0:y1, x0:x1] = scaled[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return out

    def apply_all(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.apply(f) for f in frames])

    def points_to_source(self, points: np.ndarray) -> np.ndarray:
        """``[..., 2]`` input-pixel points -> source-frame pixels."""
        points = np.asarray(points, dtype=np.float64)
        return (points - np.array(self.offset)) / np.array(self.scale)

    def boxes_to_source(self, boxes: np.ndarray) -> np.ndarray:
        """``[..., 4]`` input-pixel boxes -> source-frame pixels."""
        boxes = np.asarray(boxes, dtype=np.float64)
        return (boxes - np.array(self.offset * 2)) / np.array(self.scale * 2)


def crop_box(image: np.ndarray, box: np.ndarray, margin: float = 0.1) -> np.ndarray | None:
    """The pixels of ``box`` (``[x0, y0, x1, y1]``, grown by ``margin`` of its size), or None if empty."""
    if box is None or np.isnan(box).any():
        return None
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    ix0, iy0 = max(0, int(np.floor(x0 - mx))), max(0, int(np.floor(y0 - my)))
    ix1, iy1 = min(width, int(np.ceil(x1 + mx))), min(height, int(np.ceil(y1 + my)))
    if ix1 - ix0 < 2 or iy1 - iy0 < 2:
        return None
    return np.ascontiguousarray(image[iy0:iy1, ix0:ix1])


__all__ = ["Fit", "PROTOCOL_TEXT", "RESIZE_MODES", "ResizeMode", "crop_box", "describe"]
