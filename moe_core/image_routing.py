"""Routing from the start image: a user's TorchScript instrument classifier as the teacher.

Image-to-video (I2V A14B, TI2V 5B) starts from a frame that already shows the instrument, so the gates may
come from that frame instead of (or besides) the prompt's keywords. The pack ships no classifier and
downloads nothing: the user gives a TorchScript file and its SHA-256, and the file is refused unless its
bytes match that hash (a TorchScript file is code; the hash pins the exact file the user vetted).

The classifier contract:

- attributes ``class_names`` (list of str: expert names or instrument keywords of the vocabulary,
  case-insensitive, e.g. ``["scissors", "hook", "suction", "grasper"]``) and ``input_size`` (int or
  ``[h, w]``);
- ``forward(x)`` takes float RGB ``[N, 3, H, W]`` in [0, 1] (the first frame of ComfyUI's IMAGE
  ``[N, H, W, 3]``, resized bilinearly to ``input_size``) and returns logits ``[N, len(class_names)]``.

The teacher is ``softmax(logits / temperature)``, each class's probability added to the expert its name
maps to; ``prompt+image`` takes the mean of the prompt's rule distribution and that one. The result is an
ordinary :class:`moe_core.routing.Routing` (its weights are the teacher), so top-k, the learned router,
the EMA and the band treat it like a prompt's.
"""
from __future__ import annotations

import hashlib
import io
import re
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .routing import RouteSource, RouterMode, Routing, RoutingError
from .vocabulary import keywords_for

ROUTE_FROM: tuple[RouteSource, ...] = ("prompt", "image", "prompt+image")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ImageRoutingError(RoutingError):
    """A classifier file, hash or image that cannot route; the message names the file."""


@dataclass(frozen=True)
class ImageClassifier:
    path: str
    sha256: str
    module: torch.jit.ScriptModule
    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)

    @property
    def name(self) -> str:
        return Path(self.path).name


_CACHE: dict[tuple[str, str], ImageClassifier] = {}
_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_classifier(path: str | Path, sha256: str, name: str | None = None) -> ImageClassifier:
    """The TorchScript classifier at `path`, after checking its bytes against `sha256` (hex), its
    `class_names` and `input_size`. Loaded on the CPU once per (path, hash). The bytes are read once and the
    module is loaded from those very bytes, so the file cannot change between the check and the load.
    `name` is how messages call the file (the Router passes what the user typed, never the server's folders)."""
    shown = name if name is not None else str(path)
    if not str(path).strip():
        raise ImageRoutingError("no classifier file given: routing from the image needs 'classifier' (a TorchScript "
                                "file) and 'classifier_sha256'")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageRoutingError(f"classifier file {shown} not found")
    want = (sha256 or "").strip().lower()
    key = (str(p.resolve()), want)
    data = p.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if not want:
        raise ImageRoutingError(f"classifier {shown}: classifier_sha256 is empty; give the SHA-256 of the file you "
                                f"checked (this file's is {actual})")
    if not _SHA256.fullmatch(want):
        raise ImageRoutingError(f"classifier {shown}: classifier_sha256 {sha256!r} is not 64 hexadecimal digits "
                                f"(this file's is {actual})")
    if actual != want:
        raise ImageRoutingError(f"classifier {shown}: its SHA-256 is {actual}, not the given {want}: the file "
                                "changed or is another file; refusing to run it")
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    try:
        with warnings.catch_warnings():  # torch >= 2.10 calls TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError and others for a file that is not TorchScript
        raise ImageRoutingError(f"classifier {shown}: not a TorchScript module ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    clf = ImageClassifier(shown, actual, module.eval(), _class_names(module, shown), _input_size(module, shown))
    with _LOCK:
        _CACHE[key] = clf
    return clf


def _class_names(module: torch.jit.ScriptModule, p: str) -> tuple[str, ...]:
    names = getattr(module, "class_names", None)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ImageRoutingError(f"classifier {p}: needs an attribute 'class_names', a non-empty list of class "
                                f"names (expert names or instrument keywords), got {names!r}")
    if len({n.strip().lower() for n in names}) != len(names):
        raise ImageRoutingError(f"classifier {p}: duplicate class names {list(names)}")
    return tuple(n.strip() for n in names)


def _input_size(module: torch.jit.ScriptModule, p: str) -> tuple[int, int]:
    size = getattr(module, "input_size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in size)):
        raise ImageRoutingError(f"classifier {p}: needs an attribute 'input_size', an int or [height, width] of "
                                f"positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def class_probabilities(clf: ImageClassifier, image: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """softmax(logits / temperature) of the classifier on the first frame of a ComfyUI IMAGE [N, H, W, C]."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3 or image.shape[0] < 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ImageRoutingError(f"the image must be a ComfyUI IMAGE [frames, height, width, 3], got {shape}")
    if not (temperature > 0):
        raise ImageRoutingError(f"temperature must be > 0, got {temperature}")
    frame = image[:1, :, :, :3].movedim(-1, 1).to("cpu", torch.float32)
    x = torch.nn.functional.interpolate(frame, size=clf.input_size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        try:
            logits = clf.module(x)
        except Exception as e:
            raise ImageRoutingError(f"classifier {clf.name} failed on a [1, 3, {clf.input_size[0]}, "
                                    f"{clf.input_size[1]}] input: {str(e).splitlines()[0] if str(e) else e!r}") from None
    n = len(clf.class_names)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, n):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ImageRoutingError(f"classifier {clf.name} returned {shape}, expected logits [1, {n}] (one per class "
                                "name)")
    if not bool(torch.isfinite(logits).all()):
        raise ImageRoutingError(f"classifier {clf.name} returned non-finite logits")
    probs = torch.softmax(logits[0].double() / float(temperature), dim=0)
    return dict(zip(clf.class_names, probs.tolist()))


def expert_of_class(expert_names: Sequence[str], keywords: Mapping[str, Sequence[str]] | None = None
                    ) -> dict[str, str]:
    """Lower-cased class name -> expert: each expert's own name and each of its keywords."""
    table: dict[str, str] = {}
    for name, kws in keywords_for(list(expert_names), dict(keywords) if keywords else None).items():
        table.setdefault(name.lower(), name)
        for k in kws:
            table.setdefault(k.lower(), name)
    return table


def image_distribution(class_probs: Mapping[str, float], expert_names: Sequence[str],
                       keywords: Mapping[str, Sequence[str]] | None = None, source: str = "the classifier"
                       ) -> dict[str, float]:
    """The class probabilities summed per expert; a class name that is no expert name or keyword is an error."""
    table = expert_of_class(expert_names, keywords)
    unknown = [c for c in class_probs if c.lower() not in table]
    if unknown:
        kw = keywords_for(list(expert_names), dict(keywords) if keywords else None)
        known = "; ".join(f"{n} ({', '.join(kw[n][:4])})" for n in expert_names)
        raise ImageRoutingError(f"{source}: class name(s) {unknown} match no expert name or instrument keyword "
                                f"(case-insensitive); the experts are: {known}")
    out = {n: 0.0 for n in expert_names}
    for c, p in class_probs.items():
        out[table[c.lower()]] += float(p)
    return out


def image_route(class_probs: Mapping[str, float], expert_names: Sequence[str], *, route_from: RouteSource,
                prompt_routing: Routing | None = None, keywords: Mapping[str, Sequence[str]] | None = None,
                top_k: int = 2, temperature: float = 1.0, mode: RouterMode = "rule", prompt: str = "",
                classifier: str = "the classifier") -> Routing:
    """A Routing whose teacher is the image's distribution ("image") or the mean of the prompt's rule
    distribution and the image's ("prompt+image"; a prompt that names no instrument carries no evidence, so
    whatever its no_instrument fallback, the image alone decides). `class_probs` already carry the temperature, so a rule routing gets temperature 1
    (top-k only, as the rule router does); a learned routing keeps it for the learned router's softmax."""
    if route_from not in ("image", "prompt+image"):
        raise ImageRoutingError(f"route_from must be 'image' or 'prompt+image' here, got {route_from!r}")
    if route_from == "prompt+image" and prompt_routing is None:
        raise ImageRoutingError("route_from 'prompt+image' needs the prompt's routing")
    if not 1 <= int(top_k) <= len(expert_names):
        raise RoutingError(f"top_k must be between 1 and the number of experts ({len(expert_names)}), got {top_k}")
    image = image_distribution(class_probs, expert_names, keywords, f"classifier {classifier}")
    top_class = max(class_probs, key=class_probs.get)
    seen = max(image, key=image.get)
    note = f"classifier {classifier}: {top_class} {class_probs[top_class]:.2f}"
    detected: tuple[str, ...] = (seen,)
    weights = image
    if route_from == "prompt+image" and prompt_routing.detected and sum(prompt_routing.weights.values()) > 0:
        weights = {n: 0.5 * (float(prompt_routing.weights.get(n, 0.0)) + image[n]) for n in expert_names}
        detected = tuple(n for n in expert_names if n in prompt_routing.detected or n == seen)
        if prompt_routing.note:
            note = f"{note}; prompt: {prompt_routing.note}"
    elif route_from == "prompt+image":
        note = f"{note}; the prompt names no instrument, so the image alone"
    base = prompt_routing or Routing(mode=mode, weights={}, prompt=prompt)
    return replace(base, mode=mode, weights=weights, top_k=int(top_k),
                   temperature=1.0 if mode == "rule" else float(temperature), detected=detected,
                   prompt=prompt or base.prompt, note=note, source=route_from,
                   image_classes=tuple((c, float(p)) for c, p in class_probs.items()), classifier=classifier)


__all__ = ["ROUTE_FROM", "ImageClassifier", "ImageRoutingError", "class_probabilities", "expert_of_class",
           "file_sha256", "image_distribution", "image_route", "load_classifier"]
