"""Evaluate folders of generated (and real) clips offline.

    python -m training.evaluate --arm lora=renders/lora --arm moe=renders/moe --real data/heldout \
        --out eval/ [--i3d i3d_torchscript.pt --i3d-sha256 HEX] [--classifier cls.pt] [--detector tips.pt]

Each ``--arm NAME=PATH`` (and ``--real PATH``) is a folder of videos or a training manifest (.jsonl).
Clips named ``<prompt>_seed<k>.mp4`` (or with a ``<stem>.json`` sidecar) are paired across arms by prompt and
seed. Every model is a local TorchScript file (checked with ``--*-sha256`` when given); nothing is
downloaded, and a metric whose model is not given is skipped. Writes ``report.json`` and ``report.html``
into ``--out`` and prints a summary. Metrics, protocols and file formats: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from moe_core.vocabulary import DEFAULT_EXPERT_NAMES
from training.evaluation.features import parse_encoder_spec
from training.evaluation.pipeline import EvalConfig, evaluate
from training.evaluation.report import format_summary
from training.evaluation.resize import RESIZE_MODES
from training.evaluation.temporal import DIS_PRESETS, FlowConfig
from training.evaluation.videos import EvalInputError


def _arm(text: str) -> tuple[str, str]:
    if "=" in text:
        name, path = text.split("=", 1)
        if not name:
            raise argparse.ArgumentTypeError(f"--arm {text!r}: empty name before '='")
        return name, path
    return Path(text).stem or text, text


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 832x480), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and output")
    io.add_argument("--arm", action="append", type=_arm, default=[], metavar="NAME=PATH",
                    help="a set of generated clips (folder or .jsonl manifest); repeat for several arms")
    io.add_argument("--real", help="real clips (folder or manifest): FVD reference and ceilings")
    io.add_argument("--reference", help="arm the others are paired against (default: the first --arm)")
    io.add_argument("--out", type=Path, help="folder for report.json and report.html")
    io.add_argument("--max-frames", type=int, help="use only the first N frames of each clip")
    io.add_argument("--min-clips", type=int, default=2, help="a set with fewer readable clips is an error")
    io.add_argument("--strict", action="store_true", help="clips of differing size/length/fps are errors")
    io.add_argument("--classes", default=",".join(DEFAULT_EXPERT_NAMES),
                    help="instrument class names, comma-separated, in the classifier's output order")
    io.add_argument("--device", default="cpu", help="torch device for the networks")
    io.add_argument("--workers", type=int, default=1, help="clips processed in parallel (threads)")

    vq = p.add_argument_group("video quality (FVD / KVD)")
    vq.add_argument("--i3d", help="StyleGAN-V i3d_torchscript.pt (local path)")
    vq.add_argument("--i3d-sha256")
    vq.add_argument("--fvd-resize", choices=RESIZE_MODES, default="letterbox",
                    help="how frames are fitted to 224x224 (center-crop cuts the frame sides)")
    vq.add_argument("--fvd-windows", type=int, default=1, help="16-frame windows per clip")
    vq.add_argument("--encoder", action="append", type=parse_encoder_spec, default=[],
                    metavar="name=..,path=..[,frames=16,size=224,resize=letterbox,range=signed,kw.KEY=V]",
                    help="another TorchScript video encoder for FD/KVD")
    vq.add_argument("--fvd-bootstrap", type=int, default=100, help="bootstrap replicates for the paired FVD/KVD difference to the reference arm")
    vq.add_argument("--floor-splits", type=int, default=10, help="random real/real splits for the floor")

    tm = p.add_argument_group("temporal stability")
    tm.add_argument("--no-temporal", dest="temporal", action="store_false", help="skip warped PSNR")
    tm.add_argument("--flow", choices=("dis", "farneback"), default="dis")
    tm.add_argument("--dis-preset", choices=DIS_PRESETS, default="fast")
    tm.add_argument("--flow-scale", type=float, default=0.5, help="flow estimated on frames scaled by this")
    tm.add_argument("--lpips", action="store_true", help="also LPIPS (needs the lpips package and --lpips-backbone)")
    tm.add_argument("--lpips-backbone", help="torchvision weights of the LPIPS trunk (local path)")
    tm.add_argument("--lpips-sha256")
    tm.add_argument("--lpips-net", choices=("alex", "vgg", "squeeze"), default="alex")
    tm.add_argument("--lpips-stride", type=int, default=4, help="LPIPS on every k-th frame pair")

    tp = p.add_argument_group("tip localisation")
    tp.add_argument("--detector", help="TorchScript tip detector: [B,3,H,W] in [0,1] -> [B,7]")
    tp.add_argument("--detector-sha256")
    tp.add_argument("--detector-size", type=_size, help="detector input WIDTHxHEIGHT (default: clip size)")
    tp.add_argument("--detector-resize", choices=RESIZE_MODES, default="letterbox")
    tp.add_argument("--detector-threshold", type=float, default=0.5)
    tp.add_argument("--detector-stride", type=int, default=4, help="run the detector on every k-th frame")
    tp.add_argument("--pck-px", type=_floats, default=(5.0, 10.0, 20.0), help="PCK thresholds in pixels")
    tp.add_argument("--pck-diag", type=_floats, default=(0.01, 0.02, 0.05),
                    help="PCK thresholds as fractions of the frame diagonal")

    ident = p.add_argument_group("identity")
    ident.add_argument("--classifier", help="TorchScript instrument classifier: [B,3,S,S] in [0,1] -> [B,C]")
    ident.add_argument("--classifier-sha256")
    ident.add_argument("--classifier-input", choices=("frame", "roi"), default="frame")
    ident.add_argument("--classifier-size", type=int, default=224)
    ident.add_argument("--classifier-resize", choices=RESIZE_MODES, default="letterbox")
    ident.add_argument("--classifier-frames", type=int, default=8, help="frames classified per clip")

    st = p.add_argument_group("statistics")
    st.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
    st.add_argument("--cluster", choices=("video", "prompt"), default="video",
                    help="bootstrap unit: each clip, or all seeds of a prompt together")
    st.add_argument("--level", type=float, default=0.95, help="interval level")
    st.add_argument("--seed", type=int, default=0)
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        device=args.device, max_frames=args.max_frames, class_names=tuple(c.strip() for c in args.classes.split(",")),
        min_clips=args.min_clips, strict=args.strict, workers=args.workers, temporal=args.temporal,
        flow=FlowConfig(method=args.flow, preset=args.dis_preset, scale=args.flow_scale), lpips=args.lpips,
        lpips_backbone=args.lpips_backbone, lpips_sha256=args.lpips_sha256, lpips_net=args.lpips_net,
        lpips_stride=args.lpips_stride, i3d=args.i3d, i3d_sha256=args.i3d_sha256, fvd_resize=args.fvd_resize,
        fvd_windows=args.fvd_windows, encoders=list(args.encoder), fvd_bootstrap=args.fvd_bootstrap,
        floor_splits=args.floor_splits, classifier=args.classifier, classifier_sha256=args.classifier_sha256,
        classifier_input=args.classifier_input, classifier_size=args.classifier_size,
        classifier_resize=args.classifier_resize, classifier_frames=args.classifier_frames, detector=args.detector,
        detector_sha256=args.detector_sha256, detector_size=args.detector_size, detector_resize=args.detector_resize,
        detector_threshold=args.detector_threshold, detector_stride=args.detector_stride, pck_px=args.pck_px,
        pck_norm=args.pck_diag, bootstrap=args.bootstrap, cluster=args.cluster, level=args.level, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.arm:
        parser.error("give at least one --arm NAME=PATH")
    names = [n for n, _ in args.arm]
    if len(set(names)) != len(names):
        parser.error(f"arm names must be unique, got {names}")
    try:
        config = config_from_args(args)
        report = evaluate(dict(args.arm), args.real, config, args.out, args.reference)
    except (EvalInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    if args.out is not None:
        print(f"report: {args.out / 'report.html'} (and report.json)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
