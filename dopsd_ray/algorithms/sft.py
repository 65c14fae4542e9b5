"""Baseline SFT: plain flow matching on the same pairs (what D-OPSD is compared against)."""

import torch

from .dopsd import VelocityFn


def sft_loss(velocity: VelocityFn, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """MSE(v_pred, eps - x0) at x_sigma = (1 - sigma) x0 + sigma eps; sigmas: (B,) per sample."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0)
    x = (1 - s) * x0 + s * noise
    v = velocity(x, sigmas)
    return (v.float() - (noise - x0).float()).pow(2).mean()
