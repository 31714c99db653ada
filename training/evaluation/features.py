"""User-supplied TorchScript models (local files only, checked by SHA-256 when given) and video features.

Nothing is ever downloaded: every network (I3D, another video encoder, the tip detector, the instrument
classifier) is a path the user gives. A wrong file is caught before hours of decoding: a missing path,
a checksum that does not match, or a file that is not TorchScript each raise :class:`ModelFileError`
naming the role, the path and what was expected.

Video encoders follow the StyleGAN-V ``i3d_torchscript.pt`` convention: input ``[B, 3, T, S, S]`` float with
values in [-1, 1], T = 16 consecutive frames. StyleGAN-V calls that detector with
``rescale=True, resize=True`` on uint8 input; here the frames are fitted and scaled beforehand (so the
letterbox/stretch/crop protocol is ours and stated), and it is called with
``rescale=False, resize=False, return_features=True`` (its 400-d pre-softmax features). Any other TorchScript
video encoder (VideoMAE, V-JEPA, ...) can be given with its own frame count, size, value range and keyword
arguments; its output is flattened to one vector per window.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .resize import Fit, describe
from .videos import EvalInputError

I3D_KWARGS: dict[str, Any] = {"rescale": False, "resize": False, "return_features": True}


class ModelFileError(EvalInputError):
    """A model file that is missing, has the wrong checksum, or is not loadable TorchScript."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(path: str | os.PathLike | None, sha256: str | None, role: str) -> Path:
    """The path, after checking that it exists and (when ``sha256`` is given) that its checksum matches."""
    if path is None:
        raise ModelFileError(f"{role}: no model file given")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFileError(f"{role}: model file not found: {path} (give the local path of the file; "
                             "nothing is downloaded)")
    if sha256:
        expected = sha256.strip().lower()
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            raise ModelFileError(f"{role}: {sha256!r} is not a SHA-256 hex digest (64 hex digits)")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelFileError(f"{role}: checksum mismatch for {path}: expected sha256 {expected}, "
                                 f"the file has {actual} (wrong or corrupted file)")
    return path


def load_torchscript(path: str | os.PathLike | None, sha256: str | None = None, role: str = "model",
                     device: str = "cpu"):
    """Load a TorchScript module for inference after :func:`check_model_file`."""
    import torch

    path = check_model_file(path, sha256, role)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the interchange format here
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError or ValueError depending on the damage
        raise ModelFileError(f"{role}: {path} is not a loadable TorchScript file "
                             f"(save it with torch.jit.script/trace + .save): {str(exc).splitlines()[0]}") from None
    module.eval()
    return module


@dataclass
class VideoEncoderSpec:
    """A TorchScript video encoder and how it is fed.

    Attributes:
        name: label in reports (``i3d`` for FVD/KVD).
        path / sha256: the local model file and optional checksum.
        num_frames: consecutive frames per window (16 for I3D).
        size: square input side in pixels (224 for I3D).
        resize: ``letterbox`` / ``stretch`` / ``center-crop`` (see ``resize.py``).
        value_range: ``signed`` ([-1, 1]) or ``unit`` ([0, 1]).
        kwargs: keyword arguments for the forward call (I3D: rescale/resize False, return_features True).
        windows: windows per clip, spread evenly over it (1: the first ``num_frames`` frames).
    """

    name: str
    path: Path
    sha256: str | None = None
    num_frames: int = 16
    size: int = 224
    resize: str = "letterbox"
    value_range: Literal["signed", "unit"] = "signed"
    kwargs: dict[str, Any] = field(default_factory=dict)
    windows: int = 1

    def protocol(self) -> dict[str, Any]:
        return {"model": str(self.path), "sha256": self.sha256, "frames_per_window": self.num_frames,
                "windows_per_clip": self.windows, "input": f"[B, 3, {self.num_frames}, {self.size}, {self.size}]",
                "values": "[-1, 1]" if self.value_range == "signed" else "[0, 1]",
                "resize": self.resize, "resize_protocol": describe(self.resize, self.size, self.size),
                "call_kwargs": dict(self.kwargs)}


def i3d_spec(path: str | os.PathLike, sha256: str | None = None, resize: str = "letterbox",
             windows: int = 1) -> VideoEncoderSpec:
    """The StyleGAN-V I3D (``i3d_torchscript.pt``) as FVD/KVD use it."""
    return VideoEncoderSpec("i3d", Path(path), sha256, 16, 224, resize, "signed", dict(I3D_KWARGS), windows)


def parse_encoder_spec(text: str) -> VideoEncoderSpec:
    """``name=vjepa,path=enc.pt[,sha256=..][,frames=16][,size=224][,resize=letterbox][,range=signed|unit]
    [,windows=1][,kw.<key>=<value>]`` -> spec (kw values: true/false/int/float/string)."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise EvalInputError(f"encoder spec {text!r}: expected key=value pairs separated by commas, got {part!r}")
        key, value = part.split("=", 1)
        fields[key.strip()] = value.strip()
    if "name" not in fields or "path" not in fields:
        raise EvalInputError(f"encoder spec {text!r}: 'name' and 'path' are required")
    kwargs: dict[str, Any] = {}
    for key, value in list(fields.items()):
        if key.startswith("kw."):
            low = value.lower()
            parsed: Any = {"true": True, "false": False}.get(low, value)
            if parsed is value:
                for cast in (int, float):
                    try:
                        parsed = cast(value)
                        break
                    except ValueError:
                        pass
            kwargs[key[3:]] = parsed
            del fields[key]
    known = {"name", "path", "sha256", "frames", "size", "resize", "range", "windows"}
    unknown = set(fields) - known
    if unknown:
        raise EvalInputError(f"encoder spec {text!r}: unknown key(s) {sorted(unknown)}; known: {sorted(known)} "
                             "and kw.<name>")
    value_range = fields.get("range", "signed")
    if value_range not in ("signed", "unit"):
        raise EvalInputError(f"encoder spec {text!r}: range must be 'signed' or 'unit'")
    try:
        return VideoEncoderSpec(fields["name"], Path(fields["path"]), fields.get("sha256"),
                                int(fields.get("frames", 16)), int(fields.get("size", 224)),
                                fields.get("resize", "letterbox"), value_range, kwargs, int(fields.get("windows", 1)))
    except ValueError as exc:
        raise EvalInputError(f"encoder spec {text!r}: {exc}") from None


def window_starts(num_frames: int, window: int, count: int) -> list[int]:
    """Starts of ``count`` windows of ``window`` frames spread evenly over a clip (first one at 0)."""
    if num_frames < window:
        return []
    last = num_frames - window
    if count <= 1:
        return [0]
    return sorted({int(round(s)) for s in np.linspace(0, last, count)})


class VideoEncoder:
    """Features of clips from a :class:`VideoEncoderSpec` (model loaded and checked at construction)."""

    def __init__(self, spec: VideoEncoderSpec, device: str = "cpu", batch_size: int = 4):
        from .resize import RESIZE_MODES

        if spec.resize not in RESIZE_MODES:
            raise EvalInputError(f"encoder '{spec.name}': resize must be one of {RESIZE_MODES}, not {spec.resize!r}")
        self.spec, self.device, self.batch_size = spec, device, batch_size
        self.model = load_torchscript(spec.path, spec.sha256, f"video encoder '{spec.name}'", device)

    def features(self, frames: np.ndarray) -> np.ndarray:
        """``[F, H, W, 3]`` uint8 clip -> ``[windows, D]`` float64 features.

        Raises:
            EvalInputError: a clip shorter than one window.
        """
        import torch

        spec = self.spec
        starts = window_starts(len(frames), spec.num_frames, spec.windows)
        if not starts:
            raise EvalInputError(f"encoder '{spec.name}': clip has {len(frames)} frames, fewer than one "
                                 f"{spec.num_frames}-frame window")
        fit = Fit.make((frames.shape[2], frames.shape[1]), (spec.size, spec.size), spec.resize)
        needed = sorted({i for s in starts for i in range(s, s + spec.num_frames)})
        fitted = {i: fit.apply(frames[i]) for i in needed}
        outputs = []
        for b in range(0, len(starts), self.batch_size):
            batch = np.stack([np.stack([fitted[i] for i in range(s, s + spec.num_frames)])
                              for s in starts[b:b + self.batch_size]])  # [B, T, S, S, 3]
            x = torch.from_numpy(batch).to(self.device).permute(0, 4, 1, 2, 3).float() / 255.0
            if spec.value_range == "signed":
                x = x * 2.0 - 1.0
            with torch.no_grad():
                out = self.model(x, **spec.kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, torch.Tensor) or out.shape[0] != x.shape[0]:
                raise EvalInputError(f"encoder '{spec.name}': expected a [B, D] tensor per batch of {x.shape[0]} "
                                     f"windows, got {getattr(out, 'shape', type(out).__name__)}")
            outputs.append(out.reshape(out.shape[0], -1).double().cpu().numpy())
        feats = np.concatenate(outputs)
        if not np.isfinite(feats).all():
            raise EvalInputError(f"encoder '{spec.name}': non-finite features")
        return feats


__all__ = ["I3D_KWARGS", "ModelFileError", "VideoEncoder", "VideoEncoderSpec", "check_model_file", "i3d_spec",
           "load_torchscript", "parse_encoder_spec", "sha256_file", "window_starts"]
