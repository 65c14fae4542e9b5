"""Where a learner rank runs: Ray Train, or one plain process (tests, the GPU device check).

A context gives the rank its place (rank, world, device), its data, the checkpoint to resume
from, and the way a checkpoint is stored:

    RayTrainContext()        inside train_loop_per_worker: ray.train's rank, device, dataset
                             shards; checkpoints reported to Ray Train (it registers them,
                             FailureConfig restarts resume from them)
    LocalContext(...)        no Ray: rank and world given (a process group of one, or one a
                             test set up), datasets as iterables of decoded rows, checkpoints
                             written straight into `experiment_dir`
"""

import os
import tempfile
from pathlib import Path

import torch

from .. import process
from ..checkpoint import checkpoint_dir_name, latest_checkpoint, ray_upload_fn, save_checkpoint, upload_checkpoint
from ..checkpoint import usable_checkpoint
from ..ranks import LearnerRanks
from ..storage import Storage


class RayTrainContext:
    """`experiment`: where this run's checkpoints go (RunConfig's storage_path / name: a path
    or an object-store URI, the same on every node)."""

    def __init__(self, experiment: str):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = process.device(ray.train.torch.get_device() if torch.cuda.is_available() else None)
        self.ranks = LearnerRanks(self.rank, self.world, self.device)
        self.experiment = Storage(experiment)

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def resume_dir(self) -> Storage | None:
        """The checkpoint Ray Train registered (it must be readable), else the newest complete one."""
        import ray.train

        return usable_checkpoint(ray.train.get_checkpoint(), self.experiment)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def save(self, step: int, write) -> None:
        """write(directory) writes this rank's files; Ray Train uploads them (each file complete
        or not at all, state.json last) and registers the checkpoint once every rank's are in."""
        import ray.train

        with save_checkpoint(write) as ckpt:
            ray.train.report({"step": step}, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(step),
                             checkpoint_upload_fn=ray_upload_fn(self.experiment))


def one_rank_group(device: torch.device) -> None:
    """The default process group of a one-rank learner (DeepSpeed needs one), unless there is one."""
    import socket

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


class LocalContext:
    """A learner rank without Ray. `datasets`: name -> iterable of decoded rows (or a Ray
    Dataset). With world > 1 the default process group must exist already (one process per rank).
    `experiment`: where checkpoints go, a path or an object-store URI."""

    def __init__(self, experiment: str | Path, datasets: dict | None = None, rank: int = 0, world: int = 1,
                 device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or process.device()
        self.ranks = LearnerRanks(rank, world, self.device)
        self.experiment = Storage(experiment)
        self.datasets = datasets or {}
        if world == 1:
            one_rank_group(self.device)

    def dataset(self, name: str):
        return self.datasets[name]

    def resume_dir(self) -> Storage | None:
        return latest_checkpoint(self.experiment)

    def node_id(self) -> str:
        return "local"

    def save(self, step: int, write) -> None:
        """Every rank's files into experiment/checkpoint_N; rank 0's last (state.json last of all)."""
        name = checkpoint_dir_name(step)
        with tempfile.TemporaryDirectory(prefix=f"dopsd-ckpt-{step}-") as tmp:
            write(tmp)
            if self.rank != 0:
                upload_checkpoint(tmp, self.experiment, name)
            self.ranks.all_true(True)  # a checkpoint step, not every step: the other ranks' files are in
            if self.rank == 0:
                upload_checkpoint(tmp, self.experiment, name)
