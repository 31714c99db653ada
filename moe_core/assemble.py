"""Build a LoRA-MoE file from ordinary LoRA files: a base LoRA and one LoRA per expert (per DiT for A14B).

    python -m moe_core.assemble --base base.safetensors \
        --expert Scissors=scissors.safetensors --expert Hook/Electrocautery=hook.safetensors \
        --expert Suction=suction.safetensors --expert Other=other.safetensors --out moe.safetensors

For the WAN 2.2 A14B pair, prefix a part with its DiT: `--base high_noise:base_high.safetensors`,
`--expert low_noise:Scissors=scissors_low.safetensors`. Any key format ComfyUI's LoRA loader reads for WAN
works (musubi/kohya, diffusers-style, ComfyUI trainer), with or without alpha.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .band import BandError, TimestepBand
from .checkpoint import (A14B_BOUNDARY, SET_NAMES, AdapterSet, LoraMoE, LoraMoEFormatError, MoEDefaults,
                         ProjectionAdapters, save_lora_moe)
from .lora_formats import load_lora
from .vocabulary import DEFAULT_EXPERT_NAMES

_SIGMA_RANGES = {"high_noise": (A14B_BOUNDARY, 1.0), "low_noise": (0.0, A14B_BOUNDARY)}


def _split_set(spec: str) -> tuple[str, str]:
    head, sep, rest = spec.partition(":")
    if sep and head in SET_NAMES:
        return head, rest
    return "default", spec


def assemble(base: dict[str, Path], experts: dict[str, dict[str, Path]], expert_names: Sequence[str],
             defaults: MoEDefaults | None = None) -> LoraMoE:
    """A LoraMoE from plain LoRA files: `base[set] = path`, `experts[set][name] = path`."""
    sets: dict[str, AdapterSet] = {}
    for set_name in sorted(set(base) | set(experts), key=SET_NAMES.index):
        base_ads = load_lora(base[set_name]) if set_name in base else {}
        expert_ads = {n: load_lora(p) for n, p in experts.get(set_name, {}).items()}
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
        sets[set_name] = AdapterSet(set_name, modules, sigma_range=_SIGMA_RANGES.get(set_name))
    if not sets:
        raise LoraMoEFormatError("nothing to assemble: give --base and/or --expert files")
    return LoraMoE(list(expert_names), sets, defaults or MoEDefaults())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_core.assemble", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", action="append", default=[], metavar="[SET:]PATH", help="the frozen base LoRA")
    ap.add_argument("--expert", action="append", default=[], metavar="[SET:]NAME=PATH", help="one expert LoRA")
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
        defaults = MoEDefaults(alpha_base=args.alpha_base, alpha_expert=args.alpha_expert)
        if args.band:
            import json
            defaults.band = TimestepBand.from_json(json.loads(args.band))
        moe = assemble(base, experts, names, defaults)
        out = save_lora_moe(moe, args.out)
    except (LoraMoEFormatError, BandError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(len(s.modules) for s in moe.sets.values())
    print(f"wrote {out}: sets {list(moe.sets)}, experts {moe.expert_names}, {total} adapted modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
