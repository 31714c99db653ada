"""Clips from a trained LoRA-MoE by running a bundled workflow in a headless ComfyUI (the demo's step 4).

The workflow a user loads (``workflows/wan22_a14b_t2v_lora_moe.json``) is converted to ComfyUI's API format
(``moe_core.workflow_api``) and only its values are substituted: model and LoRA-MoE file names, prompt, router
mode, steps (the high/low-noise split moved to the step where t falls below the A14B boundary), shift, seed,
size and frame count, output name. Every substitution is recorded (:attr:`GeneratedClip.changes`). Two graph
edits exist, both recorded too: "experts off" disconnects the routing input of both Load LoRA-MoE nodes (what a
user does to compare with the base LoRA alone), and the demo's text encoder replaces CLIPLoader +
CLIPTextEncode (below).

The graph runs on a ComfyUI server of its own (:class:`training.comfy_server.ComfyServer`) whose base
directory holds this pack (a symlink in ``custom_nodes/``) and symlinks to the model files in ``models/``.

Demo text encoder: the demo trains on ``HashTextEncoder`` embeddings (UMT5-XXL cannot be made small), so the
graph must condition on the same stand-in: a small node written into the server's ``custom_nodes/`` (never into
the pack) wraps that encoder; it is used only when the text encoder is ``demo:hash``.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from moe_core.schedule import A14B_T2V_BOUNDARY, flow_sigmas

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_LINK = "ComfyUI-WanLoRAMoE"
DEMO_ENCODER_NODE = "WanLoRAMoEDemoHashTextEncode"

DEMO_NODE_SOURCE = '''"""Written by the WAN LoRA-MoE demo (training/generate.py); not part of the pack.

The hashing stand-in for UMT5-XXL that the demo trained with (training.data.synthetic.HashTextEncoder):
CONDITIONING for a text, equal to the cached training embedding of the same caption.
"""
import sys

REPO = {repo!r}
if REPO not in sys.path:
    sys.path.append(REPO)  # appended: ComfyUI's own top-level modules keep priority

from training.data.synthetic import HashTextEncoder  # noqa: E402

_ENCODER = HashTextEncoder()


class {node}:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"text": ("STRING", {{"multiline": True}})}}}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "WAN LoRA-MoE/demo"

    def encode(self, text):
        return ([[_ENCODER(text)[None], {{}}]],)


NODE_CLASS_MAPPINGS = {{"{node}": {node}}}
'''


class GenerationError(RuntimeError):
    """A clip could not be generated (the message names the clip and the failing node)."""


@dataclass(frozen=True)
class ModelFiles:
    """The files the workflow loads (paths on disk; linked into the server's models/ folders)."""

    dit_high: Path
    dit_low: Path
    vae: Path
    lora_moe: Path
    text_encoder: Path | None  # None: the demo's hashing stand-in


@dataclass(frozen=True)
class ClipSpec:
    """One render: its name, prompt, router mode (or experts off), and what it is meant to show."""

    name: str
    prompt: str
    router_mode: str = "rule-based"  # the Router's mode; ignored when experts_off
    experts_off: bool = False
    purpose: str = ""
    keep_schedules: bool = False  # copy the Timestep Band nodes' pictures into the output folder
    # a further graph edit after the substitutions (the ablation runner's arms): changes the API prompt in place
    # and returns what it changed, in the words of ``changes``
    edit: Callable[[dict], list[str]] | None = None


@dataclass(frozen=True)
class RenderSettings:
    steps: int
    shift: float
    cfg: float | None  # None: the workflow's
    seed: int | None  # None: the workflow's
    width: int
    height: int
    frames: int
    boundary: float = A14B_T2V_BOUNDARY


@dataclass
class GeneratedClip:
    spec: ClipSpec
    video: Path
    seconds: float
    changes: list[str]
    prompt_json: Path
    router: dict | None = None  # the Router node's UI output (detected, gates)
    lora_text: dict[str, str] = field(default_factory=dict)  # Load LoRA-MoE title -> its UI line
    schedules: dict[str, Path] = field(default_factory=dict)  # adapter set -> Timestep Band picture
    schedule_data: dict[str, dict] = field(default_factory=dict)  # adapter set -> the band node's wlm_schedule


def boundary_step(steps: int, shift: float, boundary: float = A14B_T2V_BOUNDARY) -> int:
    """The first step whose t is below ``boundary``: where the low-noise KSamplerAdvanced starts."""
    sigmas = flow_sigmas(steps, shift)[:-1]
    return next((i for i, s in enumerate(sigmas) if s < boundary), steps)


# ------------------------------------------------------------------------------------ server folder

def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(Path(src).resolve())


def prepare_custom_nodes(base: Path, demo_encoder: bool) -> None:
    """The server's ``custom_nodes/``: this pack (a symlink), and the demo's text encoder node if asked.

    Before the server starts (ComfyUI loads custom nodes once, at start-up).
    """
    custom = base / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    pack = custom / PACK_LINK
    if not pack.exists():
        pack.symlink_to(REPO_ROOT, target_is_directory=True)
    node_dir = custom / "wlm_demo_text_encode"
    if demo_encoder:
        node_dir.mkdir(exist_ok=True)
        (node_dir / "__init__.py").write_text(DEMO_NODE_SOURCE.format(repo=str(REPO_ROOT), node=DEMO_ENCODER_NODE),
                                               encoding="utf-8")
    elif node_dir.exists():
        shutil.rmtree(node_dir)


def link_models(base: Path, files: ModelFiles) -> dict[str, str]:
    """Links to the model files in the server's ``models/`` folders (ComfyUI lists them on each request).

    Returns the names the workflow's loaders must use (keys ``dit_high``, ``dit_low``, ``vae``, ``lora_moe``,
    ``text_encoder``).
    """
    models = base / "models"
    names = {}
    for key, folder in (("dit_high", "diffusion_models"), ("dit_low", "diffusion_models"), ("vae", "vae"),
                        ("lora_moe", "lora_moe"), ("text_encoder", "text_encoders")):
        src = getattr(files, key)
        if src is None:
            continue
        src = Path(src)
        if not src.is_file():
            raise GenerationError(f"{key.replace('_', ' ')} file {src} not found")
        name = src.name
        if key == "dit_low" and name == Path(files.dit_high).name and src.resolve() != Path(files.dit_high).resolve():
            name = f"low_noise_{name}"
        _link(src, models / folder / name)
        names[key] = name
    return names


# ------------------------------------------------------------------------------------ substitution

def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def _is_high(node: dict) -> bool:
    text = (node.get("_meta", {}).get("title", "") + " " + str(node["inputs"].get("unet_name", ""))).lower()
    return "high" in text


def substitute(api: dict, spec: ClipSpec, settings: RenderSettings, names: dict[str, str],
               video_prefix: str) -> tuple[dict, list[str]]:
    """The API prompt for one clip: ``api`` (the converted workflow) with this run's values; and the changes."""
    prompt = copy.deepcopy(api)
    changes: list[str] = []

    def setv(nid: str, key: str, value: Any) -> None:
        node = prompt[nid]
        if node["inputs"].get(key) != value:
            changes.append(f"{node.get('_meta', {}).get('title', node['class_type'])}.{key}: "
                           f"{_short(node['inputs'].get(key))} -> {_short(value)}")
            node["inputs"][key] = value

    required = {"UNETLoader": 2, "VAELoader": 1, "WanLoRAMoE_LoadLoRAMoE": 2, "KSamplerAdvanced": 2,
                "EmptyHunyuanLatentVideo": 1, "SaveVideo": 1, "WanLoRAMoE_PromptRouter": 1}
    for kind, count in required.items():
        if len(nodes_of(prompt, kind)) != count:
            raise GenerationError(f"the workflow should have {count} {kind} node(s), it has "
                                  f"{len(nodes_of(prompt, kind))}: not the bundled A14B workflow")
    old_steps = None
    split = boundary_step(settings.steps, settings.shift, settings.boundary)
    for nid, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            setv(nid, "unet_name", names["dit_high"] if _is_high(node) else names["dit_low"])
        elif kind == "VAELoader":
            setv(nid, "vae_name", names["vae"])
        elif kind == "CLIPLoader" and "text_encoder" in names:
            setv(nid, "clip_name", names["text_encoder"])
        elif kind == "WanLoRAMoE_LoadLoRAMoE":
            setv(nid, "lora_moe", names["lora_moe"])
        elif kind == "EmptyHunyuanLatentVideo":
            setv(nid, "width", settings.width)
            setv(nid, "height", settings.height)
            setv(nid, "length", settings.frames)
        elif kind == "PrimitiveStringMultiline":
            setv(nid, "value", spec.prompt)
        elif kind == "WanLoRAMoE_PromptRouter":
            setv(nid, "mode", spec.router_mode)
        elif kind == "KSamplerAdvanced":
            old_steps = inputs["steps"]
            setv(nid, "steps", settings.steps)
            for key in ("start_at_step", "end_at_step"):
                if 0 < inputs[key] < old_steps:  # the high/low-noise split
                    setv(nid, key, split)
            if settings.cfg is not None:
                setv(nid, "cfg", settings.cfg)
            if settings.seed is not None and inputs.get("add_noise") == "enable":
                setv(nid, "noise_seed", settings.seed)
        elif kind == "ModelSamplingSD3":
            setv(nid, "shift", settings.shift)
        elif kind == "WanLoRAMoE_TimestepBand":
            setv(nid, "preview_steps", settings.steps)
            setv(nid, "preview_shift", settings.shift)
        elif kind == "SaveVideo":
            setv(nid, "filename_prefix", video_prefix)
    if "text_encoder" not in names:  # the demo's stand-in encoder instead of CLIPLoader + CLIPTextEncode
        for nid in nodes_of(prompt, "CLIPLoader"):
            del prompt[nid]
            changes.append("CLIPLoader: removed (the demo's hashing text encoder needs no file)")
        for nid in nodes_of(prompt, "CLIPTextEncode"):
            node = prompt[nid]
            prompt[nid] = {"class_type": DEMO_ENCODER_NODE, "inputs": {"text": node["inputs"]["text"]},
                           "_meta": node.get("_meta", {})}
            changes.append(f"{node.get('_meta', {}).get('title', 'CLIPTextEncode')}: CLIPTextEncode -> "
                           f"{DEMO_ENCODER_NODE} (the encoder the demo trained with)")
    if spec.experts_off:
        for nid in nodes_of(prompt, "WanLoRAMoE_LoadLoRAMoE"):
            prompt[nid]["inputs"].pop("routing", None)
        for nid in nodes_of(prompt, "WanLoRAMoE_PromptRouter"):
            del prompt[nid]
        changes.append("Load LoRA-MoE (both): routing input disconnected (experts off, base LoRA only)")
    if spec.edit is not None:
        changes += spec.edit(prompt)
    for nid, node in prompt.items():  # nothing may point at a removed node
        for key, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                raise GenerationError(f"{nid}.{key} links to removed node {value[0]}")
    return prompt, changes


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


# ------------------------------------------------------------------------------------ running

def _ui(entry: dict, nid: str, key: str) -> Any:
    value = entry.get("outputs", {}).get(nid, {}).get(key)
    return value[0] if value else None


def render_clips(server, api: dict, specs: Sequence[ClipSpec], settings: RenderSettings, names: dict[str, str],
                 out_dir: Path, timeout: float = 600.0, log_fn: Callable[[str], None] = print) -> list[GeneratedClip]:
    """Run one prompt per spec on ``server``; copy each mp4 (and its API prompt) into ``out_dir``."""
    from .comfy_server import execution_error, output_files

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prompts").mkdir(exist_ok=True)
    clips = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i, spec in enumerate(specs):
        prompt, changes = substitute(api, spec, settings, names, f"wan_lora_moe_demo/{stamp}_{spec.name}")
        prompt_json = out_dir / "prompts" / f"{spec.name}.api.json"
        prompt_json.write_text(json.dumps(prompt, indent=1, ensure_ascii=False), encoding="utf-8")
        log_fn(f"  [{i + 1}/{len(specs)}] {spec.name}: {spec.purpose or spec.prompt[:60]}")
        t0 = time.monotonic()
        entry = server.run(prompt, timeout=timeout)
        seconds = time.monotonic() - t0
        error = execution_error(entry)
        if error:
            raise GenerationError(f"clip {spec.name!r}: ComfyUI failed at {error}\n(server log: {server.log_path})")
        videos = [p for p in output_files(entry, server.base, ("images", "videos")) if p.suffix == ".mp4"]
        if len(videos) != 1:
            raise GenerationError(f"clip {spec.name!r}: expected one mp4 from SaveVideo, got {videos}")
        video = out_dir / f"{spec.name}.mp4"
        shutil.copyfile(videos[0], video)
        clip = GeneratedClip(spec, video, seconds, changes, prompt_json)
        for nid in nodes_of(prompt, "WanLoRAMoE_PromptRouter"):
            clip.router = _ui(entry, nid, "wlm_routing")
        for nid in nodes_of(prompt, "WanLoRAMoE_LoadLoRAMoE"):
            title = prompt[nid].get("_meta", {}).get("title", nid)
            clip.lora_text[title] = _ui(entry, nid, "text") or ""
        for nid in nodes_of(prompt, "WanLoRAMoE_TimestepBand"):
            # The Timestep Band node's picture: moe_core.schedule.render_schedule for this run's routing,
            # the file's learned router, the band, and this run's steps and shift.
            data = _ui(entry, nid, "wlm_schedule") or {}
            item = _ui(entry, nid, "wlm_schedule_image")
            if data.get("set"):
                clip.schedule_data[data["set"]] = data
            if item and data.get("set") and spec.keep_schedules:
                src = server.base / item.get("type", "temp") / item.get("subfolder", "") / item["filename"]
                dst = out_dir / f"gate_schedule_{spec.name}_{data['set']}.png"
                if src.is_file():
                    shutil.copyfile(src, dst)
                    clip.schedules[data["set"]] = dst
        log_fn(f"      {video.name} in {seconds:.1f} s" + (f"; router: {clip.router.get('line', '')}"
                                                         if clip.router and clip.router.get("line") else ""))
        clips.append(clip)
    return clips


def load_api_workflow(server, workflow: Path) -> dict:
    """The bundled UI workflow as an API prompt, with the server's node definitions."""
    from moe_core.workflow_api import ConversionError, convert

    try:
        ui = json.loads(Path(workflow).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GenerationError(f"workflow {workflow}: cannot read it ({e})") from None
    try:
        return convert(ui, server.object_info())
    except ConversionError as e:
        raise GenerationError(f"workflow {workflow}: {e}") from None


__all__ = ["ClipSpec", "DEMO_ENCODER_NODE", "GeneratedClip", "GenerationError", "ModelFiles", "RenderSettings",
           "boundary_step", "link_models", "load_api_workflow", "prepare_custom_nodes", "render_clips", "substitute"]
