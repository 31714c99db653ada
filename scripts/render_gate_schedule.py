#!/usr/bin/env python
"""Render the README's gate schedule picture (docs/images/gate_schedule.png) with moe_core.schedule: the seeds'
default band, the prompt of the bundled workflows routed by the rule router, 20 steps at shift 8 (the
bundled A14B workflow's sampling), experts' EMA beta 0.9. The Timestep Band node draws the same picture.

    python scripts/render_gate_schedule.py [--out docs/images/gate_schedule.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moe_core.band import DEFAULT_BAND  # noqa: E402
from moe_core.routing import rule_route  # noqa: E402
from moe_core.schedule import render_schedule  # noqa: E402
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES  # noqa: E402

PROMPT = "腹腔镜手术视野，电凝钩沿胆囊三角切割组织，吸引器吸除渗血。"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "docs" / "images" / "gate_schedule.png"))
    args = ap.parse_args()
    routing = rule_route(PROMPT, DEFAULT_EXPERT_NAMES, top_k=2)
    title = "Prompt: electrocautery hook + suction -> " + ", ".join(
        f"{k} {v:.2f}" for k, v in routing.weights.items() if v > 0) + "  (seeds' default band)"
    img = render_schedule(routing, DEFAULT_EXPERT_NAMES, DEFAULT_BAND, steps=20, shift=8.0, ema_beta=0.9,
                          title=title)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
