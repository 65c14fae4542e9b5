"""A run's export, checked against a base and applied to it (jobs/sample.py, the evaluation).

An export (weights.py) is either
- a LoRA file, pytorch_lora_weights.safetensors (alpha folded in), with keys
  `<prefix>.<module>.lora_A.weight` / `.lora_B.weight`, prefix "transformer" (or "unet": the
  toy's UNet), or the run's export folder that holds it;
- a full fine-tuning transformer folder: config.json + safetensors, from_pretrained-loadable.

    problem = export_problem(path)                 # None, or what is wrong with the path itself
    problem = base_mismatch(transformer, path)     # None, or how the export does not fit this base
    with applied(transformer, path) as model:      # the base with the export in it, undone after
        family.velocity(model, ...)

Checks return one-line messages instead of raising, so each caller says them its own way
(`error: --lora ...` in jobs/sample.py, a ValueError before any sampling in the evaluation).
"""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:  # torch loads only where a model is: jobs/sample.py checks its arguments first
    from torch import nn

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "export"  # the adapter name an applied LoRA export gets (deleted after)


def lora_file(path: str | Path) -> Path | None:
    """The LoRA file of `path` (the file itself, or LORA_FILE in a folder), or None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / LORA_FILE).is_file():
        return path / LORA_FILE
    return None


def lora_problem(path: str | Path) -> str | None:
    """What keeps `path` from being a LoRA export (a folder or a .safetensors file), or None."""
    path = Path(path)
    if not path.exists():
        return f"{path}: no such file or directory (pass the run's export folder or its .safetensors file)"
    if path.is_dir() and not any(path.glob("*.safetensors")):
        return f"{path}: the folder holds no .safetensors file (expected {LORA_FILE})"
    return None


def transformer_problem(path: str | Path) -> str | None:
    """What keeps `path` from being a full fine-tuning export (a transformer folder), or None."""
    if not (Path(path) / "config.json").is_file():
        return f"{path}: not a transformer folder (no config.json); pass a full fine-tuning export"
    return None


def export_problem(path: str | Path) -> str | None:
    """What keeps `path` from being any export (LoRA or transformer folder), or None."""
    path = Path(path)
    if not path.exists():
        return f"export {path}: no such file or directory (pass a run's export folder, its LoRA file or a transformer folder)"
    if lora_file(path) is None and transformer_problem(path):
        return f"export {path}: neither a LoRA export ({LORA_FILE}) nor a transformer folder (config.json)"
    return None


def class_problem(path: str | Path, expected: str, needed_by: str = "the base") -> str | None:
    """A transformer folder holding another class than `expected`, as a message, or None."""
    exported = json.loads((Path(path) / "config.json").read_text()).get("_class_name")
    return None if exported == expected else f"{path} holds a {exported}, but {needed_by} needs a {expected}"


def lora_prefix(file: Path) -> str:
    """The key prefix of a LoRA file ("transformer" or "unet"): what load_lora_adapter strips."""
    with safe_open(str(file), "pt") as f:
        return next(iter(f.keys())).split(".", 1)[0]


def base_mismatch(transformer: "nn.Module", path: str | Path) -> str | None:
    """How the export at `path` does not fit `transformer` (a LoRA module it lacks or of another
    shape; a transformer folder of another class or configuration), or None when it fits."""
    file = lora_file(path)
    if file is None:
        problem = class_problem(path, type(transformer).__name__)
        if problem:
            return f"export {problem}"
        exported = json.loads((Path(path) / "config.json").read_text())
        base = json.loads(json.dumps(dict(transformer.config)))  # tuples -> lists, as config.json has them
        for key, value in exported.items():
            if not key.startswith("_") and key in base and base[key] != value:
                return f"export {path}: its transformer has {key}={value}, the base {key}={base[key]}: another model"
        return None
    modules = dict(transformer.named_modules())
    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            prefix, name = key.split(".", 1)
            if not name.endswith((".lora_A.weight", ".lora_B.weight")):
                continue
            module = name.rsplit(".", 2)[0]
            weight = getattr(modules.get(module), "weight", None)
            if weight is None:
                return (f"export {file}: LoRA module {module!r} is not in the base's {type(transformer).__name__}: "
                        "an export of another model family or size")
            shape = f.get_slice(key).get_shape()
            # lora_A is (r, in, ...) and lora_B (out, r, ...), as the module's weight (out, in, ...)
            side, want = (1, weight.shape[1]) if name.endswith(".lora_A.weight") else (0, weight.shape[0])
            if shape[side] != want:
                return (f"export {file}: {key} has shape {tuple(shape)}, but the base's {module} has weight "
                        f"{tuple(weight.shape)}: an export of another model size")
    return None


@contextmanager
def applied(transformer: "nn.Module", path: str | Path | None):
    """`transformer` with the export at `path` (None: the base as it is). A LoRA is loaded as an
    adapter of the base and deleted after; a transformer folder loads beside it, in its dtype and
    on its device."""
    if path is None:
        yield transformer
        return
    file = lora_file(path)
    if file is None:
        param = next(transformer.parameters())
        model = type(transformer).from_pretrained(str(path), torch_dtype=param.dtype)
        yield model.to(param.device).eval().requires_grad_(False)
        return
    transformer.load_lora_adapter(str(file), prefix=lora_prefix(file), adapter_name=ADAPTER)
    try:
        yield transformer
    finally:
        transformer.delete_adapters(ADAPTER)
