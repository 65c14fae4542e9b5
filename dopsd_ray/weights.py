"""Trainable weights: the student, its EMA teacher, and export.

Two implementations of one small surface (used by the learner and the rollout workers):
- `LoraWeights`: two peft LoRA adapters on one frozen base transformer. "student" is
  trainable; "teacher" is its EMA, initialised equal (method.md, "Teacher weights").
- `FullWeights`: the whole transformer is trained; the teacher is a full-parameter EMA copy.

    weights.model                      # the module to call for the student
    with weights.teacher() as model:   # the module to call for the teacher (no grad)
    weights.trainable_parameters()     # what the optimizer updates
    weights.ema_update(decay)          # after every optimizer step
    weights.student_state_dict()       # what a weight sync ships (LoRA: adapters only)
    weights.load_student_state_dict(sd)
    weights.export(path, pipeline_class)
"""

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
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
        self.rank, self.alpha = rank, alpha
        self._pairs = self._pair_parameters()
        with torch.no_grad():
            for t, s in self._pairs:
                t.copy_(s)
        transformer.set_adapter(STUDENT)  # student trainable, teacher frozen

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

    def ema_update(self, decay: float) -> None:
        ema_update(self.teacher_parameters(), self.trainable_parameters(), decay)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student adapter, with diffusers/peft key names (no adapter name)."""
        return {k: v.detach() for k, v in get_peft_model_state_dict(self.model, adapter_name=STUDENT).items()}

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in get_peft_model_state_dict(self.model, adapter_name=TEACHER).items()}

    def load_student_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _load_adapter(self.model, state, STUDENT)

    def load_teacher_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _load_adapter(self.model, state, TEACHER)

    def export(self, path: str | Path, pipeline_class) -> Path:
        """A diffusers LoRA file the stock pipeline's load_lora_weights accepts."""
        metadata = {"r": self.rank, "lora_alpha": self.alpha}
        pipeline_class.save_lora_weights(
            str(path), transformer_lora_layers=self.student_state_dict(),
            transformer_lora_adapter_metadata=metadata, safe_serialization=True,
        )
        return Path(path) / "pytorch_lora_weights.safetensors"


def _load_adapter(model: nn.Module, state: dict[str, torch.Tensor], adapter: str) -> None:
    params = dict(model.named_parameters())
    missing = []
    with torch.no_grad():
        for key, value in state.items():
            # peft state-dict keys drop the adapter name: "...lora_A.weight" -> "...lora_A.<adapter>.weight"
            name = key.replace(".lora_A.", f".lora_A.{adapter}.").replace(".lora_B.", f".lora_B.{adapter}.")
            if name not in params:
                missing.append(key)
                continue
            params[name].copy_(value)
    if missing:
        raise KeyError(f"{len(missing)} adapter tensors match no parameter, e.g. {missing[:3]}")


class FullWeights:
    def __init__(self, transformer: nn.Module):
        self.model = transformer
        self._teacher = copy.deepcopy(transformer).requires_grad_(False).eval()
        transformer.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def teacher_parameters(self) -> list[nn.Parameter]:
        return list(self._teacher.parameters())

    @contextmanager
    def teacher(self):
        with torch.no_grad():
            yield self._teacher

    def ema_update(self, decay: float) -> None:
        ema_update(self.teacher_parameters(), self.trainable_parameters(), decay)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._teacher.state_dict().items()}

    def load_student_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def load_teacher_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._teacher.load_state_dict(state, strict=True)

    def export(self, path: str | Path, pipeline_class=None) -> Path:
        """A diffusers transformer folder (safetensors), loadable with from_pretrained."""
        self.model.save_pretrained(str(path), safe_serialization=True)
        return Path(path)


def make_weights(transformer: nn.Module, lora_cfg, family_targets: list[str]):
    if not lora_cfg.enabled:
        return FullWeights(transformer)
    targets = lora_cfg.targets or family_targets
    return LoraWeights(transformer, targets, lora_cfg.rank, lora_cfg.alpha, lora_cfg.init)
