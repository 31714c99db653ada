"""Flow matching as ComfyUI samples WAN, shifted timestep sampling truncated exactly, ROI-weighted MSE."""
from __future__ import annotations

import math

import pytest
import torch

from training.objective import TimestepSampler, noisy_input, per_sample_loss, roi_weights


def _shift(u, s):
    return s * u / (1 + (s - 1) * u)


def test_velocity_target_is_what_comfyui_turns_back_into_x0(tiny_wan):
    """ComfyUI's WAN sampling computes x0 = x_t - sigma * model_output: the true velocity gives back x0."""
    ms = tiny_wan.model.model_sampling
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 16, 3, 4, 6, generator=g)
    t = torch.tensor([0.3, 0.9])
    x_t, v = noisy_input(x0, noise, t)
    assert torch.allclose(ms.calculate_denoised(t, v, x_t), x0, atol=1e-6)
    assert torch.allclose(ms.noise_scaling(t, noise, x0), x_t, atol=1e-6)  # ComfyUI's own x_t
    assert torch.allclose(ms.timestep(t), t * 1000)  # what the trainer feeds the DiT


@pytest.mark.parametrize("sampling, shift", [("shift", 3.0), ("uniform", 3.0), ("logit_normal", 2.0)])
def test_sampler_range_is_an_exact_truncation(sampling, shift):
    full = TimestepSampler(sampling, shift)
    part = full.restricted(0.2, 1.0)
    t_full = full.sample(torch.Generator().manual_seed(0), 200_000)
    t_part = part.sample(torch.Generator().manual_seed(1), 100_000)
    assert float(t_part.min()) >= 0.2 and float(t_part.max()) <= 1.0
    # inside the range, the truncated distribution is the full one renormalised
    kept = t_full[t_full >= 0.2]
    for q in (0.1, 0.5, 0.9):
        assert abs(float(torch.quantile(kept, q)) - float(torch.quantile(t_part, q))) < 0.01
    assert abs(part.fraction_above(0.875) - float((t_part >= 0.875).float().mean())) < 0.01


def test_shift_matches_the_formula_and_a14b_share():
    s = TimestepSampler("shift", 3.0)
    t = s.sample(torch.Generator().manual_seed(0), 100_000)
    for q in (0.25, 0.5, 0.75):  # t = shift(u) with u uniform: quantile q of t is shift(q)
        assert abs(float(torch.quantile(t, q)) - _shift(q, 3.0)) < 0.01
    # P(t >= 0.875) = 1 - u(0.875) with u = t / (s - (s-1) t) = 0.7
    assert math.isclose(s.fraction_above(0.875), 0.3, abs_tol=1e-9)
    high = s.restricted(0.875, 1.0).sample(torch.Generator().manual_seed(2), 1000)
    assert float(high.min()) >= 0.875


def test_sampler_is_deterministic_per_generator():
    s = TimestepSampler()
    a = s.sample(torch.Generator().manual_seed(7), 4)
    b = s.sample(torch.Generator().manual_seed(7), 4)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not overlap"):
        TimestepSampler(t_min=0.0, t_max=0.5).restricted(0.875, 1.0)


def test_roi_weighted_mse():
    pred = torch.zeros(2, 16, 2, 2, 2)
    target = torch.ones(2, 16, 2, 2, 2)
    target[1, :, 0, 0, 0] = 3.0  # sample 1 has a larger error in one latent cell
    roi = torch.zeros(2, 2, 2, 2)
    roi[1, 0, 0, 0] = 1.0  # ... which is its ROI
    plain = per_sample_loss(pred, target)
    weighted = per_sample_loss(pred, target, roi_weights(roi, 3.0))
    assert torch.allclose(plain, torch.tensor([1.0, (7 * 1 + 9) / 8]))
    assert torch.allclose(weighted[0], torch.tensor(1.0))  # no ROI: the plain MSE
    assert torch.allclose(weighted[1], torch.tensor((7 * 1 + 3 * 9) / (7 + 3)))  # ROI cell counts 3x
    assert roi_weights(roi, 1.0) is None and roi_weights(None, 3.0) is None
