"""The renders of an ablation: every (arm, prompt, seed) through the bundled workflow in a headless ComfyUI.

Each render is one prompt on a ComfyUI server of its own (``training.generate.render_clips``, the demo's path:
the workflow's API twin with this run's values substituted, plus the arm's edit). A finished render is
recorded in ``renders.json`` (rewritten atomically after every clip) with a fingerprint of everything that
decides its pixels (arm, prompt, seed, sampler values, workflow file, model files) and the clip's size and
SHA-256. A later run into the same folder skips every render whose record matches and whose clip is still
complete (same size and checksum), renders the rest, and starts ComfyUI only if something is left to render.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from moe_core.atomic import atomic_write_text

from ..evaluation.features import sha256_file
from .arms import MAIN, Arm, graph_edit, slug
from .config import AblationConfig
from .files import ModelPaths

MANIFEST = "renders.json"
MANIFEST_FORMAT = "wan-lora-moe-ablation-renders"


@dataclass(frozen=True)
class RenderJob:
    arm: Arm
    prompt_id: str
    prompt: str
    instrument: str | None
    seed: int

    @property
    def clip_name(self) -> str:  # training.evaluation reads <prompt_id>_seed<k> (and the sidecar)
        return f"{self.prompt_id}_seed{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.arm.name}/{self.clip_name}"


def prompt_ids(n: int) -> list[str]:
    return [f"p{i + 1:02d}" for i in range(n)]


def render_jobs(cfg: AblationConfig, arms: list[Arm], instruments: list[str | None]) -> list[RenderJob]:
    """Each prompt at each seed for every arm, arm by arm and seeds innermost: consecutive renders then differ
    only in the seed, so ComfyUI reuses the cached outputs of every node before the samplers (models, LoRA-MoE
    patches, routing, band)."""
    ids = prompt_ids(len(cfg.render.prompts))
    return [RenderJob(arm, pid, text, inst, seed) for arm in arms
            for pid, text, inst in zip(ids, cfg.render.prompts, instruments) for seed in cfg.render.seeds]


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def fingerprint(job: RenderJob, cfg: AblationConfig, files: ModelPaths, workflow_sha: str) -> str:
    """Everything that decides the clip's pixels; a render whose fingerprint changed is rendered again."""
    r = cfg.render
    keys = ["models.dit_high", "models.dit_low", "models.vae", job.arm.file_key]
    keys += ["models.text_encoder"] if "models.text_encoder" in files.paths else []
    return _sha({"arm": job.arm.to_json(), "prompt": job.prompt, "seed": job.seed, "workflow": workflow_sha,
                 "render": {k: getattr(r, k) for k in ("steps", "shift", "cfg", "width", "height", "frames")},
                 "boundary": cfg.models.boundary, "demo_text": files.demo_text,
                 "files": {k: files.identity(k) for k in keys}})


class RenderManifest:
    """``renders.json``: the finished renders, by key; rewritten atomically after each render."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") == MANIFEST_FORMAT:
                    self.entries = dict(data.get("renders", {}))
            except (OSError, ValueError):
                self.entries = {}  # unreadable: every clip is checked (and rendered) again

    def finished(self, job: RenderJob, fp: str) -> dict | None:
        """The record of a finished render whose clip is complete, or None."""
        entry = self.entries.get(job.key)
        if not entry or entry.get("fingerprint") != fp:
            return None
        video = self.out_dir / entry["video"]
        try:
            if video.stat().st_size != entry["size"] or sha256_file(video) != entry["sha256"]:
                return None
        except OSError:
            return None
        return entry

    def record(self, job: RenderJob, entry: dict) -> None:
        self.entries[job.key] = entry
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"format": MANIFEST_FORMAT, "version": 1, "renders": self.entries},
                                                indent=1, ensure_ascii=False))


@dataclass
class RenderStats:
    total: int = 0
    skipped: int = 0
    rendered: int = 0
    seconds: float = 0.0
    server_start_s: float | None = None


def _server_cpu(choice: str) -> bool:
    import torch

    if choice == "gpu":
        if not torch.cuda.is_available():
            from ..config import ConfigError

            raise ConfigError("render.device = \"gpu\" but torch sees no CUDA device")
        return False
    return choice == "cpu" or not torch.cuda.is_available()


class Renderer:
    """Starts ComfyUI on first use, links the model files, renders one job at a time."""

    def __init__(self, cfg: AblationConfig, files: ModelPaths, log_fn: Callable[[str], None]):
        self.cfg, self.files, self.log_fn = cfg, files, log_fn
        self.server = None
        self.api: dict | None = None
        self.names: dict[str, dict[str, str]] = {}

    def _start(self) -> None:
        from ..comfy_server import ComfyServer
        from ..generate import ModelFiles, _link, link_models, load_api_workflow, prepare_custom_nodes

        cfg, files = self.cfg, self.files
        base = Path(cfg.ablation.comfy_dir)
        prepare_custom_nodes(base, demo_encoder=files.demo_text)
        self.server = ComfyServer(base, cpu=_server_cpu(cfg.render.device), threads=cfg.render.cpu_threads or None)
        self.log_fn(f"starting ComfyUI (base directory {base}, log {self.server.log_path})")
        self.server.start()
        self.log_fn(f"ComfyUI ready at {self.server.url} ({self.server.startup_s:.0f} s)")
        p = files.paths
        common = link_models(base, ModelFiles(p["models.dit_high"], p["models.dit_low"], p["models.vae"], p[MAIN],
                                              p.get("models.text_encoder")))
        for key in files.moes:  # each LoRA-MoE file; two of the same name (other folders) get distinct names
            path, name = p[key], p[key].name
            if any(p[k].name == name and p[k].resolve() != path.resolve() for k in files.moes if k != key):
                name = f"{slug(key)}_{name}"
            _link(path, base / "models" / "lora_moe" / name)
            self.names[key] = dict(common, lora_moe=name)
        self.api = load_api_workflow(self.server, Path(cfg.ablation.workflow))

    def settings(self, seed: int):
        from ..generate import RenderSettings

        r = self.cfg.render
        wf = _workflow_latent(self.api)
        return RenderSettings(steps=r.steps, shift=r.shift, cfg=r.cfg or None, seed=seed,
                              width=r.width or wf["width"], height=r.height or wf["height"],
                              frames=r.frames or wf["length"], boundary=self.cfg.models.boundary)

    def render(self, job: RenderJob, clips_dir: Path):
        from ..generate import ClipSpec, render_clips

        if self.server is None:
            self._start()
        spec = ClipSpec(job.clip_name, job.prompt, job.arm.router_mode, experts_off=not job.arm.experts,
                        purpose=job.arm.what, edit=graph_edit(job.arm))
        settings = self.settings(job.seed)
        clip = render_clips(self.server, self.api, [spec], settings, self.names[job.arm.file_key],
                            clips_dir / job.arm.name, self.cfg.render.timeout_s, log_fn=lambda _: None)[0]
        return clip, settings

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _workflow_latent(api: dict) -> dict:
    for node in api.values():
        if node["class_type"] == "EmptyHunyuanLatentVideo":
            return node["inputs"]
    from ..generate import GenerationError

    raise GenerationError("the workflow has no EmptyHunyuanLatentVideo node: not the bundled A14B workflow")


def run_renders(cfg: AblationConfig, jobs: list[RenderJob], files: ModelPaths, out_dir: Path,
                log_fn: Callable[[str], None] = print,
                on_render: Callable[[RenderJob, dict], None] | None = None) -> tuple[dict[str, dict], RenderStats]:
    """Render what is not finished; returns the record of every job (by key) and the counts.

    ``on_render`` is called after each new render is recorded (the tests interrupt a run there).
    """
    from tqdm import tqdm

    workflow_sha = sha256_file(cfg.ablation.workflow)
    manifest = RenderManifest(out_dir)
    stats = RenderStats(total=len(jobs))
    records: dict[str, dict] = {}
    todo: list[tuple[RenderJob, str]] = []
    for job in jobs:
        fp = fingerprint(job, cfg, files, workflow_sha)
        done = manifest.finished(job, fp)
        if done is not None:
            records[job.key] = done
        else:
            todo.append((job, fp))
    stats.skipped = len(records)
    log_fn(f"renders: {len(jobs)} ({len({j.arm.name for j in jobs})} arms x "
           f"{len(cfg.render.prompts)} prompts x {len(cfg.render.seeds)} seeds); {stats.skipped} finished in an "
           f"earlier run (kept), {len(todo)} to render")
    if not todo:
        return records, stats

    def say(message: str) -> None:  # a line above the progress bar, not through it
        with tqdm.external_write_mode():
            log_fn(message)

    renderer = Renderer(cfg, files, say)
    clips_dir = out_dir / "clips"
    t0 = time.monotonic()
    try:
        with tqdm(total=len(jobs), initial=stats.skipped, desc="rendering", unit="clip", dynamic_ncols=True) as bar:
            for job, fp in todo:
                bar.set_postfix_str(job.key)
                clip, settings = renderer.render(job, clips_dir)
                if stats.server_start_s is None and renderer.server is not None:
                    stats.server_start_s = renderer.server.startup_s
                _write_sidecar(clip.video, job)
                entry = {"arm": job.arm.name, "prompt_id": job.prompt_id, "seed": job.seed, "prompt": job.prompt,
                         "instrument": job.instrument, "fingerprint": fp,
                         "video": str(clip.video.relative_to(out_dir)), "size": clip.video.stat().st_size,
                         "sha256": sha256_file(clip.video), "duration": _duration(clip.video),
                         "seconds": round(clip.seconds, 2),
                         "api_prompt": str(clip.prompt_json.relative_to(out_dir)), "changes": clip.changes,
                         "router": clip.router, "schedule_data": clip.schedule_data,
                         "lora_moe": renderer.names[job.arm.file_key]["lora_moe"],
                         "settings": dataclasses.asdict(settings),
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                manifest.record(job, entry)
                records[job.key] = entry
                stats.rendered += 1
                bar.update(1)
                say(f"  {job.key}: {clip.seconds:.1f} s")
                if on_render is not None:
                    on_render(job, entry)
    finally:
        renderer.stop()
        stats.seconds = time.monotonic() - t0
    return records, stats


def _duration(video: Path) -> float:
    """Seconds of a clip, from its header (ffmpeg stops after the first frame)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(video))
    try:
        meta = next(reader)
    finally:
        reader.close()
    return float(meta.get("duration") or 0.0)


def arm_manifest(records: list[dict], out_dir: Path, path: Path, class_names: list[str]) -> Path:
    """A training-style manifest of exactly these clips (what the evaluation reads for the arm), so clips of an
    earlier config left in the arm's folder are never evaluated."""
    lines = []
    for rec in records:
        line = {"video_path": str((out_dir / rec["video"]).resolve()), "caption": rec["prompt"],
                "duration": rec.get("duration") or 1.0, "source": f"ablation:{rec['arm']}",
                "prompt_id": rec["prompt_id"], "seed": rec["seed"]}
        if rec.get("instrument") in class_names:
            line["instrument_label"] = class_names.index(rec["instrument"])
        lines.append(json.dumps(line, ensure_ascii=False))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def _write_sidecar(video: Path, job: RenderJob) -> None:
    """``<clip>.json`` beside the clip: the evaluation's prompt/seed key and the reference instrument."""
    data = {"prompt_id": job.prompt_id, "seed": job.seed, "prompt": job.prompt}
    if job.instrument:
        data["instrument"] = job.instrument
    atomic_write_text(video.with_suffix(".json"), json.dumps(data, ensure_ascii=False))


__all__ = ["MANIFEST", "RenderJob", "RenderManifest", "RenderStats", "arm_manifest", "fingerprint", "prompt_ids",
           "render_jobs", "run_renders"]
