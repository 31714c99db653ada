"""Cache of VAE latents and text-encoder outputs, computed once and reused across training runs.

Encoding a 480p x 81-frame window with the WAN VAE or a caption with UMT5-XXL costs far more than a
training step needs to spend, and both are fixed during LoRA training, so they are computed once.

Layout under ``cache_dir``::

    latents/<clip-stem>-<path-hash>/<settings-hash>_w<window>.safetensors   one per clip window
    text/<hash of encoder identity + caption>.safetensors                   one per caption

A latent file holds ``latent`` ``[C, F', H/s, W/s]`` (raw VAE output: *not* normalised by the model's
latent format; C = 16 and s = 8 for the WAN 2.1 VAE, C = 48 and s = 16 for the WAN 2.2 VAE of the ``ti2v``
family), ``source_indices`` ``[F]``, and when the clip has ROI ``roi_boxes`` ``[F, 4]`` (bucket pixels,
NaN rows = no box) and ``roi_latent`` ``[F', H/s, W/s]`` (ROI coverage on the latent grid). For the ``i2v``
family it also holds ``image_cond_latent`` ``[16, F', H/8, W/8]``: the window's first frame followed by
0.5-gray frames, encoded, exactly as core ``WanImageToVideo`` builds ``concat_latent_image``. A text
file holds ``context`` ``[L, 4096]``. The safetensors header metadata records the format version, source
path, size and ``mtime_ns`` (and the ROI mask's, and the sample aspect ratio of a clip with non-square
pixels), the settings hash and settings (extraction, encoder identity, dtype, ROI annotation), and the
window's place in the clip.

Invalidation: an entry is reused only if its metadata matches the current source stat and settings hash;
otherwise that clip is decoded again and only the stale or missing windows are encoded. Changing a setting
changes the hash, so the old files stay (switching back reuses them). Every write goes to a temporary file
that is renamed into place, so a crash or an encoder exception never leaves a half-written cache file.
Unreadable clips and clips with bad ROI are skipped and reported by name, never silently dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from moe_core.atomic import atomic_path
from .labels import ClipLabel, LabelReport
from .manifest import ClipRecord
from .video_io import ClipWindow, ExtractionConfig, VideoReadError, frames_to_tensor, load_clip, sample_aspect

CACHE_FORMAT_VERSION = "1"


class EncoderOutputError(RuntimeError):
    """An encoder returned something that is not the documented tensor (an encoder bug, not a data problem)."""


class VAEFamilyError(ValueError):
    """A VAE whose latents (channels, spatial compression) are not those of the model family being trained."""


class VideoEncoder(Protocol):
    """``frames`` float ``[F, H, W, 3]`` in [0, 1] -> latent ``[C, F', H/s, W/s]``; ``identity`` names it.

    Optional attributes ``latent_channels`` / ``spatial_compression`` (ComfyUI encoders have them) let the
    cache refuse a VAE of the wrong family before decoding anything; ``path`` names its file in messages.
    """

    identity: str

    def __call__(self, frames: torch.Tensor) -> torch.Tensor: ...


class TextEncoder(Protocol):
    """``caption`` -> context ``[L, 4096]``; ``identity`` names the encoder (weights, dtype, settings)."""

    identity: str

    def __call__(self, caption: str) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------- helpers

def settings_hash(settings: Mapping[str, Any]) -> str:
    """Short stable hash of a JSON-able settings dict (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def encoder_identity(encoder: Any, explicit: str | None = None) -> str:
    """The identity string that goes into cache keys.

    A plain callable has no way to tell us which weights it runs, and a cache keyed without that would
    silently reuse latents of another VAE; so one is required, from ``explicit`` or ``encoder.identity``.
    """
    identity = explicit if explicit is not None else getattr(encoder, "identity", None)
    if not identity or not isinstance(identity, str):
        raise ValueError(f"encoder {encoder!r} has no identity: give it an 'identity' attribute or pass an "
                         "explicit encoder id, so that the cache can tell encoders apart")
    return identity


def state_dict_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Cheap content fingerprint of model weights: names, shapes, dtypes and a sample of values per tensor.

    Hashing every byte of a 10 GB text encoder would take longer than encoding the captions.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]) if flat.numel() > 128 else flat
        digest.update(sample.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def clip_key(video_path: str | os.PathLike) -> str:
    """Folder name for a clip's latents: readable stem plus a hash of the absolute path (no collisions)."""
    path = Path(video_path).absolute()
    stem = re.sub(r"[^0-9A-Za-z._\u4e00-\u9fff-]+", "_", path.stem)[:60] or "clip"
    return f"{stem}-{hashlib.sha1(str(path).encode('utf-8')).hexdigest()[:10]}"


def _stat(path: Path | None) -> tuple[str, str]:
    if path is None:
        return "", ""
    st = path.stat()
    return str(st.st_size), str(st.st_mtime_ns)


def read_cache_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The safetensors header metadata of a cache file, or None if it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # truncated or foreign file: treat as absent and recompute
        return None


def save_cache_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                    ) -> Path:
    """Write a safetensors file atomically (temporary file + ``os.replace``)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def roi_to_latent_grid(mask: np.ndarray, latent_shape: Sequence[int]) -> np.ndarray:
    """ROI coverage ``[F', h, w]`` on the latent grid from a pixel mask ``[F, H, W]`` in [0, 1].

    Space: mean over each ``H/h x W/w`` block. Time follows the WAN VAE's causal grouping (latent frame 0
    <- pixel frame 0, then each latent frame <- the next ``(F-1)/(F'-1)`` pixel frames); the maximum is taken
    so a tip visible in any frame of a group counts.
    """
    f_lat, h_lat, w_lat = (int(s) for s in latent_shape[-3:])
    mask = np.asarray(mask, dtype=np.float32)
    frames, height, width = mask.shape
    if height % h_lat or width % w_lat:
        raise ValueError(f"mask {height}x{width} is not a multiple of the latent grid {h_lat}x{w_lat}")
    pooled = mask.reshape(frames, h_lat, height // h_lat, w_lat, width // w_lat).mean(axis=(2, 4))
    if f_lat == 1:
        return pooled.max(axis=0, keepdims=True)
    step = (frames - 1) // (f_lat - 1)
    groups = [pooled[:1]] + [pooled[1 + step * i: 1 + step * (i + 1)] for i in range(f_lat - 1)]
    return np.stack([g.max(axis=0) for g in groups])


def _vae_kind(channels: int) -> str:
    return {16: "a WAN 2.1 VAE", 48: "a WAN 2.2 VAE"}.get(int(channels), "not a WAN VAE")


def vae_family_problem(channels: int | None, compression: int | None, family: str) -> str | None:
    """Why a VAE making ``channels``-channel latents at ``compression``x is not the VAE of ``family``
    (None: it is, or nothing is known). The WAN 2.1 VAE (16 ch, 8x) serves t2v and i2v, the WAN 2.2 VAE
    (48 ch, 16x) the TI2V 5B model; the other pairing fails only later, as a shape error in the DiT."""
    from moe_core.families import FAMILIES

    fam = FAMILIES[family]
    if channels is not None and int(channels) != fam.latent_channels:
        return (f"this VAE makes {int(channels)}-channel latents ({_vae_kind(channels)}), but {fam.title} "
                f"(family {fam.name!r}) takes {fam.latent_channels}-channel latents from {fam.vae}")
    if compression is not None and int(compression) != fam.spatial_compression:
        return (f"this VAE compresses {int(compression)}x in space, but {fam.title} (family {fam.name!r}) takes "
                f"latents of a {fam.spatial_compression}x VAE ({fam.vae})")
    return None


def check_vae_family(encoder: Any, family: str, video_id: str, channels: int | None = None,
                     compression: int | None = None) -> None:
    """Raise :class:`VAEFamilyError` naming the VAE (its file, else its identity) when it does not fit
    ``family``; ``channels`` / ``compression`` default to what the encoder declares."""
    if channels is None:
        channels = getattr(encoder, "latent_channels", None)
    if compression is None:
        compression = getattr(encoder, "spatial_compression", None)
    problem = vae_family_problem(channels, compression, family)
    if problem:
        name = getattr(encoder, "path", None) or video_id
        raise VAEFamilyError(f"VAE {str(name)!r}: {problem}")


# -------------------------------------------------------------------------------- results and summary

@dataclass
class LatentEntry:
    """One cached training window: where its tensors are and what clip/caption they belong to."""

    record: ClipRecord
    path: Path
    text_path: Path | None
    window_index: int
    start: int
    num_frames: int
    bucket: tuple[int, int]

    def load(self) -> dict[str, torch.Tensor]:
        """All tensors of the window file (``latent``, ``source_indices``, ``roi_boxes``, ``roi_latent``,
        ``image_cond_latent`` for ``i2v``)."""
        return load_cache_tensors(self.path)


@dataclass
class CacheSummary:
    """What ``build_cache`` did; ``format()`` is what the run prints at the end."""

    entries: list[LatentEntry] = field(default_factory=list)
    clips_total: int = 0
    clips_used: int = 0
    computed: int = 0
    reused: int = 0
    text_computed: int = 0
    text_reused: int = 0
    removed_stale: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def windows(self) -> int:
        return len(self.entries)

    def format(self) -> str:
        lines = [f"cache: {self.clips_used}/{self.clips_total} clip(s) used, {self.windows} window(s): "
                 f"latents {self.computed} computed / {self.reused} reused; "
                 f"text {self.text_computed} computed / {self.text_reused} reused"]
        if self.removed_stale:
            lines.append(f"  removed {self.removed_stale} stale window file(s)")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} clip(s):")
            lines.extend(f"    - {name}: {reason}" for name, reason in self.skipped)
        if self.warnings:
            lines.append("  warnings:")
            lines.extend(f"    - {w}" for w in self.warnings)
        return "\n".join(lines)


def load_cache_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_text_context(path: str | os.PathLike) -> torch.Tensor:
    """The ``[L, 4096]`` text context stored in a text cache file."""
    return load_cache_tensors(path)["context"]


# ------------------------------------------------------------------------------------------- text

def text_cache_path(cache_dir: str | os.PathLike, caption: str, encoder_id: str) -> Path:
    digest = hashlib.sha256(f"{encoder_id}\0{caption}".encode("utf-8")).hexdigest()[:24]
    return Path(cache_dir) / "text" / f"{digest}.safetensors"


def ensure_text(cache_dir: str | os.PathLike, caption: str, encode_text: Callable[[str], torch.Tensor],
                encoder_id: str, dtype: torch.dtype = torch.float32) -> tuple[Path, bool]:
    """Path of the cached context for ``caption``, encoding it if needed; returns (path, computed)."""
    path = text_cache_path(cache_dir, caption, encoder_id)
    meta = read_cache_metadata(path)
    expected = {"format_version": CACHE_FORMAT_VERSION, "kind": "text", "caption": caption,
                "text_encoder": encoder_id, "dtype": str(dtype)}
    if meta is not None and all(meta.get(k) == v for k, v in expected.items()):
        return path, False
    context = encode_text(caption)
    if not isinstance(context, torch.Tensor) or context.ndim != 2:
        raise EncoderOutputError(f"text encoder {encoder_id!r} must return a [L, dim] tensor, got "
                         f"{getattr(context, 'shape', type(context))}")
    save_cache_file(path, {"context": context.to(dtype)}, expected)
    return path, True


# ----------------------------------------------------------------------------------------- latents

def _latent_settings(config: ExtractionConfig, video_id: str, dtype: torch.dtype) -> dict:
    """What the latents depend on besides the clip itself (hashed into the file names)."""
    return {"format_version": CACHE_FORMAT_VERSION, "extraction": config.settings(), "video_encoder": video_id,
            "dtype": str(dtype)}


def _roi_fingerprint(record: ClipRecord) -> str:
    """The clip's ROI annotation, as part of its source identity: editing it rewrites the same files."""
    if record.roi_boxes is not None:
        return "boxes:" + hashlib.sha256(json.dumps(record.roi_boxes).encode()).hexdigest()[:16]
    if record.roi_mask is not None:
        return f"mask:{record.roi_mask}"
    return "none"


def _window_file(clip_dir: Path, shash: str, index: int) -> Path:
    return clip_dir / f"{shash}_w{index:03d}.safetensors"


def _valid(meta: dict[str, str] | None, source: dict[str, str]) -> bool:
    return meta is not None and all(meta.get(k) == v for k, v in source.items())


def start_image_frames(frames: torch.Tensor) -> torch.Tensor:
    """What core ``WanImageToVideo`` encodes for a start image: ``[F, H, W, 3]`` of 0.5 gray with the first
    frame replaced by ``frames[0]`` (its ``torch.ones((length, height, width, 3)) * 0.5`` then
    ``image[:1] = start_image``)."""
    image = torch.ones(frames.shape, dtype=frames.dtype, device=frames.device) * 0.5
    image[:1] = frames[:1]
    return image


def _encode(encode_video, frames: torch.Tensor, video_id: str, family: str) -> torch.Tensor:
    latent = encode_video(frames)
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        raise EncoderOutputError(f"video encoder {video_id!r} must return a [C, F', H', W'] latent, got "
                         f"{getattr(latent, 'shape', type(latent))}")
    compression = frames.shape[1] // latent.shape[-2] if latent.shape[-2] else None
    check_vae_family(encode_video, family, video_id, channels=latent.shape[0], compression=compression)
    return latent


def _encode_window(window: ClipWindow, encode_video: Callable[[torch.Tensor], torch.Tensor], video_id: str,
                   dtype: torch.dtype, family: str = "t2v") -> dict[str, torch.Tensor]:
    from moe_core.families import FAMILIES

    frames = frames_to_tensor(window.frames, "unit")
    latent = _encode(encode_video, frames, video_id, family)
    tensors = {"latent": latent.detach().to("cpu", dtype),
               "source_indices": torch.from_numpy(np.asarray(window.source_indices, dtype=np.int64))}
    if FAMILIES[family].conditioning == "concat_image":
        # i2v: the DiT reads the start image's latent next to the noisy one (ComfyUI's concat_latent_image)
        image_cond = _encode(encode_video, start_image_frames(frames), video_id, family)
        tensors["image_cond_latent"] = image_cond.detach().to("cpu", dtype)
    if window.roi_boxes is not None:
        tensors["roi_boxes"] = torch.from_numpy(window.roi_boxes.astype(np.float32))
    pixel_mask = window.roi_pixel_mask()
    if pixel_mask is not None:
        tensors["roi_latent"] = torch.from_numpy(roi_to_latent_grid(pixel_mask, latent.shape))
    return tensors


def _cache_clip(record: ClipRecord, cache_dir: Path, encode_video, video_id: str, config: ExtractionConfig,
                dtype: torch.dtype, summary: CacheSummary) -> list[LatentEntry]:
    """Reuse or (re)compute the windows of one clip; raises VideoReadError for data problems."""
    video = record.video_path
    try:
        size, mtime = _stat(video)
        mask_size, mask_mtime = _stat(record.roi_mask)
    except OSError as exc:
        raise VideoReadError(exc.filename or video, f"cannot read: {exc.strerror}") from None
    settings = _latent_settings(config, video_id, dtype)
    shash = settings_hash(settings)
    source = {"format_version": CACHE_FORMAT_VERSION, "kind": "latent", "source_path": str(video),
              "source_size": size, "source_mtime_ns": mtime, "roi": _roi_fingerprint(record),
              "roi_mask_size": mask_size, "roi_mask_mtime_ns": mask_mtime, "settings_hash": shash}
    sar = sample_aspect(video)
    if sar != 1.0:  # non-square pixels are decoded to their display aspect (entries written before were not)
        source["sample_aspect"] = f"{sar:.6g}"
    clip_dir = cache_dir / "latents" / clip_key(video)

    def entry(meta: dict[str, str], path: Path) -> LatentEntry:
        return LatentEntry(record=record, path=path, text_path=None, window_index=int(meta["window_index"]),
                           start=int(meta["start"]), num_frames=int(meta["num_frames"]),
                           bucket=(int(meta["width"]), int(meta["height"])))

    # Fast path: every window of this clip is cached and current -> no decoding at all.
    existing = sorted(clip_dir.glob(f"{shash}_w*.safetensors")) if clip_dir.is_dir() else []
    metas = [read_cache_metadata(p) for p in existing]
    if existing and all(_valid(m, source) for m in metas):
        count = int(metas[0]["num_windows"])
        if [int(m["window_index"]) for m in metas] == list(range(count)):
            summary.reused += count
            return [entry(m, p) for m, p in zip(metas, existing)]

    decoded = load_clip(video, config, roi_boxes=record.roi_boxes, roi_mask=record.roi_mask)
    summary.warnings.extend(f"{record.name}: {w}" for w in decoded.warnings)
    entries = []
    for window in decoded.windows:
        path = _window_file(clip_dir, shash, window.index)
        meta = {**source, "settings": json.dumps(settings, sort_keys=True), "video_encoder": video_id,
                "window_index": str(window.index), "num_windows": str(len(decoded.windows)),
                "start": str(window.start), "num_frames": str(len(window.frames)),
                "width": str(decoded.bucket[0]), "height": str(decoded.bucket[1]),
                "target_fps": str(config.target_fps)}
        old = read_cache_metadata(path)
        if _valid(old, {k: meta[k] for k in (*source, "num_windows", "start", "num_frames", "width", "height")}):
            summary.reused += 1
        else:
            save_cache_file(path, _encode_window(window, encode_video, video_id, dtype, config.family), meta)
            summary.computed += 1
        entries.append(entry(meta, path))
    for stale in existing:
        index = int(stale.stem.rsplit("_w", 1)[1])
        if index >= len(decoded.windows):
            stale.unlink(missing_ok=True)
            summary.removed_stale += 1
    return entries


def build_cache(records: Iterable[ClipRecord], cache_dir: str | os.PathLike,
                encode_video: Callable[[torch.Tensor], torch.Tensor],
                encode_text: Callable[[str], torch.Tensor] | None = None,
                config: ExtractionConfig = ExtractionConfig(), *, video_encoder_id: str | None = None,
                text_encoder_id: str | None = None, latent_dtype: torch.dtype = torch.float32,
                text_dtype: torch.dtype = torch.float32, log: Callable[[str], None] | None = None) -> CacheSummary:
    """Make sure every window of every clip (and every caption) is cached; return what was done.

    Args:
        records: clips to cache (e.g. the labelled ones of ``assign_labels``).
        encode_video: ``frames [F, H, W, 3] in [0, 1] -> latent [C, F', H/s, W/s]``, e.g. ComfyVAEEncoder;
            its latents must be those of ``config.family`` (else :class:`VAEFamilyError`, before any decoding
            when the encoder declares ``latent_channels``).
        config: extraction settings, including the model ``family`` (``i2v`` also caches the start-image
            latent of each window).
        encode_text: ``caption -> [L, 4096]``, e.g. ComfyTextEncoder; None to cache latents only.
        video_encoder_id / text_encoder_id: identity strings when the encoders carry no ``identity``.
        latent_dtype / text_dtype: storage dtypes (bf16 halves the disk use; part of the cache key).
        log: called with one line per clip processed (default: silent).

    Clips that cannot be read, are too short, or whose ROI does not fit are skipped and listed in the
    summary with the reason. Encoder exceptions propagate (they are not data problems); entries written
    before the failure are complete and are reused by the next run.
    """
    cache_dir = Path(cache_dir)
    video_id = encoder_identity(encode_video, video_encoder_id)
    check_vae_family(encode_video, config.family, video_id)
    text_id = encoder_identity(encode_text, text_encoder_id) if encode_text is not None else None
    log = log or (lambda line: None)
    summary = CacheSummary()
    text_paths: dict[str, Path] = {}
    for record in records:
        summary.clips_total += 1
        try:
            entries = _cache_clip(record, cache_dir, encode_video, video_id, config, latent_dtype, summary)
        except VideoReadError as exc:
            reason = exc.reason if exc.path == record.video_path else f"{exc.path.name}: {exc.reason}"
            summary.skipped.append((record.name, reason))
            log(f"skip {record.name}: {reason}")
            continue
        summary.clips_used += 1
        if encode_text is not None:
            if record.caption not in text_paths:
                path, computed = ensure_text(cache_dir, record.caption, encode_text, text_id, text_dtype)
                text_paths[record.caption] = path
                if computed:
                    summary.text_computed += 1
                else:
                    summary.text_reused += 1
            for e in entries:
                e.text_path = text_paths[record.caption]
        summary.entries.extend(entries)
        log(f"cached {record.name}: {len(entries)} window(s)")
    return summary


# ------------------------------------------------------------------------------------------ dataset

class CachedClipDataset(torch.utils.data.Dataset):
    """Training items from cached windows: latent, text context, teacher distribution, ROI on the latent grid.

    Items of different buckets have different shapes, so batch with ``batch_size=1`` (the seeds' setting)
    or group by ``entry.bucket``. ``roi_latent`` is all zeros with ``has_roi`` False for clips without ROI.
    Windows cached for the ``i2v`` family also give ``image_cond_latent`` (raw, like ``latent``).
    """

    def __init__(self, entries: Sequence[LatentEntry],
                 labels: LabelReport | Mapping[Path, ClipLabel] | None = None):
        self.entries = list(entries)
        if isinstance(labels, LabelReport):
            labels = {record.video_path: label for record, label in labels.labelled}
        self.labels = dict(labels or {})
        missing = [e.record.name for e in self.entries if self.labels and e.record.video_path not in self.labels]
        if missing:
            raise ValueError(f"no label for cached clip(s): {', '.join(sorted(set(missing)))}")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        tensors = entry.load()
        latent = tensors["latent"]
        item: dict[str, Any] = {"latent": latent, "name": entry.record.name, "window_index": entry.window_index,
                                "caption": entry.record.caption}
        if "image_cond_latent" in tensors:
            item["image_cond_latent"] = tensors["image_cond_latent"]
        roi = tensors.get("roi_latent")
        item["has_roi"] = roi is not None
        item["roi_latent"] = roi if roi is not None else torch.zeros(latent.shape[1:])
        if entry.text_path is not None:
            item["context"] = load_text_context(entry.text_path)
        label = self.labels.get(entry.record.video_path)
        if label is not None:
            item["teacher"] = torch.tensor(label.teacher, dtype=torch.float32)
            item["primary"] = label.primary
        return item


# ----------------------------------------------------------------------------- ComfyUI encoder adapters

def _frames_check(frames: torch.Tensor, multiple: int) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got {tuple(frames.shape)}")
    if frames.shape[1] % multiple or frames.shape[2] % multiple:
        # comfy.sd.VAE.encode would silently centre-crop to a multiple of its downscale factor.
        raise ValueError(f"frame size {frames.shape[2]}x{frames.shape[1]} is not a multiple of {multiple}")


class ComfyVAEEncoder:
    """Encode frames with a ``comfy.sd.VAE``: the WAN 2.1 VAE (A14B t2v/i2v) or the WAN 2.2 VAE (TI2V 5B).

    ``VAE.encode`` takes pixels ``[F, H, W, C]`` in [0, 1] (it applies ``x * 2 - 1`` itself), moves them
    to ``[1, C, F, H, W]`` and returns ``[1, 16, 1 + (F - 1) // 4, H/8, W/8]`` (WAN 2.2 VAE:
    ``[1, 48, ..., H/16, W/16]``) float32 on the intermediate device; the latents are raw (the DiT's
    ``latent_format.process_in`` normalises them when sampling). Do not pass 5-D ``[B, F, H, W, C]``: its
    crop step treats F as a spatial axis and drops frames.
    """

    def __init__(self, vae: Any, identity: str | None = None, path: str | os.PathLike | None = None):
        self.vae = vae
        self.path = None if path is None else Path(path)
        self.identity = identity or (f"comfy-vae:{state_dict_fingerprint(vae.get_sd())}:{vae.vae_dtype}")

    @property
    def latent_channels(self) -> int:
        return int(self.vae.latent_channels)

    @property
    def spatial_compression(self) -> int:
        return int(self.vae.spacial_compression_encode())

    @classmethod
    def from_file(cls, path: str | os.PathLike, identity: str | None = None) -> "ComfyVAEEncoder":
        """Load a VAE file the way ComfyUI's VAELoader does (``comfy.sd.VAE(sd=load_torch_file(path))``)."""
        from moe_core.comfy_runtime import ensure_comfy

        ensure_comfy()
        import comfy.sd
        import comfy.utils

        sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
        vae = comfy.sd.VAE(sd=sd, metadata=metadata)
        vae.throw_exception_if_invalid()
        return cls(vae, identity, path)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        _frames_check(frames, self.vae.spacial_compression_encode())
        with torch.inference_mode():
            latent = self.vae.encode(frames)
        return latent[0].float().cpu().clone()


class ComfyTextEncoder:
    """Encode captions with a ComfyUI CLIP object (for WAN: UMT5-XXL from CLIPLoader type ``wan``).

    Runs ``clip.tokenize(text)`` then ``clip.encode_from_tokens(tokens)`` (what CLIPTextEncode does, minus
    hook scheduling) and returns ``cond[0]``: ``[512, 4096]`` for UMT5, padded to 512 tokens with zeroed
    padding exactly as at inference.
    """

    def __init__(self, clip: Any, identity: str | None = None):
        self.clip = clip
        self.identity = identity or f"comfy-clip:{state_dict_fingerprint(clip.cond_stage_model.state_dict())}"

    @classmethod
    def from_file(cls, path: str | os.PathLike, clip_type: str = "wan", identity: str | None = None
                  ) -> "ComfyTextEncoder":
        """Load a text encoder file as ComfyUI's CLIPLoader does (``comfy.sd.load_clip``)."""
        from moe_core.comfy_runtime import ensure_comfy

        ensure_comfy()
        import comfy.sd

        kind = getattr(comfy.sd.CLIPType, clip_type.upper())
        return cls(comfy.sd.load_clip(ckpt_paths=[str(path)], clip_type=kind), identity)

    def __call__(self, caption: str) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self.clip.tokenize(caption)
            cond = self.clip.encode_from_tokens(tokens)
        return cond[0].float().cpu().clone()


# ------------------------------------------------------------------------------------------ one call

@dataclass
class PreparedData:
    """Everything the training loop needs from the data side, plus the report to print at the end."""

    dataset: CachedClipDataset
    labels: LabelReport
    cache: CacheSummary

    def format(self) -> str:
        return self.labels.format() + "\n" + self.cache.format()


def prepare_dataset(manifest: str | os.PathLike, cache_dir: str | os.PathLike,
                    encode_video: Callable[[torch.Tensor], torch.Tensor],
                    encode_text: Callable[[str], torch.Tensor] | None = None,
                    config: ExtractionConfig = ExtractionConfig(), *,
                    expert_names: Sequence[str] | None = None,
                    custom_keywords: Mapping[str, Sequence[str]] | None = None,
                    no_instrument: str = "fallback", video_encoder_id: str | None = None,
                    text_encoder_id: str | None = None, latent_dtype: torch.dtype = torch.float32,
                    text_dtype: torch.dtype = torch.float32,
                    log: Callable[[str], None] | None = None) -> PreparedData:
    """Manifest -> labels -> cache -> dataset, in one call.

    Raises ManifestError (bad manifest) or NoInstrumentError (policy ``error``) before any encoding.
    Skipped clips are listed in ``result.cache.skipped``; ``result.format()`` is the end-of-run report.
    """
    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

    from .labels import assign_labels
    from .manifest import load_manifest

    names = tuple(expert_names or DEFAULT_EXPERT_NAMES)
    records = load_manifest(manifest, names)
    report = assign_labels(records, names, custom_keywords, policy=no_instrument)  # type: ignore[arg-type]
    summary = build_cache([r for r, _ in report.labelled], cache_dir, encode_video, encode_text, config,
                          video_encoder_id=video_encoder_id, text_encoder_id=text_encoder_id,
                          latent_dtype=latent_dtype, text_dtype=text_dtype, log=log)
    return PreparedData(dataset=CachedClipDataset(summary.entries, report), labels=report, cache=summary)
