"""The whole job in one command: data -> stage 1 -> stage 2 -> clips from the bundled workflow -> report.

    bash scripts/demo.sh                       # = python -m training.mission: the embedded demo config, CPU
    bash scripts/demo.sh --fast                # the same, smaller and shorter (CI)
    bash scripts/demo.sh --config my.toml      # the real pipeline on your clips and WAN 2.2 A14B files
    python -m training.mission --print-config  # the resolved config (a starting point for my.toml)

Five steps, each announced with its time:

1. data: the synthetic clips (demo) or the manifest of the config;
2. models and cache: the demo's tiny random A14B-style DiT pair and random WAN 2.1 VAE (demo), then VAE
   latents and text embeddings cached as the trainer caches them;
3. training: stage 1 (the base LoRA of each DiT), then stage 2 on it (experts + learned router, held-out
   validation): ``training.stage1.run_stage1`` and ``training.stage2.run_stage2`` as their CLIs run them;
4. clips: the bundled A14B workflow run by a ComfyUI server of its own (``training.generate``): one clip per
   instrument, one routed automatically by the learned router, one with the experts off;
5. report: one folder with the clips, a contact sheet, gate schedules, expert usage, loss curves and
   ``report.html`` / ``report.md`` (``training.mission_report``).

The config is one TOML file (``training.mission_config``): the stage configs' sections apply to both stages,
``[stage1.<section>]`` / ``[stage2.<section>]`` to one, ``[mission]`` and ``[generate]`` are the mission's.
Overrides: ``--set stage2.train.max_steps=10``, ``--set generate.steps=6``, ``--set data.cache_dir=...``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from moe_core.comfy_runtime import ensure_comfy

from .config import ConfigError
from .mission_config import MissionConfig, load_mission_config, mission_toml


# ------------------------------------------------------------------------------------------- running

@dataclass
class StepTimer:
    """Announces the five steps and keeps their durations (shown at the end and in the report)."""

    log_fn: Callable[[str], None]
    total: int = 5
    times: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    @contextmanager
    def step(self, index: int, title: str, key: str):
        """``title`` is announced; the duration is kept under the short ``key``."""
        self.log_fn(f"\n=== [{index}/{self.total}] {title} ===")
        start = time.monotonic()
        yield
        self.times[key] = time.monotonic() - start
        self.log_fn(f"--- {title}: {self.times[key]:.1f} s (total {time.monotonic() - self.t0:.0f} s)")


@dataclass
class MissionResult:
    out_dir: Path
    report_html: Path
    report_md: Path
    clips: list
    lora_moe: Path
    stage1_loras: dict[str, Path]
    times: dict[str, float]
    seconds: float


def _free_memory() -> None:
    gc.collect()
    try:
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()
    except Exception:  # pragma: no cover
        pass


MARKER = ".wan_lora_moe_report"


def _prepare_out_dir(out_dir: Path) -> None:
    """An empty report folder; one of ours from an earlier run is emptied, anything else is refused."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).is_file():
            raise ConfigError(f"mission.out_dir {out_dir} is not empty and not a report folder of an earlier run: "
                              "choose another folder (it would be overwritten)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by python -m training.mission; emptied on every run\n")


def _server_device(choice: str) -> bool:
    """True for a CPU server."""
    import torch

    if choice == "cpu":
        return True
    if choice == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("generate.device = \"gpu\" but torch sees no CUDA device")
        return False
    return not torch.cuda.is_available()


def run_mission(mc: MissionConfig, resume: bool = False, overwrite: bool = False,
                log_fn: Callable[[str], None] = print) -> MissionResult:
    """Run the five steps (see the module docstring); returns where everything is."""
    ensure_comfy()
    from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
    from .data.synthetic import CAPTIONS, INSTRUMENT_SHAPES
    from .comfy_server import ComfyServer
    from .demo import demo_clips, prepare_demo
    from .encoders import DEMO_TEXT, prepare
    from .generate import ClipSpec, ModelFiles, RenderSettings, boundary_step, link_models, load_api_workflow
    from .generate import prepare_custom_nodes, render_clips
    from .mission_report import write_mission_report
    from .models import resolve_model_path
    from .stage1 import resolve_family, run_stage1
    from .stage2 import run_stage2

    timer = StepTimer(log_fn)
    # the hashing stand-in text encoder (the demo's unless a file is given): the graph needs the same one
    hash_text = mc.stage1.data.text_encoder == DEMO_TEXT or (mc.demo and not mc.stage1.data.text_encoder)
    own, gen = mc.own.mission, mc.own.generate
    out_dir = Path(own.out_dir)
    _prepare_out_dir(out_dir)
    cfg1, cfg2 = mc.stage1, mc.stage2
    mode = ("demo (--fast)" if mc.fast else "demo") if mc.demo else f"config {mc.source}"
    log_fn(f"WAN LoRA-MoE mission: {mode}; everything it shows will be in {out_dir}")
    if mc.demo:
        log_fn("(tiny random models on synthetic clips: the run shows the pipeline working end to end; the "
               "videos it makes are noise, not surgery)")

    with timer.step(1, "data", "data"):
        if mc.demo:
            manifest = demo_clips(cfg1, log_fn)
            log_fn(f"{4 * cfg1.demo.clips_per_class} synthetic clips ({cfg1.demo.clips_per_class} per instrument) "
                   f"with Chinese captions and tip boxes: {manifest}")
        else:
            log_fn(f"manifest: {cfg1.data.manifest}")

    with timer.step(2, "models and cache", "models and cache"):
        if mc.demo:
            cfg1 = prepare_demo(cfg1, log_fn, pair=True)
            cfg2 = dataclasses.replace(cfg2, model=cfg1.model,
                                       data=dataclasses.replace(cfg2.data, manifest=cfg1.data.manifest,
                                                                vae=cfg1.data.vae,
                                                                text_encoder=cfg1.data.text_encoder))
            log_fn(f"DiT pair (random, {cfg1.demo.dit_layers} blocks, dim {cfg1.demo.dit_dim}): "
                   f"{cfg1.model.dit_high}, {cfg1.model.dit_low}; VAE (random WAN 2.1): {cfg1.data.vae}; "
                   "text encoder: the hashing stand-in")
        cfg1, _ = resolve_family(cfg1)  # data.family, model.boundary and clip defaults from the DiTs' headers
        prepared = prepare(cfg1.data, log_fn)
        log_fn(prepared.format())
        data_summary = prepared.format()
        del prepared

    # The server starts while training runs when both share the CPU (its start-up is mostly imports); on a
    # GPU it starts after training, so that it never competes with training for GPU memory.
    cpu_server = _server_device(gen.device)
    server_dir = Path(own.comfy_dir)
    server = ComfyServer(server_dir, cpu=cpu_server, threads=gen.cpu_threads or None)
    prepare_custom_nodes(server_dir, demo_encoder=hash_text)
    try:
        with timer.step(3, "training: stage 1, then stage 2", "training"):
            launched_early = False
            s1 = run_stage1(cfg1, resume="auto" if resume else None, overwrite=overwrite or mc.demo, log_fn=log_fn)
            stage1 = {"loras": dict(s1.loras), "steps": s1.steps, "losses": list(s1.losses), "plots": list(s1.plots),
                      "metrics": s1.metrics, "out_dir": s1.out_dir}
            del s1
            _free_memory()
            if cpu_server:
                # ComfyUI imports while stage 2 trains (stage 2 runs one torch thread on tiny models)
                server.launch()
                launched_early = True
            log_fn("")
            s2 = run_stage2(cfg2, base_loras=stage1["loras"], resume="auto" if resume else None,
                            overwrite=overwrite or mc.demo, log_fn=log_fn)
            stage2 = {"lora_moe": s2.lora_moe, "steps": s2.steps, "losses": list(s2.losses), "plots": list(s2.plots),
                      "metrics": s2.metrics, "out_dir": s2.out_dir, "validation": s2.validation,
                      "ema_check": s2.ema_check}
            del s2
            _free_memory()

        with timer.step(4, "clips from the bundled workflow in ComfyUI", "clips"):
            if not launched_early:
                server.launch()
            log_fn(f"ComfyUI server {server.url} (base directory {server_dir}, log {server.log_path})")
            server.wait_ready()
            log_fn(f"ComfyUI ready ({server.startup_s:.0f} s after launch)")
            files = ModelFiles(resolve_model_path(cfg1.model.dit_high, "high_noise DiT"),
                               resolve_model_path(cfg1.model.dit_low, "low_noise DiT"), _resolve(cfg1.data.vae, "vae"),
                               Path(stage2["lora_moe"]),
                               None if hash_text else _resolve(cfg1.data.text_encoder, "text_encoders"))
            names = link_models(server_dir, files)
            api = load_api_workflow(server, Path(gen.workflow))
            settings = RenderSettings(
                steps=gen.steps, shift=gen.shift, cfg=gen.cfg or None, seed=None if gen.seed < 0 else gen.seed,
                width=gen.width or (cfg1.demo.width if mc.demo else _workflow_value(api, "width")),
                height=gen.height or (cfg1.demo.height if mc.demo else _workflow_value(api, "height")),
                frames=gen.frames or (cfg1.demo.frames if mc.demo else _workflow_value(api, "length")),
                boundary=cfg1.model.boundary)
            split = boundary_step(settings.steps, settings.shift, settings.boundary)
            log_fn(f"{settings.width}x{settings.height}, {settings.frames} frames, {settings.steps} steps (high-noise "
                   f"DiT steps 0-{split - 1}, low-noise DiT steps {split}-{settings.steps - 1}), shift {settings.shift:g}")
            expert_names = list(cfg2.moe.expert_names)
            prompts = list(gen.instrument_prompts)
            if not prompts:
                if expert_names != list(DEFAULT_EXPERT_NAMES):
                    raise ConfigError("generate.instrument_prompts: give one prompt per expert of moe.expert_names "
                                      f"{expert_names} (the built-in ones name the four default instruments)")
                prompts = [c[0] for c in CAPTIONS]
            if len(prompts) != len(expert_names):
                raise ConfigError(f"generate.instrument_prompts: {len(prompts)} prompt(s) for {len(expert_names)} "
                                  f"experts {expert_names}")
            auto_prompt = gen.auto_prompt or _workflow_value(api, "value", "PrimitiveStringMultiline")
            clip_names = (list(INSTRUMENT_SHAPES) if expert_names == list(DEFAULT_EXPERT_NAMES)
                          else [_slug(n) for n in expert_names])
            specs = [ClipSpec(f"{i + 1}_{name}", prompt, "rule-based", purpose=f"{expert} (its prompt names it)")
                     for i, (name, expert, prompt) in enumerate(zip(clip_names, expert_names, prompts))]
            n = len(specs)
            specs.append(ClipSpec(f"{n + 1}_auto_routed", auto_prompt, gen.auto_router,
                                  purpose=f"the workflow's prompt, {gen.auto_router} routing", keep_schedules=True))
            specs.append(ClipSpec(f"{n + 2}_experts_off", auto_prompt, experts_off=True,
                                  purpose="the same prompt and seed, experts off (base LoRA only)"))
            clips = render_clips(server, api, specs, settings, names, out_dir, gen.timeout_s, log_fn)
    finally:
        server.stop()

    with timer.step(5, "report", "report"):
        md, page = write_mission_report(
            out_dir, mc=mc, mode=mode, clips=clips, settings=settings, split=split, expert_names=expert_names,
            stage1=stage1, stage2=stage2, data_summary=data_summary, times=timer.times, config_text=mission_toml(mc),
            log_fn=log_fn)
    seconds = time.monotonic() - timer.t0
    log_fn(f"\nDone in {seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timer.times.items()) + ").")
    log_fn(f"Everything is in {out_dir}/:")
    log_fn("  report.html          open it in a browser (report.md says the same in text)")
    log_fn(f"  contact_sheet.png    frames of the {len(clips)} clips; the clips: " +
           ", ".join(c.video.name for c in clips))
    log_fn("  gate_schedule_*.png, expert_usage.png, loss_*.png, stage2_*.png, prompts/ (the API graphs run)")
    log_fn(f"LoRA-MoE file: {stage2['lora_moe']} (ComfyUI: models/lora_moe/, then the bundled workflow)")
    return MissionResult(out_dir, page, md, clips, Path(stage2["lora_moe"]), stage1["loras"], timer.times, seconds)


def _resolve(spec: str, folder: str) -> Path:
    from .encoders import resolve_in_folder

    return resolve_in_folder(spec, folder, {"vae": "VAE", "text_encoders": "text encoder"}[folder])


def _workflow_value(api: dict, key: str, class_type: str = "EmptyHunyuanLatentVideo") -> Any:
    for node in api.values():
        if node["class_type"] == class_type and key in node["inputs"]:
            return node["inputs"][key]
    raise ConfigError(f"generate.workflow: no {class_type} node with '{key}' in the workflow")


def _slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "_" for c in name).strip("_") or "expert"


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.mission (bash scripts/demo.sh)",
        description="The whole WAN LoRA-MoE job in one command: data, stage 1, stage 2, clips rendered by the "
                    "bundled A14B workflow in a headless ComfyUI, and a report. Without --config: the CPU demo on "
                    "synthetic clips and tiny random models.")
    p.add_argument("--config", type=Path, help="a mission TOML (python -m training.mission --print-config shows "
                                               "the demo's; set model.dit_high/dit_low and data.* for a real run)")
    p.add_argument("--fast", action="store_true", help="the demo, smaller and shorter (CI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key: section.key=v (both stages), stage1.section.key=v, stage2.section.key=v, "
                        "generate.key=v, mission.key=v (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue both stages from their newest checkpoints")
    p.add_argument("--overwrite", action="store_true", help="start the stages again in output folders that hold "
                                                            "runs (always so in the demo)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_comfy()
    from .comfy_server import ServerError
    from .generate import GenerationError
    from .stage2 import known_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    errors = known_errors() + (GenerationError, ServerError)
    try:
        mc = load_mission_config(args.config, args.overrides, args.fast)
        if args.print_config:
            print(mission_toml(mc), end="")
            return 0
        run_mission(mc, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
