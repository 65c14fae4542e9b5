"""Checkpoints: safetensors + JSON only, nothing pickled; complete or absent, never half.

Layout of one checkpoint directory, checkpoint_{step:08d} (every rank's files in one):
    student.safetensors        full student weights (LoRA: adapters)      (rank 0)
    teacher.safetensors        full EMA-teacher weights                   (rank 0)
    optimizer_rank{r}.safetensors   rank r's fp32 master shards and AdamW moments
    ema_rank{r}.safetensors    rank r's fp32 EMA-teacher shadow (bf16 runs: weights.EmaTeacher)
    state.json                 step, counters, learner world size, the file list   (rank 0, last)

Weights are loaded into the model BEFORE DeepSpeed partitions it, so a checkpoint
resumes on any number of ranks; the optimizer shards need the same number of ranks
(otherwise the optimizer restarts fresh, with a warning).

Interrupted writes (a killed learner, a full disk, an exception halfway) never replace
the last good checkpoint:
  1. each rank writes its files into a fresh local temp dir, each file under a
     `.name.partial` name that is renamed into place only once it is fully written;
  2. `upload_checkpoint` (Ray Train's checkpoint_upload_fn) copies them into the run's
     storage the same way: `.name.partial`, then an atomic rename; state.json goes last;
  3. Ray Train registers a checkpoint (the one `ray.train.get_checkpoint()` resumes
     from) only after every rank's upload returned, and deletes older ones only after
     that;
  4. `check_checkpoint` proves a directory complete: state.json parses, every file it
     lists is there, and every safetensors file's header covers the file exactly (a
     truncated file fails). `usable_checkpoint` resumes from Ray's checkpoint when it is
     complete, else from the newest complete one in the run's storage, saying so.
"""

import json
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .storage import PARTIAL, write_atomic

# weights.STUDENT and weights.TEACHER, spelled here so that writing or checking a checkpoint
# imports neither peft nor Ray (a writer is a small, fast process)
STUDENT, TEACHER = "student", "teacher"
STATE_FILE = "state.json"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def expected_files(world: int, ema: bool = False) -> list[str]:
    """Every file a complete checkpoint of `world` learner ranks holds (state.json last)."""
    return ([f"{STUDENT}.safetensors", f"{TEACHER}.safetensors"]
            + [f"optimizer_rank{r}.safetensors" for r in range(world)]
            + ([f"ema_rank{r}.safetensors" for r in range(world)] if ema else []) + [STATE_FILE])


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


def write_checkpoint_files(directory: str | Path, rank: int, world: int, step: int, counters: dict,
                           optimizer, student: dict | None, teacher: dict | None, ema: dict | None = None) -> Path:
    """Write rank `rank`'s part of the step-`step` checkpoint into `directory` (no Ray needed).

    `ema`: this rank's fp32 EMA shadow (EmaTeacher.state()); empty or None when the teacher
    is fp32 and so its own shadow (then teacher.safetensors holds it exactly)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner, masters = _optimizer_slots(optimizer)
    tensors = {}
    for i, master in enumerate(masters):
        tensors[f"{i}.master"] = master.detach()
        for name, value in inner.state.get(master, {}).items():
            tensors[f"{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors = _contiguous(tensors)
    write_atomic(directory / f"optimizer_rank{rank}.safetensors", lambda p: save_file(tensors, str(p)))
    if ema:
        shadow = _contiguous(ema)
        write_atomic(directory / f"ema_rank{rank}.safetensors", lambda p: save_file(shadow, str(p)))
    if rank == 0:
        for name, state in ((STUDENT, _contiguous(student)), (TEACHER, _contiguous(teacher))):
            write_atomic(directory / f"{name}.safetensors", lambda p, s=state: save_file(s, str(p)))
        meta = {"step": step, "counters": counters, "world": world, "files": expected_files(world, bool(ema))}
        write_atomic(directory / STATE_FILE, lambda p: p.write_text(json.dumps(meta)))
    return directory


@contextmanager
def save_checkpoint(write):
    """write(directory) writes this rank's part into a fresh temp dir, yielded as a ray.train.Checkpoint."""
    from ray.train import Checkpoint  # Ray only where Ray Train needs it: the rest runs anywhere

    tmp = Path(tempfile.mkdtemp(prefix="dopsd-ckpt-"))
    try:
        write(tmp)
        yield Checkpoint.from_directory(str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_checkpoint(source: str | Path, destination: str | Path) -> Path:
    """Copy one rank's checkpoint files into the shared checkpoint dir, each file atomically,
    state.json last (Ray Train merges every rank's files into one dir the same way)."""
    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    files = sorted((p for p in source.iterdir() if p.is_file() and not p.name.endswith(PARTIAL)),
                   key=lambda p: (p.name == STATE_FILE, p.name))
    for f in files:
        write_atomic(destination / f.name, lambda p, f=f: shutil.copyfile(f, p))
    return destination


def ray_upload_fn(experiment_dir: str | Path):
    """checkpoint_upload_fn for ray.train.report: upload_checkpoint into experiment_dir/<name>."""
    from ray.train import Checkpoint

    def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        with checkpoint.as_directory() as local:
            return Checkpoint.from_directory(str(upload_checkpoint(local, Path(experiment_dir) / dir_name)))
    return upload


# -- reading -----------------------------------------------------------------------------
def check_checkpoint(directory: str | Path) -> str | None:
    """None if `directory` holds a complete checkpoint, else what is wrong with it."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / STATE_FILE).read_text())
        files = meta["files"] if "files" in meta else expected_files(int(meta["world"]))
        int(meta["step"])
    except FileNotFoundError:
        return f"{directory}: no {STATE_FILE} (the write did not finish)"
    except (ValueError, KeyError, TypeError) as err:
        return f"{directory}/{STATE_FILE} is unreadable ({err})"
    for name in files:
        path = directory / name
        if not path.is_file():
            return f"{directory}: {name} is missing (the write did not finish)"
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), "pt"):
                    pass  # the header must cover the file exactly: a truncated file fails here
            except Exception as err:
                return f"{path} is damaged ({err})"
    return None


def checkpoint_step(directory: str | Path) -> int:
    return int(json.loads((Path(directory) / STATE_FILE).read_text())["step"])


def latest_checkpoint(experiment_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under experiment_dir, or None."""
    root = Path(experiment_dir)
    if not root.is_dir():
        return None
    complete = [d for d in root.glob("checkpoint_*") if d.is_dir() and check_checkpoint(d) is None]
    return max(complete, key=lambda d: (checkpoint_step(d), d.name), default=None)


def usable_checkpoint(checkpoint: "ray.train.Checkpoint | None", experiment_dir: str | Path) -> Path | None:
    """Where to resume from: Ray Train's checkpoint if it is complete; otherwise (or when
    Ray has none but the storage does) the newest complete checkpoint in experiment_dir."""
    if checkpoint is not None:
        problem = check_checkpoint(checkpoint.path)
        if problem is None:
            return Path(checkpoint.path)
        fallback = latest_checkpoint(experiment_dir)
        warnings.warn(f"the checkpoint Ray Train resumes from is incomplete: {problem}; resuming from "
                      f"{fallback or 'scratch'} instead")
        return fallback
    return latest_checkpoint(experiment_dir)


@dataclass
class ResumeState:
    step: int
    counters: dict
    path: str = ""
    optimizer_tensors: dict | None = field(default=None, repr=False)
    ema_tensors: dict | None = field(default=None, repr=False)

    def restore_ema(self, ema) -> None:
        """This rank's fp32 EMA shadow, when the checkpoint has it for this world size; else the
        shadow stays what EmaTeacher read from the (bf16-rounded) teacher weights."""
        if self.ema_tensors is not None:
            ema.load_state(self.ema_tensors)
        elif ema.separate:
            warnings.warn("no fp32 EMA shadow in the checkpoint for this learner layout: the EMA teacher "
                          "resumes from its bf16 weights")

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


def load_checkpoint(directory: str | Path, weights, rank: int, world: int) -> ResumeState:
    """Load weights into the (not yet partitioned) model; return step, counters, optimizer shard.

    safetensors and JSON only: nothing in a checkpoint is unpickled.
    """
    from .weights import load_state_dict

    d = Path(directory)
    problem = check_checkpoint(d)
    if problem is not None:
        raise ValueError(f"cannot resume: {problem}")
    meta = json.loads((d / STATE_FILE).read_text())
    load_state_dict(weights, load_file(str(d / f"{STUDENT}.safetensors")), STUDENT)
    load_state_dict(weights, load_file(str(d / f"{TEACHER}.safetensors")), TEACHER)
    shard, ema_shard = d / f"optimizer_rank{rank}.safetensors", d / f"ema_rank{rank}.safetensors"
    optimizer = ema = None
    if meta["world"] == world and shard.is_file():
        optimizer = load_file(str(shard))
        ema = load_file(str(ema_shard)) if ema_shard.is_file() else None
    else:
        warnings.warn(f"checkpoint was written by {meta['world']} learner ranks, now {world}: "
                      "weights resume, the optimizer state and the fp32 EMA shadow start fresh")
    return ResumeState(meta["step"], meta["counters"], str(d), optimizer, ema)
