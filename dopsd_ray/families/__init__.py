"""Model families: one file each, and FAMILIES, the one place that picks a family by name.

Every family module has the same surface:

    LORA_TARGETS      the released recipe's LoRA target modules (peft name suffixes)
    PIPELINE_CLASS    the class whose save_lora_weights writes the LoRA export
    TEACHER_CONTEXTS  the teacher contexts it can build, its default first
    INFERENCE_STEPS   its deployed few-step setting
    PIXEL_MULTIPLE    image sides of its models are multiples of this (config checks train.sample_size)
    COMFYUI_BLOCKS, COMFYUI_MODULES   diffusers -> ComfyUI native LoRA names (None: no ComfyUI model)
    CONTEXT_FILES     the pipeline's subfolders whose files make contexts (contexts.py fingerprints them)
    default_teacher_vlm(path)   the teacher VLM when model.teacher_vlm_path is unset (families with "vlm")
    build_tiny(path, seed, model_cfg)                          a tiny random pipeline saved under path
    from_config(model_cfg, path, device, transformer_device)   the family loaded from path
    DEFAULT_PATH, DEFAULT_DATA   (optional) model.path and data.path when a recipe sets none

so adding a family is its file plus one line in FAMILIES. This package stays light (no
torch): `complete` fills a loaded recipe with its family's facts (recipes.load_config calls
it), and a family's module (torch, diffusers) is imported only when that family is asked for.
"""

import importlib
import tempfile
from pathlib import Path
from types import ModuleType

from ..storage import Storage

FAMILIES = {"zimage": ".zimage", "flux2_klein": ".flux2_klein", "toy": ".toy"}  # name -> module


class FamilyError(ValueError):
    """A recipe that its model family cannot run; the message starts with the field's name."""


def family_module(name: str) -> ModuleType:
    """The module of the family called `name`; ValueError naming the known ones for any other name."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name], __name__)


def complete_model(model):
    """A ModelConfig with its family's facts: model.path's default (the toy's), the teacher
    context (the family's first when unset). FamilyError names the field when it cannot run."""
    if model.family not in FAMILIES:  # before any family module (torch) is imported
        raise FamilyError(f"model.family: unknown model family; known: {', '.join(FAMILIES)} (got {model.family!r})")
    module = family_module(model.family)
    if model.path is None and not model.tiny:
        model.path = None if getattr(module, "DEFAULT_PATH", None) is None else str(module.DEFAULT_PATH)
    if model.path is None and not model.tiny:
        raise FamilyError("model: set model.path (a hub id or a local pipeline directory) or model.tiny=true")
    allowed = module.TEACHER_CONTEXTS
    if model.teacher_context is None:
        model.teacher_context = allowed[0]
    if model.teacher_context not in allowed:
        raise FamilyError(f"model: model.teacher_context={model.teacher_context!r} is not supported by family "
                          f"{model.family!r}; allowed: {', '.join(allowed)}")
    return model


def complete(cfg):
    """A schema-valid Config filled with its family's facts (complete_model; the few-step
    setting when algorithm.inference_steps is unset; the toy's data when data.path is unset)
    and checked against them (train.sample_size against the family's pixel multiple)."""
    complete_model(cfg.model)
    module = family_module(cfg.model.family)
    if cfg.algorithm.inference_steps is None:
        cfg.algorithm.inference_steps = module.INFERENCE_STEPS
    if cfg.data.path is None and getattr(module, "DEFAULT_DATA", None) is not None:
        cfg.data.path = str(module.DEFAULT_DATA)
    multiple, size = module.PIXEL_MULTIPLE, cfg.train.sample_size
    if size is not None and size % multiple:
        raise FamilyError(f"train.sample_size: train.sample_size={size} is not a multiple of {multiple} (family "
                          f"{cfg.model.family!r} needs image sides divisible by {multiple}); use e.g. "
                          f"{max(multiple, size // multiple * multiple)}")
    return cfg


def load_family(model, path: str | Path | None = None, device: str = "cpu", transformer_device: str | None = None):
    """Load the configured family (a ModelConfig) from `path` (default model.path).

    Encoders and VAE go to `device`; the transformer to `transformer_device` (default
    `device`). A DeepSpeed learner keeps it on the CPU: ZeRO-3 moves it to the GPU one
    parameter at a time as it partitions, so no rank ever holds the whole model there."""
    return family_module(model.family).from_config(model, str(path or model.path), device, transformer_device)


TINY_MODEL = "tiny_model"  # the run's folder of a model.tiny base


def build_tiny(model, path: str | Path, seed: int = 0) -> Path:
    """Build (once) a tiny random pipeline of the configured family under `path`."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        family_module(model.family).build_tiny(path, seed, model)
    return path


def base_model_path(cfg) -> str:
    """The base model a Config trains: model.path, or (model.tiny) the tiny pipeline built once
    in the run's storage, run_dir/tiny_model (workers may run elsewhere: an absolute path, or
    on an object store a URI they copy from)."""
    if not cfg.model.tiny:
        return cfg.model.path
    run = Storage(cfg.run_dir)
    if run.local:
        return str(build_tiny(cfg.model, run.local_path(TINY_MODEL), cfg.train.seed))
    if not run.is_file(f"{TINY_MODEL}/model_index.json"):
        with tempfile.TemporaryDirectory(prefix="dopsd-tiny-") as tmp:
            run.put_dir(build_tiny(cfg.model, Path(tmp, TINY_MODEL), cfg.train.seed), TINY_MODEL,
                        last=("model_index.json",))
    return run.name_uri(TINY_MODEL)


def lora_targets(family_name: str) -> list[str]:
    return list(family_module(family_name).LORA_TARGETS)


def pipeline_class(family_name: str):
    return family_module(family_name).PIPELINE_CLASS


def comfyui_keys(family_name: str) -> tuple[dict, dict] | None:
    """The family's (blocks, modules) map to ComfyUI's native LoRA names (weights.comfyui_lora);
    None for a family that is no ComfyUI model (the toy): it gets the diffusers file only."""
    module = family_module(family_name)
    return None if module.COMFYUI_MODULES is None else (module.COMFYUI_BLOCKS, module.COMFYUI_MODULES)
