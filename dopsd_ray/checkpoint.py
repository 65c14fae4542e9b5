"""Checkpoints: safetensors + JSON only, nothing pickled.

Layout of one checkpoint directory (Ray Train merges every rank's files into it):
    state.json                 step, counters, learner world size        (rank 0)
    student.safetensors        full student weights (LoRA: adapters)      (rank 0)
    teacher.safetensors        full EMA-teacher weights                   (rank 0)
    optimizer_rank{r}.safetensors   rank r's fp32 master shards and AdamW moments

Weights are loaded into the model BEFORE DeepSpeed partitions it, so a checkpoint
resumes on any number of ranks; the optimizer shards need the same number of ranks
(otherwise the optimizer restarts fresh, with a warning).
"""

import json
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ray.train import Checkpoint
from safetensors.torch import load_file, save_file

from .weights import STUDENT, TEACHER, load_state_dict


def _optimizer_slots(optimizer) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """(the inner torch optimizer, this rank's fp32 master tensors, in a stable order)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return optimizer.optimizer, list(optimizer.fp32_partitioned_groups_flat)
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return optimizer.optimizer, list(optimizer.single_partition_of_fp32_groups)
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner, [p for g in inner.param_groups for p in g["params"]]


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


@contextmanager
def save_checkpoint(rank: int, world: int, step: int, counters: dict, optimizer,
                    student: dict | None, teacher: dict | None):
    """Write this rank's part into a fresh temp dir and yield it as a ray.train.Checkpoint."""
    tmp = Path(tempfile.mkdtemp(prefix=f"dopsd-ckpt-{step}-"))
    try:
        inner, masters = _optimizer_slots(optimizer)
        tensors = {}
        for i, master in enumerate(masters):
            tensors[f"{i}.master"] = master.detach()
            for name, value in inner.state.get(master, {}).items():
                tensors[f"{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        save_file(_contiguous(tensors), str(tmp / f"optimizer_rank{rank}.safetensors"))
        if rank == 0:
            save_file(_contiguous(student), str(tmp / f"{STUDENT}.safetensors"))
            save_file(_contiguous(teacher), str(tmp / f"{TEACHER}.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": step, "counters": counters, "world": world}))
        yield Checkpoint.from_directory(str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ResumeState:
    step: int
    counters: dict
    optimizer_tensors: dict | None = field(default=None, repr=False)

    def restore_optimizer(self, optimizer) -> None:
        if self.optimizer_tensors is None:
            return
        inner, masters = _optimizer_slots(optimizer)
        with torch.no_grad():
            for i, master in enumerate(masters):
                master.copy_(self.optimizer_tensors[f"{i}.master"])
                slots = {k.split(".", 1)[1]: v for k, v in self.optimizer_tensors.items()
                         if k.startswith(f"{i}.") and not k.endswith(".master")}
                inner.state[master] = {k: v.to(master.device) for k, v in slots.items()}


def load_checkpoint(checkpoint: Checkpoint, weights, rank: int, world: int) -> ResumeState:
    """Load weights into the (not yet partitioned) model; return step, counters, optimizer shard."""
    with checkpoint.as_directory() as d:
        d = Path(d)
        meta = json.loads((d / "state.json").read_text())
        load_state_dict(weights, load_file(str(d / f"{STUDENT}.safetensors")), STUDENT)
        load_state_dict(weights, load_file(str(d / f"{TEACHER}.safetensors")), TEACHER)
        shard = d / f"optimizer_rank{rank}.safetensors"
        optimizer = None
        if meta["world"] == world and shard.is_file():
            optimizer = load_file(str(shard))
        else:
            warnings.warn(f"checkpoint was written by {meta['world']} learner ranks, now {world}: "
                          "weights resume, the optimizer state starts fresh")
    return ResumeState(meta["step"], meta["counters"], optimizer)
