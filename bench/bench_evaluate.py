"""Evaluation speed on CPU: decoding + optical flow + warped PSNR (whole frame and tip ROI), no neural features.

    python bench/bench_evaluate.py                      # 4 synthetic clips, 81 frames, 832x480, DIS fast at 0.5
    python bench/bench_evaluate.py --clips 8 --workers 2 --preset medium --flow-scale 1.0

Synthetic laparoscopy-like clips (``training.data.synthetic``: textured tissue, a moving instrument, per-frame
tip boxes as annotations) are rendered once into a temporary folder as H.264 mp4, then evaluated exactly as
``python -m training.evaluate`` does (``training.evaluation.pipeline.process_set``: decode every frame, flow in
both directions for every consecutive pair, forward-backward occlusion mask, warp, squared errors, ROI).
Prints clips per second and the time extrapolated to ``--target`` clips (160 by default: the size of a
typical study), with the flow settings used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def render_clips(folder: Path, count: int, frames: int, width: int, height: int) -> None:
    from training.data.synthetic import render_clip, write_clip

    for i in range(count):
        clip = render_clip(i % 4, seed=i, width=width, height=height, fps=16.0, seconds=frames / 16.0)
        write_clip(clip, folder, f"p{i}_seed0")
        (folder / f"p{i}_seed0.json").write_text(json.dumps({"roi_boxes": clip.boxes}), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from training.evaluation.pipeline import EvalConfig, Models, process_set
    from training.evaluation.temporal import DIS_PRESETS, FlowConfig
    from training.evaluation.videos import load_clip_set

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=4, help="clips measured")
    p.add_argument("--target", type=int, default=160, help="clip count to extrapolate to")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--flow", choices=("dis", "farneback"), default="dis")
    p.add_argument("--preset", choices=DIS_PRESETS, default="fast")
    p.add_argument("--flow-scale", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=1, help="clips in parallel (threads)")
    p.add_argument("--keep", type=Path, help="render into this folder (reused if it has the clips)")
    args = p.parse_args(argv)

    import cv2

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.mp4"))) < args.clips:
        start = time.perf_counter()
        render_clips(folder, args.clips, args.frames, args.width, args.height)
        print(f"rendered {args.clips} clips of {args.frames} frames at {args.width}x{args.height} "
              f"in {time.perf_counter() - start:.1f} s (not part of the measurement)")
    clip_set = load_clip_set("bench", folder)
    clip_set.clips = clip_set.clips[:args.clips]
    config = EvalConfig(flow=FlowConfig(method=args.flow, preset=args.preset, scale=args.flow_scale),
                        workers=args.workers)
    models = Models([], None, None, None)
    errors: list[dict] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    results = process_set(clip_set, models, config, errors)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if errors:
        print("errors:", errors)
        return 1
    rate = len(results) / elapsed
    pairs = sum(r.temporal.pairs for r in results)
    print(f"flow: {config.flow.describe()}")
    print(f"workers: {args.workers}; OpenCV threads: {cv2.getNumThreads()}; CPU cores: {os.cpu_count()}")
    print(f"{len(results)} clips ({pairs} frame pairs) in {elapsed:.1f} s: {rate:.3f} clips/s, "
          f"{elapsed / len(results):.1f} s per clip, {1000 * elapsed / pairs:.0f} ms per pair")
    print(f"extrapolated: {args.target} clips in {args.target / rate / 60:.1f} min")
    print(f"CPU time: {cpu / len(results):.1f} CPU-s per clip ({args.target} clips: {args.target * cpu / len(results) / 60:.1f} "
          f"CPU-min; wall time above it means the cores were shared with other work, below it means parallelism)")
    decode_start = time.process_time()
    from training.evaluation.videos import read_frames

    read_frames(clip_set.clips[0].path)
    print(f"of which decoding one clip: {time.process_time() - decode_start:.2f} CPU-s")
    psnr = [r.temporal.summary()["warped_psnr"] for r in results]
    roi = [r.temporal.summary()["warped_psnr_roi"] for r in results]
    print(f"warped PSNR per clip (dB): {', '.join(f'{v:.2f}' for v in psnr)}; ROI: "
          f"{', '.join(f'{v:.2f}' for v in roi if v is not None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
