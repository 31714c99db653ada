"""Data side of headless training: manifest, decoding/bucketing, labels, synthetic clips, encoder cache.

Typical use by the training loop::

    from training.data import ExtractionConfig, ComfyVAEEncoder, ComfyTextEncoder, prepare_dataset
    data = prepare_dataset("data/manifest.jsonl", "cache/", ComfyVAEEncoder.from_file(vae_path),
                           ComfyTextEncoder.from_file(t5_path), ExtractionConfig(mode="uniform"))
    for item in data.dataset: ...   # latent, context, teacher, primary, roi_latent, has_roi
                                    # (+ image_cond_latent with ExtractionConfig(family="i2v"))
    print(data.format())

See docs/data.md for the manifest format, extraction settings and cache rules. Names are imported lazily
(PEP 562), so ``python -m training.build_manifest`` does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cache": ("CACHE_FORMAT_VERSION", "CachedClipDataset", "CacheSummary", "ComfyTextEncoder", "ComfyVAEEncoder",
              "EncoderOutputError", "LatentEntry", "PreparedData", "build_cache", "ensure_text",
              "load_cache_tensors", "load_text_context", "prepare_dataset", "read_cache_metadata",
              "roi_to_latent_grid", "settings_hash", "start_image_frames", "state_dict_fingerprint",
              "VAEFamilyError", "check_vae_family", "vae_family_problem"),
    "labels": ("ClipLabel", "LabelReport", "NoInstrumentError", "assign_labels", "detect_label",
               "label_distribution", "label_for"),
    "manifest": ("ClipRecord", "ManifestError", "load_manifest", "parse_record", "record_to_dict",
                 "write_manifest"),
    "synthetic": ("HashTextEncoder", "PoolingVideoEncoder", "make_synthetic_dataset", "render_clip", "write_clip"),
    "video_io": ("VIDEO_EXTENSIONS", "ClipTooShortError", "ClipWindow", "DecodedClip", "ExtractionConfig",
                 "Geometry", "RoiMismatchError", "VideoInfo", "VideoReadError", "Window", "boxes_to_mask",
                 "bucket_size", "ffmpeg_summary", "frames_4n1", "frames_to_tensor", "load_clip", "native_stderr",
                 "plan_windows", "probe_video", "resample_indices", "sample_aspect", "write_video"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
