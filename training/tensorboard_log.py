"""TensorBoard event files beside ``metrics.jsonl`` (``output.tensorboard``), an optional dependency.

``torch.utils.tensorboard`` needs the ``tensorboard`` package; without it the run warns once and keeps the
JSONL log only. Every numeric metric of a logged step goes under ``train/<name>``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("training")


def open_writer(out_dir: Path, step: int = 0):
    """A ``SummaryWriter`` on ``out_dir/tensorboard``, or None (with one warning) without the package.

    On resume (``step`` > 0) events an interrupted run logged after ``step`` are purged, as metrics.jsonl is cut.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("output.tensorboard = true, but the tensorboard package is not installed (pip install "
                    "tensorboard); writing metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=step if step else None)


def log_scalars(writer, metrics: dict[str, Any], step: int) -> None:
    for key, value in metrics.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(f"train/{key}", value, step)


__all__ = ["log_scalars", "open_writer"]
