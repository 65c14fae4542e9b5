"""Model families. Each lives in its own file with its tiny builder; this picks one."""

from pathlib import Path

import torch

from ..config import ModelConfig


def load_family(model: ModelConfig, path: str | Path | None = None, device: str = "cpu",
                transformer_device: str | None = None):
    """Load the configured family from `path` (default model.path) with from_pretrained.

    Encoders and VAE go to `device`; the transformer to `transformer_device` (default
    `device`). A DeepSpeed learner keeps it on the CPU: ZeRO-3 moves it to the GPU one
    parameter at a time as it partitions, so no rank ever holds the whole model there."""
    path = str(path or model.path)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model.dtype]
    if model.family == "zimage":
        from .zimage import ZImageFamily

        return ZImageFamily.from_pretrained(
            path, teacher_vlm_path=model.teacher_vlm_path, dtype=dtype, device=device,
            transformer_device=transformer_device,
            max_sequence_length=model.max_sequence_length,
            teacher_max_sequence_length=model.teacher_max_sequence_length,
            vlm_min_pixels=model.vlm_min_pixels, vlm_max_pixels=model.vlm_max_pixels,
        )
    if model.family == "flux2_klein":
        from .flux2_klein import Flux2KleinFamily

        return Flux2KleinFamily.from_pretrained(
            path, teacher_context=model.teacher_context, teacher_vlm_path=model.teacher_vlm_path,
            dtype=dtype, device=device, transformer_device=transformer_device,
            max_sequence_length=model.max_sequence_length, teacher_max_sequence_length=model.teacher_max_sequence_length,
            vlm_min_pixels=model.vlm_min_pixels, vlm_max_pixels=model.vlm_max_pixels,
        )
    if model.family == "toy":
        from .toy import ToyFamily

        return ToyFamily.from_pretrained(path, dtype=dtype, device=device, transformer_device=transformer_device,
                                         max_sequence_length=model.max_sequence_length)
    raise ValueError(f"unknown model family {model.family!r}; known: zimage, flux2_klein, toy")


def build_tiny(model: ModelConfig, path: str | Path, seed: int = 0) -> Path:
    """Build (once) a tiny random pipeline of the configured family under `path`."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    if model.family == "zimage":
        from .zimage import build_tiny_zimage

        build_tiny_zimage(path, seed=seed)
    elif model.family == "flux2_klein":
        from .flux2_klein import build_tiny_flux2_klein

        build_tiny_flux2_klein(path, seed=seed, variant=model.variant or "4b")
    elif model.family == "toy":
        from .toy import build_tiny_toy

        build_tiny_toy(path, seed=seed)
    else:
        raise ValueError(f"unknown model family {model.family!r}; known: zimage, flux2_klein, toy")
    return path


def lora_targets(family_name: str) -> list[str]:
    if family_name == "zimage":
        from .zimage import LORA_TARGETS
    elif family_name == "toy":
        from .toy import LORA_TARGETS
    else:
        from .flux2_klein import LORA_TARGETS
    return list(LORA_TARGETS)


def pipeline_class(family_name: str):
    if family_name == "zimage":
        from .zimage import PIPELINE_CLASS
    elif family_name == "toy":
        from .toy import PIPELINE_CLASS
    else:
        from .flux2_klein import PIPELINE_CLASS
    return PIPELINE_CLASS


def comfyui_keys(family_name: str) -> tuple[dict, dict] | None:
    """The family's (blocks, modules) map to ComfyUI's native LoRA names (weights.comfyui_lora);
    None for the toy, whose UNet is no ComfyUI model: it gets the diffusers file only."""
    if family_name == "zimage":
        from .zimage import COMFYUI_BLOCKS, COMFYUI_MODULES
    elif family_name == "flux2_klein":
        from .flux2_klein import COMFYUI_BLOCKS, COMFYUI_MODULES
    else:
        return None
    return COMFYUI_BLOCKS, COMFYUI_MODULES
