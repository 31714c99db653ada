"""The ablation runner behind ``python -m training.ablate --config ablate.toml`` (see docs/ablation.md).

One config renders the same prompts and seeds through the bundled A14B workflow in a headless ComfyUI for
every arm (base LoRA only, the experts with the learned router, teacher-only routing, top-1, always-on band,
each expert forced, cycling experts per step, other LoRA-MoE files), evaluates them all with
``training.evaluation.evaluate`` and writes one report. Modules by responsibility:

- ``config``: the TOML sections, file and checksum checks, the arms a config asks for;
- ``arms``: what each arm changes in the workflow's API graph, and the routing it runs with;
- ``render``: the renders, resumable (a manifest of finished clips, written atomically after each);
- ``gates``: the gates each arm used (schedule pictures, expert usage) and the router-vs-instrument confusion;
- ``pictures``: contact sheets with fixed seeds across arms and x-t slices;
- ``report``: report.json / report.html / report.md.
"""
from __future__ import annotations
