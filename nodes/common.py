"""What the four nodes share: names, the routing wire type, the LoRA-MoE file list, a small file cache.

Imported relatively (``from .common import ...``): inside ComfyUI this package is
``custom_nodes.<folder>.nodes``, never the top-level ``nodes`` (that name is ComfyUI's own module).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import folder_paths
from comfy_api.latest import io

from ..moe_core.checkpoint import LoraMoE, LoraMoEFormatError, load_lora_moe, read_lora_moe_metadata
from ..moe_core.image_routing import image_route
from ..moe_core.routing import Routing, RoutingError, rule_route
from ..moe_core.vocabulary import DEFAULT_EXPERT_NAMES, DEFAULT_FALLBACK, DEFAULT_INSTRUMENTS

PACK = "WanLoRAMoE"
CATEGORY = "WAN LoRA-MoE"
LORA_MOE_FOLDER = "lora_moe"  # ComfyUI/models/lora_moe (plus extra_model_paths.yaml entries)
LORA_FOLDER = "loras"

#: The value on a LORA_MOE_ROUTING wire (Router / Gate Override -> Load LoRA-MoE), a `RoutingValue`.
RoutingIO = io.Custom("LORA_MOE_ROUTING")


def node_id(name: str) -> str:
    return f"{PACK}_{name}"


def register_model_folder() -> None:
    """Register ``models/lora_moe`` with ComfyUI (idempotent; extra_model_paths.yaml may add more paths)."""
    folder_paths.add_model_folder_path(LORA_MOE_FOLDER, os.path.join(folder_paths.models_dir, LORA_MOE_FOLDER))


register_model_folder()


# ---------------------------------------------------------------------------------------- routing value

@dataclass(frozen=True)
class RoutingValue:
    """A routing as the Router / Gate Override nodes produce it.

    `routing` is computed with the default instrument vocabulary, for display. Load LoRA-MoE routes the
    prompt again with the file's own expert names and keywords (`resolve`), so a file with another
    vocabulary is routed by its own table; manual gates are used as they are.
    """

    routing: Routing
    fallback: str = DEFAULT_FALLBACK

    def resolve(self, moe: LoraMoE) -> Routing:
        r = self.routing
        if r.mode in ("manual", "cycle"):  # fixed by hand / the file's experts in turn: no prompt routing
            return r
        if r.source == "prompt":
            return self._prompt_routing(moe)
        # from the start image: the classifier's class probabilities mapped onto the file's own experts
        with_prompt = self._prompt_routing(moe) if r.source == "prompt+image" else None
        return image_route(dict(r.image_classes), moe.expert_names, route_from=r.source, prompt_routing=with_prompt,
                           keywords=moe.expert_keywords, top_k=min(r.top_k, moe.num_experts),
                           temperature=r.temperature, mode=r.mode, prompt=r.prompt, classifier=r.classifier)

    def _prompt_routing(self, moe: LoraMoE) -> Routing:
        r = self.routing
        unknown_fallback = self.fallback not in ("off", "error", *moe.expert_names)
        try:
            return rule_route(r.prompt, moe.expert_names, keywords=moe.expert_keywords,
                              fallback="error" if unknown_fallback else self.fallback,
                              top_k=min(r.top_k, moe.num_experts), temperature=r.temperature, mode=r.mode)
        except RoutingError:
            if unknown_fallback and r.prompt and r.prompt.strip():  # no instrument named: the fallback is needed
                raise RoutingError(
                    f"the prompt names no instrument and the Router's no_instrument is '{self.fallback}', but "
                    f"{moe.source} has no expert of that name (its experts: {', '.join(moe.expert_names)}): "
                    "choose off or error") from None
            raise

    def to_ui(self) -> dict:
        r = self.routing
        return {"mode": r.mode, "detected": list(r.detected), "gates": dict(r.weights), "top_k": r.top_k,
                "temperature": r.temperature, "note": r.note, "source": r.source, "line": r.describe()}


def as_routing_value(value) -> RoutingValue | None:
    """Accept a RoutingValue or a bare moe_core Routing (from another pack's node); anything else is an error."""
    if value is None or isinstance(value, RoutingValue):
        return value
    if isinstance(value, Routing) or type(value).__name__ == "Routing":  # a Routing from another import path
        return RoutingValue(value)
    raise RoutingError(f"expected a LORA_MOE_ROUTING value, got {type(value).__name__}")


def check_choices(**values: tuple[object, list | tuple]) -> str | None:
    """An error message if a combo value is not one of its options, else None.

    ComfyUI 0.3.64 checks combo values only for V1 list-typed inputs; a V3 ``io.Combo`` arrives as type
    "COMBO" and is not checked against its options, so every node checks its own (in ``validate_inputs``,
    which also turns a bad value into a node error before anything runs)."""
    for name, (value, options) in values.items():
        if value is not None and value not in options:
            shown = list(options) if len(options) <= 20 else f"{len(options)} names"
            return f"{name}: {value!r} is not one of {shown}"
    return None


def instrument_label(name: str) -> str:
    """'Hook/Electrocautery 电凝钩' for a default expert, the name itself otherwise."""
    for inst in DEFAULT_INSTRUMENTS:
        if inst.name == name:
            return f"{inst.name} {inst.chinese}"
    return name


# ----------------------------------------------------------------------------------------- file listing

def _is_lora_moe_header(path: str) -> bool:
    """True if a .safetensors file's header carries LoRA-MoE metadata (reads the header only)."""
    try:
        read_lora_moe_metadata(path)
        return True
    except LoraMoEFormatError:
        return False


_header_cache: dict[str, tuple[tuple[int, int], bool]] = {}


def _cached_is_lora_moe(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (st.st_mtime_ns, st.st_size)
    hit = _header_cache.get(path)
    if hit is None or hit[0] != key:
        hit = (key, _is_lora_moe_header(path))
        _header_cache[path] = hit
    return hit[1]


def list_lora_moe_files() -> list[str]:
    """Names for the file combo: every .safetensors in ``models/lora_moe``, and the LoRA-MoE files found in
    ``models/loras`` (plain LoRAs there are left out). A name in both folders means the lora_moe one."""
    names = [n for n in folder_paths.get_filename_list(LORA_MOE_FOLDER) if n.lower().endswith(".safetensors")]
    seen = set(names)
    for n in folder_paths.get_filename_list(LORA_FOLDER):
        if n in seen or not n.lower().endswith(".safetensors"):
            continue
        full = folder_paths.get_full_path(LORA_FOLDER, n)
        if full and _cached_is_lora_moe(full):
            names.append(n)
            seen.add(n)
    return names


def resolve_lora_moe_file(name: str) -> str:
    """The full path of a listed LoRA-MoE file. Only names in the current list are accepted, so no path
    outside ComfyUI's model folders can be reached (no traversal, no absolute paths)."""
    if not isinstance(name, str) or not name:
        raise ValueError("no LoRA-MoE file selected")
    if name not in list_lora_moe_files():
        raise ValueError(f"LoRA-MoE file '{name}' is not in ComfyUI's 'lora_moe' or 'loras' model folders "
                         "(refresh the node list after copying a file there)")
    for folder in (LORA_MOE_FOLDER, LORA_FOLDER):
        full = folder_paths.get_full_path(folder, name)
        if full:
            return full
    raise ValueError(f"LoRA-MoE file '{name}' disappeared from the model folders")


def scrub_paths(text: str, path: str, name: str) -> str:
    """`text` with the server's path of a file replaced by `name`, the file as the user chose it (the combo
    value), and no model folder left in it: messages reach the browser."""
    for p in {str(path), os.path.realpath(path)}:
        text = text.replace(p, name)
    for folder in folder_paths.get_folder_paths(LORA_MOE_FOLDER) + folder_paths.get_folder_paths(LORA_FOLDER):
        for f in {folder, os.path.realpath(folder)}:
            text = text.replace(f.rstrip(os.sep) + os.sep, "")
    return text


@contextmanager
def named_as(name: str, path: str) -> Iterator[None]:
    """Errors raised inside name the file `path` as `name` (see `scrub_paths`); other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        text = str(e)
        clean = scrub_paths(text, path, name)
        if clean == text:
            raise
        try:
            renamed = type(e)(clean)
        except Exception:  # an exception type with another constructor
            renamed = ValueError(clean)
        raise renamed from None


def header_summary(path: str, name: str | None = None) -> dict:
    """Expert names, adapter sets (with what `auto` needs to pick one) and defaults from a LoRA-MoE file's
    header, without reading tensors.

    Raises ValueError naming the file as `name` (default: its file name), never by its server path."""
    try:
        meta = read_lora_moe_metadata(path)
    except LoraMoEFormatError as e:
        raise ValueError(scrub_paths(str(e), path, name or os.path.basename(path))) from None
    sets = {}
    for set_name, s in (meta.get("sets") or {}).items():
        sets[set_name] = {"modules": len(s.get("modules") or {}), "learned_router": bool(s.get("router_hidden")),
                          "sigma_range": s.get("sigma_range"), "fingerprint": bool(s.get("fingerprint")),
                          "model": s.get("model") or {}}
    return {"format": meta.get("format"), "version": meta.get("version"), "expert_names": meta.get("expert_names"),
            "sets": sets, "defaults": meta.get("defaults")}


# ------------------------------------------------------------------------------------------ file cache

class _LoraMoECache:
    """The last few loaded files (an A14B graph loads one file twice), at most `size`.

    Keyed by the file's identity on disk (path, inode, size, mtime), so a file replaced or rewritten while
    the server runs is read again; a file that fails to load is never cached."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[tuple, LoraMoE] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, path: str) -> LoraMoE:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        moe = load_lora_moe(path)
        with self._lock:
            self._items[key] = moe
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return moe

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


LORA_MOE_CACHE = _LoraMoECache()

def file_signature(name: str) -> tuple | str:
    """What changes when a listed file changes on disk (for `fingerprint_inputs`, so that ComfyUI runs a node
    again, not from its cache, after a file was replaced under the same name)."""
    try:
        st = os.stat(resolve_lora_moe_file(name))
    except (ValueError, OSError) as e:
        return f"unavailable: {type(e).__name__}"
    return (st.st_ino, st.st_size, st.st_mtime_ns)


__all__ = ["CATEGORY", "DEFAULT_EXPERT_NAMES", "LORA_MOE_CACHE", "PACK", "RoutingIO", "RoutingValue",
           "as_routing_value", "check_choices", "file_signature", "header_summary", "instrument_label",
           "list_lora_moe_files", "named_as", "node_id", "resolve_lora_moe_file", "scrub_paths"]
