"""Stage 2's loss terms, each a small function of tensors (so each can be checked by hand).

The routing terms that depend on the whole optimizer step (load balance, usage entropy) are computed from
the step's routing statistics, gathered before the first micro-batch (the router is tiny and its input, the
caption's teacher logits and t, is known up front) and summed over processes. Each micro-batch then adds
``sum(coefficients · P_row)``: a surrogate whose gradient, summed over the micro-batches, is exactly the
gradient of the step-level term; the value logged is the step-level term itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .objective import per_sample_loss


def flow_terms(pred: torch.Tensor, target: torch.Tensor, roi: torch.Tensor | None,
               keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample plain MSE and ROI term ``Σ roi·e² / Σ roi`` (0 for a sample without ROI cells).

    ``roi`` is [B, F, H, W] (latent grid, 0/1 or soft), broadcast over channels. ``keep`` [B, 1, F, H, W]
    (a TI2V sample's denoise mask, 0 on the start frame the sampler keeps clean) leaves those frames out of both.
    """
    err = (pred.float() - target.float()) ** 2
    plain = per_sample_loss(pred, target, keep)
    if roi is None:
        return plain, torch.zeros_like(plain)
    w = roi.float().unsqueeze(1).expand_as(err)
    if keep is not None:
        w = w * keep.float()
    denom = w.flatten(1).sum(1)
    roi_term = (w * err).flatten(1).sum(1) / denom.clamp_min(1e-12)
    return plain, torch.where(denom > 0, roi_term, torch.zeros_like(roi_term))


def kl_to_teacher(probs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row KL(router || teacher) = Σ p log(p / q); ``teacher`` has no zeros (floored rule softmax)."""
    p = probs.float()
    return (torch.xlogy(p, p) - p * torch.log(teacher.float())).sum(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(-1)


@dataclass
class StepRouting:
    """Routing statistics of one optimizer step (all rows of all processes) and the surrogate coefficients."""

    mean_probs: torch.Tensor  # P̄ [N]: mean pre-top-k router probability
    dispatch: torch.Tensor  # f [N]: mean post-top-k gate (the share of expert work actually dispatched)
    balance: float  # Σ f·P̄/q (1 at balance toward q)
    usage_entropy: float  # H(P̄)
    entropy_hinge: float  # max(0, target − H(P̄))
    coefficients: torch.Tensor  # [N]: d(w_bal·balance + w_ent·hinge)/dP_row for one row, already / rows


def step_routing(prob_sum: torch.Tensor, gate_sum: torch.Tensor, rows: int, target_freq: torch.Tensor,
                 w_balance: float, w_entropy: float, entropy_target: float) -> StepRouting:
    """The step-level load balance and entropy hinge, and their per-row gradient coefficients.

    Load balance, Switch style generalised to a target distribution q (the teacher's label frequencies):
    ``L = Σ_e f_e · P̄_e / q_e`` with f treated as a constant (it comes from top-k), minimal (= 1) when usage
    follows q. Entropy hinge: ``max(0, H_target − H(P̄))`` penalises the step's mean routing only when its
    entropy falls below the target, i.e. when usage concentrates on few experts; single rows may stay sharp.
    """
    p_bar = prob_sum / max(rows, 1)
    f = gate_sum / max(rows, 1)
    q = target_freq.clamp_min(1e-6)
    balance = float((f * p_bar / q).sum())
    h = float(entropy(p_bar))
    hinge = max(0.0, entropy_target - h)
    d_balance = f / q
    d_hinge = (torch.log(p_bar.clamp_min(1e-12)) + 1.0) if hinge > 0 else torch.zeros_like(p_bar)
    coeff = (w_balance * d_balance + w_entropy * d_hinge) / max(rows, 1)
    return StepRouting(p_bar, f, balance, h, hinge, coeff)


def predicted_clean(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 from a flow-matching velocity: x_t = (1−t)·x0 + t·noise and v = noise − x0 give x0 = x_t − t·v."""
    return x_t.float() - t.float().reshape(-1, *([1] * (x_t.ndim - 1))) * velocity.float()


def temporal_term(x0_pred: torch.Tensor, x0: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    """Per-sample temporal consistency inside the ROI: the predicted clean latent's frame-to-frame change
    matches the clip's (so real motion is not penalised, jitter is). Latents [B, C, F, H, W]; roi [B, F, H, W]."""
    if x0.shape[2] < 2:
        return torch.zeros(x0.shape[0], device=x0.device)
    d_pred = x0_pred[:, :, 1:] - x0_pred[:, :, :-1]
    d_true = x0[:, :, 1:].float() - x0[:, :, :-1].float()
    w = torch.maximum(roi[:, 1:], roi[:, :-1]).float().unsqueeze(1).expand_as(d_pred)
    denom = w.flatten(1).sum(1)
    val = (w * (d_pred - d_true) ** 2).flatten(1).sum(1) / denom.clamp_min(1e-12)
    return torch.where(denom > 0, val, torch.zeros_like(val))


def load_classifier(path: str, device: torch.device) -> torch.jit.ScriptModule:
    """A user's TorchScript instrument classifier (identity loss), frozen."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"loss.identity_classifier: {p} not found (a TorchScript file: latent "
                                "[B, C, F, H, W] -> logits [B, experts])")
    try:
        model = torch.jit.load(str(p), map_location=device)
    except Exception as e:  # torch raises several types for a non-TorchScript file
        raise ValueError(f"loss.identity_classifier: {p} is not a TorchScript file ({type(e).__name__}: {e})"
                         ) from None
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


__all__ = ["StepRouting", "entropy", "flow_terms", "kl_to_teacher", "load_classifier", "predicted_clean",
           "step_routing", "temporal_term"]
