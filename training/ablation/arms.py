"""The arms of an ablation: what each changes in the bundled workflow's API graph, and the routing it runs.

Every arm renders the same graph (``training.generate.substitute``: models, prompt, seed, steps, size) and then
changes only what it is about:

============================  =====================================================================
arm                           change
============================  =====================================================================
``base_only``                 Load LoRA-MoE's routing disconnected: the base LoRA alone
``experts``                   the Router on ``learned-from-file`` (``rule-based`` if the file has no router)
``teacher_only``              the Router on ``rule-based``: the keyword teacher, no learned router
``top1``                      ``experts`` with the Router's top_k 1 (the workflow's is 2)
``always_on``                 ``experts`` with both Timestep Band presets on ``always on``
``forced_<expert>``           a Gate Override (that expert at gate 1) between Router and Load LoRA-MoE
``cycle``                     a Gate Override on ``cycle per step``: expert k mod N at step k (LoRA Switch)
``n_experts_<N>``             ``experts`` with a LoRA-MoE file of N experts (``models.expert_count_files``)
``roi_weighted``/``_uniform`` ``experts`` with the ROI-weighted / uniform-loss files
============================  =====================================================================

Groups: ``forced`` (every forced arm), ``n_experts``, ``roi``.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from moe_core.checkpoint import LoraMoE
from moe_core.routing import Routing, cycle_route, manual_route, rule_route
from moe_core.vocabulary import DEFAULT_EXPERT_NAMES

from ..config import ConfigError
from .config import AblationConfig
from .files import A14B_SETS, ModelPaths

#: The Gate Override node's option that cycles the experts (nodes/gate_override.py CYCLE; the tests check both).
CYCLE = "cycle per step"
#: Gate Override's weight widgets, in expert order (nodes/gate_override.py WEIGHT_INPUTS).
OVERRIDE_WEIGHTS = ("scissors", "hook_electrocautery", "suction", "other")
LEARNED, RULE = "learned-from-file", "rule-based"
MAIN = "models.lora_moe"


@dataclass(frozen=True)
class Arm:
    """One variant of the graph. ``file_key``: the config key of its LoRA-MoE file."""

    name: str
    what: str
    file_key: str = MAIN
    experts: bool = True  # False: routing disconnected, the base LoRA only
    router_mode: str = LEARNED  # the Router node's mode
    top_k: int | None = None  # None: the workflow's
    band_preset: str | None = None  # None: the workflow's Timestep Band
    override: str | None = None  # Gate Override instrument: an expert name, or CYCLE

    def to_json(self) -> dict:
        return asdict(self)


def slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "_" for c in name).strip("_") or "expert"


def _has_routers(moe: LoraMoE) -> bool:
    return all(moe.sets[s].router is not None for s in A14B_SETS)


def available_arms(files: ModelPaths) -> dict[str, Arm]:
    """Every arm these files allow, in report order."""
    main = files.moes[MAIN]
    mode = LEARNED if _has_routers(main) else RULE
    routed = "learned router" if mode == LEARNED else "rule-based router (the file has no learned router)"
    arms = [Arm("base_only", "base LoRA only (experts off: routing disconnected)", experts=False),
            Arm("experts", f"base + experts, {routed}, the workflow's top-k and band", router_mode=mode),
            Arm("teacher_only", "base + experts, rule-based router only (the keyword teacher, no learned router)",
                router_mode=RULE),
            Arm("top1", "as experts, top-1 gate (Router top_k 1)", router_mode=mode, top_k=1),
            Arm("always_on", "as experts, band always on (Timestep Band preset 'always on')", router_mode=mode,
                band_preset="always on")]
    if list(main.expert_names) == list(DEFAULT_EXPERT_NAMES):  # Gate Override knows the default experts only
        arms += [Arm(f"forced_{slug(e)}", f"{e} forced (Gate Override: gate 1)", router_mode=mode, override=e)
                 for e in main.expert_names]
    arms.append(Arm("cycle", "cycling experts per sampler step, expert k mod N at step k (LoRA Switch; "
                             "training-free)", router_mode=RULE, override=CYCLE))
    for key, moe in files.moes.items():
        if key.startswith("models.expert_count_files"):
            m = LEARNED if _has_routers(moe) else RULE
            arms.append(Arm(f"n_experts_{moe.num_experts}", f"as experts, a file of {moe.num_experts} experts "
                                                            f"({files.paths[key].name})", file_key=key, router_mode=m))
    for key, label in (("models.roi_weighted", "ROI-weighted"), ("models.roi_uniform", "uniform")):
        if key in files.moes:
            moe = files.moes[key]
            arms.append(Arm(key.split(".")[1], f"as experts, the file trained with the {label} loss "
                                               f"({files.paths[key].name})", file_key=key,
                            router_mode=LEARNED if _has_routers(moe) else RULE))
    out: dict[str, Arm] = {}
    for arm in arms:
        if arm.name in out:
            raise ConfigError(f"models.expert_count_files: two files make the arm {arm.name!r} (same number of "
                              "experts); keep one")
        out[arm.name] = arm
    return out


GROUPS = {"forced": "forced_", "n_experts": "n_experts_", "roi": "roi_"}
NEEDS = {"forced_": "the main file's experts to be the four default instruments (Gate Override forces those)",
         "n_experts_": "models.expert_count_files", "roi_": "models.roi_weighted and models.roi_uniform"}


def select_arms(cfg: AblationConfig, available: dict[str, Arm]) -> list[Arm]:
    """The arms ``ablation.arms`` names (all available ones if empty), in report order; unknown names fail."""
    wanted = list(cfg.ablation.arms) or list(available)
    chosen: list[str] = []
    for i, name in enumerate(wanted):
        key = f"ablation.arms[{i}]"
        if name in GROUPS:
            members = [a for a in available if a.startswith(GROUPS[name])]
            if not members:
                raise ConfigError(f"{cfg.source}: {key}: the group {name!r} has no arm: it needs "
                                  f"{NEEDS[GROUPS[name]]}")
            chosen += members
        elif name in available:
            chosen.append(name)
        else:
            prefix = next((p for p in NEEDS if name.startswith(p)), None)
            if prefix is not None:
                raise ConfigError(f"{cfg.source}: {key}: arm {name!r} is not available with these files: "
                                  f"{prefix}* arms need {NEEDS[prefix]}; available: {', '.join(available)}")
            close = difflib.get_close_matches(name, list(available) + list(GROUPS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{cfg.source}: {key}: unknown arm {name!r}{hint}; arms: {', '.join(available)}; "
                              f"groups: {', '.join(GROUPS)}")
    order = [a for a in available if a in chosen]
    if cfg.ablation.reference not in order:
        raise ConfigError(f"{cfg.source}: ablation.reference: {cfg.ablation.reference!r} is not one of the arms "
                          f"rendered ({', '.join(order)})")
    return [available[a] for a in order]


# ------------------------------------------------------------------------------------------ graph edits

def _nodes(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def graph_edit(arm: Arm) -> Callable[[dict], list[str]] | None:
    """The edit of the substituted API graph for this arm (None: no edit beyond the substitutions)."""
    if not arm.experts or (arm.top_k is None and arm.band_preset is None and arm.override is None):
        return None

    def edit(prompt: dict) -> list[str]:
        changes = []
        router = _nodes(prompt, "WanLoRAMoE_PromptRouter")
        if arm.top_k is not None:
            for nid in router:
                changes.append(f"Router.top_k: {prompt[nid]['inputs'].get('top_k')} -> {arm.top_k}")
                prompt[nid]["inputs"]["top_k"] = arm.top_k
        if arm.band_preset is not None:
            for nid in _nodes(prompt, "WanLoRAMoE_TimestepBand"):
                node = prompt[nid]
                title = node.get("_meta", {}).get("title", "Timestep Band")
                changes.append(f"{title}.preset: {node['inputs'].get('preset')!r} -> {arm.band_preset!r}")
                node["inputs"]["preset"] = arm.band_preset
        if arm.override is not None:
            new = str(max(int(k) for k in prompt if k.isdigit()) + 1 if any(k.isdigit() for k in prompt)
                      else len(prompt) + 1)
            inputs = {"instrument": arm.override, **{w: 1.0 for w in OVERRIDE_WEIGHTS}}
            if router:
                inputs["routing"] = [router[0], 0]
            prompt[new] = {"class_type": "WanLoRAMoE_GateOverride", "inputs": inputs,
                           "_meta": {"title": "Gate Override (ablation)"}}
            for nid in _nodes(prompt, "WanLoRAMoE_LoadLoRAMoE"):
                prompt[nid]["inputs"]["routing"] = [new, 0]
            changes.append(f"Gate Override (instrument {arm.override!r}) inserted between the Router and both "
                           "Load LoRA-MoE nodes")
        return changes

    return edit


# --------------------------------------------------------------------------------------------- routing

def arm_routing(arm: Arm, prompt: str, moe: LoraMoE, router_ui: dict | None) -> Routing | None:
    """The routing Load LoRA-MoE resolved for this arm and prompt (what the sampler's gates start from).

    ``router_ui``: the Router node's output for the clip (mode, top_k, temperature, as it ran); for the
    override arms the Gate Override's routing replaces it, as in the node.
    """
    if not arm.experts:
        return None
    if arm.override == CYCLE:
        return cycle_route()
    if arm.override is not None:
        return manual_route({arm.override: 1.0})
    ui = router_ui or {}
    names = list(moe.expert_names)
    return rule_route(prompt, names, keywords=moe.expert_keywords,
                      fallback="Other" if "Other" in names else "off",
                      top_k=min(int(ui.get("top_k", arm.top_k or 2)), len(names)),
                      temperature=float(ui.get("temperature", 1.0)),
                      mode=ui.get("mode", "learned" if arm.router_mode == LEARNED else "rule"))


def prompt_instruments(cfg: AblationConfig, expert_names: Sequence[str], keywords: dict | None) -> list[str | None]:
    """Each prompt's instrument: ``render.instruments``, else the one its keywords name (None if not one)."""
    from moe_core.vocabulary import detect_instruments, keywords_for

    if cfg.render.instruments:
        bad = [(i, n) for i, n in enumerate(cfg.render.instruments) if n not in expert_names]
        if bad:
            i, n = bad[0]
            raise ConfigError(f"{cfg.source}: render.instruments[{i}]: {n!r} is not an expert of {MAIN} "
                              f"({', '.join(expert_names)})")
        return list(cfg.render.instruments)
    kw = keywords_for(list(expert_names), keywords)
    out = []
    for p in cfg.render.prompts:
        found = detect_instruments(p, kw)
        out.append(found[0] if len(found) == 1 else None)
    return out


__all__ = ["Arm", "CYCLE", "LEARNED", "MAIN", "RULE", "arm_routing", "available_arms", "graph_edit",
           "prompt_instruments", "select_arms", "slug"]
