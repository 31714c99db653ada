"""The training objective: flow matching as WAN is trained, timestep sampling, ROI-weighted MSE.

WAN (2.1 and 2.2) is a rectified-flow model. With clean latents ``x0`` (VAE latents after the model's own
``process_latent_in`` normalisation), Gaussian noise ``eps`` and a noise level ``t`` in [0, 1]::

    x_t = (1 - t) * x0 + t * eps          velocity target  v = eps - x0

and the DiT is called with ``timestep = 1000 * t`` (what ComfyUI's ``model_sampling.timestep(sigma)`` gives
for WAN; sigma *is* t under flow matching). ComfyUI's sampler turns the prediction back into a clean-sample
estimate with ``x0_hat = x_t - t * v``, so training the velocity trains exactly what inference uses.

Timesteps: ``u`` from a base distribution, then the flow shift ``t = s*u / (1 + (s - 1)*u)`` (ComfyUI's
``time_snr_shift``), which moves mass towards high noise:

* ``shift`` (the default): ``u`` uniform. These are the noise levels a sampler visits with ComfyUI's shift-``s``
  model sampling (``ModelSamplingSD3``) and evenly spaced steps (the ``simple`` scheduler takes evenly spaced
  entries of the table ``time_snr_shift(s, k / 1000)``).
* ``logit_normal``: ``u = sigmoid(logit_scale * z)``, ``z ~ N(0, 1)``, then shifted. This is what musubi-tuner
  calls ``--timestep_sampling shift`` (with ``--discrete_flow_shift s --sigmoid_scale logit_scale``), the
  setting its WAN guide shows; it puts less mass at both ends than ``shift``.
* ``uniform``: ``t`` uniform, no shift (musubi-tuner's ``uniform``).

A range ``[t_min, t_max]`` (stage 2 trains experts on [0.2, 1.0], A14B gives each DiT its own side of the
0.875 boundary) *truncates* that distribution exactly: ``u`` is drawn between the pre-images of ``t_min`` and
``t_max`` (the shift is monotonic), so inside the range the density is the shifted one, not a squashed copy of
the full range (musubi-tuner rescales into its ``--min_timestep``/``--max_timestep`` range unless given
``--preserve_distribution_shape``, which rejects samples outside it: the truncation used here).

With the defaults (``shift``, s = 3) the A14B high-noise DiT (t >= 0.875) gets 30% of the samples and the
low-noise DiT 70%; with ``logit_normal`` (s = 3, scale 1) about 20% / 80%; with ``uniform`` 12.5% / 87.5%
(:meth:`TimestepSampler.fraction_above`; the trainer prints the figure of its run at start).

Everything takes explicit ``torch.Generator`` objects: the loop derives one per sample from (seed, sample
position), which makes noise and timesteps independent of how samples are split over processes and
micro-batches (data-parallel runs equal single-process runs) and of interruptions (resume is exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TimestepSampling = Literal["shift", "uniform", "logit_normal"]
TIMESTEP_SAMPLINGS = ("shift", "uniform", "logit_normal")
#: WAN's timestep embedding takes t * 1000.
TIMESTEP_SCALE = 1000.0


@dataclass(frozen=True)
class TimestepSampler:
    """Draws noise levels t in [t_min, t_max].

    Attributes:
        sampling: ``shift`` (uniform u, then shifted), ``uniform`` (t uniform, no shift) or ``logit_normal``
            (u = sigmoid(scale * z), z ~ N(0, 1), then shifted; musubi-tuner's ``shift`` sampling).
        shift: the flow shift s (1 = none); ignored by ``uniform``.
        t_min, t_max: the range; the distribution is truncated to it exactly.
        logit_scale: spread of ``logit_normal``.
    """

    sampling: TimestepSampling = "shift"
    shift: float = 3.0
    t_min: float = 0.0
    t_max: float = 1.0
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLINGS}, not {self.sampling!r}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not (0.0 <= self.t_min < self.t_max <= 1.0):
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")

    @property
    def effective_shift(self) -> float:
        return 1.0 if self.sampling == "uniform" else float(self.shift)

    def restricted(self, t_min: float, t_max: float) -> "TimestepSampler":
        """The same distribution truncated further to [t_min, t_max] ∩ this range."""
        lo, hi = max(self.t_min, t_min), min(self.t_max, t_max)
        if not lo < hi:
            raise ValueError(f"the timestep range [{self.t_min}, {self.t_max}] does not overlap [{t_min}, {t_max}]")
        return TimestepSampler(self.sampling, self.shift, lo, hi, self.logit_scale)

    # -- the monotonic maps between u (base variable) and t ---------------------------------------------

    def _u_to_t(self, u: torch.Tensor) -> torch.Tensor:
        s = self.effective_shift
        return u if s == 1.0 else s * u / (1.0 + (s - 1.0) * u)

    def _t_to_u(self, t: float) -> float:
        s = self.effective_shift
        return t if s == 1.0 else t / (s - (s - 1.0) * t)

    def _u_to_cdf(self, u: float) -> float:
        """CDF of the base distribution at u (identity for uniform bases)."""
        if self.sampling != "logit_normal":
            return u
        if u <= 0.0:
            return 0.0
        if u >= 1.0:
            return 1.0
        z = math.log(u / (1.0 - u)) / self.logit_scale
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    def _cdf_to_u(self, p: torch.Tensor) -> torch.Tensor:
        if self.sampling != "logit_normal":
            return p
        z = torch.special.ndtri(p.clamp(1e-12, 1.0 - 1e-12))
        return torch.sigmoid(self.logit_scale * z)

    def cdf_bounds(self) -> tuple[float, float]:
        return self._u_to_cdf(self._t_to_u(self.t_min)), self._u_to_cdf(self._t_to_u(self.t_max))

    def sample(self, generator: torch.Generator, n: int = 1) -> torch.Tensor:
        """``n`` noise levels (float32, CPU) drawn with ``generator``."""
        lo, hi = self.cdf_bounds()
        p = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        t = self._u_to_t(self._cdf_to_u(p))
        return t.clamp(self.t_min, self.t_max).float()

    def fraction_above(self, boundary: float) -> float:
        """Probability mass of t >= boundary (e.g. how often the A14B high-noise DiT trains)."""
        lo, hi = self.cdf_bounds()
        if boundary <= self.t_min:
            return 1.0
        if boundary >= self.t_max:
            return 0.0
        b = self._u_to_cdf(self._t_to_u(boundary))
        return (hi - b) / (hi - lo)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, v)``: the flow-matching input and velocity target for per-row noise levels ``t`` [B]."""
    tb = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - tb) * x0 + tb * noise, noise - x0


# ------------------------------------------------------------------------------------------- ROI weights
# The ROI arrives on the latent grid from the cache (``training.data.cache.roi_to_latent_grid``: coverage
# of each latent cell, the maximum over the VAE's temporal groups).

def roi_weights(roi: torch.Tensor | None, roi_weight: float) -> torch.Tensor | None:
    """Weights ``1 + (roi_weight - 1) * roi`` for a batch of latent-grid ROIs ``[B, f, h, w]``, shaped
    ``[B, 1, f, h, w]`` to broadcast over the latent channels; None without ROI or with weight 1."""
    if roi is None or roi_weight == 1.0:
        return None
    if roi.ndim != 4:
        raise ValueError(f"batched ROI must be [batch, frames, height, width], got {tuple(roi.shape)}")
    return (1.0 + (roi_weight - 1.0) * roi.float())[:, None]


def frame_weights(weights: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """Loss weights ``[B, 1, F, H, W]`` with the frames a TI2V sample keeps clean left out: ``keep`` is the
    sample's denoise mask (0 on the start frame, 1 on generated frames; None: every frame is generated). The
    model's output on a kept frame is discarded by the sampler, so it is not trained."""
    if keep is None:
        return weights
    keep = keep.float()
    return keep if weights is None else weights.float() * keep


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE per batch row ``[B]``, computed in float32.

    With weights ``w`` (1 outside the ROI, ``roi_weight`` inside) it is ``sum(w * e^2) / sum(w)`` per sample:
    an ROI element counts ``roi_weight`` times as much as any other element, and the loss keeps the scale of
    a plain MSE whatever the ROI's size (a clip without ROI simply gets the plain MSE).
    """
    err = (pred.float() - target.float()).pow(2)
    dims = tuple(range(1, err.ndim))
    if weights is None:
        return err.mean(dim=dims)
    w = weights.float().expand_as(err)
    return (w * err).sum(dim=dims) / w.sum(dim=dims).clamp_min(1e-12)  # all-zero weights: 0, not NaN


__all__ = ["TIMESTEP_SAMPLINGS", "TIMESTEP_SCALE", "TimestepSampler", "frame_weights", "noisy_input", "per_sample_loss",
           "roi_weights"]
