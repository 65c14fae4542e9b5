"""Trainable weights: the student, its EMA teacher, and export.

Two implementations of one small surface (used by the learner and the rollout workers):
- `LoraWeights`: two peft LoRA adapters on one frozen base transformer. "student" is
  trainable; "teacher" is its EMA, initialised equal (docs/method.md, "Teacher weights").
- `FullWeights`: the whole transformer is trained; the teacher is a full-parameter EMA copy.

    weights.model                      # the module to call for the student
    with weights.teacher() as model:   # the module to call for the teacher (no grad)
    with weights.base() as model:      # the untrained base (LoRA: adapters off), or None
    weights.trainable_parameters()     # what the optimizer updates
    weights.named_parameters(which)    # (key, param) of the student or teacher
    weights.export(path, pipeline_class, comfyui=...)   # LoRA: scale folded in, + a ComfyUI copy
    ema = EmaTeacher(weights); ema.step(decay)   # after every optimizer step, in fp32
    state_dict(weights, which) / load_state_dict(weights, sd, which): what a sync ships
    apply_snapshot(weights, buckets)   # a rollout worker's swap, one bucket at a time

Rollout workers that do not compute teacher targets build no teacher (with_teacher=False):
at full fine-tuning that is a whole model copy they never use.
"""

import copy
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from .algorithms.ema import ema_update

STUDENT, TEACHER = "student", "teacher"


class Weights(Protocol):
    """The surface the learner, the rollout workers and the algorithm use (LoraWeights, FullWeights)."""

    model: nn.Module  # the module to call for the student
    module: nn.Module  # every weight, student and teacher: what DeepSpeed wraps

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def teacher_parameters(self) -> list[nn.Parameter]: ...

    def named_parameters(self, which: str = STUDENT) -> list[tuple[str, nn.Parameter]]: ...

    def teacher(self) -> AbstractContextManager[nn.Module]: ...

    def base(self) -> AbstractContextManager[nn.Module | None]: ...

    def base_as_buffers(self) -> int: ...

    def export(self, path: str | Path, pipeline_class=None, state: dict | None = None,
               comfyui: tuple[dict, dict] | None = None) -> Path: ...


class LoraWeights:
    def __init__(self, transformer: nn.Module, targets: list[str], rank: int, alpha: float, init: str = "gaussian",
                 with_teacher: bool = True):
        transformer.requires_grad_(False)
        lora = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets),
            init_lora_weights="gaussian" if init == "gaussian" else True,
        )
        transformer.add_adapter(lora, adapter_name=STUDENT)
        if with_teacher:
            with warnings.catch_warnings():  # a second adapter on purpose: the EMA teacher
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                transformer.add_adapter(lora, adapter_name=TEACHER)
        self.model = transformer
        self.rank, self.alpha, self.targets = rank, alpha, list(targets)
        self.with_teacher = with_teacher
        params = dict(transformer.named_parameters())
        self._student = [p for name, p in params.items() if f".{STUDENT}." in name]
        self._teacher = [params[name.replace(f".{STUDENT}.", f".{TEACHER}.")]
                         for name in params if f".{STUDENT}." in name] if with_teacher else []
        if not self._student:
            raise ValueError("LoRA matched no module: check lora.targets against the model's module names")
        with torch.no_grad():
            for t, s in zip(self._teacher, self._student):
                t.copy_(s)
        transformer.set_adapter(STUDENT)  # student trainable, teacher frozen
        self.module = transformer  # every weight, student and teacher: what DeepSpeed wraps

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._student)

    def teacher_parameters(self) -> list[nn.Parameter]:
        return list(self._teacher)

    def base_as_buffers(self) -> int:
        """Turn the frozen base's parameters into buffers; returns how many elements moved.

        ZeRO-3 partitions every PARAMETER of the module it wraps, frozen ones included, and
        re-gathers them for every forward and backward: at K=4 that is ~16 gathers of the
        whole base per step, for a trainable state of a few hundred MB. As buffers, the base
        stays whole on every rank (it fits: inference needs it whole anyway) and DeepSpeed
        partitions only what it trains and the EMA teacher.
        """
        moved, teacher = 0, {id(t) for t in self._teacher}
        for module in self.model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.requires_grad or id(p) in teacher:
                    continue
                del module._parameters[name]
                module.register_buffer(name, p.detach(), persistent=True)
                moved += p.numel()
        return moved

    @contextmanager
    def teacher(self):
        if not self.with_teacher:
            raise RuntimeError("these weights were built without a teacher (with_teacher=False)")
        self.model.set_adapter(TEACHER)
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self.model.set_adapter(STUDENT)

    @contextmanager
    def base(self):
        """The frozen base with every adapter off (no grad): the untrained model."""
        self.model.disable_adapters()
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self.model.enable_adapters()
            self.model.set_adapter(STUDENT)  # (enable_adapters may make every adapter trainable)

    def named_parameters(self, which: str = STUDENT) -> list[tuple[str, nn.Parameter]]:
        """(key, parameter) of one adapter; keys drop the adapter name, as diffusers LoRA files do
        (empty for the teacher of weights built without one)."""
        return [(name.replace(f".{which}.", "."), p) for name, p in self.model.named_parameters() if f".{which}." in name]

    def export(self, path: str | Path, pipeline_class, state: dict[str, torch.Tensor] | None = None,
               comfyui: tuple[dict, dict] | None = None) -> Path:
        """A diffusers LoRA file the stock pipeline's load_lora_weights accepts, at scale 1.

        The student computes W x + (alpha / r) B A x. Loaders disagree on where that scale
        comes from: diffusers reads lora_alpha from the file's metadata, ComfyUI and kohya-style
        tools read `.alpha` tensors and take scale 1 without them, so a rank-64 / alpha-128 file
        with alpha in the metadata alone runs at half strength there. So alpha / r is folded into
        every lora_B and the metadata says lora_alpha = r: diffusers' scale is 1 and its product
        unchanged, and a loader that knows nothing of alpha gets the same weights. Folding rather
        than adding `.alpha` tensors: one set of tensors that every loader reads alike, with no
        key some loader might not expect.

        `state`: the student adapter gathered from ZeRO-3 partitions (default: read it here).
        `comfyui`: the family's (blocks, modules) key map (families.comfyui_keys); with it a
        ComfyUI-native copy is written beside, COMFYUI_FILE (see comfyui_lora).
        """
        path = Path(path)
        state = fold_lora_scale(state_dict(self) if state is None else state, self.alpha / self.rank)
        metadata = {"r": self.rank, "lora_alpha": self.rank, "target_modules": self.targets}
        pipeline_class.save_lora_weights(
            str(path), transformer_lora_layers=state,
            transformer_lora_adapter_metadata=metadata, safe_serialization=True,
        )
        if comfyui is not None:
            try:
                native = comfyui_lora(state, *comfyui)
            except KeyError as e:  # custom lora.targets the map does not cover: the diffusers file stands
                warnings.warn(f"no ComfyUI LoRA file written: {e.args[0]}")
            else:
                save_file(native, str(path / COMFYUI_FILE))
        return path / "pytorch_lora_weights.safetensors"


COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"


def fold_lora_scale(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """LoRA weights with `scale` multiplied into every lora_B (in fp32, stored in its dtype)."""
    return {k: (v.float() * scale).to(v.dtype) if ".lora_B." in k else v for k, v in state.items()}


def comfyui_lora(state: dict[str, torch.Tensor], blocks: dict[str, str],
                 modules: dict[str, tuple[str, int | None]]) -> dict[str, torch.Tensor]:
    """LoRA weights (keys `<block>.<i>.<module>.lora_A/B.weight`, scale folded in) under ComfyUI's
    native names: `diffusion_model.<native block>.<i>.<native module>.lora_A.weight` / `.lora_B.weight`.

    ComfyUI maps `diffusion_model.<name>` for every weight of its native model, whatever the
    model (comfy/lora.py model_lora_keys_unet), and reads `<key>.lora_A.weight` / `.lora_B.weight`
    pairs (comfy/weight_adapter/lora.py); with no `<key>.alpha` its scale is 1, the trained
    strength of a folded file. `blocks` renames block lists; `modules` gives each of our modules
    its native module and, where the native model fuses several of ours into one linear (q, k, v
    into qkv, rows in that order), its part index. Fused parts become one LoRA of rank n * r whose
    product is exactly the parts' products stacked: A = [A_0; A_1; ...], B = blockdiag(B_0, B_1, ...).
    Raises KeyError for a module the map does not cover or a fused module with parts missing.

    Why native names: recent ComfyUI also converts diffusers keys for Z-Image and FLUX.2 itself
    (`transformer.<our module>`, q/k/v sliced into qkv), but those are the keys of the diffusers
    file already; this copy relies only on the generic rule, not on per-model conversion tables.
    Its price: the fused q/k/v B matrices are block-diagonal, zeros off the blocks.
    """
    fused: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
        module = key[:-len(".lora_A.weight")]
        block, index, name = (module.split(".", 2) + ["", ""])[:3]
        if block not in blocks or name not in modules:
            raise KeyError(f"LoRA module {module!r} has no ComfyUI name in the family's map")
        native, part = modules[name]
        fused.setdefault(f"{blocks[block]}.{index}.{native}", {})[part] = (state[key], state[f"{module}.lora_B.weight"])
    out = {}
    for native, parts in fused.items():
        if None in parts:
            down, up = parts[None]
        else:
            n = 1 + max(p for m, p in modules.values() if m == native.split(".", 2)[2])
            if sorted(parts) != list(range(n)):
                raise KeyError(f"ComfyUI's {native} fuses {n} LoRA modules; the LoRA has parts {sorted(parts)}")
            down = torch.cat([parts[i][0] for i in range(n)])
            up = torch.block_diag(*[parts[i][1] for i in range(n)])
        out[f"diffusion_model.{native}.lora_A.weight"] = down.contiguous()
        out[f"diffusion_model.{native}.lora_B.weight"] = up.contiguous()
    return out


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DeepSpeed ZeRO-3 partitioned parameter, or the parameter itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class EmaTeacher:
    """teacher <- decay * teacher + (1 - decay) * student, after every optimizer step, in fp32.

    bf16 keeps 8 bits of mantissa, so `t.lerp_(s, 1e-4)` on bf16 tensors rounds to no
    change: an EMA teacher at decay 0.9999 kept in bf16 (DeepSpeed's bf16 mode casts every
    parameter, the teacher's too, and keeps fp32 masters only of what it optimizes) would
    stay the initial model. So the EMA lives in an fp32 shadow of this rank's teacher
    tensors, and the teacher weights the forward uses are rounded from it after each
    update. fp32 teacher tensors are their own shadow (no copy).

    Under ZeRO-3 student and teacher are partitioned alike: each rank keeps the shadow of
    its own shards, updates it from its own student shards, and no gather is needed.
    Build it after deepspeed.initialize (the shards exist from then on).
    """

    def __init__(self, weights):
        self.teacher = [_local(t) for t in weights.teacher_parameters()]
        self.student = [_local(s) for s in weights.trainable_parameters()]
        self.shadow = [t if t.dtype == torch.float32 else t.detach().float() for t in self.teacher]

    @property
    def separate(self) -> bool:
        """True when the shadow is a copy (a non-fp32 teacher): it must be checkpointed."""
        return any(s is not t for s, t in zip(self.shadow, self.teacher))

    @torch.no_grad()
    def step(self, decay: float) -> None:
        ema_update(self.shadow, self.student, decay)
        for t, s in zip(self.teacher, self.shadow):
            if s is not t:
                t.copy_(s)

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's shadow shards by position ({} when the teacher is its own shadow)."""
        return {str(i): s for i, s in enumerate(self.shadow)} if self.separate else {}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA shadow has {len(state)} tensors, this rank's teacher {len(self.shadow)}")
        for i, (t, s) in enumerate(zip(self.teacher, self.shadow)):
            s.copy_(state[str(i)])
            if s is not t:
                t.copy_(s)


def state_dict(weights, which: str = STUDENT) -> dict[str, torch.Tensor]:
    """Student (or teacher) weights by key: LoRA adapters only, or the full transformer."""
    return {k: p.detach() for k, p in weights.named_parameters(which)}


@torch.no_grad()
def apply_snapshot(weights, buckets: Iterable[dict[str, torch.Tensor]]) -> int:
    """Copy a snapshot into the model one bucket at a time (keys "teacher/..." go to the
    teacher); returns its bytes. A worker so needs one bucket of extra memory, not a
    second model. Every student key, and every teacher key of weights that have a
    teacher, must arrive (a teacher left at its old value would go unnoticed)."""
    targets = {STUDENT: dict(weights.named_parameters(STUDENT)), TEACHER: dict(weights.named_parameters(TEACHER))}
    seen = {STUDENT: set(), TEACHER: set()}
    nbytes = 0
    for bucket in buckets:
        for key, value in bucket.items():
            which, name = (TEACHER, key.split("/", 1)[1]) if key.startswith(f"{TEACHER}/") else (STUDENT, key)
            if name not in targets[which]:
                raise KeyError(f"snapshot key {key!r} is not a {which} weight of this model")
            targets[which][name].copy_(value, non_blocking=True)
            seen[which].add(name)
            nbytes += value.numel() * value.element_size()
    for which in (STUDENT, TEACHER) if targets[TEACHER] else (STUDENT,):
        missing = sorted(targets[which].keys() - seen[which])
        if missing:
            raise KeyError(f"snapshot misses {len(missing)} {which} weights, e.g. {missing[:3]}")
    return nbytes


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
    def __init__(self, transformer: nn.Module, with_teacher: bool = True):
        self.model = transformer
        self._teacher = copy.deepcopy(transformer).requires_grad_(False).eval() if with_teacher else None
        transformer.requires_grad_(True)
        # every weight, student and teacher: what DeepSpeed wraps, so both are partitioned alike
        self.module = nn.ModuleDict({STUDENT: transformer, **({TEACHER: self._teacher} if with_teacher else {})})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def teacher_parameters(self) -> list[nn.Parameter]:
        return [] if self._teacher is None else list(self._teacher.parameters())

    def base_as_buffers(self) -> int:
        """Nothing is frozen in full fine-tuning: every weight stays DeepSpeed's."""
        return 0

    @contextmanager
    def teacher(self):
        if self._teacher is None:
            raise RuntimeError("these weights were built without a teacher (with_teacher=False)")
        with torch.no_grad():
            yield self._teacher

    @contextmanager
    def base(self):
        """None: full fine-tuning trains the base in place and keeps no copy of it."""
        yield None

    def named_parameters(self, which: str = STUDENT) -> list[tuple[str, nn.Parameter]]:
        if which == TEACHER:
            return [] if self._teacher is None else list(self._teacher.named_parameters())
        return list(self.model.named_parameters())

    def export(self, path: str | Path, pipeline_class=None, state: dict[str, torch.Tensor] | None = None,
               comfyui=None) -> Path:
        """A diffusers transformer folder (config + safetensors), loadable with from_pretrained
        (`comfyui` is for LoRA exports: whole weights have no ComfyUI copy here)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = state_dict(self) if state is None else state
        self.model.save_config(str(path))
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "diffusion_pytorch_model.safetensors"))
        return path


def make_weights(transformer: nn.Module, lora_cfg, family_targets: list[str], with_teacher: bool = True):
    if not lora_cfg.enabled:
        return FullWeights(transformer, with_teacher)
    targets = lora_cfg.targets or family_targets
    return LoraWeights(transformer, targets, lora_cfg.rank, lora_cfg.alpha, lora_cfg.init, with_teacher)
