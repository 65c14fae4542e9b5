"""Few-step Euler sampling in the diffusers flow-matching convention (v = eps - x0)."""

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) -> v


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate from sigmas[0] (noise) to sigmas[-1] (0) with the given velocity field.

    Matches FlowMatchEulerDiscreteScheduler.step: x <- x + (s_next - s) * v, in float32.
    """
    x = noise.float()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = velocity(x, sigma).float()
        x = x + (sigma_next - sigma) * v
    return x
