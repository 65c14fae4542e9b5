"""The one interface the algorithm and the runtime use to talk to a model family.

Everything here speaks the diffusers flow-matching convention:
- sigma in [0, 1] is the noise level, 1 = pure noise;
- x_sigma = (1 - sigma) * x0 + sigma * eps;
- velocity v = eps - x0, so x0_hat = x - sigma * v and an Euler step is
  x_next = x + (sigma_next - sigma) * v.
Model-specific conventions (Z-Image's t = 1 - sigma and negated output, FLUX.2's
token packing and position ids, latent scale/shift) live inside each family's file
and never leak out of it.

Latents are always spatial tensors (B, C, h, w) that every item of a batch shares;
contexts are family-specific objects the algorithm only passes through. Contexts
must be picklable (they travel through Ray's object store) and support `.to()`.
"""

import gc
from typing import Any, Protocol

import torch
from torch import nn


class Family(Protocol):
    """A loaded model family: frozen encoders + the denoiser that we fine-tune."""

    name: str
    transformer: nn.Module  # the denoiser; LoRA adapters or full training act on it
    pixel_multiple: int  # image sides must be a multiple of this
    device: torch.device  # where the encoders and the VAE live; callers move inputs there

    # -- contexts (always computed without grad) --------------------------------
    def student_context(self, captions: list[str]) -> Any:
        """Text-only context, exactly the stock pipeline's prompt encoding."""

    def teacher_context(self, captions: list[str], images: torch.Tensor) -> Any:
        """Multimodal context of (caption, target image); images in [-1, 1], (B, 3, H, W)."""

    def release_encoders(self) -> int:
        """Drop the frozen modules that only make contexts (text encoder, VLM, vision encoder)
        once every context this process needs is cached (contexts.py); returns the bytes of
        parameters and buffers dropped. Contexts cannot be computed here afterwards; the
        denoiser, the VAE and `device` stay."""

    # -- the denoiser ------------------------------------------------------------
    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
        """v = eps - x0 predicted by `model` (student or teacher weights) at noise level sigma.

        x: (B, C, h, w) latents; sigma: scalar tensor or (B,); returns float32 (B, C, h, w).
        """

    # -- latents -----------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> normalised latents x0 (B, C, h, w)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1], (B, 3, H, W)."""

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the noise / latents for images of height x width pixels."""

    # -- schedules ---------------------------------------------------------------
    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The stock pipeline's few-step sigmas, float32, length num_steps + 1, ending at 0."""

    def shift_sigmas(self, sigmas: torch.Tensor, height: int, width: int, num_steps: int) -> torch.Tensor:
        """Apply the family's timestep shift (static or resolution-dependent) to uniform sigmas,
        the shift its stock sampler uses at this resolution for num_steps steps (only
        FLUX.2-klein's depends on the number of steps)."""

    # -- previews and export -----------------------------------------------------
    def pipeline(self):
        """The stock diffusers pipeline built from this family's components (the toy's has
        only the LoRA file format; Z-Image's and klein's also take another transformer)."""

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError naming the problem if images are not usable by this family."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's model.dtype ("float32" or "bfloat16")."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def module_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


def tensor_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the parameters and buffers of `modules`, each storage counted once (the VLM's
    language model shares the text encoder's parameters)."""
    storages = {}
    for module in modules:
        for t in [] if module is None else [*module.parameters(), *module.buffers()]:
            storages[t.untyped_storage().data_ptr(), t.device] = t.untyped_storage().nbytes()
    return sum(storages.values())


def free_memory() -> None:
    """Give back the memory of modules just dropped: collect them now, and return the GPU's
    cached blocks, so other processes (and nvidia-smi) see it free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def freeze(module: nn.Module) -> nn.Module:
    """Frozen encoders (text encoder, VAE, VLM): eval mode, no grad."""
    return module.eval().requires_grad_(False)


def check_image_batch(images, pixel_multiple: int, model_name: str) -> None:
    """Raise ValueError naming the problem: not a (B, 3, H, W) float tensor in [-1, 1], or a
    side that is not a multiple of `pixel_multiple` (vae_scale_factor * 2)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels in dim 1, got {images.shape[1]} "
                         f"(shape {tuple(images.shape)})")
    for side, value in (("height", images.shape[2]), ("width", images.shape[3])):
        if value % pixel_multiple:
            raise ValueError(f"image {side} {value} is not a multiple of {pixel_multiple} "
                             f"({model_name} needs sides divisible by vae_scale_factor * 2)")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [-1, 1], got dtype {images.dtype}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
        raise ValueError(f"image values must lie in [-1, 1], got min {lo:.4g} max {hi:.4g}")
