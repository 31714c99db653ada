"""Instrument identity: does the clip show the instrument its prompt asked for, by a user's classifier?

Classifier interface (TorchScript): input ``[B, 3, S, S]`` float RGB in [0, 1] (whole frames, or ROI crops
around the tip box, fitted to S by ``resize``; normalisation belongs inside the model), output logits
``[B, C]`` over the class names (default: the expert names in ``moe_core.vocabulary`` order). A clip's
prediction is the argmax of the softmax averaged over ``frames`` evenly spaced frames (ROI mode: the frames
that have a box). Its reference label comes from annotations or from the prompt's instrument keywords.

Metrics from the (optionally weighted, for the bootstrap) confusion matrix, rows = reference, columns =
prediction: accuracy; balanced accuracy (mean recall over classes that occur as references); macro-F1 over
classes that occur as reference or prediction (a class never involved has no F1); the matrix itself.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .features import load_torchscript
from .resize import Fit, crop_box, describe
from .videos import EvalInputError


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """``[C, C]`` counts (or weights): ``m[true, pred]``."""
    m = np.zeros((num_classes, num_classes), dtype=np.float64)
    w = np.ones(len(y_true)) if weights is None else np.asarray(weights, np.float64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), w)
    return m


def metrics_from_confusion(m: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of a confusion matrix (NaN when it is empty)."""
    total = m.sum()
    if total <= 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "macro_f1": float("nan")}
    tp = np.diag(m)
    support, predicted = m.sum(1), m.sum(0)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    involved = present | (predicted > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=involved)
    return {"accuracy": float(tp.sum() / total), "balanced_accuracy": float(recall[present].mean()),
            "macro_f1": float(f1[involved].mean())}


class InstrumentClassifier:
    """A TorchScript instrument classifier applied to sampled frames or tip-box crops of a clip."""

    def __init__(self, path, sha256: str | None = None, class_names: Sequence[str] = (), size: int = 224,
                 resize: str = "letterbox", mode: str = "frame", frames: int = 8, device: str = "cpu",
                 batch_size: int = 8):
        if mode not in ("frame", "roi"):
            raise EvalInputError(f"classifier input must be 'frame' or 'roi', not {mode!r}")
        self.model = load_torchscript(path, sha256, "instrument classifier", device)
        self.class_names = list(class_names)
        self.size, self.resize, self.mode, self.frames = size, resize, mode, frames
        self.device, self.batch_size = device, batch_size

    def protocol(self) -> dict:
        return {"input": "tip-box crops (box grown by 10%)" if self.mode == "roi" else "whole frames",
                "frames_per_clip": self.frames, "resize": describe(self.resize, self.size, self.size),
                "classes": self.class_names, "clip_prediction": "argmax of the mean softmax over frames"}

    def _images(self, frames: np.ndarray, boxes: np.ndarray | None) -> list[np.ndarray]:
        if self.mode == "frame":
            idx = np.unique(np.linspace(0, len(frames) - 1, min(self.frames, len(frames))).round().astype(int))
            return [frames[i] for i in idx]
        if boxes is None:
            return []
        with_box = [i for i in range(min(len(frames), len(boxes))) if not np.isnan(boxes[i]).any()]
        if not with_box:
            return []
        pick = np.unique(np.linspace(0, len(with_box) - 1, min(self.frames, len(with_box))).round().astype(int))
        crops = [crop_box(frames[with_box[i]], boxes[with_box[i]]) for i in pick]
        return [c for c in crops if c is not None]

    def predict(self, frames: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray | None:
        """Mean class probabilities ``[C]`` of a clip, or None when there is nothing to classify (no ROI)."""
        import torch

        images = self._images(frames, boxes)
        if not images:
            return None
        fitted = np.stack([Fit.make((im.shape[1], im.shape[0]), (self.size, self.size), self.resize).apply(im)
                           for im in images])
        probs = []
        for b in range(0, len(fitted), self.batch_size):
            x = torch.from_numpy(fitted[b:b + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            with torch.no_grad():
                logits = self.model(x)
            if (not isinstance(logits, torch.Tensor) or logits.ndim != 2
                    or logits.shape[1] != len(self.class_names)):
                raise EvalInputError(f"instrument classifier: expected [B, {len(self.class_names)}] logits "
                                     f"({', '.join(self.class_names)}), got {getattr(logits, 'shape', logits)}")
            probs.append(torch.softmax(logits.double(), -1).cpu().numpy())
        return np.concatenate(probs).mean(0)


__all__ = ["InstrumentClassifier", "confusion_matrix", "metrics_from_confusion"]
