"""The LoRA-MoE checkpoint: one .safetensors file, validated on load, written atomically.

Layout (see README "Checkpoint format"):
- tensors `{set}.{module}.base.lora_down|lora_up` and `{set}.{module}.expert{e}.lora_down|lora_up`
  (down [rank, in], up [out, rank]) and, optionally, `{set}.router.fc1.weight|bias`, `{set}.router.fc2...`;
- header metadata `lora_moe`: JSON with the format version, expert names, per-set model info, the
  per-projection ranks and alphas, and the defaults (alphas, band, top-k, EMA beta, temperature).
A set is "default" (one DiT) or "high_noise" / "low_noise" (the WAN 2.2 A14B pair).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .band import DEFAULT_BAND, BandError, TimestepBand
from .families import T2V_BOUNDARY, model_record_problem

FORMAT_NAME = "wan-lora-moe"
FORMAT_VERSION = 1
METADATA_KEY = "lora_moe"
SET_NAMES = ("default", "high_noise", "low_noise")
#: The WAN 2.2 T2V A14B boundary (t = 0.875) between the high- and low-noise DiT. The I2V A14B pair switches at
#: t = 0.9: `moe_core.families.pair_boundary` gives the boundary of a set from its recorded model.
A14B_BOUNDARY = T2V_BOUNDARY


class LoraMoEFormatError(ValueError):
    """A LoRA-MoE (or LoRA) file that cannot be used; the message names the file and the key."""


@dataclass
class Adapter:
    """One LoRA on one projection: ΔW = (alpha / rank) · up @ down."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class ProjectionAdapters:
    """The base adapter and one slot per expert (None where that expert does not cover the module)."""

    in_features: int
    out_features: int
    base: Adapter | None
    experts: list[Adapter | None]


@dataclass
class AdapterSet:
    """All adapters for one DiT, plus its optional learned router."""

    name: str
    modules: dict[str, ProjectionAdapters]
    router: dict[str, torch.Tensor] | None = None
    sigma_range: tuple[float, float] | None = None
    fingerprint: list[float] | None = None
    #: The DiT the set was made for: {dim, num_layers, ffn_dim, in_dim, out_dim: int, family: str}, every field
    #: optional (older files record fewer; see `moe_core.families.model_record_problem`).
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class MoEDefaults:
    alpha_base: float = 0.7
    alpha_expert: float = 1.0
    band: TimestepBand = DEFAULT_BAND
    top_k: int = 2
    ema_beta: float = 0.9
    temperature: float = 1.0
    max_gate: float = 1.0  # cap on any one gate (stage 2's router.max_gate); 1 = no cap
    clip_level: bool = False  # the learned router sees t = 1 at every step (gates constant over t)

    def to_json(self) -> dict[str, Any]:
        return {"alpha_base": self.alpha_base, "alpha_expert": self.alpha_expert, "band": self.band.to_json(),
                "top_k": self.top_k, "ema_beta": self.ema_beta, "temperature": self.temperature,
                "max_gate": self.max_gate, "clip_level": self.clip_level}


@dataclass
class LoraMoE:
    expert_names: list[str]
    sets: dict[str, AdapterSet]
    defaults: MoEDefaults = field(default_factory=MoEDefaults)
    expert_keywords: dict[str, list[str]] | None = None
    source: str = "<memory>"

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def target_modules(self, set_name: str) -> list[str]:
        """Modules where at least one expert acts (the base may cover more)."""
        return [m for m, p in self.sets[set_name].modules.items() if any(e is not None for e in p.experts)]


# --------------------------------------------------------------------------------------------- save

def _tensor_key(set_name: str, module: str, slot: str, part: str) -> str:
    return f"{set_name}.{module}.{slot}.{part}"


def to_state_dict(moe: LoraMoE, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a LoRA-MoE, as written to disk."""
    tensors: dict[str, torch.Tensor] = {}
    sets_meta: dict[str, Any] = {}

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu")
        tensors[key] = (t.to(dtype) if dtype is not None else t).contiguous()

    for sname, aset in moe.sets.items():
        mods: dict[str, Any] = {}
        for mname, proj in aset.modules.items():
            entry: dict[str, Any] = {"in": proj.in_features, "out": proj.out_features, "base": None,
                                     "experts": []}
            if proj.base is not None:
                put(_tensor_key(sname, mname, "base", "lora_down"), proj.base.down)
                put(_tensor_key(sname, mname, "base", "lora_up"), proj.base.up)
                entry["base"] = {"rank": proj.base.rank, "alpha": float(proj.base.alpha)}
            for e, ad in enumerate(proj.experts):
                if ad is None:
                    entry["experts"].append(None)
                    continue
                put(_tensor_key(sname, mname, f"expert{e}", "lora_down"), ad.down)
                put(_tensor_key(sname, mname, f"expert{e}", "lora_up"), ad.up)
                entry["experts"].append({"rank": ad.rank, "alpha": float(ad.alpha)})
            mods[mname] = entry
        if aset.router is not None:
            for k, v in aset.router.items():
                tensors[f"{sname}.router.{k}"] = v.detach().to("cpu", torch.float32).contiguous()
        sets_meta[sname] = {
            "modules": mods,
            "router_hidden": int(aset.router["fc1.weight"].shape[0]) if aset.router is not None else None,
            "sigma_range": list(aset.sigma_range) if aset.sigma_range else None,
            "fingerprint": aset.fingerprint,
            "model": aset.model,
        }
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "expert_names": list(moe.expert_names),
            "expert_keywords": moe.expert_keywords, "defaults": moe.defaults.to_json(), "sets": sets_meta}
    return tensors, {METADATA_KEY: json.dumps(meta, ensure_ascii=False), "format": "pt"}


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically and durably: readers never see half a file."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return Path(path)


def save_lora_moe(moe: LoraMoE, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    validate(moe)
    tensors, meta = to_state_dict(moe, dtype)
    return atomic_save_safetensors(tensors, path, meta)


# --------------------------------------------------------------------------------------------- load

def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a safetensors file, with errors that name the file. Never unpickles."""
    p = Path(path)
    if not p.exists():
        raise LoraMoEFormatError(f"{p}: file not found")
    if not p.is_file():
        raise LoraMoEFormatError(f"{p}: not a file")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraMoEFormatError(
            f"{p}: not a readable safetensors file (truncated, corrupt or another format): {e}") from e
    return tensors, meta


def load_lora_moe(path: str | os.PathLike) -> LoraMoE:
    """Read and fully validate a LoRA-MoE file."""
    tensors, header = read_safetensors(path)
    return from_state_dict(tensors, header, source=str(path))


def read_lora_moe_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `lora_moe` metadata of a file, from its header alone (no tensor is read): for listing files."""
    p = Path(path)
    if not p.is_file():
        raise LoraMoEFormatError(f"{p}: file not found")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraMoEFormatError(
            f"{p}: not a readable safetensors file (truncated, corrupt or another format): {e}") from e
    return _metadata(header, str(p))


def _metadata(header: dict[str, str], src: str) -> dict[str, Any]:
    if METADATA_KEY not in header:
        raise LoraMoEFormatError(
            f"{src}: no '{METADATA_KEY}' metadata, so this is not a LoRA-MoE file. A plain LoRA can be "
            "loaded with ComfyUI's LoraLoader, or turned into a LoRA-MoE with `python -m moe_core.assemble`.")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise LoraMoEFormatError(f"{src}: the '{METADATA_KEY}' metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise LoraMoEFormatError(f"{src}: metadata format is {found!r}, expected {FORMAT_NAME!r}")
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise LoraMoEFormatError(
            f"{src}: format version {version!r} is not supported (this pack reads version {FORMAT_VERSION}); "
            "update the pack or re-export the file")
    return meta


def from_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str = "<memory>") -> LoraMoE:
    src = source
    meta = _metadata(header, src)
    names = meta.get("expert_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise LoraMoEFormatError(f"{src}: 'expert_names' must be a non-empty list of names, got {names!r}")
    if len(set(names)) != len(names):
        raise LoraMoEFormatError(f"{src}: duplicate expert names {names}")
    try:
        d = meta.get("defaults") or {}
        defaults = MoEDefaults(
            alpha_base=float(d.get("alpha_base", 0.7)), alpha_expert=float(d.get("alpha_expert", 1.0)),
            band=TimestepBand.from_json(d["band"]) if "band" in d else DEFAULT_BAND,
            top_k=int(d.get("top_k", 2)), ema_beta=float(d.get("ema_beta", 0.9)),
            temperature=float(d.get("temperature", 1.0)), max_gate=float(d.get("max_gate", 1.0)),
            clip_level=bool(d.get("clip_level", False)))
        if not 0.0 < defaults.max_gate <= 1.0:
            raise ValueError(f"max_gate must be in (0, 1], got {defaults.max_gate}")
    except (BandError, TypeError, ValueError) as e:
        raise LoraMoEFormatError(f"{src}: invalid 'defaults' metadata: {e}") from e

    used: set[str] = set()

    def take(key: str, shape: tuple[int, int]) -> torch.Tensor:
        if key not in tensors:
            raise LoraMoEFormatError(f"{src}: missing tensor '{key}' declared by the metadata")
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise LoraMoEFormatError(f"{src}: tensor '{key}' has shape {tuple(t.shape)}, expected {shape}")
        used.add(key)
        return t

    sets: dict[str, AdapterSet] = {}
    sets_meta = meta.get("sets")
    if not isinstance(sets_meta, dict) or not sets_meta:
        raise LoraMoEFormatError(f"{src}: metadata declares no adapter sets")
    for sname, smeta in sets_meta.items():
        if sname not in SET_NAMES:
            raise LoraMoEFormatError(f"{src}: unknown adapter set {sname!r}; expected one of {SET_NAMES}")
        modules: dict[str, ProjectionAdapters] = {}
        for mname, m in (smeta.get("modules") or {}).items():
            where = f"{src}: set '{sname}', module '{mname}'"
            try:
                fin, fout = int(m["in"]), int(m["out"])
                slots = [("base", m.get("base"))] + [(f"expert{e}", x) for e, x in enumerate(m["experts"])]
            except (KeyError, TypeError, ValueError) as e:
                raise LoraMoEFormatError(f"{where}: malformed metadata entry {m!r}") from e
            if len(m["experts"]) != len(names):
                raise LoraMoEFormatError(f"{where}: {len(m['experts'])} expert slots but {len(names)} expert names")
            built: list[Adapter | None] = []
            for slot, info in slots:
                if info is None:
                    built.append(None)
                    continue
                rank, alpha = int(info["rank"]), float(info["alpha"])
                if rank <= 0 or not math.isfinite(alpha):
                    raise LoraMoEFormatError(f"{where}: {slot} has invalid rank {rank} or alpha {alpha}")
                down = take(_tensor_key(sname, mname, slot, "lora_down"), (rank, fin))
                up = take(_tensor_key(sname, mname, slot, "lora_up"), (fout, rank))
                built.append(Adapter(down, up, alpha))
            modules[mname] = ProjectionAdapters(fin, fout, built[0], built[1:])
        if not modules:
            raise LoraMoEFormatError(f"{src}: adapter set '{sname}' has no modules")
        router = None
        if smeta.get("router_hidden"):
            h, n = int(smeta["router_hidden"]), len(names)
            router = {
                "fc1.weight": take(f"{sname}.router.fc1.weight", (h, n + 1)),
                "fc2.weight": take(f"{sname}.router.fc2.weight", (n, h)),
            }
            for b, size in (("fc1.bias", h), ("fc2.bias", n)):
                key = f"{sname}.router.{b}"
                if key not in tensors or tuple(tensors[key].shape) != (size,):
                    raise LoraMoEFormatError(f"{src}: router tensor '{key}' missing or not of shape ({size},)")
                used.add(key)
                router[b] = tensors[key]
        sr = smeta.get("sigma_range")
        model = smeta.get("model") or {}
        problem = model_record_problem(model)
        if problem:
            raise LoraMoEFormatError(f"{src}: set '{sname}': the 'model' metadata {problem}")
        sets[sname] = AdapterSet(sname, modules, router, tuple(sr) if sr else None, smeta.get("fingerprint"),
                                 dict(model))
    extra = sorted(set(tensors) - used)
    if extra:
        raise LoraMoEFormatError(f"{src}: {len(extra)} tensors not declared by the metadata, e.g. {extra[:3]}")
    moe = LoraMoE(list(names), sets, defaults, meta.get("expert_keywords"), source=src)
    validate(moe)
    return moe


def validate(moe: LoraMoE) -> None:
    """Checks shared by load and save: rank consistency and finite weights."""
    src = moe.source
    for sname, aset in moe.sets.items():
        if "default" in moe.sets and len(moe.sets) > 1:
            raise LoraMoEFormatError(f"{src}: a file holds either one 'default' set or high/low-noise sets")
        for mname, proj in aset.modules.items():
            if len(proj.experts) != moe.num_experts:
                raise LoraMoEFormatError(f"{src}: set '{sname}', module '{mname}': {len(proj.experts)} expert "
                                         f"slots for {moe.num_experts} experts")
            for slot, ad in [("base", proj.base)] + [(f"expert{e}", a) for e, a in enumerate(proj.experts)]:
                if ad is None:
                    continue
                where = f"{src}: set '{sname}', module '{mname}', {slot}"
                if ad.down.ndim != 2 or ad.up.ndim != 2 or ad.up.shape[1] != ad.down.shape[0]:
                    raise LoraMoEFormatError(f"{where}: inconsistent ranks, down {tuple(ad.down.shape)} "
                                             f"vs up {tuple(ad.up.shape)}")
                if tuple(ad.down.shape[1:]) != (proj.in_features,) or ad.up.shape[0] != proj.out_features:
                    raise LoraMoEFormatError(f"{where}: shapes down {tuple(ad.down.shape)} / up "
                                             f"{tuple(ad.up.shape)} do not fit {proj.in_features}->"
                                             f"{proj.out_features}")
                for part, t in (("lora_down", ad.down), ("lora_up", ad.up)):
                    if not t.is_floating_point():
                        raise LoraMoEFormatError(f"{where}.{part}: dtype {t.dtype} is not floating point")
                    if not bool(torch.isfinite(t).all()):
                        raise LoraMoEFormatError(f"{where}.{part}: contains NaN or Inf values")
        problem = model_record_problem(aset.model)
        if problem:
            raise LoraMoEFormatError(f"{src}: set '{sname}': the 'model' record {problem}")
        if aset.router is not None:
            for k, t in aset.router.items():
                if not bool(torch.isfinite(t).all()):
                    raise LoraMoEFormatError(f"{src}: set '{sname}', router '{k}': contains NaN or Inf values")
