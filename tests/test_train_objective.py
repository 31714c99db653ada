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


def _musubi_shift(n: int, shift: float, sigmoid_scale: float, generator: torch.Generator) -> torch.Tensor:
    """musubi-tuner's ``--timestep_sampling shift`` (``training/trainer_base.py``,
    ``get_noisy_model_input_and_timesteps``): ``t = sigmoid(sigmoid_scale * randn)``, then
    ``t = t * shift / (1 + (shift - 1) * t)``; rewritten here from its source as the oracle."""
    t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator, dtype=torch.float64))
    return t * shift / (1 + (shift - 1) * t)


@pytest.mark.parametrize("shift, scale", [(3.0, 1.0), (5.0, 1.5)])
def test_musubi_shift_sampling_is_this_packs_logit_normal(shift, scale):
    theirs = _musubi_shift(200_000, shift, scale, torch.Generator().manual_seed(0)).float()
    ours = TimestepSampler("logit_normal", shift, logit_scale=scale).sample(torch.Generator().manual_seed(1), 200_000)
    plain = TimestepSampler("shift", shift).sample(torch.Generator().manual_seed(2), 200_000)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(float(torch.quantile(ours, q)) - float(torch.quantile(theirs, q))) < 0.01
    assert abs(float(torch.quantile(plain, 0.05)) - float(torch.quantile(theirs, 0.05))) > 0.05  # not "shift"
    share = float((theirs >= 0.875).float().mean())
    assert abs(TimestepSampler("logit_normal", shift, logit_scale=scale).fraction_above(0.875) - share) < 0.005


def test_docs_state_what_share_each_a14b_dit_gets_with_the_defaults():
    from pathlib import Path

    from training.config import Stage1Config, load_config

    from moe_core.families import FAMILIES

    cfg = load_config(Stage1Config)
    o = cfg.objective
    assert cfg.model.boundary == "auto"  # the family's: T2V A14B's 0.875 here
    boundary = FAMILIES["t2v"].boundary
    high = TimestepSampler(o.timestep_sampling, o.shift, o.t_min, o.t_max, o.logit_scale).fraction_above(boundary)
    musubi_like = TimestepSampler("logit_normal", o.shift, o.t_min, o.t_max, 1.0).fraction_above(boundary)
    # closed form: P(t >= 0.875) = P(u >= 0.7) = 1 - Phi(logit(0.7)) for logit-normal u and shift 3
    assert musubi_like == pytest.approx(1 - 0.5 * (1 + math.erf(math.log(0.7 / 0.3) / math.sqrt(2))), abs=1e-9)
    text = " ".join((Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text("utf-8").split())
    assert f"{high:.0%} of the samples go to the high-noise DiT and {1 - high:.0%} to the low-noise DiT" in text
    assert f"`logit_normal`, musubi-tuner's `shift` sampling: {musubi_like:.0%} / {1 - musubi_like:.0%}" in text
