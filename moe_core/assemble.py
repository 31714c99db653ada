"""Build a LoRA-MoE file from ordinary LoRA files: a base LoRA and one LoRA per expert (per DiT for A14B).

    python -m moe_core.assemble --base base.safetensors \
        --expert Scissors=scissors.safetensors --expert Hook/Electrocautery=hook.safetensors \
        --expert Suction=suction.safetensors --expert Other=other.safetensors --out moe.safetensors

For the WAN 2.2 A14B pair, prefix a part with its DiT: `--base high_noise:base_high.safetensors`,
`--expert low_noise:Scissors=scissors_low.safetensors`. Any key format ComfyUI's LoRA loader reads for WAN
works (musubi/kohya, diffusers-style, ComfyUI trainer), with or without alpha.

Each set records the DiT it belongs to, so that Load LoRA-MoE refuses the file on a DiT of another depth,
width or model family (T2V, I2V A14B, TI2V 5B: `moe_core.families`; an I2V pair's sets switch at t = 0.9, not
T2V's 0.875) and `adapter_set = auto` finds each A14B DiT's set: from `--dit [SET:]PATH` (the DiT file the LoRAs
were trained on; only its header and `head.modulation` are read), else from what this pack's stage-1
trainer writes into its LoRAs (`wan_lora_moe_fingerprint`, `wan_lora_moe_set`, optionally
`wan_lora_moe_model`). Without either, only the width (from the LoRA shapes) is recorded, and a note says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .band import BandError, TimestepBand
from .checkpoint import (SET_NAMES, Adapter, AdapterSet, LoraMoE, LoraMoEFormatError, MoEDefaults,
                         ProjectionAdapters, read_safetensors, save_lora_moe)
from .dit_info import (DitFileError, DitFileInfo, block_indices, closest_fingerprint, read_dit_file,
                       width_from_modules)
from .families import ModelFamilyError, family_of_record, model_record_problem, pair_boundary
from .lora_formats import parse_lora
from .vocabulary import DEFAULT_EXPERT_NAMES



def sigma_range(set_name: str, model: dict[str, Any] | None) -> tuple[float, float] | None:
    """Where on the noise scale an A14B set's DiT works: above or below its family's boundary (T2V 0.875,
    I2V 0.9; a set recording no family is T2V); None for a single DiT."""
    boundary = pair_boundary(model)
    return {"high_noise": (boundary, 1.0), "low_noise": (0.0, boundary)}.get(set_name)


def _split_set(spec: str) -> tuple[str, str]:
    head, sep, rest = spec.partition(":")
    if sep and head in SET_NAMES:
        return head, rest
    return "default", spec


@dataclass
class _Part:
    """One LoRA file: its adapters and what this pack's trainer recorded about its DiT (if anything)."""

    path: Path
    adapters: dict[str, Adapter]
    set_name: str | None
    fingerprint: list[float] | None
    model: dict[str, Any] | None


def _read_part(path: Path) -> _Part:
    tensors, header = read_safetensors(path)

    def meta(key: str) -> Any:
        if key not in header:
            return None
        try:
            return json.loads(header[key])
        except json.JSONDecodeError as e:
            raise LoraMoEFormatError(f"{path}: metadata '{key}' is not valid JSON: {e}") from None

    fingerprint, model = meta("wan_lora_moe_fingerprint"), meta("wan_lora_moe_model")
    if fingerprint is not None and not (isinstance(fingerprint, list)
                                        and all(isinstance(v, (int, float)) for v in fingerprint)):
        raise LoraMoEFormatError(f"{path}: metadata 'wan_lora_moe_fingerprint' is not a list of numbers")
    problem = None if model is None else model_record_problem(model)
    if problem:
        raise LoraMoEFormatError(f"{path}: metadata 'wan_lora_moe_model' {problem}")
    return _Part(path, parse_lora(tensors, source=str(path)), header.get("wan_lora_moe_set"), fingerprint, model)


def _set_model(set_name: str, parts: list[_Part], dit: DitFileInfo | None, dit_path: Path | None,
               shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, Any], list[float] | None]:
    """The `model` metadata and fingerprint of one set, from --dit and the parts' metadata, cross-checked."""
    for p in parts:
        if p.set_name in ("high_noise", "low_noise") and set_name in ("high_noise", "low_noise") \
                and p.set_name != set_name:
            raise LoraMoEFormatError(f"{p.path} was trained on the {p.set_name} DiT (its metadata says so) but is "
                                     f"given for the {set_name} set")
    fingerprint, source = (dit.fingerprint, f"--dit {dit_path}") if dit is not None else (None, "")
    for p in parts:
        if not p.fingerprint:
            continue
        if fingerprint is None:
            fingerprint, source = p.fingerprint, str(p.path)
        elif closest_fingerprint(p.fingerprint, {"x": fingerprint}) is None:
            raise LoraMoEFormatError(f"{p.path} was trained on another DiT than {source} (their DiT fingerprints "
                                     f"differ): set '{set_name}' mixes LoRAs of different models")
    model = dict(dit.model) if dit is not None else next((dict(p.model) for p in parts if p.model), {})
    try:  # every part that records a model family must agree with --dit (or the first part that records one)
        family = family_of_record(model)
        family_source = f"--dit {dit_path}" if dit is not None else next((str(p.path) for p in parts if p.model), None)
        for p in parts:
            theirs = family_of_record(p.model)
            if theirs is None:
                continue
            if family is None:
                family, family_source = theirs, str(p.path)
            elif theirs.name != family.name:
                raise LoraMoEFormatError(
                    f"{p.path} was trained on {theirs.title}, but {family_source or 'another part'} is "
                    f"{family.title}: set '{set_name}' mixes LoRAs of different model families")
    except ModelFamilyError as e:
        raise LoraMoEFormatError(f"set '{set_name}': {e}") from None
    if family is not None:
        model["family"] = family.name
    width = width_from_modules(shapes)
    if width is not None:
        if model.get("dim") not in (None, width):
            raise LoraMoEFormatError(f"set '{set_name}': the LoRAs adapt a DiT of width {width}, but "
                                     f"{dit_path or 'their metadata'} says width {model['dim']}")
        model.setdefault("dim", width)
    blocks = block_indices(shapes)
    if blocks and model.get("num_layers") is not None and blocks[-1] >= model["num_layers"]:
        raise LoraMoEFormatError(f"set '{set_name}': the LoRAs adapt block {blocks[-1]}, but "
                                 f"{dit_path or 'their metadata'} says the DiT has {model['num_layers']} blocks")
    return model, fingerprint


def assemble(base: dict[str, Path], experts: dict[str, dict[str, Path]], expert_names: Sequence[str],
             defaults: MoEDefaults | None = None, dits: dict[str, Path] | None = None) -> LoraMoE:
    """A LoraMoE from plain LoRA files: `base[set] = path`, `experts[set][name] = path`, and optionally
    the DiT file of each set, `dits[set] = path` (recorded: depth, width and fingerprint)."""
    dits = dits or {}
    unknown_dits = sorted(set(dits) - set(base) - set(experts))
    if unknown_dits:
        raise LoraMoEFormatError(f"--dit for set(s) {unknown_dits}, which no --base or --expert file has")
    sets: dict[str, AdapterSet] = {}
    for set_name in sorted(set(base) | set(experts), key=SET_NAMES.index):
        base_part = _read_part(base[set_name]) if set_name in base else None
        expert_parts = {n: _read_part(p) for n, p in experts.get(set_name, {}).items()}
        base_ads = base_part.adapters if base_part is not None else {}
        expert_ads = {n: p.adapters for n, p in expert_parts.items()}
        unknown = [n for n in expert_ads if n not in expert_names]
        if unknown:
            raise LoraMoEFormatError(f"experts {unknown} are not among the expert names {list(expert_names)}")
        modules: dict[str, ProjectionAdapters] = {}
        for module in sorted(set(base_ads).union(*[set(a) for a in expert_ads.values()])):
            parts = [base_ads.get(module)] + [expert_ads.get(n, {}).get(module) for n in expert_names]
            first = next(p for p in parts if p is not None)
            fin, fout = first.down.shape[1], first.up.shape[0]
            for label, p in zip(["base", *expert_names], parts):
                if p is not None and (p.down.shape[1], p.up.shape[0]) != (fin, fout):
                    raise LoraMoEFormatError(
                        f"module '{module}': {label} LoRA is {p.down.shape[1]}->{p.up.shape[0]} but another part "
                        f"is {fin}->{fout}: the LoRAs were trained for different models")
            modules[module] = ProjectionAdapters(fin, fout, parts[0], parts[1:])
        try:
            dit = read_dit_file(dits[set_name]) if set_name in dits else None
        except DitFileError as e:
            raise LoraMoEFormatError(str(e)) from None
        model, fingerprint = _set_model(set_name, [p for p in [base_part, *expert_parts.values()] if p], dit,
                                        dits.get(set_name),
                                        {m: (p.in_features, p.out_features) for m, p in modules.items()})
        sets[set_name] = AdapterSet(set_name, modules, sigma_range=sigma_range(set_name, model),
                                    fingerprint=fingerprint, model=model)
    if not sets:
        raise LoraMoEFormatError("nothing to assemble: give --base and/or --expert files")
    return LoraMoE(list(expert_names), sets, defaults or MoEDefaults())


def notes(moe: LoraMoE) -> list[str]:
    """What the file will not be able to check, and how to fix that."""
    out = []
    for name, aset in moe.sets.items():
        dit = "--dit " if name == "default" else f"--dit {name}:"
        if aset.model.get("num_layers") is None:
            out.append(f"set '{name}' records no DiT depth ({dit}<DiT file> records it): Load LoRA-MoE cannot refuse "
                       "this file on a DiT with another number of blocks")
        if aset.model.get("family") is None and aset.model.get("in_dim") is None:
            out.append(f"set '{name}' records no model family ({dit}<DiT file> records it): Load LoRA-MoE cannot "
                       "refuse this file on a DiT of another family (text-, image- or text/image-to-video)")
        if len(moe.sets) > 1 and not aset.fingerprint:
            out.append(f"set '{name}' records no DiT fingerprint ({dit}<DiT file> records it): adapter_set 'auto' "
                       "cannot pick it; choose high-noise / low-noise on each Load LoRA-MoE node")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_core.assemble", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", action="append", default=[], metavar="[SET:]PATH", help="the frozen base LoRA")
    ap.add_argument("--expert", action="append", default=[], metavar="[SET:]NAME=PATH", help="one expert LoRA")
    ap.add_argument("--dit", action="append", default=[], metavar="[SET:]PATH",
                    help="the DiT file the LoRAs were trained on: records its depth, width and fingerprint")
    ap.add_argument("--expert-names", default=",".join(DEFAULT_EXPERT_NAMES),
                    help="comma-separated expert order (default: %(default)s)")
    ap.add_argument("--out", required=True, help="the LoRA-MoE .safetensors to write")
    ap.add_argument("--alpha-base", type=float, default=0.7)
    ap.add_argument("--alpha-expert", type=float, default=1.0)
    ap.add_argument("--band", default=None, help='default band as JSON, e.g. "[[0.2,0.5],[0.6,1.0]]"')
    args = ap.parse_args(argv)
    try:
        names = [n.strip() for n in args.expert_names.split(",") if n.strip()]
        base: dict[str, Path] = {}
        for spec in args.base:
            set_name, path = _split_set(spec)
            if set_name in base:
                raise LoraMoEFormatError(f"two --base files for set '{set_name}'")
            base[set_name] = Path(path)
        experts: dict[str, dict[str, Path]] = {}
        for spec in args.expert:
            set_name, rest = _split_set(spec)
            name, sep, path = rest.rpartition("=")
            if not sep or not name:
                raise LoraMoEFormatError(f"--expert {spec!r}: expected NAME=PATH (optionally SET:NAME=PATH)")
            experts.setdefault(set_name, {})[name] = Path(path)
        dits: dict[str, Path] = {}
        for spec in args.dit:
            set_name, path = _split_set(spec)
            if set_name in dits:
                raise LoraMoEFormatError(f"two --dit files for set '{set_name}'")
            dits[set_name] = Path(path)
        defaults = MoEDefaults(alpha_base=args.alpha_base, alpha_expert=args.alpha_expert)
        if args.band:
            defaults.band = TimestepBand.from_json(json.loads(args.band))
        moe = assemble(base, experts, names, defaults, dits)
        out = save_lora_moe(moe, args.out)
    except (LoraMoEFormatError, BandError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes(moe):
        print(f"note: {note}", file=sys.stderr)
    total = sum(len(s.modules) for s in moe.sets.values())
    print(f"wrote {out}: sets {list(moe.sets)}, experts {moe.expert_names}, {total} adapted modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
