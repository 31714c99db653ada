"""FVD/KVD numerics against closed forms and independent implementations, and the I3D calling convention."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from eval_fixtures import TinyI3D, save_script
from training.evaluation.features import VideoEncoder, i3d_spec, window_starts
from training.evaluation.fvd import (compare_feature_sets, feature_stats, frechet_distance,
                                     frechet_distance_features, kvd, mmd2_unbiased)
from training.evaluation.resize import Fit


def _random_psd(rng, dim, rank=None):
    a = rng.normal(size=(dim, rank or dim))
    return a @ a.T / dim


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.5, 3.0, 6), rng.uniform(0.5, 3.0, 6)
    exact = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_of_gaussian_features_approaches_the_closed_form():
    """Features sampled from two known Gaussians: the estimate converges to the parameters' closed form."""
    rng = np.random.default_rng(1)
    dim = 5
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    a, b = np.linspace(1.0, 2.0, dim), np.linspace(2.0, 0.5, dim)
    exact = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    x = mu1 + rng.normal(size=(40000, dim)) * np.sqrt(a)
    y = mu2 + rng.normal(size=(40000, dim)) * np.sqrt(b)
    assert frechet_distance_features(x, y) == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize("rank", [None, 6])  # full-rank and singular (N <= D) covariances
def test_frechet_distance_matches_torch_fidelity_and_scipy(rank):
    rng = np.random.default_rng(2)
    dim = 16
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_psd(rng, dim, rank), _random_psd(rng, dim, rank)
    ours = frechet_distance(mu1, s1, mu2, s2)
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert ours == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-6, abs=1e-8)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    classic = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    assert ours == pytest.approx(classic, rel=1e-5, abs=1e-6)


def test_frechet_distance_from_few_samples_stays_finite_and_non_negative():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 40)), rng.normal(size=(6, 40))  # N far below D: singular covariances
    value = frechet_distance_features(x, y)
    assert np.isfinite(value) and value >= 0
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-8)


def _mmd_brute_force(x, y):
    def k(a, b):
        return (float(a @ b) / len(a) + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kvd_equals_brute_force_loop_and_torch_fidelity():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(14, 6)), rng.normal(0.3, 1.2, size=(11, 6))
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd_brute_force(x, y), rel=1e-10)
    z = rng.normal(0.3, 1.2, size=(14, 6))
    fidelity = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(z), kid_subsets=1, kid_subset_size=14,
                                      verbose=False)
    assert kvd(x, z)[0] == pytest.approx(fidelity["kernel_inception_distance_mean"], rel=1e-9)


def test_kvd_is_near_zero_for_identical_distributions():
    rng = np.random.default_rng(5)
    same = [mmd2_unbiased(rng.normal(size=(300, 16)), rng.normal(size=(300, 16))) for _ in range(5)]
    shifted = mmd2_unbiased(rng.normal(size=(300, 16)), rng.normal(0.5, 1.0, size=(300, 16)))
    assert abs(np.mean(same)) < 0.02 * shifted
    assert max(abs(v) for v in same) < 0.1 * shifted


def test_compare_feature_sets_equal_n_shared_keys_floor_and_warnings():
    rng = np.random.default_rng(6)
    dim = 16

    def feats(keys, shift):
        return {k: rng.normal(shift, 1.0, size=(1, dim)) for k in keys}

    real = feats([f"r{i}" for i in range(30)], 0.0)
    arms = {"a": feats([f"p{i}#0" for i in range(12)], 0.2), "b": feats([f"p{i}#0" for i in range(10)], 1.0)}
    out = compare_feature_sets(real, arms, seed=0, floor_splits=5, n_boot=30, reference="a")
    assert out["n_clips"] == 10 and out["n_features"] == 10 and out["dim"] == dim and out["paired"]
    assert out["arms"]["a"]["clips"] == out["arms"]["b"]["clips"]  # same prompts and seeds in both arms
    assert out["floor"]["n_clips"] == 10 and out["floor"]["splits"] == 5
    assert any("subsampled to N = 10" in w for w in out["warnings"])
    assert any("<= feature dimension 16" in w for w in out["warnings"])
    b = out["arms"]["b"]
    assert b["fvd"] > out["arms"]["a"]["fvd"] > 0  # the farther arm scores worse ...
    assert b["fvd_diff"] == pytest.approx(b["fvd"] - out["arms"]["a"]["fvd"])
    assert 0 < b["fvd_diff_ci"][0] <= b["fvd_diff_ci"][1]  # ... clearly, on paired resamples
    assert "fvd_diff" not in out["arms"]["a"]
    # An arm identical to the reference: the paired difference is exactly zero in every replicate.
    twin = compare_feature_sets(real, {"a": arms["a"], "a2": dict(arms["a"])}, n_boot=10, reference="a")
    assert twin["arms"]["a2"]["fvd_diff_ci"] == [0.0, 0.0] and twin["arms"]["a2"]["kvd_diff_ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="real set has 1 clip"):
        compare_feature_sets({"r": np.zeros((1, dim))}, arms)


def test_feature_stats_needs_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


def test_i3d_encoder_calling_convention_windows_and_letterbox(tmp_path):
    path = save_script(TinyI3D(), tmp_path / "i3d_torchscript.pt")
    encoder = VideoEncoder(i3d_spec(path, windows=2), batch_size=1)
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (40, 48, 83, 3), dtype=np.uint8)
    feats = encoder.features(frames)
    assert feats.shape == (2, 24)
    assert window_starts(40, 16, 2) == [0, 24]
    # The second window is frames 24..39: the same features as a clip made of exactly those frames.
    single = VideoEncoder(i3d_spec(path, windows=1)).features(frames[24:40])
    np.testing.assert_allclose(feats[1], single[0], rtol=1e-5)


def test_resize_protocols_keep_or_cut_the_frame_sides():
    frame = np.full((480, 832, 3), 255, np.uint8)
    frame[:, :100] = 0  # a dark band at the left edge, where instruments enter
    box = Fit.make((832, 480), (224, 224), "letterbox")
    out = box.apply(frame)
    assert box.resized == (224, 129) and box.offset == (0, 47)
    assert out[:47].max() == 0 and out[47 + 129:].max() == 0  # black bars
    assert out[112, :20].max() < 30 and out[112, 40:].min() > 225  # the dark band survives
    crop = Fit.make((832, 480), (224, 224), "center-crop").apply(frame)
    assert crop.min() > 225  # the band is cut away
    stretch = Fit.make((832, 480), (224, 224), "stretch")
    np.testing.assert_allclose(stretch.points_to_source(np.array([[112.0, 112.0]])), [[416.0, 240.0]])
    np.testing.assert_allclose(box.points_to_source(np.array([[112.0, 47 + 64.5]])), [[416.0, 240.0]], atol=1.0)


class _UnitRangeEncoder(torch.nn.Module):
    """Another video encoder's convention: [B, 3, 8, 32, 32] in [0, 1], a keyword argument of its own."""

    def forward(self, x: torch.Tensor, pool: bool = False) -> torch.Tensor:
        assert pool, "called without its keyword argument"
        assert x.shape[2] == 8 and x.shape[3] == 32 and x.shape[4] == 32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        return x.mean((3, 4)).flatten(1)


def test_other_encoder_from_a_spec_string(tmp_path):
    from training.evaluation.features import parse_encoder_spec
    from training.evaluation.videos import EvalInputError

    path = save_script(_UnitRangeEncoder(), tmp_path / "enc.pt")
    spec = parse_encoder_spec(f"name=vjepa,path={path},frames=8,size=32,range=unit,resize=stretch,kw.pool=true")
    assert (spec.name, spec.num_frames, spec.size, spec.value_range, spec.resize) == ("vjepa", 8, 32, "unit", "stretch")
    assert spec.kwargs == {"pool": True}
    frames = np.full((10, 20, 30, 3), 255, np.uint8)
    np.testing.assert_allclose(VideoEncoder(spec).features(frames), np.ones((1, 24)))  # 3 channels x 8 frames
    with pytest.raises(EvalInputError, match="fewer than one 8-frame window"):
        VideoEncoder(spec).features(frames[:5])
    with pytest.raises(EvalInputError, match="'name' and 'path' are required"):
        parse_encoder_spec("path=x.pt")
    with pytest.raises(EvalInputError, match="unknown key"):
        parse_encoder_spec("name=a,path=x.pt,colour=red")
