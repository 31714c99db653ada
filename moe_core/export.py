"""Bake fixed gates into a plain LoRA that ComfyUI's core LoraLoader loads.

    python -m moe_core.export moe.safetensors --gates Scissors=0.7,Other=0.3 --out scissors.safetensors

The result is exact, not an approximation: each module's adapters are concatenated (ranks add up) with
their gains folded into `lora_up`, so `W + ΔW_baked` equals the LoRA-MoE with those gates at band factor 1.
For an A14B file, one plain LoRA is written per adapter set (`<out>_high_noise.safetensors`, ...).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import Adapter, LoraMoE, LoraMoEFormatError, load_lora_moe
from .lora_formats import save_lora
from .routing import RoutingError


def bake(moe: LoraMoE, set_name: str, gates: dict[str, float], alpha_base: float,
         alpha_expert: float) -> dict[str, Adapter]:
    """One plain adapter per module equal to a_base·ΔW_base + Σ_e g_e·a_e·ΔW_e."""
    unknown = [g for g in gates if g not in moe.expert_names]
    if unknown:
        raise RoutingError(f"unknown experts {unknown}; this file has {moe.expert_names}")
    gains = [alpha_base] + [alpha_expert * float(gates.get(n, 0.0)) for n in moe.expert_names]
    out: dict[str, Adapter] = {}
    for module, proj in moe.sets[set_name].modules.items():
        slots = [(g, a) for g, a in zip(gains, [proj.base, *proj.experts]) if a is not None and g != 0.0]
        if not slots:
            continue
        down = torch.cat([a.down.float() for _, a in slots], dim=0)
        up = torch.cat([a.up.float() * (g * a.scale) for g, a in slots], dim=1)
        out[module] = Adapter(down, up, float(down.shape[0]))  # alpha = rank: scale 1
    return out


def parse_gates(spec: str) -> dict[str, float]:
    gates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.rpartition("=")
        if not sep:
            raise RoutingError(f"--gates entry {part!r}: expected NAME=WEIGHT")
        gates[name] = float(value)
    return gates


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_core.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--gates", default="", help="NAME=WEIGHT,... (empty: experts off, base only)")
    ap.add_argument("--alpha-base", type=float, default=None, help="default: the file's")
    ap.add_argument("--alpha-expert", type=float, default=None, help="default: the file's")
    ap.add_argument("--set", dest="set_name", default=None, help="only this adapter set")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        moe = load_lora_moe(args.file)
        gates = parse_gates(args.gates)
        a_base = moe.defaults.alpha_base if args.alpha_base is None else args.alpha_base
        a_exp = moe.defaults.alpha_expert if args.alpha_expert is None else args.alpha_expert
        names = [args.set_name] if args.set_name else list(moe.sets)
        for n in names:
            if n not in moe.sets:
                raise LoraMoEFormatError(f"{args.file}: no adapter set {n!r}; it holds {list(moe.sets)}")
        out = Path(args.out)
        for n in names:
            path = out if len(names) == 1 else out.with_name(f"{out.stem}_{n}{out.suffix}")
            save_lora(bake(moe, n, gates, a_base, a_exp), path, getattr(torch, args.dtype),
                      metadata={"lora_moe_export": f"{Path(args.file).name} set={n} gates={gates} "
                                                   f"alpha_base={a_base} alpha_expert={a_exp}"})
            print(f"wrote {path}")
    except (LoraMoEFormatError, RoutingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
