"""Few-step Euler sampling in the diffusers flow-matching convention (v = eps - x0)."""

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) -> v


def euler_step(x: torch.Tensor, sigma, sigma_next, v: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE from sigma to sigma_next with velocity v, in float32
    (FlowMatchEulerDiscreteScheduler.step). The one place roll-outs, training and sampling step."""
    return x + (sigma_next - sigma) * v.float()


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate from sigmas[0] (noise) to sigmas[-1] (0) with the given velocity field.

    Matches FlowMatchEulerDiscreteScheduler.step: x <- x + (s_next - s) * v, in float32.
    """
    x = noise.float()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(x, sigma, sigma_next, velocity(x, sigma))
    return x
