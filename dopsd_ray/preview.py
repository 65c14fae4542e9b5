"""Sample grids: what users look at instead of reading losses.

One column per validation pair; rows: the target image, the student's few-step sample
from the caption alone, and the teacher-context sample (caption + target image, EMA
teacher weights). If the teacher row does not show the concept, D-OPSD cannot teach it
(method.md, "Known failure modes"): look before spending GPU hours.
"""

import torch

from .algorithms.sampling import euler_sample
from .algorithms.steps import velocity_fn
from .grid import sample_grid


@torch.no_grad()
def preview_latents(family, weights, captions: list[str], images: torch.Tensor, num_steps: int, seed: int = 0):
    """(student latents, teacher-context latents), same noise for both.

    Under ZeRO-3 every learner rank must call this (each forward gathers the partitioned
    weights); only the rank that shows the grid needs to decode.
    """
    _, _, height, width = images.shape
    noise = torch.randn(family.latent_shape(len(captions), height, width), generator=torch.Generator().manual_seed(seed))
    noise = noise.to(family.device)  # drawn on the CPU: the same samples on any device
    sigmas = family.inference_sigmas(num_steps, height, width)
    c_s = family.student_context(captions)
    c_t = family.teacher_context(captions, images.to(family.device))
    student = euler_sample(velocity_fn(family, weights.model, c_s), noise, sigmas)
    with weights.teacher() as teacher_model:
        teacher = euler_sample(velocity_fn(family, teacher_model, c_t), noise, sigmas)
    return student, teacher


@torch.no_grad()
def decode_one_by_one(family, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] on the CPU, decoded one at a time: a VAE decode at 1 MP holds
    gigabytes of activations, and a grid of 8 decoded at once would hold 8 times that."""
    return torch.cat([family.decode_latents(x[None]).clamp(-1, 1).cpu() for x in latents])


def preview_samples(family, weights, captions: list[str], images: torch.Tensor, num_steps: int, seed: int = 0):
    """(student samples, teacher-context samples), images in [-1, 1], same noise for both."""
    student, teacher = preview_latents(family, weights, captions, images, num_steps, seed)
    return decode_one_by_one(family, student), decode_one_by_one(family, teacher)


def sample_grid_for(family, weights, validation, cfg, decode: bool = True):
    """A labelled PIL grid of target / student / teacher-context samples; with decode=False
    (learner ranks > 0) only the sampling forwards run, and None is returned."""
    captions, images = validation
    steps = cfg.algorithm.inference_steps
    student, teacher = preview_latents(family, weights, captions, images, steps, cfg.train.seed)
    if not decode:
        return None
    return preview_grid(captions, images, decode_one_by_one(family, student), decode_one_by_one(family, teacher),
                        steps)


def preview_grid(captions: list[str], images: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, num_steps: int):
    """The grid of sample_grid_for from samples already drawn: rows target / student / teacher."""
    rows = [list(images), list(student), list(teacher)]
    labels = ["target", f"student ({num_steps} steps)", "teacher context"]
    return sample_grid(rows, labels, [c[:40] for c in captions])


def pixel_gaps(samples: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per item, the mean absolute difference to its target in 0-255 pixel units (images in [-1, 1])."""
    diff = (samples.detach().cpu().float().clamp(-1, 1) - targets.detach().cpu().float().clamp(-1, 1)).abs() * 127.5
    return diff.flatten(1).mean(1).tolist()
