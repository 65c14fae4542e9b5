"""Trainable weights: the student, its EMA teacher, and export.

Two implementations of one small surface (used by the learner and the rollout workers):
- `LoraWeights`: two peft LoRA adapters on one frozen base transformer. "student" is
  trainable; "teacher" is its EMA, initialised equal (method.md, "Teacher weights").
- `FullWeights`: the whole transformer is trained; the teacher is a full-parameter EMA copy.

    weights.model                      # the module to call for the student
    with weights.teacher() as model:   # the module to call for the teacher (no grad)
    weights.trainable_parameters()     # what the optimizer updates
    weights.named_parameters(which)    # (key, param) of the student or teacher
    weights.export(path, pipeline_class)
    ema_step(weights, decay)           # after every optimizer step
    state_dict(weights, which) / load_state_dict(weights, sd, which): what a sync ships
"""

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from .algorithms.ema import ema_update

STUDENT, TEACHER = "student", "teacher"


class LoraWeights:
    def __init__(self, transformer: nn.Module, targets: list[str], rank: int, alpha: float, init: str = "gaussian"):
        transformer.requires_grad_(False)
        lora = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets),
            init_lora_weights="gaussian" if init == "gaussian" else True,
        )
        transformer.add_adapter(lora, adapter_name=STUDENT)
        with warnings.catch_warnings():  # a second adapter on purpose: the EMA teacher
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(lora, adapter_name=TEACHER)
        self.model = transformer
        self.rank, self.alpha, self.targets = rank, alpha, list(targets)
        self._pairs = self._pair_parameters()
        with torch.no_grad():
            for t, s in self._pairs:
                t.copy_(s)
        transformer.set_adapter(STUDENT)  # student trainable, teacher frozen
        self.module = transformer  # every weight, student and teacher: what DeepSpeed wraps

    def _pair_parameters(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        params = dict(self.model.named_parameters())
        pairs = []
        for name, p in params.items():
            if f".{STUDENT}." in name:
                pairs.append((params[name.replace(f".{STUDENT}.", f".{TEACHER}.")], p))
        if not pairs:
            raise ValueError("LoRA matched no module: check lora.targets against the model's module names")
        return pairs

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [s for _, s in self._pairs]

    def teacher_parameters(self) -> list[nn.Parameter]:
        return [t for t, _ in self._pairs]

    @contextmanager
    def teacher(self):
        self.model.set_adapter(TEACHER)
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self.model.set_adapter(STUDENT)

    def named_parameters(self, which: str = STUDENT) -> list[tuple[str, nn.Parameter]]:
        """(key, parameter) of one adapter; keys drop the adapter name, as diffusers LoRA files do."""
        return [(name.replace(f".{which}.", "."), p) for name, p in self.model.named_parameters() if f".{which}." in name]

    def export(self, path: str | Path, pipeline_class, state: dict[str, torch.Tensor] | None = None) -> Path:
        """A diffusers LoRA file the stock pipeline's load_lora_weights accepts.

        `state`: the student adapter gathered from ZeRO-3 partitions (default: read it here).
        """
        state = state_dict(self) if state is None else state
        metadata = {"r": self.rank, "lora_alpha": self.alpha, "target_modules": self.targets}
        pipeline_class.save_lora_weights(
            str(path), transformer_lora_layers=state,
            transformer_lora_adapter_metadata=metadata, safe_serialization=True,
        )
        return Path(path) / "pytorch_lora_weights.safetensors"


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DeepSpeed ZeRO-3 partitioned parameter, or the parameter itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def ema_step(weights, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, after every optimizer step.

    Under ZeRO-3 student and teacher tensors are partitioned alike, so each rank
    updates its own shards and no gather is needed.
    """
    ema_update([_local(t) for t in weights.teacher_parameters()],
               [_local(s) for s in weights.trainable_parameters()], decay)


def state_dict(weights, which: str = STUDENT) -> dict[str, torch.Tensor]:
    """Student (or teacher) weights by key: LoRA adapters only, or the full transformer."""
    return {k: p.detach() for k, p in weights.named_parameters(which)}


def load_state_dict(weights, state: dict[str, torch.Tensor], which: str = STUDENT) -> None:
    """Copy a snapshot in; keys must match exactly."""
    params = dict(weights.named_parameters(which))
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


class FullWeights:
    def __init__(self, transformer: nn.Module):
        self.model = transformer
        self._teacher = copy.deepcopy(transformer).requires_grad_(False).eval()
        transformer.requires_grad_(True)
        # every weight, student and teacher: what DeepSpeed wraps, so both are partitioned alike
        self.module = nn.ModuleDict({STUDENT: transformer, TEACHER: self._teacher})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def teacher_parameters(self) -> list[nn.Parameter]:
        return list(self._teacher.parameters())

    @contextmanager
    def teacher(self):
        with torch.no_grad():
            yield self._teacher

    def named_parameters(self, which: str = STUDENT) -> list[tuple[str, nn.Parameter]]:
        return list((self.model if which == STUDENT else self._teacher).named_parameters())

    def export(self, path: str | Path, pipeline_class=None, state: dict[str, torch.Tensor] | None = None) -> Path:
        """A diffusers transformer folder (config + safetensors), loadable with from_pretrained."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = state_dict(self) if state is None else state
        self.model.save_config(str(path))
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "diffusion_pytorch_model.safetensors"))
        return path


def make_weights(transformer: nn.Module, lora_cfg, family_targets: list[str]):
    if not lora_cfg.enabled:
        return FullWeights(transformer)
    targets = lora_cfg.targets or family_targets
    return LoraWeights(transformer, targets, lora_cfg.rank, lora_cfg.alpha, lora_cfg.init)
