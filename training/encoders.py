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

:func:`precheck_encoders` reads the headers of the VAE and text-encoder files before anything is encoded
(``training.model_files``), and :func:`prepare` checks every text embedding, computed or cached, against the
DiT's text width: a wrong file is an error naming ``data.vae`` / ``data.text_encoder`` and the file, not a
shape error deep inside the first training step.

Model family (``moe_core.families``): ``data.family`` (the trainer settles ``auto`` from its DiT's header;
:func:`data_family` says what an unsettled one means) selects the VAE the latents must come from (WAN 2.1
VAE for t2v/i2v, WAN 2.2 VAE for ti2v), the clip defaults (``data.target_fps`` / ``data.max_frames`` 0 =
the family's: 16 fps / 81 frames, ti2v 24 / 121) and what the cache stores (i2v: the start-image latent of
every window).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
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
    key = "data.vae" if folder == "vae" else "data.text_encoder"
    if not spec:
        raise EncoderFileError(f"no {what} given (set {key})")
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
    raise EncoderFileError(f"{key} = {spec!r}: {what} not found: not a file, and not a name in ComfyUI's {folder} "
                           f"folder(s) {where}")


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

    @property
    def latent_channels(self) -> int | None:
        """A VAE file's latent channels, from the loaded model or else its safetensors header (None: unknown),
        so that a VAE of the wrong family is refused before any clip is decoded."""
        if self._encoder is not None:
            return getattr(self._encoder, "latent_channels", None)
        if not hasattr(self, "_header_channels"):
            self._header_channels = None
            from .model_files import HeaderError, is_safetensors, read_header, wan_vae_channels

            if self.identity.startswith("vae:") and is_safetensors(self.path):
                try:
                    self._header_channels = wan_vae_channels(read_header(self.path).shapes)
                except (OSError, HeaderError):
                    pass
        return self._header_channels

    def release(self) -> None:
        self._encoder = None
        try:
            import comfy.model_management as mm

            mm.unload_all_models()
            mm.soft_empty_cache()
        except Exception:  # pragma: no cover
            pass


def data_family(data_cfg, encode_video: Any = None) -> str:
    """The model family of the data: ``data.family`` as the trainer settled it from its DiT. Still ``auto`` (or
    absent: older configs) where no DiT was read, e.g. ``prepare`` called directly: the WAN 2.2 VAE's 48
    channels mean ``ti2v``, anything else ``t2v`` (``i2v`` cannot be told from the VAE: set it)."""
    family = getattr(data_cfg, "family", None)
    if family in (None, "", "auto"):
        return "ti2v" if getattr(encode_video, "latent_channels", None) == 48 else "t2v"
    return family


def video_encoder(spec: str, family: str = "t2v"):
    """The VAE of ``data.vae``; ``demo:pooling`` is the stand-in with the shapes of ``family``'s VAE."""
    if spec == DEMO_VAE:
        from .data.synthetic import PoolingVideoEncoder

        return PoolingVideoEncoder.for_family(family)
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


def precheck_encoders(data_cfg, dit_path: str | os.PathLike | None = None, video: bool = True,
                      text: bool = True) -> int | None:
    """Check the configured VAE and text-encoder files against the DiT from their headers alone.

    The VAE must be the one of the model family: the DiT's (from its header: 16 / 36 / 48 input channels),
    else ``data.family``.

    Args:
        dit_path: a DiT of the run (its header gives the family and the text width), or None.
        video / text: check ``data.vae`` / ``data.text_encoder`` (False where the caller injects an encoder).

    Returns:
        The text width the DiT takes (4096 for WAN), or None when it cannot be read from a header.

    Raises:
        EncoderFileError: naming the config key and the file, and saying what the file looks like.
    """
    from moe_core.families import ModelFamilyError, family_from_dims
    from .data.cache import vae_family_problem
    from .model_files import (HeaderError, is_safetensors, read_header, umt5_problem, wan_dit_layout,
                              wan_vae_channels, wan_vae_problem)

    dit = None
    if dit_path is not None and is_safetensors(dit_path):
        try:
            dit = wan_dit_layout(read_header(dit_path).shapes)
        except (OSError, HeaderError):
            dit = None  # precheck_dit reports the DiT's own problems
    family = getattr(data_cfg, "family", None) or "auto"
    if dit is not None:
        try:
            family = family_from_dims(dit.in_channels).name
        except ModelFamilyError:
            pass  # precheck_dit reports it

    def vae_problem(header):
        if family == "auto":  # no DiT header to tell: the trainer checks the latents against the loaded DiT
            return wan_vae_problem(header, None)
        return wan_vae_problem(header, None) or vae_family_problem(wan_vae_channels(header.shapes), None, family)

    checks = [("data.vae", data_cfg.vae, DEMO_VAE, "vae", "VAE", video, vae_problem),
              ("data.text_encoder", data_cfg.text_encoder, DEMO_TEXT, "text_encoders", "text encoder", text,
               lambda h: umt5_problem(h, dit.text_dim if dit else None))]
    for key, spec, demo, folder, what, wanted, problem_of in checks:
        if not wanted or spec == demo:
            continue
        path = resolve_in_folder(spec, folder, what)
        if not is_safetensors(path):
            continue  # .pt / .ckpt / .gguf: only loading the file can tell
        try:
            problem = problem_of(read_header(path))
        except HeaderError as exc:
            problem = str(exc).removeprefix(f"{path}: ")
        if problem:
            raise EncoderFileError(f"{key} = {str(path)!r}: {problem}")
    return dit.text_dim if dit else None


class TextWidthCheck:
    """A text encoder whose every output is checked against the DiT's text width (``identity`` passes through).

    A wrong encoder that no header check caught (a ``.pt`` file, an injected encoder) then fails at its first
    caption with the config key in the message, not at the first training step.
    """

    def __init__(self, encoder, text_dim: int, source: str):
        self.encoder, self.text_dim, self.source = encoder, int(text_dim), source
        self.identity = getattr(encoder, "identity", None)

    def __call__(self, caption: str):
        context = self.encoder(caption)
        width = getattr(context, "shape", (None,))[-1]
        if width != self.text_dim:
            raise EncoderFileError(f"data.text_encoder = {self.source!r}: it made embeddings of shape "
                                   f"{list(getattr(context, 'shape', []))} but the DiT takes {self.text_dim}-wide "
                                   "text (UMT5-XXL for WAN)")
        return context


def check_cached_text(prepared, text_dim: int, source: str) -> None:
    """Every text embedding the dataset uses, cached earlier or just now, is ``[L, text_dim]`` (header read)."""
    from .model_files import read_header

    seen = set()
    for entry in prepared.dataset.entries:
        if entry.text_path is None or entry.text_path in seen:
            continue
        seen.add(entry.text_path)
        shape = read_header(entry.text_path).shapes.get("context")
        if shape is None or len(shape) != 2 or shape[1] != text_dim:
            raise EncoderFileError(f"data.text_encoder = {source!r}: the cached text embedding {entry.text_path} "
                                   f"(caption of {entry.record.name}) has shape {list(shape or [])}, but the DiT "
                                   f"takes {text_dim}-wide text (UMT5-XXL for WAN)")


def extraction_config(data_cfg, family: str | None = None):
    """The cache's ``ExtractionConfig`` from the ``[data]`` section: ``family`` (default: :func:`data_family`)
    as the config or the trainer set it; ``max_frames`` / ``target_fps`` 0 (or None) take the family's defaults."""
    from .data.video_io import ExtractionConfig

    return ExtractionConfig(mode=data_cfg.extraction_mode, max_frames=data_cfg.max_frames or None,
                            min_frames=data_cfg.min_frames, num_windows=data_cfg.num_windows,
                            stride=data_cfg.stride or None, target_fps=data_cfg.target_fps or None,
                            target_area=data_cfg.target_area, bucket_step=data_cfg.bucket_step,
                            family=family or data_family(data_cfg))


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NoUsableClipsError(ValueError):
    """Every clip of the manifest was skipped (unreadable, too short, no instrument, bad ROI)."""


def prepare(data_cfg, log_fn: Callable[[str], None] | None = None, encode_video=None, encode_text=None,
            text_dim: int | None = None):
    """Manifest -> labels -> cache -> dataset, with encoders from the config unless given (tests inject them).

    Args:
        text_dim: the DiT's text width; every embedding (computed or cached) must have it.

    Raises ManifestError / NoInstrumentError / NoUsableClipsError / EncoderFileError with clear messages;
    cached files are only ever added or replaced atomically, never deleted on failure.
    """
    from .data.cache import prepare_dataset
    from .data.manifest import ManifestError

    if not data_cfg.manifest:
        raise EncoderFileError("no manifest given (set data.manifest; python -m training.build_manifest makes one)")
    if not Path(data_cfg.manifest).is_file():
        raise ManifestError("file not found (data.manifest; python -m training.build_manifest --input-dir CLIPS "
                            "--output MANIFEST writes one)", Path(data_cfg.manifest).absolute())
    injected = encode_text is not None
    encode_video = encode_video if encode_video is not None else video_encoder(data_cfg.vae, data_family(data_cfg))
    family = data_family(data_cfg, encode_video)
    encode_text = encode_text if injected else text_encoder(data_cfg.text_encoder)
    source = str(getattr(encode_text, "path", None)
                 or (getattr(encode_text, "identity", None) if injected else data_cfg.text_encoder))
    if text_dim is not None:
        encode_text = TextWidthCheck(encode_text, text_dim, source)
    try:
        prepared = prepare_dataset(data_cfg.manifest, data_cfg.cache_dir, encode_video, encode_text,
                                   extraction_config(data_cfg, family), no_instrument=data_cfg.no_instrument,
                                   latent_dtype=_DTYPES[data_cfg.latent_dtype],
                                   text_dtype=_DTYPES[data_cfg.text_dtype], log=log_fn)
    finally:
        for enc in (encode_video, getattr(encode_text, "encoder", encode_text)):
            if isinstance(enc, LazyComfyEncoder) and enc.loaded:
                enc.release()
    if text_dim is not None:
        check_cached_text(prepared, text_dim, source)
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


__all__ = ["DEMO_TEXT", "DEMO_VAE", "EncoderFileError", "LazyComfyEncoder", "NoUsableClipsError", "TextWidthCheck",
           "check_cached_text", "data_family", "dataset_id", "extraction_config", "file_identity", "precheck_encoders",
           "prepare", "resolve_in_folder", "text_encoder", "video_encoder"]
