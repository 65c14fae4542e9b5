"""Training sigmas (D-OPSD) and SFT sigma sampling. Sigma in [0, 1], 1 = noise."""

import torch

# Z-Image-Turbo released recipe: K = 4 hand-set training sigmas (used as they are).
RECIPE_4STEP = (1.0, 0.9, 0.75, 0.5, 0.0)


def static_shift(sigmas, shift: float) -> torch.Tensor:
    """The flow-matching timestep shift sigma' = shift * sigma / (1 + (shift - 1) * sigma), float32.

    What diffusers' FlowMatchEulerDiscreteScheduler applies with a static `shift` (SD3's
    resolution shift): for shift > 1 it moves every sigma towards 1, more steps at high noise.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigmas(preset, family, height: int, width: int, inference_steps: int) -> torch.Tensor:
    """The K + 1 sigmas s_0 = 1 > ... > s_K = 0 a D-OPSD roll-out visits.

    preset: "recipe_4step" (Z-Image recipe), "inference" (the family's few-step inference
    schedule: Z-Image's 8-step one, FLUX.2-klein's native 4-step one), or a list.
    """
    if preset == "recipe_4step":
        return torch.tensor(RECIPE_4STEP, dtype=torch.float32)
    if preset == "inference":
        return family.inference_sigmas(inference_steps, height, width).float()
    return torch.tensor(list(preset), dtype=torch.float32)


def sample_sft_sigmas(
    family, batch_size: int, height: int, width: int, num_steps: int, generator: torch.Generator | None = None,
    logit_mean: float = 0.0, logit_std: float = 1.0,
) -> torch.Tensor:
    """Per-sample sigma ~ logit-normal(mean, std), then the family's timestep shift as its
    sampler applies it for num_steps steps at this resolution (the run's inference steps)."""
    u = torch.randn(batch_size, generator=generator) * logit_std + logit_mean
    return family.shift_sigmas(torch.sigmoid(u), height, width, num_steps).float()
