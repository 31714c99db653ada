"""Evaluate sets of clips: decode each clip once, run every requested measurement on it, aggregate, report.

``evaluate(arms, real, config, out_dir)`` is the one entry point (the CLI and an ablation runner call it):
it returns the results dict and, with ``out_dir``, writes ``report.json`` and ``report.html`` there
(atomically, after every set, so an interrupted run keeps what was finished).

Failures are contained where they happen and reported: a model file that is missing or fails its checksum
stops the run before any decoding (nothing would be comparable without it); a set that cannot be read
(no videos, too few clips) is reported and the others go on; a clip that fails to decode or to measure is
listed and the rest of its set goes on; a metric that cannot be computed (e.g. FVD with too few clips)
records its reason while the others are kept.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from training.data.video_io import VideoReadError

from .features import ModelFileError, VideoEncoder, VideoEncoderSpec, i3d_spec
from .identity import InstrumentClassifier
from .temporal import FlowConfig, FlowEstimator, TemporalSums, clip_temporal
from .tips import TipDetector, TipSums, score_tips
from .videos import ClipSet, EvalClip, EvalInputError, compare_sets, load_clip_set, read_frames


@dataclass
class EvalConfig:
    """Everything that changes the numbers (all of it is written into the report).

    Model paths are local files; ``*_sha256`` are optional checksums. Leave a model unset to skip its
    metric. ``cluster`` is ``video`` (each clip its own cluster) or ``prompt`` (all seeds of a prompt move
    together in the bootstrap: the conservative choice with several seeds per prompt).
    """

    device: str = "cpu"
    max_frames: int | None = None
    class_names: tuple[str, ...] = DEFAULT_EXPERT_NAMES
    min_clips: int = 2
    strict: bool = False
    workers: int = 1
    # temporal stability
    temporal: bool = True
    flow: FlowConfig = field(default_factory=FlowConfig)
    lpips: bool = False
    lpips_backbone: str | None = None
    lpips_sha256: str | None = None
    lpips_net: str = "alex"
    lpips_stride: int = 4
    # video quality
    i3d: str | None = None
    i3d_sha256: str | None = None
    fvd_resize: str = "letterbox"
    fvd_windows: int = 1
    encoders: list[VideoEncoderSpec] = field(default_factory=list)
    fvd_bootstrap: int = 100
    floor_splits: int = 10
    # identity
    classifier: str | None = None
    classifier_sha256: str | None = None
    classifier_input: str = "frame"
    classifier_size: int = 224
    classifier_resize: str = "letterbox"
    classifier_frames: int = 8
    # tips
    detector: str | None = None
    detector_sha256: str | None = None
    detector_size: tuple[int, int] | None = None
    detector_resize: str = "letterbox"
    detector_threshold: float = 0.5
    detector_stride: int = 4
    pck_px: tuple[float, ...] = (5.0, 10.0, 20.0)
    pck_norm: tuple[float, ...] = (0.01, 0.02, 0.05)
    # statistics
    bootstrap: int = 2000
    cluster: str = "video"
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cluster not in ("video", "prompt"):
            raise EvalInputError(f"cluster must be 'video' or 'prompt', not {self.cluster!r}")
        if self.lpips and not self.temporal:
            raise EvalInputError("LPIPS is part of the temporal metrics; it cannot run with temporal metrics off")
        for name in ("workers", "lpips_stride", "detector_stride", "classifier_frames", "fvd_windows"):
            if getattr(self, name) < 1:
                raise EvalInputError(f"{name} must be >= 1, not {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("flow", "encoders")}
        out["flow"] = dict(self.flow.__dict__)
        out["encoders"] = [s.protocol() | {"name": s.name} for s in self.encoders]
        return out


@dataclass
class Models:
    """The loaded, checked models of a run (None where not requested)."""

    encoders: list[VideoEncoder]
    classifier: InstrumentClassifier | None
    detector: TipDetector | None
    lpips: Any

    @classmethod
    def load(cls, config: EvalConfig) -> "Models":
        specs = list(config.encoders)
        if config.i3d is not None:
            specs.insert(0, i3d_spec(config.i3d, config.i3d_sha256, config.fvd_resize, config.fvd_windows))
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise EvalInputError(f"video encoder names must be unique, got {names}")
        encoders = [VideoEncoder(s, config.device) for s in specs]
        classifier = None
        if config.classifier is not None:
            classifier = InstrumentClassifier(config.classifier, config.classifier_sha256, config.class_names,
                                              config.classifier_size, config.classifier_resize,
                                              config.classifier_input, config.classifier_frames, config.device)
        detector = None
        if config.detector is not None:
            detector = TipDetector(config.detector, config.detector_sha256, config.detector_size,
                                   config.detector_resize, config.detector_threshold, config.device)
        lpips = None
        if config.lpips:
            from .perceptual import LpipsMetric

            lpips = LpipsMetric(config.lpips_backbone, config.lpips_sha256, config.lpips_net, config.device)
        elif config.lpips_backbone is not None:
            raise EvalInputError("--lpips-backbone was given without --lpips")
        return cls(encoders, classifier, detector, lpips)


@dataclass
class ClipResult:
    """Everything measured on one clip (features stay out of the JSON report)."""

    clip: EvalClip
    frames: int
    temporal: TemporalSums | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    tips: TipSums | None = None
    probs: np.ndarray | None = None
    roi_source: str | None = None
    warnings: list[str] = field(default_factory=list)


def _annotation(values: np.ndarray | None, n: int, what: str, clip: EvalClip, warnings: list[str]):
    if values is None:
        return None
    if len(values) < n or (len(values) != n and clip.info is not None and len(values) != clip.info.num_frames):
        warnings.append(f"{clip.name}: {what} has {len(values)} entries but the clip has {n} frames "
                        "(one per frame expected); ignored")
        return None
    return values[:n]


def _held_boxes(boxes: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Per-frame boxes from boxes at ``index`` frames: each frame takes the nearest evaluated frame's box."""
    nearest = np.abs(np.arange(n)[:, None] - index[None, :]).argmin(1)
    return boxes[nearest]


def process_clip(clip: EvalClip, models: Models, config: EvalConfig, estimator: FlowEstimator | None) -> ClipResult:
    """Decode one clip and measure everything requested on it."""
    frames = read_frames(clip.path, config.max_frames)
    n = len(frames)
    result = ClipResult(clip=clip, frames=n)
    ref_boxes = _annotation(clip.roi_boxes, n, "roi_boxes", clip, result.warnings)
    ref_tips = _annotation(clip.tips, n, "tips", clip, result.warnings)
    roi_boxes = ref_boxes
    result.roi_source = "annotation" if ref_boxes is not None else None

    if models.detector is not None:
        index = np.arange(0, n, config.detector_stride)
        scores, tips, boxes = models.detector(frames[index])
        result.tips = score_tips(scores, tips, boxes, config.detector_threshold,
                                 None if ref_tips is None else ref_tips[index],
                                 None if ref_boxes is None else ref_boxes[index],
                                 float(np.hypot(frames.shape[2], frames.shape[1])), config.pck_px, config.pck_norm)
        detected = scores >= config.detector_threshold
        if roi_boxes is None and detected.any():
            roi_boxes = _held_boxes(boxes[detected], index[detected], n)
            result.roi_source = "detector"

    if estimator is not None:
        lpips_fn = models.lpips if models.lpips is not None else None
        result.temporal = clip_temporal(frames, estimator, roi_boxes, lpips_fn, config.lpips_stride)

    for encoder in models.encoders:
        try:
            result.features[encoder.spec.name] = encoder.features(frames)
        except EvalInputError as exc:
            result.warnings.append(f"{clip.name}: {exc}")

    if models.classifier is not None:
        result.probs = models.classifier.predict(frames, roi_boxes)
        if result.probs is None:
            result.warnings.append(f"{clip.name}: no tip box in any frame: not classified (ROI mode)")
    return result


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="clip", file=sys.stderr, dynamic_ncols=True)


def process_set(clip_set: ClipSet, models: Models, config: EvalConfig,
                errors: list[dict]) -> list[ClipResult]:
    """Every clip of a set (``config.workers`` clips in parallel threads: OpenCV and torch release the GIL)."""
    local = threading.local()

    def run(clip: EvalClip) -> ClipResult | None:
        estimator = None
        if config.temporal:
            if not hasattr(local, "estimator"):
                local.estimator = FlowEstimator(config.flow)  # DIS objects are not shared between threads
            estimator = local.estimator
        try:
            return process_clip(clip, models, config, estimator)
        except (VideoReadError, EvalInputError, ValueError) as exc:
            errors.append({"where": f"{clip_set.name}/{clip.name}", "message": str(exc)})
            return None

    results: list[ClipResult] = []
    with _progress(len(clip_set.clips), f"evaluating {clip_set.name}") as bar:
        if config.workers == 1:
            for clip in clip_set.clips:
                results.append(run(clip))
                bar.update(1)
        else:
            with ThreadPoolExecutor(config.workers) as pool:
                for item in pool.map(run, clip_set.clips):
                    results.append(item)
                    bar.update(1)
    return [r for r in results if r is not None]


def evaluate(arms: Mapping[str, str | os.PathLike], real: str | os.PathLike | None = None,
             config: EvalConfig | None = None, out_dir: str | os.PathLike | None = None,
             reference: str | None = None) -> dict[str, Any]:
    """Evaluate arms (name -> folder or manifest) against an optional real set; return the results dict.

    Args:
        reference: the arm the others are paired against (default: the first arm).
        out_dir: where ``report.json`` / ``report.html`` go (None: nothing written).

    Raises:
        ModelFileError: a requested model file is missing, fails its checksum or is not TorchScript.
        EvalInputError: bad configuration, or no set could be read at all.
    """
    from .aggregate import aggregate
    from .report import write_report

    config = config or EvalConfig()
    if not arms:
        raise EvalInputError("no arms to evaluate (give at least one folder of clips)")
    if "real" in arms and real is not None:
        raise EvalInputError("'real' is reserved for the real set; rename that arm")
    models = Models.load(config)
    sources = ([("real", real)] if real is not None else []) + list(arms.items())
    warnings: list[str] = []
    errors: list[dict] = []
    sets: dict[str, ClipSet] = {}
    for name, source in sources:
        try:
            sets[name] = load_clip_set(name, source, config.class_names, config.min_clips, config.strict)
            warnings.extend(sets[name].warnings)
        except (EvalInputError, ModelFileError) as exc:
            errors.append({"where": name, "message": str(exc)})
            print(f"error: {exc}", file=sys.stderr)
    if not sets:
        raise EvalInputError("no set could be evaluated: " + "; ".join(e["message"] for e in errors))
    warnings.extend(compare_sets(list(sets.values())))
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    arm_names = [n for n, _ in sources if n != "real" and n in sets]
    if reference is not None and reference not in arms:
        raise EvalInputError(f"reference arm {reference!r} is not one of {list(arms)}")
    reference = reference if reference in sets else (arm_names[0] if arm_names else None)

    results: dict[str, list[ClipResult]] = {}
    report: dict[str, Any] = {}
    for name, clip_set in sets.items():
        results[name] = process_set(clip_set, models, config, errors)
        for r in results[name]:
            warnings.extend(r.warnings)
        if out_dir is not None and len(results) < len(sets):  # partial report: point values only, cheap
            write_report(aggregate(sets, results, config, models, reference, warnings, errors, partial=True),
                         Path(out_dir))
    report = aggregate(sets, results, config, models, reference, warnings, errors)
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


__all__ = ["ClipResult", "EvalConfig", "Models", "evaluate", "process_clip", "process_set"]
