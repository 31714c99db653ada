"""Ablations in one command: render every arm through the bundled workflow in a headless ComfyUI, evaluate, report.

    python -m training.ablate --config training/configs/ablate.toml        # on the demo's files
    python -m training.ablate --config my_ablate.toml --set render.seeds=[0,1,2]
    python -m training.ablate --print-config > my_ablate.toml              # every key, with its meaning

Five steps, each announced with its time:

1. inputs: every model file present (and matching its ``[sha256]`` checksum), the LoRA-MoE files loaded, the
   arms chosen (unknown names fail, naming the config key);
2. renders: each prompt at each seed for every arm (``training.ablation.render``); finished clips of an earlier,
   interrupted run are kept (``renders.json``) and ComfyUI starts only if something is left to render;
3. evaluation: ``training.evaluation.evaluate`` on every arm (and the real clips), paired on prompt and seed;
4. gates and pictures: expert usage, the gate schedule of each arm, the router-vs-instrument confusion,
   contact sheets and x-t slices at fixed seeds;
5. report: ``report.html`` / ``report.md`` / ``report.json`` in ``ablation.out_dir``.

See docs/ablation.md for the arms, the config and the report.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .ablation.config import AblationConfig, Sections, load_ablation_config
from .config import ConfigError

MARKER = ".wan_lora_moe_ablation"


@dataclass
class AblationResult:
    out_dir: Path
    report_html: Path
    report_json: Path
    rendered: int
    skipped: int
    times: dict[str, float]


def _prepare_out_dir(out_dir: Path) -> None:
    """The run folder: new, or one of ours (resumed); any other non-empty folder is refused."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ConfigError(f"ablation.out_dir {out_dir} is not empty and not the folder of an earlier ablation run: "
                          "choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by python -m training.ablate; a run into this folder resumes\n")


def _check_evaluation_inputs(cfg: AblationConfig) -> None:
    """The evaluation's model files and real set exist (and match their checksums) before anything renders."""
    from .evaluation.features import check_model_file

    e = cfg.evaluation
    for name in ("i3d", "classifier", "detector"):
        if getattr(e, name):
            check_model_file(getattr(e, name), getattr(e, f"{name}_sha256") or None, f"evaluation.{name}")
    if e.real and not Path(e.real).exists():
        raise ConfigError(f"evaluation.real: {e.real} not found (a folder of videos or a .jsonl manifest)")


def eval_config(cfg: AblationConfig, class_names: Sequence[str]):
    from .evaluation import EvalConfig
    from .evaluation.temporal import FlowConfig

    e = cfg.evaluation
    return EvalConfig(class_names=tuple(class_names), min_clips=e.min_clips, workers=e.workers, temporal=e.temporal,
                      flow=FlowConfig(scale=e.flow_scale),
                      i3d=e.i3d or None, i3d_sha256=e.i3d_sha256 or None, classifier=e.classifier or None,
                      classifier_sha256=e.classifier_sha256 or None, classifier_input=e.classifier_input,
                      detector=e.detector or None, detector_sha256=e.detector_sha256 or None,
                      bootstrap=e.bootstrap, cluster=e.cluster, level=e.level, seed=e.seed)


def run_ablation(cfg: AblationConfig, log_fn: Callable[[str], None] = print, on_render=None) -> AblationResult:
    """The five steps of the module docstring; returns where the report is and what was rendered."""
    from .ablation.arms import MAIN, available_arms, prompt_instruments, select_arms
    from .ablation.files import check_model_files
    from .ablation.gates import arm_usage, per_step_table, render_steps, router_confusion, schedule_pictures
    from .ablation.pictures import fixed_seed_pictures
    from .ablation.render import arm_manifest, prompt_ids, render_jobs, run_renders
    from .ablation.report import write_ablation_report
    from .config import to_toml
    from .mission import StepTimer
    from .report import expert_usage_picture, read_video

    timer = StepTimer(log_fn)
    out_dir = Path(cfg.ablation.out_dir)
    with timer.step(1, "inputs", "inputs"):
        if not Path(cfg.ablation.workflow).is_file():
            raise ConfigError(f"ablation.workflow: {cfg.ablation.workflow} not found (a UI workflow .json: the "
                              "bundled workflows/wan22_a14b_t2v_lora_moe.json)")
        files = check_model_files(cfg, log_fn)
        _check_evaluation_inputs(cfg)
        arms = select_arms(cfg, available_arms(files))
        main = files.moes[MAIN]
        instruments = prompt_instruments(cfg, main.expert_names, main.expert_keywords)
        _prepare_out_dir(out_dir)
        log_fn(f"arms ({len(arms)}): " + ", ".join(a.name for a in arms))
        log_fn(f"run folder: {out_dir}")

    with timer.step(2, "renders (ComfyUI, headless)", "renders"):
        jobs = render_jobs(cfg, arms, instruments)
        records, stats = run_renders(cfg, jobs, files, out_dir, log_fn, on_render)
        log_fn(f"rendered {stats.rendered}, kept {stats.skipped} finished earlier")

    with timer.step(3, "evaluation", "evaluation"):
        from .evaluation import evaluate
        from .evaluation.videos import EvalInputError

        by_arm = {a.name: [records[j.key] for j in jobs if j.arm is a] for a in arms}
        sets = {a.name: arm_manifest(by_arm[a.name], out_dir, out_dir / "clips" / f"{a.name}.jsonl",
                                     list(main.expert_names)) for a in arms}
        evaluation, evaluation_error = None, None
        try:
            evaluation = evaluate(sets, real=cfg.evaluation.real or None,
                                  config=eval_config(cfg, main.expert_names), out_dir=out_dir / "evaluation",
                                  reference=cfg.ablation.reference)
        except EvalInputError as e:  # partial results stay in evaluation/; the report says why
            evaluation_error = str(e)
            log_fn(f"evaluation failed: {e}")
        except Exception as e:  # noqa: BLE001  a failing metric must not cost the renders' report
            evaluation_error = f"{type(e).__name__}: {e}"
            logging.getLogger("training").exception("evaluation failed")
            log_fn(f"evaluation failed ({evaluation_error}); the report is written without its metrics")

    with timer.step(4, "gates and pictures", "pictures"):
        pictures = out_dir / "pictures"
        pictures.mkdir(exist_ok=True)
        first = {a.name: by_arm[a.name][0] for a in arms}
        _, _, split = render_steps(first[arms[0].name], cfg.models.boundary)
        usage: dict[str, dict] = {}
        for a in arms:
            moe = files.moes[a.file_key]
            title = "experts " + " / ".join(moe.expert_names)
            group = usage.setdefault(title, {"experts": list(moe.expert_names), "rows": {}})
            group["rows"][a.name] = arm_usage(a, by_arm[a.name], moe, cfg.models.boundary)
        for i, (title, group) in enumerate(usage.items()):
            group["picture"] = expert_usage_picture(list(group["rows"].items()), group["experts"],
                                                    pictures / f"expert_usage_{i + 1}.png",
                                                    f"expert usage: mean gate over the steps ({title})")
        schedules = {a.name: schedule_pictures(a, first[a.name], files.moes[a.file_key], cfg.models.boundary,
                                               pictures) for a in arms}
        per_step = {a.name: per_step_table(a, first[a.name], files.moes[a.file_key], cfg.models.boundary)
                    for a in arms}
        confusion = router_confusion(main, cfg.render.prompts, instruments, cfg.report.router_levels,
                                     cfg.models.boundary)
        sheets = []
        for pid in prompt_ids(len(cfg.render.prompts)):
            for seed in cfg.report.sheet_seeds or cfg.render.seeds[:1]:
                clips = {a.name: read_video(out_dir / records[f"{a.name}/{pid}_seed{seed}"]["video"])[1] for a in arms}
                sheet, xt = fixed_seed_pictures(clips, pid, seed, cfg.report.slice_row, pictures)
                sheets.append((pid, seed, sheet, xt))
        log_fn(f"pictures in {pictures}: {len(sheets)} contact sheet(s) and x-t slice picture(s), "
               f"{sum(len(v) for v in schedules.values())} gate schedules, expert usage")

    with timer.step(5, "report", "report"):
        settings = dict(first[arms[0].name]["settings"])
        js, page, _ = write_ablation_report(
            out_dir, cfg=cfg, arms=arms, records={j.key: records[j.key] for j in jobs}, stats=stats,
            evaluation=evaluation, evaluation_error=evaluation_error, usage=usage, confusion=confusion,
            sheets=sheets, schedules=schedules, per_step=per_step, split=split, settings=settings,
            config_text=f"# {cfg.source}\n" + to_toml(Sections(cfg.ablation, cfg.models, cfg.render, cfg.evaluation,
                                                               cfg.report), comments=False)
            + _sha256_toml(cfg))
        log_fn(f"report: {page} (and report.md, report.json)")
    return AblationResult(out_dir, page, js, stats.rendered, stats.skipped, dict(timer.times))


def _sha256_toml(cfg: AblationConfig) -> str:
    import json

    if not cfg.sha256:
        return ""
    return "\n[sha256]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.sha256.items())


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.ablate",
        description="Render the same prompts and seeds for every ablation arm through the bundled A14B workflow in "
                    "a headless ComfyUI, evaluate all arms and write one report (docs/ablation.md).")
    p.add_argument("--config", type=Path, help="the ablation TOML (training/configs/ablate.toml runs on the demo's "
                                               "files after bash scripts/demo.sh)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key: section.key=value (repeatable), e.g. render.seeds=[0,1]")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key with its meaning; the defaults without --config)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from moe_core.routing import RoutingError
    from .comfy_server import ServerError
    from .evaluation.features import ModelFileError
    from .generate import GenerationError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.print_config:
            from .config import to_toml

            if args.config is None:
                print(to_toml(Sections()), end="")
            else:
                cfg = load_ablation_config(args.config, args.overrides)
                print(to_toml(Sections(cfg.ablation, cfg.models, cfg.render, cfg.evaluation, cfg.report)), end="")
                print(_sha256_toml(cfg), end="")
            return 0
        if args.config is None:
            raise ConfigError("--config: give the ablation TOML (python -m training.ablate --print-config shows "
                              "every key; training/configs/ablate.toml is an example on the demo's files)")
        cfg = load_ablation_config(args.config, args.overrides)
        result = run_ablation(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted: the finished clips are recorded in renders.json; run the same command again to "
              "resume", file=sys.stderr)
        return 130
    except (ConfigError, ModelFileError, RoutingError, GenerationError, ServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {result.report_html} ({result.rendered} rendered, {result.skipped} kept from an earlier run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
