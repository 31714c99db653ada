"""From per-clip measurements to the report: per-set metrics with intervals, paired arm comparisons, FVD.

Per-clip quantities are kept as (numerator, denominator) pairs so that every set-level number is a ratio of
sums and can be bootstrapped by clusters (``stats.py``). The real set is reported like an arm and marked as
the ceiling; arms are paired with the reference arm on shared prompt/seed keys.
"""
from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .fvd import compare_feature_sets
from .identity import confusion_matrix, metrics_from_confusion
from .resize import describe
from .stats import bootstrap_ratio, bootstrap_statistic, mcnemar_exact, paired_bootstrap_ratio, wilson_interval
from .temporal import PSNR_CAP_DB, psnr_from_mse

REPORT_FORMAT = "wan-lora-moe-eval"
REPORT_VERSION = 1

Pair = tuple[float, float]


def _temporal_metrics() -> list[tuple[str, Callable[[Any], Pair | None]]]:
    def psnr(r):
        t = r.temporal
        return (psnr_from_mse(t.sse / t.count), 1.0) if t is not None and t.count > 0 else None

    def psnr_roi(r):
        t = r.temporal
        return (psnr_from_mse(t.roi_sse / t.roi_count), 1.0) if t is not None and t.roi_count > 0 else None

    def per_pair(attr):
        return lambda r: ((getattr(r.temporal, attr) / r.temporal.pairs, 1.0)
                          if r.temporal is not None and r.temporal.pairs else None)

    def roi_motion(r):
        t = r.temporal
        return (t.roi_motion / t.roi_pixels, 1.0) if t is not None and t.roi_pixels > 0 else None

    def lpips(r):
        t = r.temporal
        return (t.lpips / t.lpips_pairs, 1.0) if t is not None and t.lpips_pairs else None

    def lpips_roi(r):
        t = r.temporal
        return (t.roi_lpips / t.roi_lpips_weight, 1.0) if t is not None and t.roi_lpips_weight > 0 else None

    return [("warped_psnr", psnr), ("warped_psnr_roi", psnr_roi), ("motion_px", per_pair("motion")),
            ("motion_px_roi", roi_motion), ("valid_fraction", per_pair("valid_fraction")),
            ("lpips", lpips), ("lpips_roi", lpips_roi)]


def _tip_metrics(px: Sequence[float], norm: Sequence[float]) -> list[tuple[str, Callable[[Any], Pair | None]]]:
    def has(r, attr):
        return r.tips is not None and getattr(r.tips, attr) > 0

    out: list[tuple[str, Callable[[Any], Pair | None]]] = [
        ("detection_rate", lambda r: (r.tips.detected, r.tips.frames) if has(r, "frames") else None)]
    for i, t in enumerate(px):
        out.append((f"pck@{t:g}px", lambda r, i=i: (r.tips.hits_px[i], r.tips.annotated)
                    if has(r, "annotated") else None))
    for i, t in enumerate(norm):
        out.append((f"pck@{t:g}diag", lambda r, i=i: (r.tips.hits_norm[i], r.tips.annotated)
                    if has(r, "annotated") else None))
    out.append(("iou", lambda r: (r.tips.iou_sum, r.tips.box_annotated) if has(r, "box_annotated") else None))
    out.append(("iou>=0.5", lambda r: (r.tips.iou50, r.tips.box_annotated) if has(r, "box_annotated") else None))
    return out


def _cluster(result, config) -> str:
    return result.clip.prompt_id if config.cluster == "prompt" else result.clip.key


def _set_ratio_metrics(results, metrics, config, n_boot) -> dict:
    out = {}
    for name, fn in metrics:
        rows = [(fn(r), _cluster(r, config)) for r in results]
        rows = [(v, c) for v, c in rows if v is not None]
        if not rows:
            continue
        num, den = zip(*(v for v, _ in rows))
        out[name] = bootstrap_ratio(num, den, [c for _, c in rows], n_boot, config.level, config.seed)
    return out


def _identity(results, config, n_boot) -> dict | None:
    classified = [r for r in results if r.probs is not None]
    if not classified:
        return None
    labelled = [r for r in classified if r.clip.label is not None]
    names = list(config.class_names)
    out: dict[str, Any] = {"classified": len(classified), "labelled": len(labelled),
                           "label_sources": dict(Counter(r.clip.label_source for r in labelled)), "classes": names}
    if not labelled:
        out["note"] = "no clip has a reference instrument (annotation, or a prompt naming exactly one)"
        return out
    y_true = np.array([r.clip.label for r in labelled])
    y_pred = np.array([int(np.argmax(r.probs)) for r in labelled])
    clusters = [_cluster(r, config) for r in labelled]
    cm = confusion_matrix(y_true, y_pred, len(names))
    point = metrics_from_confusion(cm)
    correct = int((y_true == y_pred).sum())
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        ci = bootstrap_statistic(len(labelled), clusters, lambda w, m=metric: metrics_from_confusion(
            confusion_matrix(y_true, y_pred, len(names), w))[m], n_boot, config.level, config.seed)
        out[metric] = {"value": point[metric], "ci": ci, "n": len(labelled)}
    out["accuracy"]["wilson"] = list(wilson_interval(correct, len(labelled), config.level))
    out["confusion"] = cm.astype(int).tolist()
    return out


def _paired(a_results, b_results, config, n_boot, metrics) -> dict:
    a_by, b_by = {r.clip.key: r for r in a_results}, {r.clip.key: r for r in b_results}
    keys = sorted(set(a_by) & set(b_by))
    out: dict[str, Any] = {"n_pairs": len(keys), "metrics": {}}
    if not keys:
        out["note"] = "no shared prompt/seed keys: arms cannot be paired"
        return out
    for name, fn in metrics:
        rows = [(fn(a_by[k]), fn(b_by[k]), _cluster(a_by[k], config)) for k in keys]
        rows = [row for row in rows if row[0] is not None and row[1] is not None]
        if not rows:
            continue
        (na, da), (nb, db) = zip(*(r[0] for r in rows)), zip(*(r[1] for r in rows))
        out["metrics"][name] = paired_bootstrap_ratio(na, da, nb, db, [r[2] for r in rows], n_boot, config.level,
                                                      config.seed)
    both = [k for k in keys if a_by[k].probs is not None and b_by[k].probs is not None
            and a_by[k].clip.label is not None and a_by[k].clip.label == b_by[k].clip.label]
    if both:
        ok_a = np.array([int(np.argmax(a_by[k].probs)) == a_by[k].clip.label for k in both], float)
        ok_b = np.array([int(np.argmax(b_by[k].probs)) == b_by[k].clip.label for k in both], float)
        a_only, b_only = int((ok_a > ok_b).sum()), int((ok_b > ok_a).sum())
        ones = np.ones(len(both))
        out["metrics"]["accuracy"] = paired_bootstrap_ratio(ok_a, ones, ok_b, ones,
                                                            [_cluster(a_by[k], config) for k in both], n_boot,
                                                            config.level, config.seed)
        out["mcnemar"] = {"n_pairs": len(both), "reference_only_correct": a_only, "arm_only_correct": b_only,
                          "p_value": mcnemar_exact(a_only, b_only)}
    return out


def _fvd(results, models, reference_sets, reference, config, errors, warnings, partial) -> dict:
    out: dict[str, Any] = {}
    if not models.encoders:
        return out
    if "real" not in results:
        errors.append({"where": "fvd", "message": "FVD/KVD need the real set (--real)"})
        return out
    if partial:
        return {"note": "computed when every set is done"}
    for encoder in models.encoders:
        name = encoder.spec.name
        real = {r.clip.key: r.features[name] for r in results["real"] if name in r.features}
        arms = {a: {r.clip.key: r.features[name] for r in results[a] if name in r.features} for a in reference_sets}
        try:
            entry = compare_feature_sets(real, arms, config.seed, config.floor_splits, config.fvd_bootstrap, reference,
                                         config.level)
        except ValueError as exc:
            errors.append({"where": f"fvd/{name}", "message": str(exc)})
            continue
        warnings.extend(f"{name}: {w}" for w in entry["warnings"])
        entry["protocol"] = encoder.spec.protocol()
        out[name] = entry
    return out


def _clip_rows(results, config) -> list[dict]:
    names = list(config.class_names)
    rows = []
    for r in results:
        c = r.clip
        row = {"clip": c.name, "key": c.key, "prompt_id": c.prompt_id, "seed": c.seed, "frames": r.frames,
               "label": None if c.label is None else names[c.label], "label_source": c.label_source,
               "roi_source": r.roi_source}
        if r.temporal is not None:
            row["temporal"] = r.temporal.summary()
        if r.tips is not None:
            row["tips"] = r.tips.summary(config.pck_px, config.pck_norm)
        if r.probs is not None:
            row["prediction"] = names[int(np.argmax(r.probs))]
            row["probabilities"] = [round(float(p), 6) for p in r.probs]
        rows.append(row)
    return rows


def protocols(config, models) -> dict[str, Any]:
    return {
        "temporal": {"flow": config.flow.describe(),
                     "warped_psnr": f"per clip: 10 log10(255^2 / MSE) with the MSE pooled over consecutive pairs "
                                    f"and non-occluded pixels (RGB), capped at {PSNR_CAP_DB:g} dB; set value: mean "
                                    "over clips. A frozen clip scores the cap: read it with motion_px.",
                     "roi": "tip boxes from annotations, else from the tip detector (nearest evaluated frame); "
                            "pixels whose centre is inside the box",
                     "lpips": (f"LPIPS v0.1 ({config.lpips_net}, user weights) every {config.lpips_stride}th pair, "
                               "occluded pixels filled from the target") if config.lpips else None},
        "video_quality": {e.spec.name: e.spec.protocol() for e in models.encoders},
        "tips": None if models.detector is None else {
            "detector_input": models.detector.protocol(), "threshold": config.detector_threshold,
            "frames": f"every {config.detector_stride}th frame",
            "pck": "hit when detected and tip distance <= threshold (pixels, or fraction of the frame diagonal); "
                   "a missed detection is a miss and IoU 0; reference tip: annotated tip, else the tip box centre"},
        "identity": None if models.classifier is None else models.classifier.protocol(),
        "statistics": {"bootstrap": config.bootstrap, "level": config.level, "cluster": config.cluster,
                       "seed": config.seed, "intervals": "percentile bootstrap over clusters (ratio of sums); "
                       "Wilson for accuracy; paired arms: same clusters in both arms, interval of the difference; "
                       "McNemar exact on per-clip correctness"},
        "fvd_resize": describe(config.fvd_resize, 224, 224),
    }


def aggregate(sets: Mapping, results: Mapping[str, list], config, models, reference: str | None,
              warnings: list[str], errors: list[dict], partial: bool = False) -> dict[str, Any]:
    """The report dict (``partial``: point values only, no bootstrap, no FVD: for the interim writes)."""
    n_boot = 0 if partial else config.bootstrap
    errors_local = list(errors)
    warnings_local = list(warnings)
    temporal_m = _temporal_metrics()
    tip_m = _tip_metrics(config.pck_px, config.pck_norm)
    metrics: dict[str, dict] = {"temporal": {}, "tips": {}, "identity": {}}
    for name, res in results.items():
        if config.temporal:
            metrics["temporal"][name] = _set_ratio_metrics(res, temporal_m, config, n_boot)
        if models.detector is not None:
            metrics["tips"][name] = _set_ratio_metrics(res, tip_m, config, n_boot)
        if models.classifier is not None:
            identity = _identity(res, config, n_boot)
            if identity is not None:
                metrics["identity"][name] = identity
    arms = [n for n in results if n != "real"]
    metrics["video_quality"] = _fvd(results, models, arms, reference, config, errors_local, warnings_local, partial)
    paired = {}
    if reference is not None and reference in results:
        for arm in arms:
            if arm != reference:
                paired[f"{arm} vs {reference}"] = _paired(results[reference], results[arm], config, n_boot,
                                                          temporal_m + tip_m)
    return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "partial": partial,
            "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "config": config.to_dict(), "protocols": protocols(config, models),
            "sets": {name: s.describe() | {"evaluated": len(results.get(name, [])),
                                           "role": "real (ceiling)" if name == "real" else "arm"}
                     for name, s in sets.items()},
            "reference_arm": reference, "metrics": metrics, "paired": paired,
            "clips": {name: _clip_rows(res, config) for name, res in results.items()},
            "warnings": list(dict.fromkeys(warnings_local)), "errors": errors_local}


__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "aggregate", "protocols"]
