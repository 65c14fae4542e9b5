"""Sample grids: what users look at instead of reading losses.

One column per prompt: train.validation_prompts first, then the captions of a few
training pairs (data.stream.take_validation). Rows:

    base                                  the untrained model, from the prompt alone
    student step N                        the student now, from the prompt alone
    teacher (training image in context)   the EMA teacher, from the prompt + the column's image
    training image                        the pair's image

The last two rows have cells only in the training-pair columns. Every column has its own
seed (train.seed + column index), the same in every row and every grid, at the family's
few-step setting and one size (train.sample_size, default the pairs' bucket): rows and
steps compare pixel for pixel. If the teacher row does not show the concept, D-OPSD
cannot teach it (the teacher is the ceiling): look before spending GPU hours.

    val = validation_set(cfg, (captions, images))       # the driver, once
    student = student_samples(family, weights.model, val, steps)
    teacher = teacher_samples(family, weights, val, steps)
    validation_grid(val, student, teacher, "student step 100", base=base)

Under ZeRO-3 every learner rank must run the sampling (each forward gathers the
partitioned weights); only the rank that shows the grid decodes (decode=False elsewhere).
"""

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from .algorithms.sampling import euler_sample
from .algorithms.steps import velocity_fn
from .grid import sample_grid, to_uint8
from .tensors import safetensors_metadata

BASE_FILE = "base.safetensors"  # in <run dir>/samples: the base row, kept for resumed runs


@dataclass
class ValidationSet:
    """The columns of every sample grid of a run: CPU tensors, sent from the driver to the learners."""

    prompts: list[str]  # one per column: the validation prompts, then the training pairs' captions
    seeds: list[int]  # one per column
    height: int  # every sample's size
    width: int
    images: torch.Tensor | None = None  # (P, 3, h, w) in [-1, 1]: the images of the last P columns

    @property
    def pairs(self) -> int:
        """How many columns (the last ones) are training pairs."""
        return 0 if self.images is None else len(self.images)

    def check_size(self, pixel_multiple: int) -> None:
        if self.height % pixel_multiple or self.width % pixel_multiple:
            raise ValueError(f"sample size {self.height}x{self.width} (train.sample_size) is not a multiple of "
                             f"{pixel_multiple}, the model's pixel_multiple; set train.sample_size to a multiple "
                             f"of {pixel_multiple}, e.g. {max(1, self.height // pixel_multiple) * pixel_multiple}")

    def made_for(self, num_steps: int) -> dict[str, str]:
        """What a set of samples depends on besides the weights (the metadata of BASE_FILE)."""
        return {"prompts": json.dumps(self.prompts), "seeds": json.dumps(self.seeds),
                "size": f"{self.height}x{self.width}", "steps": str(num_steps)}


def validation_set(cfg, pairs: tuple[list[str], torch.Tensor] | None, prompts: list[str] | None = None
                   ) -> ValidationSet | None:
    """The grid columns: `prompts` (default train.validation_prompts), then the training `pairs`
    (captions, images), at train.sample_size or the pairs' size; None when there is no column."""
    prompts = list(cfg.train.validation_prompts if prompts is None else prompts)
    captions, images = pairs if pairs is not None else ([], None)
    columns = prompts + list(captions)
    if not columns:
        return None
    size = cfg.train.sample_size
    if size is None and images is None:
        raise ValueError("train.sample_size is unset (default: the training pairs' size) and the data gave no "
                         "validation pairs; set train.sample_size, e.g. train.sample_size=1024")
    height, width = (size, size) if size is not None else images.shape[-2:]
    return ValidationSet(columns, [cfg.train.seed + i for i in range(len(columns))], int(height), int(width),
                         images)


def column_noise(family, val: ValidationSet, columns: range) -> torch.Tensor:
    """Each column's noise from its own seed, drawn on the CPU (the same samples on any
    device and whatever the other columns), then moved to the family's device."""
    noise = [torch.randn(family.latent_shape(1, val.height, val.width),
                         generator=torch.Generator().manual_seed(val.seeds[c])) for c in columns]
    return torch.cat(noise).to(family.device)


@torch.no_grad()
def decode_one_by_one(family, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] on the CPU, decoded one at a time: a VAE decode at 1 MP holds
    gigabytes of activations, and a grid of 8 decoded at once would hold 8 times that."""
    return torch.cat([family.decode_latents(x[None]).clamp(-1, 1).cpu() for x in latents])


@torch.no_grad()
def student_samples(family, model, val: ValidationSet, num_steps: int, decode: bool = True) -> torch.Tensor | None:
    """Every column from its prompt alone with `model` (the student, or the base): images in
    [-1, 1] on the CPU, or None with decode=False (only the forwards run)."""
    columns = range(len(val.prompts))
    sigmas = family.inference_sigmas(num_steps, val.height, val.width)
    context = family.student_context(val.prompts)
    latents = euler_sample(velocity_fn(family, model, context), column_noise(family, val, columns), sigmas)
    return decode_one_by_one(family, latents) if decode else None


@torch.no_grad()
def teacher_samples(family, weights, val: ValidationSet, num_steps: int, decode: bool = True) -> torch.Tensor | None:
    """The training-pair columns from prompt + training image, with the EMA teacher and each
    column's seed; images as student_samples (None when there are no pairs or decode=False)."""
    if not val.pairs:
        return None
    columns = range(len(val.prompts) - val.pairs, len(val.prompts))
    sigmas = family.inference_sigmas(num_steps, val.height, val.width)
    context = family.teacher_context([val.prompts[c] for c in columns], val.images.to(family.device))
    with weights.teacher() as model:
        latents = euler_sample(velocity_fn(family, model, context), column_noise(family, val, columns), sigmas)
    return decode_one_by_one(family, latents) if decode else None


def validation_grid(val: ValidationSet, student: torch.Tensor, teacher: torch.Tensor | None, student_label: str,
                    base: torch.Tensor | None = None):
    """The labelled PIL grid (rows in the module docstring; `base` None: no base row)."""
    rows, labels = [], []
    if base is not None:
        rows.append(list(base))
        labels.append("base")
    rows.append(list(student))
    labels.append(student_label)
    if val.pairs:
        empty = [None] * (len(val.prompts) - val.pairs)  # the prompt-only columns
        rows += [empty + list(teacher), empty + list(val.images)]
        labels += ["teacher (training image in context)", "training image"]
    return sample_grid(rows, labels, val.prompts)


def save_base(store, name: str, images: torch.Tensor, val: ValidationSet, num_steps: int) -> torch.Tensor:
    """Save the base row as `name` in `store` (a storage.Storage) as uint8 pixels (what the grid
    shows, exactly), with what it was made for; returns those pixels."""
    pixels = to_uint8(images)
    store.write(name, save({"images": pixels}, metadata=val.made_for(num_steps)))
    return pixels


def load_base(store, name: str, val: ValidationSet, num_steps: int) -> torch.Tensor | None:
    """The saved base row, or None when it is missing or was made for other prompts, seeds,
    size or step count."""
    if not store.is_file(name):
        return None
    data = store.read_bytes(name)
    if safetensors_metadata(data) != val.made_for(num_steps):
        return None
    return load(data)["images"]


def pixel_gaps(samples: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per item, the mean absolute difference to its target in 0-255 pixel units (images in [-1, 1]);
    targets of another size than the samples (train.sample_size) are resized to theirs first."""
    targets = targets.detach().cpu().float()
    if targets.shape[-2:] != samples.shape[-2:]:
        targets = torch.nn.functional.interpolate(targets, size=samples.shape[-2:], mode="bilinear", antialias=True)
    diff = (samples.detach().cpu().float().clamp(-1, 1) - targets.clamp(-1, 1)).abs() * 127.5
    return diff.flatten(1).mean(1).tolist()
