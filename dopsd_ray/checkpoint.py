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
     storage (storage.Storage: a folder, a shared mount or an object store), each file whole
     or absent; state.json goes last;
  3. Ray Train registers a checkpoint (the one `ray.train.get_checkpoint()` resumes
     from) only after every rank's upload returned, and deletes older ones only after
     that;
  4. `check_checkpoint` proves a directory complete: state.json parses, every file it
     lists is there, and every safetensors file's header covers the file exactly (a
     truncated file fails), reading headers only, wherever it is stored. `usable_checkpoint`
     resumes from the checkpoint Ray Train registered, and fails naming it if it cannot be
     read (it was lost with a node's disk, or damaged): never an older one, never step 0
     silently. With none registered, the newest complete one in storage.
"""

import json
import posixpath
import struct
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .storage import Storage, join, node_cache, write_atomic

if TYPE_CHECKING:
    import ray.train

# weights.STUDENT and weights.TEACHER, spelled here so that writing or checking a checkpoint
# imports neither peft nor Ray (a writer is a small, fast process)
STUDENT, TEACHER = "student", "teacher"
STATE_FILE = "state.json"
RAY_TRAIN = "ray_train"  # the run's folder for Ray Train's storage_path


def experiment_uri(cfg) -> str:
    """Where Ray Train keeps a run's checkpoints: RunConfig(storage_path=run_dir/ray_train, name=run_name)."""
    return join(cfg.run_dir, RAY_TRAIN, cfg.train.run_name)


def checkpoint_uri(cfg, checkpoint) -> str | None:
    """Where a ray.train.Checkpoint of run `cfg` is, as users name it (a path, or a URI)."""
    return None if checkpoint is None else join(experiment_uri(cfg), PurePosixPath(checkpoint.path).name)


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

    with tempfile.TemporaryDirectory(prefix="dopsd-ckpt-") as tmp:
        write(tmp)
        yield Checkpoint.from_directory(tmp)


def upload_checkpoint(source: str | Path, experiment: Storage, name: str) -> str:
    """Copy one rank's checkpoint files into experiment/name, each file whole, state.json last
    (Ray Train merges every rank's files into one checkpoint the same way)."""
    return experiment.put_dir(source, name, last=(STATE_FILE,))


def ray_upload_fn(experiment: Storage):
    """checkpoint_upload_fn for ray.train.report: upload_checkpoint into experiment/<name>,
    returned as a Checkpoint on Ray Train's own filesystem object (Ray manages a checkpoint only
    on a filesystem equal to its own, and two S3 filesystems differ once credentials rotate)."""
    import ray.train
    from ray.train import Checkpoint

    def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        with checkpoint.as_directory() as local:
            upload_checkpoint(local, experiment, dir_name)
        storage = ray.train.get_context().get_storage()
        return Checkpoint(posixpath.join(storage.experiment_fs_path, dir_name), filesystem=storage.storage_filesystem)
    return upload


# -- reading -----------------------------------------------------------------------------
def _safetensors_problem(store: Storage, name: str) -> str | None:
    """None if the file's header covers it exactly (a truncated or padded file does not)."""
    try:
        with store.open_input(name) as f:
            size = f.size()
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return "its header runs past the end of the file"
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end != size:
            return f"{size} bytes where its header describes {8 + length + end}"
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        return f"unreadable ({err})"
    return None


def check_checkpoint(directory: str | Path | Storage) -> str | None:
    """None if `directory` (a path, a URI, or a Storage) holds a complete checkpoint, else what is
    wrong with it."""
    store = directory if isinstance(directory, Storage) else Storage(directory)
    where = store.uri
    try:
        meta = json.loads(store.read_text(STATE_FILE))
        files = meta["files"] if "files" in meta else expected_files(int(meta["world"]))
        int(meta["step"])
    except (FileNotFoundError, NotADirectoryError):
        return f"{where}: no {STATE_FILE} (the write did not finish)"
    except (ValueError, KeyError, TypeError) as err:
        return f"{where}/{STATE_FILE} is unreadable ({err})"
    for name in files:
        if not store.is_file(name):
            return f"{where}: {name} is missing (the write did not finish)"
        if name.endswith(".safetensors") and (problem := _safetensors_problem(store, name)):
            return f"{store.name_uri(name)} is damaged: {problem}"
    return None


def checkpoint_step(directory: str | Path | Storage) -> int:
    store = directory if isinstance(directory, Storage) else Storage(directory)
    return int(json.loads(store.read_text(STATE_FILE))["step"])


def checkpoint_names(experiment: Storage) -> list[str]:
    """The checkpoint folders under experiment, complete or not (not Ray Train's own
    checkpoint_manager_snapshot.json beside them)."""
    return [n for n in experiment.listdir(folders=True) if n.startswith("checkpoint_")]


def latest_checkpoint(experiment: str | Path | Storage) -> Storage | None:
    """The complete checkpoint with the highest step under `experiment`, or None."""
    experiment = experiment if isinstance(experiment, Storage) else Storage(experiment)
    complete = [c for c in map(experiment.child, checkpoint_names(experiment)) if check_checkpoint(c) is None]
    return max(complete, key=lambda c: (checkpoint_step(c), c.uri), default=None)


class CheckpointUnreadable(RuntimeError):
    """A checkpoint was registered (or written) but cannot be read: resuming from an older one
    or from step 0 would silently lose training."""


def usable_checkpoint(checkpoint: "ray.train.Checkpoint | None", experiment: Storage) -> Storage | None:
    """Where to resume from: the checkpoint Ray Train registered, which must be complete (it was
    registered only after every rank's files were in: incomplete now means lost or damaged, and
    the run fails naming it); with none registered, the newest complete one in storage; else
    None (a fresh start). A registered checkpoint is looked up by its name in `experiment`,
    the run's storage, whichever node wrote it."""
    if checkpoint is None:
        return latest_checkpoint(experiment)
    found = experiment.child(PurePosixPath(checkpoint.path).name)
    problem = check_checkpoint(found)
    if problem is not None:
        raise CheckpointUnreadable(
            f"cannot resume: the registered checkpoint is not readable: {problem}. Restore it, or start "
            f"afresh under another train.run_name")
    return found


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


def load_checkpoint(directory: str | Path | Storage, weights, rank: int, world: int) -> ResumeState:
    """Load weights into the (not yet partitioned) model; return step, counters, optimizer shard.
    A checkpoint on an object store is copied to this node first (storage.node_cache).

    safetensors and JSON only: nothing in a checkpoint is unpickled.
    """
    from .weights import load_state_dict

    store = directory if isinstance(directory, Storage) else Storage(directory)
    problem = check_checkpoint(store)
    if problem is not None:
        raise CheckpointUnreadable(f"cannot resume: {problem}")
    meta = json.loads(store.read_text(STATE_FILE))
    mine = meta["world"] == world  # this rank's optimizer and EMA shards fit only the same layout
    wanted = [f"{STUDENT}.safetensors", f"{TEACHER}.safetensors"] + (
        [f"optimizer_rank{rank}.safetensors", f"ema_rank{rank}.safetensors"] if mine else [])
    with tempfile.TemporaryDirectory(prefix="dopsd-resume-", dir=node_cache("resume")) as tmp:
        # on an object store: this rank's files only, copied to this node (a local store: read in place)
        local = {n: Path(store.path(n)) if store.local else store.fetch_file(n, Path(tmp, n))
                 for n in wanted if store.is_file(n)}
        load_state_dict(weights, load_file(str(local[f"{STUDENT}.safetensors"])), STUDENT)
        load_state_dict(weights, load_file(str(local[f"{TEACHER}.safetensors"])), TEACHER)
        shard, ema_shard = f"optimizer_rank{rank}.safetensors", f"ema_rank{rank}.safetensors"
        optimizer = load_file(str(local[shard])) if shard in local else None
        ema = load_file(str(local[ema_shard])) if optimizer is not None and ema_shard in local else None
        if optimizer is None:
            warnings.warn(f"checkpoint was written by {meta['world']} learner ranks, now {world}: "
                          "weights resume, the optimizer state and the fp32 EMA shadow start fresh")
    return ResumeState(meta["step"], meta["counters"], store.uri, optimizer, ema)
