"""Glue between the trainer's config and the data pipeline (``training.data``): encoders and the dataset.

``training.data.ComfyVAEEncoder`` / ``ComfyTextEncoder`` load their model to compute their cache identity
(a fingerprint of the weights). Loading UMT5-XXL (11 GB) just to find out that every caption is already
cached would make every run start slowly, and would make each process of a data-parallel run load it. The
:class:`LazyComfyEncoder` here computes an identity from the *file* (its safetensors header and a sample of
its bytes, cheap and content-based) and loads the model only when something actually has to be encoded;
the loaded ComfyUI encoder gets that same identity, so caches are keyed consistently.

Special encoder names for tests and the CPU demo (never for real training): ``demo:hash`` (the hashing
stand-in for UMT5, ``training.data.synthetic.HashTextEncoder``) and ``demo:pooling`` (the pooling stand-in for
the VAE, ``PoolingVideoEncoder``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("training")

DEMO_TEXT = "demo:hash"
DEMO_VAE = "demo:pooling"


class EncoderFileError(ValueError):
    """A VAE / text encoder file that cannot be found or read."""


def resolve_in_folder(spec: str, folder: str, what: str) -> Path:
    """A path, or a file name in one of ComfyUI's model folders (``vae``, ``text_encoders``)."""
    if not spec:
        raise EncoderFileError(f"no {what} given (set data.{'vae' if folder == 'vae' else 'text_encoder'})")
    p = Path(spec).expanduser()
    if p.is_file():
        return p.absolute()
    try:
        import folder_paths

        hit = folder_paths.get_full_path(folder, spec)
        if hit:
            return Path(hit).absolute()
        where = ", ".join(folder_paths.get_folder_paths(folder))
    except Exception as e:  # pragma: no cover
        where = f"(ComfyUI folders unavailable: {e})"
    raise EncoderFileError(f"{what} {spec!r} not found: not a file, and not a name in ComfyUI's {folder} folder(s) "
                           f"{where}")


def file_identity(path: Path, kind: str) -> str:
    """Content identity of a model file: safetensors header + size + first/last MiB (no full read)."""
    h = hashlib.sha256(kind.encode())
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8 and path.suffix in (".safetensors", ".sft"):
            n = struct.unpack("<Q", head)[0]
            if n < 100_000_000:
                h.update(f.read(n))
        f.seek(0)
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{kind}:{path.name}:{h.hexdigest()[:16]}"


class LazyComfyEncoder:
    """A ``training.data`` encoder that loads its ComfyUI model on first use (``release()`` frees it)."""

    def __init__(self, path: Path, kind: str, factory: Callable[[Path, str], Any]):
        self.path = path
        self.identity = file_identity(path, kind)
        self._factory = factory
        self._encoder = None

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def __call__(self, value):
        if self._encoder is None:
            log.info("loading %s", self.path)
            try:
                self._encoder = self._factory(self.path, self.identity)
            except Exception as e:
                raise EncoderFileError(f"{self.path}: ComfyUI cannot load it ({type(e).__name__}: "
                                       f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        return self._encoder(value)

    def release(self) -> None:
        self._encoder = None
        try:
            import comfy.model_management as mm

            mm.unload_all_models()
            mm.soft_empty_cache()
        except Exception:  # pragma: no cover
            pass


def video_encoder(spec: str):
    if spec == DEMO_VAE:
        from .data.synthetic import PoolingVideoEncoder

        return PoolingVideoEncoder()
    from .data.cache import ComfyVAEEncoder

    path = resolve_in_folder(spec, "vae", "VAE")
    return LazyComfyEncoder(path, "vae", lambda p, ident: ComfyVAEEncoder.from_file(p, identity=ident))


def text_encoder(spec: str, clip_type: str = "wan"):
    if spec == DEMO_TEXT:
        from .data.synthetic import HashTextEncoder

        return HashTextEncoder()
    from .data.cache import ComfyTextEncoder

    path = resolve_in_folder(spec, "text_encoders", "text encoder")
    return LazyComfyEncoder(path, f"text-{clip_type}",
                            lambda p, ident: ComfyTextEncoder.from_file(p, clip_type=clip_type, identity=ident))


def extraction_config(data_cfg):
    from .data.video_io import ExtractionConfig

    return ExtractionConfig(mode=data_cfg.extraction_mode, max_frames=data_cfg.max_frames,
                            min_frames=data_cfg.min_frames, num_windows=data_cfg.num_windows,
                            stride=data_cfg.stride or None, target_fps=data_cfg.target_fps,
                            target_area=data_cfg.target_area, bucket_step=data_cfg.bucket_step)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NoUsableClipsError(ValueError):
    """Every clip of the manifest was skipped (unreadable, too short, no instrument, bad ROI)."""


def prepare(data_cfg, log_fn: Callable[[str], None] | None = None, encode_video=None, encode_text=None):
    """Manifest -> labels -> cache -> dataset, with encoders from the config unless given (tests inject them).

    Raises ManifestError / NoInstrumentError / NoUsableClipsError / EncoderFileError with clear messages;
    cached files are only ever added or replaced atomically, never deleted on failure.
    """
    from .data.cache import prepare_dataset

    if not data_cfg.manifest:
        raise EncoderFileError("no manifest given (set data.manifest; python -m training.build_manifest makes one)")
    encode_video = encode_video if encode_video is not None else video_encoder(data_cfg.vae)
    encode_text = encode_text if encode_text is not None else text_encoder(data_cfg.text_encoder)
    try:
        prepared = prepare_dataset(data_cfg.manifest, data_cfg.cache_dir, encode_video, encode_text,
                                   extraction_config(data_cfg), no_instrument=data_cfg.no_instrument,
                                   latent_dtype=_DTYPES[data_cfg.latent_dtype],
                                   text_dtype=_DTYPES[data_cfg.text_dtype], log=log_fn)
    finally:
        for enc in (encode_video, encode_text):
            if isinstance(enc, LazyComfyEncoder) and enc.loaded:
                enc.release()
    if len(prepared.dataset) == 0:
        raise NoUsableClipsError(f"no usable clips in {data_cfg.manifest}: every clip was skipped.\n"
                                 + prepared.format())
    return prepared


def dataset_id(prepared) -> str:
    """Fingerprint of the training windows (clip, window, cache file + its settings): resume must see the same."""
    h = hashlib.sha256()
    for e in prepared.dataset.entries:
        h.update(json.dumps([e.record.name, e.window_index, e.path.name, e.num_frames,
                             list(e.bucket), str(e.text_path.name if e.text_path else "")]).encode())
    return h.hexdigest()[:16]


__all__ = ["DEMO_TEXT", "DEMO_VAE", "EncoderFileError", "LazyComfyEncoder", "NoUsableClipsError", "dataset_id",
           "extraction_config", "file_identity", "prepare", "resolve_in_folder", "text_encoder", "video_encoder"]
