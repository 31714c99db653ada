"""The clip manifest: one JSON object per line describing a training clip.

Format (the seeds' ``filtered_clips_processed.jsonl``, extended with optional labels and ROI)::

    {"video_path": "clips/c001.mp4", "caption": "电凝钩沿组织平面移动。", "duration": 4.2, "source": "case01",
     "instrument_label": 1, "roi_boxes": [[10, 12, 30, 40], null, ...]}

Required: ``video_path`` (relative paths are relative to the manifest's folder), ``caption`` (non-empty),
``duration`` (seconds, > 0), ``source`` (string: where the clip came from). Optional: ``instrument_label``
(int index into the expert names), ROI either as ``roi_boxes`` (one ``[x0, y0, x1, y1]`` pixel box of the
instrument tip per *source* frame, ``null`` for frames without one) or ``roi_mask`` (path of a mask video with
the clip's size and frame count, white = ROI), and ``fps`` / ``num_frames`` (written by ``build_manifest``;
when ``num_frames`` is present the ROI box list must have that length). Other keys are kept in ``extra``.

Every line is validated when the manifest is loaded, so a typo in line 120 fails before hours of encoding,
with an error naming the file, the line and the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

from moe_core.atomic import atomic_write_text

REQUIRED_FIELDS = ("video_path", "caption", "duration", "source")
OPTIONAL_FIELDS = ("instrument_label", "roi_boxes", "roi_mask", "fps", "num_frames")

Box = tuple[float, float, float, float]


class ManifestError(ValueError):
    """A manifest problem, located: ``<file>:<line>: field '<field>': <message>``."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 field: str | None = None):
        self.path = None if path is None else Path(path)
        self.line = line
        self.field = field
        self.reason = message
        where = str(self.path) if self.path is not None else "<manifest>"
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ClipRecord:
    """One validated manifest line. ``video_path``/``roi_mask`` are absolute; ``name`` is the path as written."""

    video_path: Path
    caption: str
    duration: float
    source: str
    name: str
    instrument_label: int | None = None
    roi_boxes: tuple[Box | None, ...] | None = None
    roi_mask: Path | None = None
    fps: float | None = None
    num_frames: int | None = None
    manifest_path: Path | None = None
    line: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def where(self) -> str:
        """``manifest.jsonl:12`` (for messages), or the clip name when not loaded from a file."""
        if self.manifest_path is None:
            return self.name
        return f"{self.manifest_path}:{self.line}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _absolute(base_dir: Path, path: str) -> Path:
    """``path`` made absolute against ``base_dir`` and normalised (``a/../b`` -> ``b``), symlinks kept."""
    return Path(os.path.normpath(Path(base_dir).absolute() / Path(path).expanduser()))


def _parse_box(value: Any, index: int, err) -> Box | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise err(f"frame {index}: expected null or [x0, y0, x1, y1] (4 finite numbers), got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if x1 <= x0 or y1 <= y0:
        raise err(f"frame {index}: box {value!r} is empty (need x0 < x1 and y0 < y1)")
    return (x0, y0, x1, y1)


def parse_record(obj: Any, base_dir: Path, expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                 manifest_path: Path | None = None, line: int | None = None) -> ClipRecord:
    """Validate one decoded JSON object and turn it into a :class:`ClipRecord`.

    Raises:
        ManifestError: naming ``manifest_path``, ``line`` and the offending field.
    """
    def err(message: str, name: str | None = None) -> ManifestError:
        return ManifestError(message, manifest_path, line, name)

    if not isinstance(obj, dict):
        raise err(f"expected a JSON object, got {type(obj).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in obj or obj[name] is None:
            raise err("missing required field", name)

    video = obj["video_path"]
    if not isinstance(video, str) or not video.strip():
        raise err(f"expected a non-empty string path, got {video!r}", "video_path")
    caption = obj["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise err(f"expected a non-empty string, got {caption!r}", "caption")
    duration = obj["duration"]
    if not _is_number(duration) or duration <= 0:
        raise err(f"expected a positive number of seconds, got {duration!r}", "duration")
    source = obj["source"]
    if not isinstance(source, str):
        raise err(f"expected a string, got {source!r}", "source")

    label = obj.get("instrument_label")
    if label is not None:
        if not isinstance(label, int) or isinstance(label, bool):
            raise err(f"expected an integer expert index, got {label!r}", "instrument_label")
        if not 0 <= label < len(expert_names):
            raise err(f"{label} is out of range 0..{len(expert_names) - 1} "
                      f"({', '.join(f'{i}={n}' for i, n in enumerate(expert_names))})", "instrument_label")

    fps = obj.get("fps")
    if fps is not None and (not _is_number(fps) or fps <= 0):
        raise err(f"expected a positive number, got {fps!r}", "fps")
    num_frames = obj.get("num_frames")
    if num_frames is not None and (not isinstance(num_frames, int) or isinstance(num_frames, bool)
                                   or num_frames <= 0):
        raise err(f"expected a positive integer, got {num_frames!r}", "num_frames")

    boxes_raw, mask_raw = obj.get("roi_boxes"), obj.get("roi_mask")
    if boxes_raw is not None and mask_raw is not None:
        raise err("give either roi_boxes or roi_mask, not both", "roi_boxes")
    roi_boxes = None
    if boxes_raw is not None:
        if not isinstance(boxes_raw, list) or not boxes_raw:
            raise err("expected a non-empty list with one box (or null) per source frame", "roi_boxes")
        roi_boxes = tuple(_parse_box(b, i, lambda m: err(m, "roi_boxes")) for i, b in enumerate(boxes_raw))
        if num_frames is not None and len(roi_boxes) != num_frames:
            raise err(f"has {len(roi_boxes)} entries but the clip has num_frames={num_frames} "
                      "(one box or null per source frame)", "roi_boxes")
    roi_mask = None
    if mask_raw is not None:
        if not isinstance(mask_raw, str) or not mask_raw.strip():
            raise err(f"expected a path to a mask video, got {mask_raw!r}", "roi_mask")
        roi_mask = _absolute(base_dir, mask_raw)

    extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS and k not in OPTIONAL_FIELDS}
    return ClipRecord(
        video_path=_absolute(base_dir, video), caption=caption.strip(), duration=float(duration),
        source=source, name=video, instrument_label=label, roi_boxes=roi_boxes, roi_mask=roi_mask,
        fps=None if fps is None else float(fps), num_frames=num_frames, manifest_path=manifest_path,
        line=line, extra=extra,
    )


def load_manifest(path: str | os.PathLike, expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                  check_files: bool = True) -> list[ClipRecord]:
    """Read and validate a JSONL manifest; blank lines are ignored.

    Args:
        path: the manifest file.
        expert_names: the experts ``instrument_label`` indexes (range check).
        check_files: also require every ``video_path`` / ``roi_mask`` to exist, so a moved folder is
            reported up front rather than as a skipped clip during encoding.

    Raises:
        ManifestError: unreadable file, bad JSON, missing/invalid field, duplicate clip, missing file, or an
            empty manifest; always naming the file and, where there is one, the line and field.
    """
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError("file not found", path) from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text ({exc})", path) from None
    base_dir = path.parent
    records: list[ClipRecord] = []
    seen: dict[Path, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"invalid JSON ({exc.msg} at column {exc.colno})", path, line_no) from None
        record = parse_record(obj, base_dir, expert_names, path, line_no)
        if record.video_path in seen:
            raise ManifestError(f"{record.name!r} is already listed on line {seen[record.video_path]}",
                                path, line_no, "video_path")
        seen[record.video_path] = line_no
        if check_files:
            if not record.video_path.is_file():
                raise ManifestError(f"file not found: {record.video_path}", path, line_no, "video_path")
            if record.roi_mask is not None and not record.roi_mask.is_file():
                raise ManifestError(f"file not found: {record.roi_mask}", path, line_no, "roi_mask")
        records.append(record)
    if not records:
        raise ManifestError("manifest is empty (no clip lines)", path)
    return records


def _rel_or_abs(target: Path, base_dir: Path) -> str:
    try:
        return os.path.relpath(target, base_dir).replace(os.sep, "/")
    except ValueError:  # another drive on Windows
        return str(target)


def record_to_dict(record: ClipRecord, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON object for ``record``; paths are made relative to ``base_dir`` when given."""
    def path_str(p: Path) -> str:
        return _rel_or_abs(p, Path(base_dir).absolute()) if base_dir is not None else str(p)

    obj: dict[str, Any] = {"video_path": path_str(record.video_path), "caption": record.caption,
                           "duration": record.duration, "source": record.source}
    if record.fps is not None:
        obj["fps"] = record.fps
    if record.num_frames is not None:
        obj["num_frames"] = record.num_frames
    if record.instrument_label is not None:
        obj["instrument_label"] = record.instrument_label
    if record.roi_boxes is not None:
        obj["roi_boxes"] = [None if b is None else list(b) for b in record.roi_boxes]
    if record.roi_mask is not None:
        obj["roi_mask"] = path_str(record.roi_mask)
    obj.update(record.extra)
    return obj


def write_manifest(entries: Iterable[dict[str, Any] | ClipRecord], path: str | os.PathLike) -> Path:
    """Write ``entries`` (dicts or records) as JSONL, atomically; UTF-8 with Chinese kept readable.

    Records' paths are written relative to the manifest's folder so the dataset folder can be moved.
    """
    path = Path(path).absolute()
    lines = []
    for entry in entries:
        obj = record_to_dict(entry, path.parent) if isinstance(entry, ClipRecord) else entry
        lines.append(json.dumps(obj, ensure_ascii=False))
    if not lines:
        raise ManifestError("refusing to write an empty manifest", path)
    return atomic_write_text(path, "\n".join(lines) + "\n")
