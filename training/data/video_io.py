"""Decode clips into training windows: 16 fps, 4n+1 frames, 16-pixel buckets, ROI transformed alike.

Why these numbers: WAN generates at 16 fps, its VAE compresses time as 1 + 4k (so 4n+1 frames make whole
latent frames: 81 frames -> 21), and the DiT patchifies 2x2 latent pixels of an 8x VAE (16-pixel multiples
avoid the silent centre crop ``comfy.sd.VAE.encode`` applies to other sizes). The WAN 2.2 TI2V 5B model
(family ``ti2v``) generates at 24 fps, 121 frames, through a 16x VAE, hence 32-pixel buckets
(``ExtractionConfig.family``). A clip is never upscaled:
upscaled pixels would teach the model blur.

Frames are read with OpenCV (``cv2.VideoCapture``), resampled by nearest timestamp (constant frame rate
assumed), resized with area filtering into a bucket (scale to cover, then centre crop) and returned as
uint8 RGB ``[F, H, W, 3]``. Non-square pixels are honoured: a 720x576 PAL clip with a 4:3 display aspect
(sample aspect ratio 16:15) is bucketed and resized as the 768x576 picture it shows, not as 720x576. ROI boxes
given per source frame and ROI mask videos follow exactly the same frame selection and geometry.
``write_video`` writes mp4 with imageio-ffmpeg (libx264, yuv420p).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from moe_core.atomic import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
ExtractionMode = Literal["head", "uniform", "sliding"]


class VideoReadError(RuntimeError):
    """A clip that cannot be opened or decoded; the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ClipTooShortError(VideoReadError):
    """A clip with fewer resampled frames than ``ExtractionConfig.min_frames``."""


class RoiMismatchError(VideoReadError):
    """ROI annotation that does not fit its clip (box count, mask size or mask frame count)."""


def _cv2():
    import cv2  # deferred so that manifests and labels work without OpenCV installed

    return cv2


# --------------------------------------------------------------------------------------------- probing

@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a clip (``num_frames`` is exact only with ``probe_video(count=True)``).

    Attributes:
        width, height: stored frame size in pixels.
        sar: sample (pixel) aspect ratio, pixel width / pixel height (1.0 for square pixels).
        container_frames: the frame count the container states, when it was checked against the stream
            (``count=True`` or ``verify_end=True``); ``num_frames`` is then what really decodes.
    """

    path: Path
    width: int
    height: int
    fps: float
    num_frames: int
    sar: float = 1.0
    container_frames: int | None = None

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    @property
    def display_width(self) -> int:
        """Width of the picture as it is meant to be shown (``width * sar``)."""
        return max(1, round(self.width * self.sar))

    @property
    def truncated(self) -> bool:
        """The stream ends before the container's frame count (a cut-short file)."""
        return self.container_frames is not None and self.num_frames < self.container_frames


def _open(path: Path):
    cv2 = _cv2()
    if not path.is_file():
        raise VideoReadError(path, "file not found")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise VideoReadError(path, "cannot open (corrupt file or unsupported codec)")
    return cap


#: Frames read at the end of a clip by ``probe_video(verify_end=True)``.
TAIL_FRAMES = 4


def _sample_aspect(cap) -> float:
    """The stream's sample aspect ratio (FFmpeg's SAR), 1.0 when unknown or implausible."""
    cv2 = _cv2()
    num, den = cap.get(cv2.CAP_PROP_SAR_NUM), cap.get(cv2.CAP_PROP_SAR_DEN)
    if not (num > 0 and den > 0):
        return 1.0
    sar = float(num) / float(den)
    return sar if 0.1 < sar < 10.0 else 1.0


def sample_aspect(path: str | os.PathLike) -> float:
    """The clip's sample aspect ratio (1.0 for square pixels), from the container without decoding."""
    cap = _open(Path(path))
    try:
        return _sample_aspect(cap)
    finally:
        cap.release()


def _count_from(cap, start: int) -> int:
    n = start
    while cap.grab():
        n += 1
    return n


def _end_decodes(path: Path, reported: int) -> bool:
    """Seek to the last ``TAIL_FRAMES`` the container claims and check that exactly those decode."""
    cv2 = _cv2()
    cap = _open(path)
    try:
        start = max(0, reported - TAIL_FRAMES)
        if start and not cap.set(cv2.CAP_PROP_POS_FRAMES, start):
            return False
        if int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) != start:
            return False  # the seek landed elsewhere: the index points past the data
        return _count_from(cap, start) == reported
    finally:
        cap.release()


def probe_video(path: str | os.PathLike, count: bool = False, verify_end: bool = False) -> VideoInfo:
    """Size, frame rate, pixel aspect and frame count of a clip, after checking that its first frame decodes.

    Args:
        count: decode the whole stream to count frames exactly; containers may report a wrong count.
        verify_end: cheaply check the container's count by seeking to its last frames; only when they do
            not decode there is the stream decoded to count (a cut-short file: ``info.truncated``).

    Raises:
        VideoReadError: unopenable file, unknown frame rate, or no decodable frame.
    """
    cv2 = _cv2()
    path = Path(path)
    cap = _open(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not math.isfinite(fps) or fps <= 0:
            raise VideoReadError(path, f"unknown frame rate ({fps})")
        ok, frame = cap.read()
        if not ok or frame is None:
            raise VideoReadError(path, "no decodable frames")
        height, width = frame.shape[:2]
        sar = _sample_aspect(cap)
        reported = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        checked = None
        if count or reported <= 0:
            n = _count_from(cap, 1)
            checked = reported if reported > 0 else None
        else:
            n = reported
    finally:
        cap.release()
    if verify_end and checked is None and not _end_decodes(path, reported):
        cap = _open(path)
        try:
            n, checked = _count_from(cap, 0), reported
        finally:
            cap.release()
        if n == 0:
            raise VideoReadError(path, "no decodable frames")
    return VideoInfo(path=path, width=int(width), height=int(height), fps=fps, num_frames=n, sar=sar,
                     container_frames=checked)


_FFMPEG_PREFIX = re.compile(r"^\s*(\[[^\]]*@ 0x[0-9a-f]+\]\s*)+")


@contextlib.contextmanager
def native_stderr(lines: list[str]):
    """Collect what native code (OpenCV's FFmpeg) writes to file descriptor 2 while the block runs.

    FFmpeg reports a damaged file with many raw lines (``[h264 @ 0x55..] Invalid NAL unit size``) that would
    otherwise land, unattributed, between a tool's own output; callers turn them into one line per clip
    (:func:`ffmpeg_summary`). The lines are appended to ``lines`` when the block ends.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


_FILE_LEVEL = re.compile(r"partial file|ended prematurely|moov atom|truncat|end of file|invalid data", re.I)


def ffmpeg_summary(lines: Sequence[str], limit: int = 2) -> str:
    """FFmpeg's messages as one line: distinct messages (numbers aside) without their ``[codec @ 0x..]``
    prefixes, messages about the file itself (``partial file``, ``File ended prematurely``) first."""
    seen: dict[str, str] = {}
    for line in lines:
        text = _FFMPEG_PREFIX.sub("", line).strip()
        if text and not text.startswith("Last message repeated"):
            seen.setdefault(re.sub(r"0x[0-9a-fA-F]+|\d+", "#", text), text)
    messages = sorted(seen.values(), key=lambda m: not _FILE_LEVEL.search(m))  # stable: FFmpeg's order otherwise
    if not messages:
        return ""
    more = f" (+{len(messages) - limit} more)" if len(messages) > limit else ""
    return "; ".join(messages[:limit]) + more


# ---------------------------------------------------------------------------------- pure frame planning

def resample_indices(num_src: int, src_fps: float, target_fps: float = 16.0) -> np.ndarray:
    """Source frame index for each target frame, nearest by timestamp.

    Target frame ``k`` sits at ``k / target_fps`` seconds and exists while that time lies inside the clip
    (``< num_src / src_fps``); it takes the source frame whose timestamp ``i / src_fps`` is nearest. A
    slower source repeats frames, a faster one drops them.
    """
    if num_src <= 0:
        return np.zeros(0, dtype=np.int64)
    count = max(1, math.ceil(num_src * target_fps / src_fps - 1e-9))
    k = np.arange(count, dtype=np.float64)
    idx = np.floor(k * src_fps / target_fps + 0.5).astype(np.int64)  # round half up, not to even
    return np.minimum(idx, num_src - 1)


def frames_4n1(available: int, max_frames: int) -> int:
    """Largest ``4n + 1`` that is ``<= min(available, max_frames)``; 0 when not even one frame fits."""
    limit = min(available, max_frames)
    return 0 if limit < 1 else 4 * ((limit - 1) // 4) + 1


def bucket_size(width: int, height: int, target_area: int = 480 * 832, step: int = 16) -> tuple[int, int]:
    """``(w, h)`` bucket: multiples of ``step``, area ``<= target_area``, never larger than the clip.

    A clip already within ``target_area`` keeps its size rounded down to ``step``. A larger one is scaled
    by ``sqrt(target_area / area)`` and rounded to the neighbouring multiples that keep the aspect ratio
    closest (then the larger area), without exceeding the clip's own size or the target area.
    """
    if width < step or height < step:
        raise ValueError(f"a {width}x{height} clip is smaller than one {step}-pixel bucket step")
    floor_w, floor_h = (width // step) * step, (height // step) * step
    if width * height <= target_area:
        return floor_w, floor_h
    scale = math.sqrt(target_area / (width * height))
    base_w, base_h = int(width * scale) // step * step, int(height * scale) // step * step
    aspect = math.log(width / height)
    best: tuple[float, int, int, int] | None = None
    for w in (base_w - step, base_w, base_w + step):
        for h in (base_h - step, base_h, base_h + step):
            if w < step or h < step or w > floor_w or h > floor_h or w * h > target_area:
                continue
            key = (abs(math.log(w / h) - aspect), -w * h, w, h)
            if best is None or key < best:
                best = key
    if best is None:
        return step, step
    return best[2], best[3]


def _family(name: str):
    """The ``moe_core.families`` entry for ``name``, or ValueError listing the known ones."""
    from moe_core.families import FAMILIES

    if name not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)} (moe_core.families), not {name!r}")
    return FAMILIES[name]


@dataclass(frozen=True)
class ExtractionConfig:
    """How windows are cut from a clip. Every field changes the pixels, so all of them enter cache keys.

    Attributes:
        mode: ``head`` (one window from the start), ``uniform`` (up to ``num_windows`` windows spread evenly
            from the start to the end of the clip; neighbours share at most half their frames, so a clip
            shorter than the windows need gives fewer), ``sliding`` (windows every ``stride`` frames).
        max_frames: window length cap; the length used is the largest 4n+1 that fits the clip and the cap.
            None (or 0): the family's clip length (81; ``ti2v`` 121).
        min_frames: clips with fewer resampled frames are skipped (reported), not padded.
        num_windows: windows per clip in ``uniform`` mode.
        stride: step between window starts in ``sliding`` mode, in target-fps frames (default: the window
            length, i.e. back-to-back windows).
        target_fps: frame rate of the resampled timeline. None (or 0): the family's (16; ``ti2v`` 24).
        target_area: bucket area in pixels (480*832 is WAN's 480p).
        bucket_step: bucket granularity in pixels; raised to a multiple of what the family's VAE and the
            DiT's 2x2 patches need (16 px for the 8x WAN 2.1 VAE, 32 px for the 16x WAN 2.2 VAE of ``ti2v``),
            so a latent grid always has whole patches.
        family: the ``moe_core.families`` model the latents are for (``t2v``, ``i2v``, ``ti2v``): it sets the
            defaults above and what each window stores (``i2v``: also the start-image latent).

    ``max_frames`` / ``target_fps`` / ``bucket_step`` hold the resolved values after construction (so a config
    for another family is built anew, not copied with ``dataclasses.replace``).
    """

    mode: ExtractionMode = "head"
    max_frames: int | None = None
    min_frames: int = 5
    num_windows: int = 3
    stride: int | None = None
    target_fps: float | None = None
    target_area: int = 480 * 832
    bucket_step: int = 16
    family: str = "t2v"

    def __post_init__(self) -> None:
        fam = _family(self.family)
        if not self.max_frames:
            object.__setattr__(self, "max_frames", fam.frames)
        if not self.target_fps:
            object.__setattr__(self, "target_fps", float(fam.fps))
        if self.mode not in ("head", "uniform", "sliding"):
            raise ValueError(f"extraction mode must be head, uniform or sliding, not {self.mode!r}")
        if self.max_frames < 1 or (self.max_frames - 1) % 4:
            raise ValueError(f"max_frames must be of the form 4n+1 (e.g. 81), not {self.max_frames}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, not {self.min_frames}")
        if self.num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, not {self.num_windows}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, not {self.stride}")
        if self.bucket_step < 1:
            raise ValueError(f"bucket_step must be >= 1, not {self.bucket_step}")
        object.__setattr__(self, "bucket_step", math.lcm(int(self.bucket_step), self.latent_cell))
        if self.target_fps <= 0 or self.target_area < self.bucket_step ** 2:
            raise ValueError(f"target_fps must be positive and target_area at least one bucket step squared "
                             f"({self.bucket_step}x{self.bucket_step} for family {self.family!r})")

    @property
    def latent_cell(self) -> int:
        """Pixels per DiT token side: the family's VAE compression times the 2x2 patch (16; ``ti2v`` 32)."""
        return 2 * _family(self.family).spatial_compression

    def settings(self) -> dict:
        """Plain dict of every field (what cache keys hash).

        ``family`` is left out for ``t2v`` so that caches written before families existed stay valid; every
        other family hashes differently (an ``i2v`` window also stores the start-image latent).
        """
        settings = {"mode": self.mode, "max_frames": self.max_frames, "min_frames": self.min_frames,
                    "num_windows": self.num_windows, "stride": self.stride, "target_fps": self.target_fps,
                    "target_area": self.target_area, "bucket_step": self.bucket_step}
        if self.mode == "uniform":
            settings["uniform_windows"] = "half-overlap"  # the placement rule: caches of the old rule are stale
        if self.family != "t2v":
            settings["family"] = self.family
        return settings


@dataclass(frozen=True)
class Window:
    """``length`` frames starting at ``start`` on the resampled (target-fps) timeline."""

    start: int
    length: int


def plan_windows(num_resampled: int, config: ExtractionConfig) -> list[Window]:
    """Windows for a clip with ``num_resampled`` target-fps frames; empty when shorter than ``min_frames``."""
    if num_resampled < config.min_frames:
        return []
    length = frames_4n1(num_resampled, config.max_frames)
    if length < 1:
        return []
    last_start = num_resampled - length
    if config.mode == "head":
        starts = [0]
    elif config.mode == "uniform":
        # Neighbouring windows start at least half a window apart (they share at most half their frames):
        # a short clip gives fewer windows instead of near-duplicates (4 s, 61 frames: one, not starts 0/2/3).
        count = min(config.num_windows, 1 + last_start // ((length + 1) // 2))
        starts = sorted({int(round(s)) for s in np.linspace(0, last_start, count)})
    else:
        stride = config.stride or length
        starts = list(range(0, last_start + 1, stride))
    return [Window(s, length) for s in starts]


# ------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Geometry:
    """Resize ``src`` to ``resized`` (covering the bucket), then crop ``out`` at ``offset``."""

    src: tuple[int, int]
    out: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def for_bucket(cls, width: int, height: int, bucket: tuple[int, int], sar: float = 1.0) -> "Geometry":
        """Cover ``bucket`` with the picture as displayed: stored ``width`` pixels span ``width * sar``."""
        bw, bh = bucket
        shown = width * sar
        scale = max(bw / shown, bh / height)
        rw, rh = max(bw, round(shown * scale)), max(bh, round(height * scale))
        return cls(src=(width, height), out=(bw, bh), resized=(rw, rh), offset=((rw - bw) // 2, (rh - bh) // 2))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Resize (area filter) and crop one ``[H, W, ...]`` image."""
        if image.shape[1] != self.src[0] or image.shape[0] != self.src[1]:
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, expected {self.src[0]}x{self.src[1]}")
        if self.resized != self.src:
            image = _cv2().resize(image, self.resized, interpolation=_cv2().INTER_AREA)
        ox, oy = self.offset
        return np.ascontiguousarray(image[oy:oy + self.out[1], ox:ox + self.out[0]])

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[N, 4]`` source-pixel boxes (NaN rows = none) into the bucket; boxes cropped away become NaN."""
        sx, sy = self.resized[0] / self.src[0], self.resized[1] / self.src[1]
        out = np.asarray(boxes, dtype=np.float64) * np.array([sx, sy, sx, sy])
        out -= np.array([self.offset[0], self.offset[1]] * 2, dtype=np.float64)
        out[:, 0::2] = np.clip(out[:, 0::2], 0, self.out[0])
        out[:, 1::2] = np.clip(out[:, 1::2], 0, self.out[1])
        empty = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])
        out[empty] = np.nan
        return out.astype(np.float32)


def boxes_to_array(boxes: Sequence[Sequence[float] | None]) -> np.ndarray:
    """``[N, 4]`` float array from a list of boxes or ``None`` (NaN rows)."""
    out = np.full((len(boxes), 4), np.nan, dtype=np.float64)
    for i, box in enumerate(boxes):
        if box is not None:
            out[i] = box
    return out


def boxes_to_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float32 ``[F, H, W]`` mask, 1 inside each frame's box (partial pixels get their covered fraction)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    mask = np.zeros((len(boxes), height, width), dtype=np.float32)
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if np.isnan(x0):
            continue
        cover_x = np.clip(np.minimum(xs + 1, x1) - np.maximum(xs, x0), 0, 1)
        cover_y = np.clip(np.minimum(ys + 1, y1) - np.maximum(ys, y0), 0, 1)
        mask[i] = np.outer(cover_y, cover_x)
    return mask


# -------------------------------------------------------------------------------------------- decoding

@dataclass
class ClipWindow:
    """One extracted window.

    Attributes:
        frames: uint8 RGB ``[F, H, W, 3]``, F = 4n+1, H and W multiples of the bucket step.
        index: window number within the clip; ``start``: first frame on the resampled timeline.
        source_indices: ``[F]`` source frame used for each frame.
        roi_boxes: ``[F, 4]`` float32 bucket-pixel boxes (NaN rows: no box), or None without box ROI.
        roi_mask: ``[F, H, W]`` float32 in [0, 1] from a mask video, or None.
    """

    frames: np.ndarray
    index: int
    start: int
    source_indices: np.ndarray
    roi_boxes: np.ndarray | None = None
    roi_mask: np.ndarray | None = None

    def roi_pixel_mask(self) -> np.ndarray | None:
        """Float32 ``[F, H, W]`` ROI in [0, 1] from whichever annotation the clip has, or None."""
        if self.roi_mask is not None:
            return self.roi_mask
        if self.roi_boxes is not None:
            return boxes_to_mask(self.roi_boxes, self.frames.shape[1], self.frames.shape[2])
        return None


@dataclass
class DecodedClip:
    """All windows of one clip plus what was learned while decoding it."""

    path: Path
    info: VideoInfo
    bucket: tuple[int, int]
    num_resampled: int
    windows: list[ClipWindow]
    warnings: list[str] = field(default_factory=list)


def _read_selected(path: Path, wanted: set[int], geometry: Geometry | None, gray: bool = False
                   ) -> tuple[dict[int, np.ndarray], int, bool]:
    """Decode frames ``wanted`` (stopping after the last one); returns (frames, frames seen, hit EOF)."""
    cv2 = _cv2()
    cap = _open(path)
    out: dict[int, np.ndarray] = {}
    last = max(wanted) if wanted else -1
    i = 0
    eof = False
    try:
        while i <= last:
            if not cap.grab():
                eof = True
                break
            if i in wanted:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise VideoReadError(path, f"frame {i} does not decode")
                if geometry is not None and (frame.shape[1], frame.shape[0]) != geometry.src:
                    raise RoiMismatchError(path, f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, "
                                                 f"expected {geometry.src[0]}x{geometry.src[1]}")
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY if gray else cv2.COLOR_BGR2RGB)
                out[i] = geometry.apply(frame) if geometry is not None else frame
            i += 1
    finally:
        cap.release()
    return out, i, eof


def load_clip(path: str | os.PathLike, config: ExtractionConfig = ExtractionConfig(),
              roi_boxes: Sequence[Sequence[float] | None] | None = None,
              roi_mask: str | os.PathLike | None = None) -> DecodedClip:
    """Decode the windows of one clip (only the frames they use), with ROI transformed alike.

    The plan is made from the container's frame count; if the stream ends earlier, the plan is remade
    from the real count (and frames re-read if the new plan needs others), and a warning is recorded.

    Args:
        roi_boxes: one box (or None) per source frame, in source pixels.
        roi_mask: mask video with the clip's size and frame count (white = ROI).

    Raises:
        VideoReadError: unreadable clip. ClipTooShortError: fewer than ``config.min_frames`` frames.
        RoiMismatchError: ROI annotation whose length or size does not match the clip.
    """
    path = Path(path)
    info = probe_video(path)
    try:
        bucket = bucket_size(info.display_width, info.height, config.target_area, config.bucket_step)
    except ValueError as exc:
        raise VideoReadError(path, str(exc)) from None
    geometry = Geometry.for_bucket(info.width, info.height, bucket, info.sar)
    warnings: list[str] = []

    num_src = info.num_frames
    frames: dict[int, np.ndarray] = {}
    # At most three passes: plan from the container count, re-plan once if the stream is shorter, done.
    for _attempt in range(4):
        mapping = resample_indices(num_src, info.fps, config.target_fps)
        windows = plan_windows(len(mapping), config)
        if not windows:
            raise ClipTooShortError(path, f"{len(mapping)} frames at {config.target_fps:g} fps "
                                          f"(< min_frames={config.min_frames})")
        wanted = {int(s) for w in windows for s in mapping[w.start:w.start + w.length]}
        missing = wanted - frames.keys()
        if not missing:
            break
        got, seen, eof = _read_selected(path, wanted, geometry)
        frames.update(got)
        if eof and seen < num_src:
            warnings.append(f"container reports {info.num_frames} frames but only {seen} decode")
            if seen == 0:
                raise VideoReadError(path, "no decodable frames")
            num_src = seen
            frames = {k: v for k, v in frames.items() if k < num_src}
    else:  # pragma: no cover - the count can only shrink once to the real count
        raise VideoReadError(path, "frame count keeps changing while decoding")
    container_frames = info.num_frames
    info = VideoInfo(path, info.width, info.height, info.fps, num_src, info.sar)

    box_array = None
    if roi_boxes is not None:
        if len(roi_boxes) != num_src:
            raise RoiMismatchError(path, f"roi_boxes has {len(roi_boxes)} entries but the clip has "
                                         f"{num_src} frames (one box or null per source frame)")
        box_array = boxes_to_array(roi_boxes)
    mask_frames = None
    if roi_mask is not None:
        mask_info = probe_video(roi_mask)
        if (mask_info.width, mask_info.height) != (info.width, info.height):
            raise RoiMismatchError(roi_mask, f"mask is {mask_info.width}x{mask_info.height}, "
                                             f"clip {path.name} is {info.width}x{info.height}")
        if mask_info.num_frames not in (num_src, container_frames):
            raise RoiMismatchError(roi_mask, f"mask has {mask_info.num_frames} frames, clip {path.name} "
                                             f"has {num_src}")
        mask_frames, seen, _ = _read_selected(Path(roi_mask), wanted, geometry, gray=True)
        if len(mask_frames) != len(wanted):
            raise RoiMismatchError(roi_mask, f"mask has only {seen} frames, clip {path.name} needs "
                                             f"{max(wanted) + 1}")

    out_windows = []
    for index, window in enumerate(windows):
        src = mapping[window.start:window.start + window.length]
        stack = np.stack([frames[int(s)] for s in src])
        boxes = geometry.apply_boxes(box_array[src]) if box_array is not None else None
        mask = None
        if mask_frames is not None:
            mask = np.stack([mask_frames[int(s)] for s in src]).astype(np.float32) / 255.0
        out_windows.append(ClipWindow(frames=stack, index=index, start=window.start, source_indices=src.copy(),
                                      roi_boxes=boxes, roi_mask=mask))
    return DecodedClip(path=path, info=info, bucket=bucket, num_resampled=len(mapping), windows=out_windows,
                       warnings=warnings)


def frames_to_tensor(frames: np.ndarray, value_range: Literal["unit", "signed"] = "unit"):
    """uint8 ``[F, H, W, 3]`` -> float32 torch tensor ``[F, H, W, 3]``.

    ``unit`` ([0, 1]) is what ``comfy.sd.VAE.encode`` takes (it maps to [-1, 1] itself); ``signed`` ([-1, 1])
    is for calling ``WanVAE.encode`` directly (after ``permute(3, 0, 1, 2)[None]`` to ``[B, C, F, H, W]``).
    """
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
    if value_range == "signed":
        return tensor * 2.0 - 1.0
    if value_range != "unit":
        raise ValueError(f"value_range must be 'unit' or 'signed', not {value_range!r}")
    return tensor


def write_video(path: str | os.PathLike, frames: np.ndarray | Sequence[np.ndarray], fps: float,
                quality: float = 8.0) -> Path:
    """Write uint8 RGB frames as H.264 mp4 (yuv420p, so width and height must be even), atomically."""
    import imageio_ffmpeg

    frames = list(frames)
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    height, width = frames[0].shape[:2]
    if width % 2 or height % 2:
        raise ValueError(f"{path}: yuv420p needs even sizes, got {width}x{height}")
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(str(tmp), (width, height), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p", quality=quality, macro_block_size=2,
                                             ffmpeg_log_level="error")
        writer.send(None)
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame, dtype=np.uint8))
        finally:
            writer.close()
    return Path(path)
