"""Stage 2: expert LoRAs and the learned router trained together on the frozen stage-1 base.

    python -m training.stage2 --config run.toml --base-lora outputs/stage1/stage1_lora.safetensors
    python -m training.stage2 --config run.toml --base-lora high_noise:stage1_lora_high_noise.safetensors \\
                                                --base-lora low_noise:stage1_lora_low_noise.safetensors
    python -m training.stage2 --config run.toml --resume                 # exactly where it stopped
    python -m training.stage2 --config run.toml --init-moe moe.safetensors --set router.train=\"router_only\"
    torchrun --nproc_per_node 4 -m training.stage2 --config run.toml --base-lora ...
    python -m training.stage2 --print-config                             # every key, default and meaning

The base LoRA may be in any format ``moe_core`` reads (musubi/kohya, diffusers-style, ComfyUI trainer),
one per DiT for A14B. Output in ``output.dir``: ``<name>.safetensors``, a complete LoRA-MoE (base, experts,
one learned router per DiT, the gate defaults) that **Load LoRA-MoE** loads as it is; ``checkpoints/``,
``metrics.jsonl``, ``validation.json`` (held-out loss matrix, forced expert x class), ``ema_check.json``,
and pictures: losses, expert usage, the validation matrix and the learned gate schedules.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from moe_core.comfy_runtime import ensure_comfy

log = logging.getLogger("training")


class BaseLoraError(ValueError):
    """A base LoRA that does not fit the DiT it is given for (the message names the file and module)."""


@dataclass
class Stage2Result:
    lora_moe: Path
    out_dir: Path
    steps: int
    losses: list[float]
    checkpoint: Path | None
    metrics: Path
    plots: list[Path]
    validation: dict | None
    ema_check: dict
    trainer: Any = None


# ------------------------------------------------------------------------------------------- inputs

def parse_base_specs(specs: Sequence[str]) -> dict[str, Path]:
    """``["high_noise:a.safetensors", "low_noise:b.safetensors"]`` or ``["a.safetensors"]`` (all DiTs)."""
    out: dict[str, Path] = {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        name, path = (head, rest) if sep and head in ("default", "high_noise", "low_noise") else ("*", spec)
        if name in out:
            raise BaseLoraError(f"--base-lora given twice for {'every DiT' if name == '*' else name}")
        out[name] = Path(path)
    return out


def _lora_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception:  # load_lora reports unreadable files with the file named
        return {}


class Stage2Hooks:
    """What stage 2 plugs into the shared setup (:func:`training.stage1.setup_stage1`)."""

    def __init__(self, cfg, base_loras: dict[str, Path], init_moe: Path | None, say: Callable[[str], None]):
        self.cfg = cfg
        self.base_specs = base_loras
        self.init_moe = None
        if init_moe is not None:
            from moe_core.checkpoint import load_lora_moe

            self.init_moe = load_lora_moe(init_moe)
            if self.init_moe.expert_names != list(cfg.moe.expert_names):
                raise BaseLoraError(f"{init_moe}: experts {self.init_moe.expert_names} differ from "
                                    f"moe.expert_names {list(cfg.moe.expert_names)}")
        if not base_loras and self.init_moe is None:
            raise BaseLoraError("stage 2 needs the frozen base: --base-lora PATH (one per DiT for A14B: "
                                "--base-lora high_noise:PATH --base-lora low_noise:PATH), or --init-moe FILE")
        self.say = say
        self.expert_names = list(cfg.moe.expert_names)
        self.routers: dict[str, Any] = {}
        self.base_sources: dict[str, str] = {}

    # -- banks ----------------------------------------------------------------------------------------

    def _base_for(self, name: str, dm) -> tuple[dict, str]:
        """The base adapters of DiT ``name``, checked against the model (modules, dims, noise range)."""
        from moe_core.lora_formats import load_lora

        from .models import recorded_family_problem

        path = self.base_specs.get(name, self.base_specs.get("*"))
        if path is None:
            raise BaseLoraError(f"no base LoRA for the {name} DiT, which the config trains (model.train_dits); "
                                f"--base-lora gives {sorted(self.base_specs)}: add --base-lora {name}:PATH")
        adapters = load_lora(path)
        meta = _lora_metadata(path)
        problem = recorded_family_problem(str(path), meta.get("wan_lora_moe_model"), dm)
        if problem:
            raise BaseLoraError(problem)
        recorded = meta.get("wan_lora_moe_set")
        if recorded and name != "default" and recorded != name and recorded != "default":
            raise BaseLoraError(f"{path}: this base LoRA was trained for the {recorded} DiT (t range "
                                f"{meta.get('wan_lora_moe_t_range', '?')}) but is given for the {name} DiT")
        for module, ad in adapters.items():
            try:
                layer = dm.get_submodule(module)
            except AttributeError:
                raise BaseLoraError(f"{path}: adapts '{module}', which the {name} DiT does not have (a LoRA for "
                                    f"another model? the DiT has {len(dm.blocks)} blocks)") from None
            if not hasattr(layer, "in_features"):
                raise BaseLoraError(f"{path}: '{module}' is not a Linear layer of the DiT")
            if (ad.down.shape[1], ad.up.shape[0]) != (layer.in_features, layer.out_features):
                raise BaseLoraError(f"{path}: '{module}' is {ad.down.shape[1]}->{ad.up.shape[0]} but the {name} "
                                    f"DiT's layer is {layer.in_features}->{layer.out_features}: a LoRA for a model "
                                    "of other dimensions")
        return adapters, str(path)

    def make_bank(self, name: str, dm, spec, index: int):
        """Frozen base (buffers) + expert slots (fresh with up = 0, so step 0 is the stage-1 model)."""
        import torch

        from .adapters import AdapterBank, ProjectionSlots, Slot
        from .models import recorded_family_problem

        cfg = self.cfg
        n = len(self.expert_names)
        train_experts = cfg.router.train != "router_only"
        if self.init_moe is not None:
            if name not in self.init_moe.sets:
                raise BaseLoraError(f"{self.init_moe.source}: has no '{name}' set (holds {list(self.init_moe.sets)})")
            aset = self.init_moe.sets[name]
            problem = recorded_family_problem(f"{self.init_moe.source} (set {name})", aset.model, dm)
            if problem:
                raise BaseLoraError(problem)
            self._check_modules_exist(aset.modules, dm, self.init_moe.source, name)
            self.base_sources[name] = self.init_moe.source
            if aset.router is not None:
                from moe_core.routing import LearnedRouter

                self.routers[name] = LearnedRouter.from_state_dict(aset.router).train()
            return AdapterBank.from_adapter_set(aset, n, range(1, 1 + n) if train_experts else ())
        if not train_experts:
            raise BaseLoraError("router.train = \"router_only\" needs trained experts: give --init-moe with a "
                                "stage-2 LoRA-MoE file")
        base, source = self._base_for(name, dm)
        self.base_sources[name] = source
        gen = torch.Generator().manual_seed(int(cfg.train.seed) + 7919 * index + 1)
        targets = spec.modules()
        names, projs = [], []
        for module in sorted(set(base) | set(targets), key=_module_order):
            layer = dm.get_submodule(module)
            b = base.get(module)
            slots = [None if b is None else Slot(b.down, b.up, b.alpha, trainable=False)]
            if module in targets:
                rank = max(1, round(targets[module] * cfg.moe.expert_rank_scale))
                alpha = cfg.moe.expert_alpha or (b.alpha if b is not None else cfg.lora.alpha)
                slots += [Slot.new(layer.in_features, layer.out_features, rank, alpha, gen) for _ in range(n)]
            else:
                slots += [None] * n
            names.append(module)
            projs.append(ProjectionSlots(layer.in_features, layer.out_features, slots))
        return AdapterBank(names, projs, n)

    @staticmethod
    def _check_modules_exist(modules: dict, dm, source: str, name: str) -> None:
        for module, pa in modules.items():
            try:
                layer = dm.get_submodule(module)
            except AttributeError:
                raise BaseLoraError(f"{source}: set '{name}' adapts '{module}', which the DiT does not have") from None
            if (layer.in_features, layer.out_features) != (pa.in_features, pa.out_features):
                raise BaseLoraError(f"{source}: '{module}' is {pa.in_features}->{pa.out_features}, the DiT's layer "
                                    f"{layer.in_features}->{layer.out_features}")

    # -- trainer --------------------------------------------------------------------------------------

    def make_trainer(self, cfg, dits, dataset, sampler, out_dir: Path, say, *, dataset_id: str, dist, callbacks,
                     model_sets):
        from moe_core.checkpoint import MoEDefaults
        from moe_core.gating import GateSettings
        from .config import config_to_dict
        from .loop import total_steps_for
        from .moe_losses import load_classifier
        from .stage1 import loop_settings
        from .stage2_eval import Subset, Validator, holdout_split, routing_targets
        from .stage2_loop import GateSpec, LossWeights, Stage2Trainer, Targets
        from .stage2_sampling import BalancedOrder
        from .stage2_router import make_routers

        names = self.expert_names
        keywords = cfg.keywords()
        teacher, label = routing_targets(dataset, names, keywords, cfg.moe.no_instrument)
        v = cfg.validation
        train_idx, val_idx = holdout_split(dataset, label, v.holdout_fraction, v.holdout_clips, cfg.train.seed)
        train_ds = Subset(dataset, train_idx)
        targets = Targets(teacher[train_idx], label[train_idx], names)
        counts = targets.label.sum(0).tolist()
        say("stage 2 data: " + ", ".join(f"{n_} {int(c)}" for n_, c in zip(names, counts))
            + f" training windows; {len(val_idx)} held-out window(s)")
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size
        total = total_steps_for(cfg.train.epochs, cfg.train.max_steps, len(train_ds), global_batch)
        settings = GateSettings(temperature=cfg.moe.temperature, top_k=cfg.moe.top_k,
                                max_gate=cfg.router.max_gate, clip_level=cfg.router.clip_level)
        spec = GateSpec(cfg.router.routing, settings, cfg.band(), cfg.moe.alpha_base, cfg.moe.alpha_expert)
        device = dits.dits[0].placement.device
        train_router = cfg.router.train != "experts_only"
        routers = make_routers(cfg, dits, targets, self.routers, settings, train_router, say)
        for r in routers.values():
            r.to(device)
        lw = cfg.loss
        weights = LossWeights(lw.diffusion, lw.roi, lw.teacher_kl, lw.entropy, lw.entropy_target, lw.load_balance,
                              lw.identity, lw.temporal, cfg.moe.rank_dropout)
        classifier = load_classifier(lw.identity_classifier, device) if lw.identity > 0 else None
        if lw.temporal > 0 and not any(train_ds[i].get("has_roi", False) for i in range(min(len(train_ds), 64))):
            raise BaseLoraError("loss.temporal > 0 needs ROI boxes (tip boxes in the manifest, .roi.json files): "
                                "no training window has one; set loss.temporal = 0")
        validator = None
        if val_idx:
            validator = Validator(Subset(dataset, val_idx), teacher[val_idx], label[val_idx], v.t_values, v.seed,
                                  v.every, v.early_stopping_patience)
        defaults = MoEDefaults(alpha_base=cfg.moe.alpha_base, alpha_expert=cfg.moe.alpha_expert, band=cfg.band(),
                               top_k=cfg.moe.top_k, ema_beta=cfg.moe.ema_beta, temperature=cfg.moe.temperature,
                               max_gate=cfg.router.max_gate, clip_level=cfg.router.clip_level)
        order = (BalancedOrder(targets.primary, cfg.train.seed) if cfg.monitor.balanced_sampler else None)
        split_id = hashlib.sha256(json.dumps(val_idx).encode()).hexdigest()[:12]
        trainer = Stage2Trainer(
            dits, train_ds, sampler, loop_settings(cfg, total), out_dir, config_to_dict(cfg), names,
            routers=routers, spec=spec, weights=weights, targets=targets, router_lr=cfg.router.learning_rate,
            defaults=defaults, expert_keywords=keywords, train_router=train_router, monitor=cfg.monitor,
            validator=validator, classifier=classifier, balanced_order=order,
            dataset_id=f"{dataset_id}:holdout-{split_id}", dist=dist, callbacks=callbacks, model_sets=model_sets)
        return trainer


def _module_order(module: str) -> tuple[int, str]:
    parts = module.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, module)


# ------------------------------------------------------------------------------------------------ run

def run_stage2(cfg, base_loras: dict[str, Path] | Sequence[str] | None = None, resume: str | None = None,
               overwrite: bool = False, init_moe: str | Path | None = None, encoders: tuple | None = None,
               callbacks: Sequence[Callable[[int, dict], None]] = (), log_fn: Callable[[str], None] = print
               ) -> Stage2Result:
    """Run stage 2 for a validated :class:`~training.stage2_config.Stage2Config` (the CLI and tests call this).

    Args:
        base_loras: ``{"high_noise": path, "low_noise": path}`` / ``{"default": path}`` or ``--base-lora``
            style strings; on ``resume`` the checkpoint's own base is used.
        init_moe: start from a LoRA-MoE file (its base, experts and routers), e.g. for ``router_only``.
    """
    import torch

    from moe_core.atomic import atomic_write_text
    from moe_core.checkpoint import save_lora_moe
    from .config import to_toml
    from .stage1 import setup_stage1
    from .stage2_report import ema_check, write_stage2_pictures

    if base_loras is None:
        specs: dict[str, Path] = {}
    elif isinstance(base_loras, dict):
        specs = {k: Path(v) for k, v in base_loras.items()}
    else:
        specs = parse_base_specs(base_loras)
    if resume is not None and not specs and init_moe is None:
        init_moe = _resume_weights(cfg, resume)  # the checkpoint holds the frozen base
    hooks = Stage2Hooks(cfg, specs, Path(init_moe) if init_moe else None, log_fn)
    setup = setup_stage1(cfg, resume, overwrite, encoders, callbacks, log_fn, hooks=hooks)
    cfg, trainer, dist, say = setup.cfg, setup.trainer, setup.dist, setup.say
    out_dir = Path(cfg.output.dir)
    try:
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "config.toml", to_toml(cfg))
        start = time.time()
        result = trainer.train()
        validation = None
        if trainer.validator is not None:
            say("validating on the held-out clips (every expert forced, experts off, routed)")
            validation = trainer.validator.full(trainer)
        check = ema_check(trainer, cfg)
        if check["ema_beta_written"] != trainer.defaults.ema_beta:
            say(f"EMA check: the learned router's gates move up to {check['max_gap']:.3f} between steps, more than "
                f"router.ema_tolerance {cfg.router.ema_tolerance}: the file's default ema_beta is set to 0")
            trainer.defaults.ema_beta = check["ema_beta_written"]
        path = out_dir / f"{cfg.output.name}.safetensors"
        plots: list[Path] = list(result.plots)
        if dist.is_main:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.output.save_dtype]
            save_lora_moe(trainer.lora_moe(), path, dtype=None if dtype == torch.float32 else dtype)
            if validation is not None:
                atomic_write_text(out_dir / "validation.json", json.dumps(validation, indent=1) + "\n")
            atomic_write_text(out_dir / "ema_check.json", json.dumps(check, indent=1) + "\n")
            if cfg.output.plot:
                plots += write_stage2_pictures(trainer, cfg, out_dir, validation)
        dist.barrier()
        if dist.is_main:
            say(f"done: {result.steps} steps in {time.time() - start:.1f} s" +
                (f"; final loss {result.losses[-1]:.4f}" if result.losses else ""))
            say(f"  LoRA-MoE: {path}")
            if validation is not None:
                plain = validation["plain"]
                say(f"  held-out loss: routed {validation['val_loss']:.4f}, experts off (stage 1) "
                    f"{validation['val_loss_base']:.4f}; own expert best on every class: "
                    f"{plain['diagonal_dominant']}; router agrees with the teacher on "
                    f"{validation['router_agreement'] if validation['router_agreement'] is not None else float('nan'):.0%}")
            say(f"  metrics: {result.metrics}; pictures: {', '.join(p.name for p in plots)}")
            for w in trainer.mon.warned:
                say(f"  warning: {w}")
        return Stage2Result(path, out_dir, result.steps, result.losses, result.checkpoint, result.metrics, plots,
                            validation, check, trainer)
    finally:
        if dist.initialized_here:
            torch.distributed.destroy_process_group()


def _resume_weights(cfg, resume: str) -> Path:
    from .loop import ResumeError, latest_checkpoint

    p = Path(cfg.output.dir if resume == "auto" else resume)
    if p.is_file() and p.name.endswith(".state.pt"):
        import torch

        state = torch.load(p, map_location="cpu", weights_only=True)
        return p.parent / state["weights"]
    pointer = latest_checkpoint(p if (p / "checkpoints").is_dir() else p.parent)
    if pointer is None:
        raise ResumeError(f"{p}: no checkpoint to resume from (no checkpoints/latest.json); start without --resume")
    ckdir = (p / "checkpoints") if (p / "checkpoints").is_dir() else p
    return ckdir / pointer["weights"]


# -------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.stage2",
        description="Stage 2 of the WAN LoRA-MoE: expert LoRAs and the learned router on the frozen stage-1 base.",
        epilog="Any config key can be overridden: --set train.learning_rate=1e-5 or --train.learning_rate 1e-5. "
               "Run with --print-config to see every key.")
    p.add_argument("--config", type=Path, help="TOML config (see training/configs/stage2.toml)")
    p.add_argument("--base-lora", action="append", default=[], metavar="[SET:]PATH",
                   help="the stage-1 base LoRA (any LoRA format); A14B: once per DiT as high_noise:PATH, "
                        "low_noise:PATH")
    p.add_argument("--init-moe", type=Path, help="start from a LoRA-MoE file (base, experts, routers)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue the run in output.dir from its newest checkpoint, or from PATH (.state.pt)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an output.dir that holds one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    return p


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors the stage-2 CLIs report as one clear line (exit 2): stage 1's, plus base, split and routing ones."""
    from moe_core.routing import RoutingError
    from .stage1 import _known_errors
    from .stage2_eval import HoldoutError
    from .stage2_router import RouterSetupError

    return _known_errors() + (BaseLoraError, HoldoutError, RoutingError, RouterSetupError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_comfy()
    from .config import ConfigError, load_config, split_dotted_flags, to_toml
    from .stage2_config import Stage2Config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rest, dotted = split_dotted_flags(argv, Stage2Config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    errors = known_errors()
    try:
        cfg = load_config(Stage2Config, args.config, list(args.overrides) + list(dotted))
        if args.print_config:
            print(to_toml(cfg), end="")
            return 0
        if not args.config:
            print("error: give --config run.toml (see training/configs/stage2.toml); --print-config shows every key",
                  file=sys.stderr)
            return 2
        run_stage2(cfg, args.base_lora, resume=args.resume, overwrite=args.overwrite, init_moe=args.init_moe)
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume (same config)", file=sys.stderr)
        return 130
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
