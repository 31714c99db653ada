"""Instrument-tip localisation: PCK at pixel and diagonal-normalised thresholds, tip-box IoU, detection rate.

Predictions come from a user-supplied TorchScript tip detector; references from annotations (a sidecar's
``tips`` and/or ``roi_boxes``, or a manifest's ``roi_boxes``; without ``tips`` the reference point is the
centre of the annotated tip box, which the report states). On clips without annotations (generated arms)
only the detection rate is measured.

Detector interface: input ``[B, 3, H, W]`` float RGB in [0, 1] (frames fitted to ``size`` by ``resize``;
any normalisation belongs inside the model), output ``[B, 7]``: ``score, tip_x, tip_y, x0, y0, x1, y1`` in
the input's pixels (mapped back to the clip's pixels here). A frame is a detection when score >= threshold.

Definitions (per annotated frame): a hit at threshold r when the frame is a detection and the distance
between predicted and reference tip is <= r (pixels) or <= a * diagonal (normalised). A missed detection
counts as a miss and as IoU 0, so PCK and IoU measure localisation and detection together; the detection
rate (detections / frames evaluated) is reported separately. All are ratios of sums over frames, so clips
pool exactly and the bootstrap resamples clips (frames of one clip are not independent).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .features import load_torchscript
from .resize import Fit, describe
from .videos import EvalInputError


def tip_distances(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[N]`` between ``[N, 2]`` points (NaN where either is missing)."""
    pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    return np.sqrt(((pred - ref) ** 2).sum(-1))


def pck_hits(distances: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """``[len(thresholds)]`` hit counts: distance <= threshold (NaN distance: a miss)."""
    d = np.asarray(distances, np.float64)
    d = np.where(np.isnan(d), np.inf, d)
    return np.array([(d <= t).sum() for t in thresholds], dtype=np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``[N, 4]`` boxes ``[x0, y0, x1, y1]`` row by row (0 where either is missing)."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return np.where(np.isfinite(iou), iou, 0.0)


@dataclass
class TipSums:
    """Per-clip tip accumulators: counts over the frames evaluated (every ``stride``-th frame)."""

    frames: int = 0
    detected: int = 0
    annotated: int = 0
    hits_px: list[float] = field(default_factory=list)
    hits_norm: list[float] = field(default_factory=list)
    iou_sum: float = 0.0
    iou50: int = 0
    box_annotated: int = 0
    reference: str | None = None

    def summary(self, px: Sequence[float], norm: Sequence[float]) -> dict:
        out = {"frames": self.frames, "detection_rate": self.detected / self.frames if self.frames else None,
               "annotated_frames": self.annotated}
        if self.annotated:
            out.update({f"pck@{t:g}px": h / self.annotated for t, h in zip(px, self.hits_px)})
            out.update({f"pck@{t:g}diag": h / self.annotated for t, h in zip(norm, self.hits_norm)})
        if self.box_annotated:
            out["iou"] = self.iou_sum / self.box_annotated
            out["iou>=0.5"] = self.iou50 / self.box_annotated
        return out


def score_tips(scores: np.ndarray, tips: np.ndarray, boxes: np.ndarray, threshold: float,
               ref_tips: np.ndarray | None, ref_boxes: np.ndarray | None, diagonal: float,
               px: Sequence[float], norm: Sequence[float]) -> TipSums:
    """Accumulate one clip's frames: predictions (``scores [N]``, ``tips [N, 2]``, ``boxes [N, 4]``) against
    references (rows of NaN: frame not annotated)."""
    detected = np.asarray(scores) >= threshold
    sums = TipSums(frames=len(detected), detected=int(detected.sum()))
    pred_tips = np.where(detected[:, None], tips, np.nan)
    pred_boxes = np.where(detected[:, None], boxes, np.nan)
    if ref_tips is not None:
        sums.reference = "tips"
        ref = np.asarray(ref_tips, np.float64)
    elif ref_boxes is not None:
        sums.reference = "box centre"
        rb = np.asarray(ref_boxes, np.float64)
        ref = np.stack([(rb[:, 0] + rb[:, 2]) / 2, (rb[:, 1] + rb[:, 3]) / 2], -1)
    else:
        ref = None
    if ref is not None:
        annotated = ~np.isnan(ref).any(-1)
        d = tip_distances(pred_tips[annotated], ref[annotated])
        sums.annotated = int(annotated.sum())
        sums.hits_px = pck_hits(d, px).tolist()
        sums.hits_norm = pck_hits(d / diagonal, norm).tolist()
    if ref_boxes is not None:
        rb = np.asarray(ref_boxes, np.float64)
        has = ~np.isnan(rb).any(-1)
        iou = box_iou(np.nan_to_num(pred_boxes[has], nan=0.0), rb[has])
        iou = np.where(detected[has], iou, 0.0)
        sums.box_annotated = int(has.sum())
        sums.iou_sum = float(iou.sum())
        sums.iou50 = int((iou >= 0.5).sum())
    return sums


class TipDetector:
    """A TorchScript tip detector run on frames, with its outputs mapped back to clip pixels."""

    def __init__(self, path, sha256: str | None = None, size: tuple[int, int] | None = None,
                 resize: str = "letterbox", threshold: float = 0.5, device: str = "cpu", batch_size: int = 8):
        self.model = load_torchscript(path, sha256, "tip detector", device)
        self.size, self.resize, self.threshold = size, resize, threshold
        self.device, self.batch_size = device, batch_size

    def protocol(self) -> str:
        if self.size is None:
            return "frames at their own size"
        return describe(self.resize, *self.size)

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 ``[N, H, W, 3]`` -> ``scores [N]``, ``tips [N, 2]``, ``boxes [N, 4]`` in clip pixels."""
        import torch

        src = (frames.shape[2], frames.shape[1])
        fit = Fit.make(src, self.size or src, self.resize)
        outputs = []
        for b in range(0, len(frames), self.batch_size):
            chunk = frames[b:b + self.batch_size]
            chunk = chunk if fit.out == src else fit.apply_all(chunk)
            x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            with torch.no_grad():
                out = self.model(x)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(chunk), 7):
                raise EvalInputError(f"tip detector: expected a [{len(chunk)}, 7] tensor (score, tip x, tip y, "
                                     f"x0, y0, x1, y1), got {getattr(out, 'shape', type(out).__name__)}")
            outputs.append(out.double().cpu().numpy())
        out = np.concatenate(outputs)
        return out[:, 0], fit.points_to_source(out[:, 1:3]), fit.boxes_to_source(out[:, 3:7])


__all__ = ["TipDetector", "TipSums", "box_iou", "pck_hits", "score_tips", "tip_distances"]
