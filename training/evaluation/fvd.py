"""Fréchet distance (FVD) and unbiased polynomial-kernel MMD (KVD) between sets of video features.

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2). The last trace is computed in the
symmetric eigen form: S1^1/2 from the eigendecomposition of S1 (eigenvalues clamped at 0), then the
eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 (clamped at 0, square-rooted, summed). Unlike
``scipy.linalg.sqrtm(S1 @ S2)`` this never takes square roots of a non-symmetric matrix, so it has no complex
parts to discard and stays stable when the covariances are singular, which they are whenever N <= feature
dimension (400 for I3D, more than the ~160 clips of a typical surgical-video study). At such N the FD is
biased upward and depends on N: arms are compared at equal N, and a real-vs-real floor at the same N (two
disjoint halves of the real set) shows how much of the number is sampling noise.

KVD is the unbiased MMD^2 with the KID kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al.), computed on
subsets of at most 1000 (the KID convention), averaged; with fewer clips it is one estimate on all of them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ddof=1) covariance of ``[N, D]`` features, float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need [N >= 2, D] features for a covariance, got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False, ddof=1).reshape(feats.shape[1], feats.shape[1])


def _sym_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (symmetric eigen form, clamped at 0)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _sym_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """FD between the Gaussians fitted to two ``[N, D]`` feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def poly_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                coef0: float = 1.0) -> np.ndarray:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                  coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel: within-set sums without the diagonal, cross term in full."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    kxx, kyy, kxy = (poly_kernel(x, x, degree, gamma, coef0), poly_kernel(y, y, degree, gamma, coef0),
                     poly_kernel(x, y, degree, gamma, coef0))
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.sum() / (m * n))


def kvd(x: np.ndarray, y: np.ndarray, subset_size: int = 1000, subsets: int = 100, seed: int = 0
        ) -> tuple[float, float]:
    """KID-convention KVD: mean and std of the unbiased MMD^2 over random subsets (one pass if N is small)."""
    size = min(subset_size, len(x), len(y))
    if size >= len(x) and size >= len(y):
        return mmd2_unbiased(x, y), 0.0
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def _stack(per_clip: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([per_clip[k] for k in keys])


def compare_feature_sets(real: Mapping[str, np.ndarray], arms: Mapping[str, Mapping[str, np.ndarray]],
                         seed: int = 0, floor_splits: int = 10, n_boot: int = 0, reference: str | None = None,
                         level: float = 0.95) -> dict:
    """FVD and KVD of every arm against the real set, all arms at equal N, with a real-vs-real floor.

    Args:
        real / arms: ``{clip key: [windows, D] features}``; arms that share keys are subsampled on the same
            keys (same prompts and seeds in every arm).
        floor_splits: random disjoint splits of the real set for the floor (mean and sd reported).
        n_boot: bootstrap replicates for the *difference* of each arm to ``reference`` (0: none). Each
            replicate resamples the clips (the same prompt/seed keys in both arms when they are shared) and the
            real clips once for both arms, so the upward bias that duplicated clips give FD largely cancels in
            the difference; an absolute FVD gets no interval (it depends on N; read it against the floor).

    Returns:
        ``{"n_clips", "n_features", "dim", "arms": {name: {"fvd", "kvd", "kvd_std", "clips",
        "fvd_diff"?, "fvd_diff_ci"?, "kvd_diff"?, "kvd_diff_ci"?}}, "floor", "paired", "warnings"}``.
    """
    rng = np.random.default_rng(seed)
    warnings: list[str] = []
    usable = {name: feats for name, feats in arms.items() if len(feats) >= 2}
    for name in arms:
        if name not in usable:
            warnings.append(f"arm '{name}': {len(arms[name])} clip(s) with features; FVD needs at least 2")
    real_keys = sorted(real)
    if len(real_keys) < 2:
        raise ValueError(f"the real set has {len(real_keys)} clip(s) with features; FVD needs at least 2")
    if not usable:
        raise ValueError("no arm has at least 2 clips with features")
    n = min(min(len(f) for f in usable.values()), len(real_keys))
    shared = sorted(set.intersection(*(set(f) for f in usable.values())))
    paired = len(shared) >= n
    if paired:
        keys = shared if len(shared) == n else sorted(rng.choice(shared, n, replace=False).tolist())
        chosen = {name: keys for name in usable}  # identical prompt/seed keys in every arm
    else:
        chosen = {name: sorted(feats) if len(feats) == n else sorted(rng.choice(sorted(feats), n, replace=False).tolist())
                  for name, feats in usable.items()}
    if any(len(f) > n for f in usable.values()) or len(real_keys) > n:
        warnings.append(f"sets subsampled to N = {n} clips each (the smallest set) for equal-N comparison")
    real_sel = real_keys if len(real_keys) == n else sorted(rng.choice(real_keys, n, replace=False).tolist())
    real_feats = _stack(real, real_sel)
    dim = real_feats.shape[1]
    if len(real_feats) <= dim:
        warnings.append(f"N = {len(real_feats)} feature vectors <= feature dimension {dim}: the covariances are "
                        "singular and FVD is strongly biased by N; compare arms only at this same N, against "
                        "the real-vs-real floor")
    out_arms = {}
    for name, keys in chosen.items():
        feats = _stack(usable[name], keys)
        mean, std = kvd(real_feats, feats, seed=seed)
        out_arms[name] = {"fvd": frechet_distance_features(real_feats, feats), "kvd": mean, "kvd_std": std,
                          "clips": keys}
    if reference in out_arms:
        for name in out_arms:
            if name == reference:
                continue
            out_arms[name]["fvd_diff"] = out_arms[name]["fvd"] - out_arms[reference]["fvd"]
            out_arms[name]["kvd_diff"] = out_arms[name]["kvd"] - out_arms[reference]["kvd"]
            if n_boot > 0:
                fd, kd = _bootstrap_diff(real, real_sel, usable[reference], chosen[reference], usable[name],
                                         chosen[name], paired, n_boot, rng, level)
                out_arms[name]["fvd_diff_ci"], out_arms[name]["kvd_diff_ci"] = fd, kd
    floor = _real_floor(real, real_keys, n, floor_splits, rng, warnings)
    return {"n_clips": n, "n_features": len(real_feats), "dim": dim, "arms": out_arms, "floor": floor,
            "paired": paired, "reference": reference if reference in out_arms else None, "warnings": warnings}


def _real_floor(real: Mapping[str, np.ndarray], keys: list[str], n: int, splits: int,
                rng: np.random.Generator, warnings: list[str]) -> dict | None:
    half = min(n, len(keys) // 2)
    if half < 2:
        warnings.append(f"real set has {len(keys)} clip(s): too few for a real-vs-real floor (needs 4)")
        return None
    if half < n:
        warnings.append(f"real-vs-real floor at N = {half} per half (the real set has {len(keys)} clips, fewer "
                        f"than 2 x {n}); at N = {n} the floor would be lower")
    fds, kvds = [], []
    for _ in range(max(1, splits)):
        order = rng.permutation(len(keys))
        a = _stack(real, [keys[i] for i in order[:half]])
        b = _stack(real, [keys[i] for i in order[half:2 * half]])
        fds.append(frechet_distance_features(a, b))
        kvds.append(mmd2_unbiased(a, b))
    return {"n_clips": half, "splits": max(1, splits), "fvd": float(np.mean(fds)), "fvd_sd": float(np.std(fds)),
            "kvd": float(np.mean(kvds)), "kvd_sd": float(np.std(kvds))}


def _bootstrap_diff(real, real_keys, ref, ref_keys, arm, arm_keys, paired: bool, n_boot: int,
                    rng: np.random.Generator, level: float) -> tuple[list[float], list[float]]:
    import sys

    from tqdm import tqdm

    fds, kds = [], []
    for _ in tqdm(range(n_boot), desc="FVD/KVD paired bootstrap", unit="rep", file=sys.stderr, leave=False):
        r = _stack(real, [real_keys[i] for i in rng.integers(0, len(real_keys), len(real_keys))])
        pick_ref = rng.integers(0, len(ref_keys), len(ref_keys))
        pick_arm = pick_ref if paired else rng.integers(0, len(arm_keys), len(arm_keys))
        a = _stack(ref, [ref_keys[i] for i in pick_ref])
        b = _stack(arm, [arm_keys[i] for i in pick_arm])
        fds.append(frechet_distance_features(r, b) - frechet_distance_features(r, a))
        kds.append(mmd2_unbiased(r, b) - mmd2_unbiased(r, a))
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    return [float(v) for v in np.quantile(fds, q)], [float(v) for v in np.quantile(kds, q)]


__all__ = ["compare_feature_sets", "feature_stats", "frechet_distance", "frechet_distance_features", "kvd",
           "mmd2_unbiased", "poly_kernel"]
