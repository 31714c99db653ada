"""Offline evaluation of folders of clips: video quality (FVD/KVD), temporal stability, tips, identity.

``evaluate(arms, real, config, out_dir)`` (``pipeline.py``) is the entry point for the CLI
(``python -m training.evaluate``) and for runners that render arms first. Modules by responsibility:
``videos`` (sets of clips, keys, annotations, checks), ``features`` (TorchScript models, video features),
``fvd`` (Fréchet distance, KVD), ``temporal`` (flow, warped PSNR), ``perceptual`` (optional LPIPS),
``tips`` (PCK, IoU), ``identity`` (classifier metrics), ``stats`` (bootstrap, Wilson, McNemar),
``aggregate`` (set metrics and paired comparisons) and ``report`` (JSON + HTML). See docs/evaluation.md.
"""
from __future__ import annotations

from .pipeline import EvalConfig, evaluate
from .videos import EvalInputError

__all__ = ["EvalConfig", "EvalInputError", "evaluate"]
