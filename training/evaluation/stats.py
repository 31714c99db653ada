"""Intervals and tests a reviewer expects: clustered and paired bootstrap, Wilson intervals, McNemar.

Every per-clip metric here is a *ratio of sums* over units (clips): ``sum(num) / sum(den)`` (a mean of
per-clip values has den = 1; PCK has hits over annotated frames). The bootstrap resamples clusters with
replacement and gives every unit of a drawn cluster that weight, so frames of one video (or, with
``cluster="prompt"``, every seed of one prompt) move together: intervals are not made narrower by treating
correlated frames as independent. Arms compared on the same prompts and seeds are *paired*: the same
resampled clusters enter both arms, and the interval is that of the difference.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sensible at 0 or n successes and small n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (A right & B wrong, A wrong & B right)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def cluster_weights(clusters: Sequence, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n_units]`` bootstrap weights: each replicate draws the clusters with replacement and gives
    every unit the number of times its cluster was drawn."""
    labels, inverse = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    k = len(labels)
    counts = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)  # [n_boot, k]
    return counts[:, inverse].astype(np.float64)


def _percentile(values: np.ndarray, level: float) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def ratio(num: np.ndarray, den: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """``sum(w num) / sum(w den)`` for one weight vector or a ``[B, n]`` matrix of them."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if weights is None:
        return float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ num) / (weights @ den)


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], clusters: Sequence, n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0,
                    transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Point value and clustered percentile interval of ``sum(num) / sum(den)`` (optionally transformed)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    f = transform or (lambda v: v)
    value = float(f(np.asarray(ratio(num, den))))
    out = {"value": value, "n": int(len(num)), "clusters": int(len(set(map(str, clusters))))}
    if out["clusters"] < 2 or n_boot <= 0:
        out["ci"] = None
        return out
    weights = cluster_weights(clusters, n_boot, np.random.default_rng(seed))
    out["ci"] = _percentile(f(ratio(num, den, weights)), level)
    return out


def paired_bootstrap_ratio(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                           den_b: Sequence[float], clusters: Sequence, n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Difference B - A of two ratios over the *same* units (row i of A and B: the same prompt and seed),
    with one set of cluster weights for both arms."""
    f = transform or (lambda v: v)
    a = [np.asarray(v, np.float64) for v in (num_a, den_a)]
    b = [np.asarray(v, np.float64) for v in (num_b, den_b)]
    diff = float(f(np.asarray(ratio(*b))) - f(np.asarray(ratio(*a))))
    out = {"diff": diff, "n_pairs": int(len(a[0])), "clusters": int(len(set(map(str, clusters))))}
    if out["clusters"] < 2 or n_boot <= 0:
        out["ci"] = None
        out["p_boot"] = None
        return out
    weights = cluster_weights(clusters, n_boot, np.random.default_rng(seed))
    samples = f(ratio(*b, weights)) - f(ratio(*a, weights))
    samples = samples[np.isfinite(samples)]
    out["ci"] = _percentile(samples, level)
    # Two-sided bootstrap p-value for "no difference" (share of replicates on the other side of 0, doubled).
    out["p_boot"] = float(min(1.0, 2 * min((samples <= 0).mean(), (samples >= 0).mean()))) if len(samples) else None
    return out


def bootstrap_statistic(n_units: int, clusters: Sequence, statistic: Callable[[np.ndarray], float],
                        n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """Clustered percentile interval of any ``statistic(weights [n_units]) -> float`` (e.g. macro-F1 from a
    weighted confusion matrix)."""
    if len(set(map(str, clusters))) < 2 or n_boot <= 0 or n_units == 0:
        return None
    weights = cluster_weights(clusters, n_boot, np.random.default_rng(seed))
    return _percentile(np.array([statistic(w) for w in weights]), level)


__all__ = ["bootstrap_ratio", "bootstrap_statistic", "cluster_weights", "mcnemar_exact", "paired_bootstrap_ratio",
           "ratio", "wilson_interval"]
