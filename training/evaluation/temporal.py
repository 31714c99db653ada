"""Temporal stability: warped PSNR (and optional LPIPS) between consecutive frames, with motion beside it.

For each pair (t, t+1): the backward flow F_b (frame t+1 -> t) and forward flow F_f (t -> t+1) are estimated
with OpenCV's DIS (default; Farneback as an option) on grey frames, optionally downscaled for speed and
scaled back. Frame t is warped onto t+1 (``W(x) = I_t(x + F_b(x))``, bilinear). A pixel counts when the two
flows agree (forward-backward check, Sundaram et al. 2010: ``|F_b + F_f(x + F_b)|^2 <= a (|F_b|^2 +
|F_f(x + F_b)|^2) + b`` with a = 0.01, b = 0.5) and it lands inside frame t; other pixels are occluded or
disoccluded, where no warp can be right. Warped PSNR of a clip is ``10 log10(255^2 / MSE)`` with the MSE
pooled over all its pairs and valid pixels (RGB), capped at 60 dB, whole frame and inside the tip ROI.

A frozen clip scores the cap: the mean flow magnitude (pixels per frame) is reported beside it, and the
real clips give the ceiling a generator should approach at similar motion.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np


PSNR_CAP_DB = 60.0
DIS_PRESETS = ("ultrafast", "fast", "medium")


@dataclass(frozen=True)
class FlowConfig:
    """Optical flow settings.

    Attributes:
        method: ``dis`` (OpenCV DIS) or ``farneback``.
        preset: DIS preset (``ultrafast`` / ``fast`` / ``medium``).
        scale: flow is estimated on frames resized by this factor (0.5 halves each side: 4x fewer pixels)
            and scaled back to full resolution; warping and PSNR are at full resolution.
        alpha / beta: forward-backward consistency thresholds.
    """

    method: Literal["dis", "farneback"] = "dis"
    preset: str = "fast"
    scale: float = 0.5
    alpha: float = 0.01
    beta: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in ("dis", "farneback"):
            raise ValueError(f"flow method must be 'dis' or 'farneback', not {self.method!r}")
        if self.preset not in DIS_PRESETS:
            raise ValueError(f"DIS preset must be one of {DIS_PRESETS}, not {self.preset!r}")
        if not 0.1 <= self.scale <= 1.0:
            raise ValueError(f"flow scale must be in [0.1, 1], not {self.scale}")

    def describe(self) -> str:
        algo = (f"OpenCV DIS, preset {self.preset}" if self.method == "dis"
                else "OpenCV Farneback (pyr 0.5, 3 levels, window 15, 3 iterations, poly 5/1.2)")
        return (f"{algo}, on grey frames scaled by {self.scale:g}; forward-backward occlusion check "
                f"(alpha {self.alpha:g}, beta {self.beta:g}); bilinear warp at full resolution; PSNR capped at "
                f"{PSNR_CAP_DB:g} dB")


#: The smallest side, in pixels after scaling, OpenCV's DIS/Farneback flow accepts here.
MIN_FLOW_SIDE = 12


class FlowEstimator:
    """Dense flow ``a -> b`` at full resolution (``[H, W, 2]`` float32: where each pixel of ``a`` moves)."""

    def __init__(self, config: FlowConfig = FlowConfig()):
        import cv2

        self.config = config
        self._cv2 = cv2
        if config.method == "dis":
            preset = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                      "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[config.preset]
            self._dis = cv2.DISOpticalFlow_create(preset)

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """Grey (and scaled) version of a frame, computed once per frame and reused for both flows."""
        cv2 = self._cv2
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if self.config.scale != 1.0:
            grey = cv2.resize(grey, None, fx=self.config.scale, fy=self.config.scale, interpolation=cv2.INTER_AREA)
        if min(grey.shape) < MIN_FLOW_SIDE:  # OpenCV's flow fails on smaller images with a bare cv2.error
            from .videos import EvalInputError

            h, w = rgb.shape[:2]
            raise EvalInputError(f"frames of {w}x{h} px are {grey.shape[1]}x{grey.shape[0]} px at flow scale "
                                 f"{self.config.scale:g}: optical flow needs at least {MIN_FLOW_SIDE} px a side; use "
                                 f"--flow-scale {min(1.0, MIN_FLOW_SIDE / min(h, w)):.2g} or larger clips")
        return grey

    def flow(self, a: np.ndarray, b: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Flow between prepared frames, returned at ``size`` (w, h) in full-resolution pixels."""
        cv2 = self._cv2
        if self.config.method == "dis":
            flow = self._dis.calc(a, b, None)
        else:
            flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        if (flow.shape[1], flow.shape[0]) != size:
            sx, sy = size[0] / flow.shape[1], size[1] / flow.shape[0]
            flow = cv2.multiply(cv2.resize(flow, size, interpolation=cv2.INTER_LINEAR), (sx, sy, 1.0, 1.0))
        return flow


@functools.lru_cache(maxsize=4)
def _grid(h: int, w: int) -> np.ndarray:
    """Pixel coordinates ``[H, W, 2]`` (x, y), float32, read-only."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), -1)
    grid.setflags(write=False)
    return grid


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``out(x) = image(x + flow(x))``, bilinear, border replicated (out-of-frame pixels are masked anyway)."""
    import cv2

    return cv2.remap(image, _grid(*flow.shape[:2]) + flow, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _sq_norm(v: np.ndarray) -> np.ndarray:
    return v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1]  # much faster than .sum(-1) over a length-2 axis


def valid_mask(flow_b: np.ndarray, flow_f: np.ndarray, alpha: float = 0.01, beta: float = 0.5) -> np.ndarray:
    """Pixels of frame t+1 whose backward flow is consistent with the forward flow and stays in frame t."""
    import cv2

    h, w = flow_b.shape[:2]
    target = _grid(h, w) + flow_b
    inside = cv2.inRange(target, (0.0, 0.0), (float(w - 1), float(h - 1))) > 0
    fw = cv2.remap(flow_f, target, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    total = flow_b + fw
    lhs = _sq_norm(total)
    rhs = alpha * (_sq_norm(flow_b) + _sq_norm(fw)) + beta
    return inside & (lhs <= rhs)


def psnr_from_mse(mse: float) -> float:
    """PSNR of uint8 images from a mean squared error, capped at :data:`PSNR_CAP_DB`."""
    if not math.isfinite(mse):
        return float("nan")
    floor = 255.0 ** 2 / 10 ** (PSNR_CAP_DB / 10)
    return float(10 * math.log10(255.0 ** 2 / max(mse, floor)))


@dataclass
class TemporalSums:
    """Per-clip accumulators (sums, so clips and bootstrap resamples pool exactly)."""

    pairs: int = 0
    sse: float = 0.0
    count: float = 0.0
    roi_sse: float = 0.0
    roi_count: float = 0.0
    motion: float = 0.0
    roi_motion: float = 0.0
    roi_pixels: float = 0.0
    valid_fraction: float = 0.0
    lpips: float = 0.0
    roi_lpips: float = 0.0
    lpips_pairs: int = 0
    roi_lpips_weight: float = 0.0

    def summary(self) -> dict[str, Any]:
        has_roi = self.roi_count > 0
        out = {"pairs": self.pairs,
               "warped_psnr": psnr_from_mse(self.sse / self.count) if self.count else float("nan"),
               "warped_psnr_roi": psnr_from_mse(self.roi_sse / self.roi_count) if has_roi else None,
               "motion_px": self.motion / self.pairs if self.pairs else float("nan"),
               "motion_px_roi": self.roi_motion / self.roi_pixels if self.roi_pixels else None,
               "valid_fraction": self.valid_fraction / self.pairs if self.pairs else float("nan")}
        if self.lpips_pairs:
            out["lpips"] = self.lpips / self.lpips_pairs
            out["lpips_roi"] = self.roi_lpips / self.roi_lpips_weight if self.roi_lpips_weight else None
        return out


def _roi_mask(boxes: np.ndarray | None, index: int, h: int, w: int) -> np.ndarray | None:
    """Binary uint8 ROI of one frame: pixels whose centre lies inside its box, or None without a box."""
    if boxes is None or index >= len(boxes) or np.isnan(boxes[index]).any():
        return None
    x0, y0, x1, y1 = (float(v) for v in boxes[index])
    c0, c1 = max(0, math.floor(x0 - 0.5) + 1), min(w, math.ceil(x1 - 0.5))
    r0, r1 = max(0, math.floor(y0 - 0.5) + 1), min(h, math.ceil(y1 - 0.5))
    if c1 <= c0 or r1 <= r0:
        return None
    mask = np.zeros((h, w), np.uint8)
    mask[r0:r1, c0:c1] = 1
    return mask


def clip_temporal(frames: np.ndarray, estimator: FlowEstimator, roi_boxes: np.ndarray | None = None,
                  lpips_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, lpips_stride: int = 1,
                  progress: Callable[[int], None] | None = None) -> TemporalSums:
    """Warped-PSNR accumulators of one clip (uint8 ``[F, H, W, 3]``).

    The occlusion check and the motion magnitude run at the flow's resolution (the mask is then upsampled,
    nearest); the warp and the squared errors run at full resolution.

    Args:
        roi_boxes: ``[F, 4]`` boxes per frame (NaN rows: none); the ROI of pair (t, t+1) is frame t+1's box
            (pixels whose centre is inside it).
        lpips_fn: ``(target, warped) -> [H, W]`` LPIPS map, evaluated every ``lpips_stride``-th pair.
    """
    import cv2

    n, h, w = frames.shape[:3]
    sums = TemporalSums()
    if n < 2:
        return sums
    cfg = estimator.config
    boxes = None if roi_boxes is None else np.asarray(roi_boxes, dtype=np.float64)
    previous = estimator.prepare(frames[0])
    for t in range(n - 1):
        current = estimator.prepare(frames[t + 1])
        small = (current.shape[1], current.shape[0])
        flow_b = estimator.flow(current, previous, small)  # flow-resolution pixels
        flow_f = estimator.flow(previous, current, small)
        previous = current
        sx, sy = w / small[0], h / small[1]
        # Same test in full-resolution units: |.|^2 scales by s^2 on both sides except beta.
        valid_small = valid_mask(flow_b, flow_f, cfg.alpha, cfg.beta / (sx * sy))
        magnitude = cv2.magnitude(flow_b[..., 0] * sx, flow_b[..., 1] * sy)
        if small != (w, h):
            # One pass each (per-channel scalars), not strided numpy ops on full-resolution arrays.
            full_b = cv2.multiply(cv2.resize(flow_b, (w, h), interpolation=cv2.INTER_LINEAR), (sx, sy, 1.0, 1.0))
            mask = cv2.resize(valid_small.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        else:
            full_b, mask = flow_b, valid_small.astype(np.uint8)
        warped = warp(frames[t], full_b)
        target = frames[t + 1]
        sums.pairs += 1
        sums.sse += float(cv2.norm(warped, target, cv2.NORM_L2SQR, mask))
        sums.count += 3.0 * float(cv2.countNonZero(mask))
        sums.motion += float(magnitude.mean())
        sums.valid_fraction += float(valid_small.mean())
        roi = _roi_mask(boxes, t + 1, h, w)
        if roi is not None:
            both = cv2.bitwise_and(roi, mask)
            sums.roi_sse += float(cv2.norm(warped, target, cv2.NORM_L2SQR, both))
            sums.roi_count += 3.0 * float(cv2.countNonZero(both))
            roi_small = roi if small == (w, h) else cv2.resize(roi, small, interpolation=cv2.INTER_NEAREST)
            sums.roi_motion += float((magnitude * roi_small).sum())
            sums.roi_pixels += float(roi_small.sum())
        if lpips_fn is not None and t % lpips_stride == 0:
            # Occluded pixels take the target's values: they add no difference to the perceptual distance.
            filled = np.where(mask[..., None].astype(bool), warped, target)
            dist = lpips_fn(target, filled)
            sums.lpips += float(dist.mean())
            sums.lpips_pairs += 1
            if roi is not None:
                sums.roi_lpips += float((dist * roi).sum())
                sums.roi_lpips_weight += float(roi.sum())
        if progress is not None:
            progress(1)
    return sums


__all__ = ["DIS_PRESETS", "FlowConfig", "FlowEstimator", "PSNR_CAP_DB", "TemporalSums", "clip_temporal",
           "psnr_from_mse", "valid_mask", "warp"]
