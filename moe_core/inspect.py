"""Print what a LoRA-MoE file holds: `python -m moe_core.inspect FILE [--json]`."""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from typing import Any, Sequence

from .checkpoint import LoraMoE, LoraMoEFormatError, load_lora_moe
from .families import ModelFamilyError, family_of_record


def describe_model(model: dict[str, Any]) -> str:
    """The recorded DiT in words: family and shape, or what is not recorded (so what cannot be checked)."""
    try:
        fam = family_of_record(model)
    except ModelFamilyError as e:
        return f"unknown model family ({e})"
    shape = ", ".join(f"{k} {model[k]}" for k in ("num_layers", "dim", "ffn_dim", "in_dim", "out_dim")
                      if model.get(k) is not None)
    family = fam.title if fam is not None else "family not recorded (taken as text-to-video)"
    return f"{family}" + (f"; {shape}" if shape else "")


def summarize(moe: LoraMoE) -> dict[str, Any]:
    """A JSON-able summary: experts, defaults, and per set the blocks, projections, ranks and alphas."""
    out: dict[str, Any] = {"file": moe.source, "experts": moe.expert_names, "defaults": moe.defaults.to_json(),
                           "sets": {}}
    for name, aset in moe.sets.items():
        blocks = sorted({int(m.group(1)) for k in aset.modules if (m := re.match(r"blocks\.(\d+)\.", k))})
        ranks: Counter = Counter()
        params = 0
        for module, proj in aset.modules.items():
            kind = re.sub(r"^blocks\.\d+\.", "", module)
            for slot, ad in [("base", proj.base)] + list(zip(moe.expert_names, proj.experts)):
                if ad is not None:
                    ranks[(kind, slot if slot == "base" else "expert", ad.rank, ad.alpha)] += 1
                    params += ad.down.numel() + ad.up.numel()
        out["sets"][name] = {
            "modules": len(aset.modules), "blocks": blocks, "expert_modules": len(moe.target_modules(name)),
            "ranks": [{"projection": k, "slot": s, "rank": r, "alpha": a, "count": c}
                      for (k, s, r, a), c in sorted(ranks.items())],
            "parameters": params, "router_hidden": None if aset.router is None else int(aset.router["fc1.weight"].shape[0]),
            "sigma_range": aset.sigma_range, "fingerprint": bool(aset.fingerprint), "model": aset.model,
        }
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"LoRA-MoE {s['file']}", f"  experts: {', '.join(s['experts'])}",
             f"  defaults: alpha_base {s['defaults']['alpha_base']}, alpha_expert {s['defaults']['alpha_expert']}, "
             f"top-k {s['defaults']['top_k']}, EMA beta {s['defaults']['ema_beta']}, band {s['defaults']['band']}"]
    for name, st in s["sets"].items():
        b = st["blocks"]
        lines.append(f"  set {name}: {st['modules']} modules in blocks {b[0]}-{b[-1] if b else ''} "
                     f"({st['expert_modules']} with experts), {st['parameters']:,} parameters, "
                     f"router: {'MLP ' + str(st['router_hidden']) + ' hidden' if st['router_hidden'] else 'none'}"
                     + (f", noise range {st['sigma_range']}" if st["sigma_range"] else ""))
        lines.append(f"    model: {describe_model(st['model'])}")
        for r in st["ranks"]:
            lines.append(f"    {r['projection']:<18} {r['slot']:<6} rank {r['rank']:<3} alpha {r['alpha']:<6g} x{r['count']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_core.inspect", description=__doc__)
    ap.add_argument("file")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    try:
        s = summarize(load_lora_moe(args.file))
    except LoraMoEFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2, ensure_ascii=False) if args.json else format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
