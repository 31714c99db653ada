"""Sets of clips to evaluate: discovery, prompt/seed keys, annotations, consistency checks and decoding.

A set is a folder of videos (any generator's output, a plain LoRA's, or real clips) or a training manifest
(JSONL, ``training.data.manifest`` format). Each clip gets a *key* ``<prompt_id>#<seed>`` so that arms
rendered from the same prompts and seeds are paired clip by clip. Where the key comes from, in order:

1. a JSON sidecar ``<stem>.json`` beside the clip (or the manifest line's extra keys)::

       {"prompt_id": "p03", "seed": 2, "prompt": "电凝钩沿组织平面移动。",
        "instrument": "Hook/Electrocautery",            # or "instrument_label": 1
        "roi_boxes": [[x0, y0, x1, y1], null, ...],     # tip box per frame (source pixels), optional
        "tips": [[x, y], null, ...]}                     # tip point per frame, optional

2. the file name ``<prompt_id>_seed<k>.mp4`` (or ``-seed<k>``);
3. otherwise the stem is the prompt id and the seed is ``null``.

ROI boxes also come from the trainer's ``<stem>.roi.json`` sidecar (a list of boxes, or an object with
``roi_boxes``) and from a manifest's ``roi_boxes``; the prompt text from the sidecar or a same-named
``<stem>.txt`` caption. The instrument label comes from the sidecar/manifest, else from the prompt through
the Router's own keywords (``moe_core.vocabulary``) when it names exactly one instrument.

Problems are reported, not hidden: a missing or empty folder, or one with too few readable clips, raises
:class:`EvalInputError`; unreadable clips are skipped and listed; clips that differ in size, length or frame
rate give a warning (an error with ``strict``), because the temporal and FVD numbers depend on them.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from moe_core.vocabulary import DEFAULT_EXPERT_NAMES, detect_instruments, keywords_for
from training.data.manifest import ManifestError, load_manifest, parse_record
from training.data.video_io import VIDEO_EXTENSIONS, VideoInfo, VideoReadError, boxes_to_array, probe_video

_SEED_NAME = re.compile(r"^(?P<prompt>.+?)[_-]seed(?P<seed>\d+)$")
MASK_TAG = ".mask"


class EvalInputError(ValueError):
    """Input that cannot be evaluated (missing folder, no clips, bad sidecar, bad model file, ...)."""


@dataclass
class EvalClip:
    """One clip of a set, with everything known about it before decoding.

    ``roi_boxes`` is ``[F, 4]`` (NaN rows: no box) and ``tips`` ``[F, 2]`` (NaN rows: no point), both in source
    pixels, one row per source frame; ``label`` indexes the class names.
    """

    path: Path
    name: str
    prompt_id: str
    seed: int | None
    prompt: str | None = None
    label: int | None = None
    label_source: str | None = None
    roi_boxes: np.ndarray | None = None
    tips: np.ndarray | None = None
    info: VideoInfo | None = None

    @property
    def key(self) -> str:
        """The pairing key across arms: same prompt and seed, same key."""
        return f"{self.prompt_id}#{'-' if self.seed is None else self.seed}"


@dataclass
class ClipSet:
    """The readable clips of one arm (or of the real set), plus skipped clips and warnings."""

    name: str
    source: Path
    clips: list[EvalClip]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def common(self, attr: str) -> Any:
        """The most frequent ``info`` value of ``attr`` (``size``, ``fps`` or ``num_frames``)."""
        values = [_info_value(c.info, attr) for c in self.clips if c.info is not None]
        return Counter(values).most_common(1)[0][0] if values else None

    def describe(self) -> dict[str, Any]:
        size = self.common("size")
        return {"name": self.name, "source": str(self.source), "clips": len(self.clips),
                "skipped": [{"clip": n, "reason": r} for n, r in self.skipped],
                "size": None if size is None else f"{size[0]}x{size[1]}", "fps": self.common("fps"),
                "num_frames": self.common("num_frames"), "warnings": list(self.warnings)}


def _info_value(info: VideoInfo, attr: str) -> Any:
    if attr == "size":
        return (info.width, info.height)
    if attr == "fps":
        return round(info.fps, 3)
    return info.num_frames


def find_videos(folder: Path) -> list[Path]:
    """Videos directly in ``folder`` (sorted; hidden files and ``*.mask.*`` ROI masks excluded)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")
                  and not p.stem.endswith(MASK_TAG))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError:
        raise EvalInputError(f"{path}: not UTF-8 text") from None


def _label_index(value: Any, class_names: Sequence[str], where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EvalInputError(f"{where}: expected an instrument name or index, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(class_names):
            raise EvalInputError(f"{where}: instrument index {value} is out of range 0..{len(class_names) - 1}")
        return value
    if value not in class_names:
        raise EvalInputError(f"{where}: unknown instrument {value!r}; expected one of {list(class_names)}")
    return list(class_names).index(value)


def _validated_boxes(boxes: Any, where: Path) -> np.ndarray:
    """Boxes checked by the manifest's own validator (same format, same messages)."""
    try:
        record = parse_record({"video_path": where.name, "caption": "-", "duration": 1.0, "source": "eval",
                               "roi_boxes": boxes}, where.parent, manifest_path=where)
    except ManifestError as exc:
        raise EvalInputError(str(exc)) from None
    return boxes_to_array(record.roi_boxes)


def _validated_tips(tips: Any, where: Path) -> np.ndarray:
    if not isinstance(tips, list) or not tips:
        raise EvalInputError(f"{where}: field 'tips': expected a list with one [x, y] (or null) per frame")
    out = np.full((len(tips), 2), np.nan)
    for i, tip in enumerate(tips):
        if tip is None:
            continue
        if (not isinstance(tip, (list, tuple)) or len(tip) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in tip)):
            raise EvalInputError(f"{where}: field 'tips': frame {i}: expected null or [x, y], got {tip!r}")
        out[i] = tip
    return out


def _apply_meta(clip: EvalClip, meta: dict[str, Any], where: Path, class_names: Sequence[str]) -> None:
    """Fill ``clip`` from a sidecar object or a manifest line's extra keys."""
    if "prompt_id" in meta:
        clip.prompt_id = str(meta["prompt_id"])
    if "seed" in meta:
        seed = meta["seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise EvalInputError(f"{where}: field 'seed': expected an integer or null, got {seed!r}")
        clip.seed = seed
    if isinstance(meta.get("prompt"), str):
        clip.prompt = meta["prompt"]
    for name in ("instrument", "instrument_label"):
        if meta.get(name) is not None:
            clip.label = _label_index(meta[name], class_names, f"{where}: field '{name}'")
            clip.label_source = "annotation"
    if meta.get("roi_boxes") is not None:
        clip.roi_boxes = _validated_boxes(meta["roi_boxes"], where)
    if meta.get("tips") is not None:
        clip.tips = _validated_tips(meta["tips"], where)


def _clip_from_file(path: Path, folder: Path, class_names: Sequence[str]) -> EvalClip:
    stem = path.stem
    match = _SEED_NAME.match(stem)
    clip = EvalClip(path=path, name=path.relative_to(folder).as_posix(),
                    prompt_id=match["prompt"] if match else stem, seed=int(match["seed"]) if match else None)
    caption = path.with_suffix(".txt")
    if caption.is_file():
        clip.prompt = " ".join(caption.read_text(encoding="utf-8-sig").split()) or None
    roi_sidecar = path.with_name(stem + ".roi.json")
    if roi_sidecar.is_file():
        data = _read_json(roi_sidecar)
        clip.roi_boxes = _validated_boxes(data.get("roi_boxes") if isinstance(data, dict) else data, roi_sidecar)
    sidecar = path.with_name(stem + ".json")
    if sidecar.is_file():
        meta = _read_json(sidecar)
        if not isinstance(meta, dict):
            raise EvalInputError(f"{sidecar}: expected a JSON object (see docs/evaluation.md), "
                                 f"got {type(meta).__name__}")
        _apply_meta(clip, meta, sidecar, class_names)
    return clip


def _clips_from_manifest(path: Path, class_names: Sequence[str]) -> list[EvalClip]:
    try:
        records = load_manifest(path, expert_names=class_names)
    except ManifestError as exc:
        raise EvalInputError(str(exc)) from None
    clips = []
    for record in records:
        stem = record.video_path.stem
        match = _SEED_NAME.match(stem)
        clip = EvalClip(path=record.video_path, name=record.name, prompt_id=match["prompt"] if match else stem,
                        seed=int(match["seed"]) if match else None, prompt=record.caption)
        if record.instrument_label is not None:
            clip.label, clip.label_source = record.instrument_label, "annotation"
        if record.roi_boxes is not None:
            clip.roi_boxes = boxes_to_array(record.roi_boxes)
        _apply_meta(clip, {k: v for k, v in record.extra.items() if k != "roi_boxes"}, Path(record.where),
                    class_names)
        clips.append(clip)
    return clips


def _label_from_prompt(clip: EvalClip, class_names: Sequence[str]) -> None:
    if clip.label is not None or not clip.prompt:
        return
    found = detect_instruments(clip.prompt, keywords_for(list(class_names)))
    if len(found) == 1:
        clip.label, clip.label_source = list(class_names).index(found[0]), "prompt"


def _spread_warning(name: str, clips: list[EvalClip], attr: str, label: str, fmt) -> str | None:
    counts = Counter(_info_value(c.info, attr) for c in clips)
    if len(counts) <= 1:
        return None
    parts = []
    for value, n in counts.most_common():
        examples = [c.name for c in clips if _info_value(c.info, attr) == value][:3]
        parts.append(f"{fmt(value)} ({n} clip{'s' if n > 1 else ''}: {', '.join(examples)}"
                     f"{', ...' if n > 3 else ''})")
    return f"set '{name}': clips differ in {label}: " + "; ".join(parts)


def load_clip_set(name: str, source: str | os.PathLike, class_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                  min_clips: int = 2, strict: bool = False) -> ClipSet:
    """Find, annotate and probe the clips of one set.

    Args:
        source: a folder of videos, or a training manifest (``.jsonl``).
        min_clips: fewer readable clips than this is an error (no metric has an interval below 2).
        strict: differing sizes, lengths or frame rates are errors instead of warnings.

    Raises:
        EvalInputError: missing source, no videos, too few readable clips, invalid sidecar, or (strict)
            inconsistent clips; the message names the set and the file.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise EvalInputError(f"set '{name}': {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".jsonl":
            raise EvalInputError(f"set '{name}': {source} is a file; give a folder of videos or a .jsonl manifest")
        clips = _clips_from_manifest(source, class_names)
    else:
        videos = find_videos(source)
        if not videos:
            raise EvalInputError(f"set '{name}': no videos in {source} "
                                 f"(looked for {', '.join(VIDEO_EXTENSIONS)}; sub-folders are not searched)")
        clips = [_clip_from_file(v, source, class_names) for v in videos]

    result = ClipSet(name=name, source=source, clips=[])
    keys: dict[str, str] = {}
    for clip in clips:
        try:
            clip.info = probe_video(clip.path)
        except VideoReadError as exc:
            result.skipped.append((clip.name, exc.reason))
            continue
        if clip.key in keys:
            raise EvalInputError(f"set '{name}': {clip.name} and {keys[clip.key]} have the same prompt and seed "
                                 f"({clip.key}); give each clip its own seed (name or sidecar)")
        keys[clip.key] = clip.name
        _label_from_prompt(clip, class_names)
        result.clips.append(clip)
    for skipped, reason in result.skipped:
        result.warnings.append(f"set '{name}': skipped {skipped}: {reason}")
    if len(result.clips) < min_clips:
        raise EvalInputError(f"set '{name}': {len(result.clips)} readable clip(s) in {source}, need at least "
                             f"{min_clips}" + (f" ({len(result.skipped)} unreadable)" if result.skipped else ""))
    for attr, label, fmt in (("size", "size", lambda v: f"{v[0]}x{v[1]}"),
                             ("num_frames", "length", lambda v: f"{v} frames"),
                             ("fps", "frame rate", lambda v: f"{v:g} fps")):
        message = _spread_warning(name, result.clips, attr, label, fmt)
        if message is not None:
            if strict:
                raise EvalInputError(message + " (strict mode)")
            result.warnings.append(message + "; each clip is measured at its own size/length/rate")
    return result


def compare_sets(sets: Sequence[ClipSet]) -> list[str]:
    """Warnings for sets whose typical size, length or frame rate differ (the comparison would be unfair)."""
    warnings = []
    for attr, label in (("size", "size"), ("num_frames", "length"), ("fps", "frame rate")):
        values = {s.name: s.common(attr) for s in sets}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{k}: {v[0]}x{v[1]}" if attr == "size" else f"{k}: {v}" for k, v in values.items())
            warnings.append(f"sets differ in {label} ({shown}): metrics that depend on it are not comparable "
                            "as they stand")
    return warnings


def iter_frames(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode a clip frame by frame as uint8 RGB ``[H, W, 3]`` (native size, every frame)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoReadError(path, "cannot open (corrupt file or unsupported codec)")
    try:
        count = 0
        while max_frames is None or count < max_frames:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            count += 1
    finally:
        cap.release()


def read_frames(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """All frames of a clip, uint8 RGB ``[F, H, W, 3]``; raises VideoReadError when none decode."""
    frames = list(iter_frames(path, max_frames))
    if not frames:
        raise VideoReadError(path, "no decodable frames")
    return np.stack(frames)


__all__ = ["ClipSet", "EvalClip", "EvalInputError", "compare_sets", "find_videos", "iter_frames",
           "load_clip_set", "read_frames"]
