"""Where a learner rank's micro-batches come from. The driver picks one per run, and that is
where the run's mode is decided for the learner: nothing in the loop asks which it has.

    DataStream("train")       colocated: this rank's shard of the Ray Data stream; the loss is
                              computed here, roll-out included (algorithms.steps.colocated_loss)
    ExperienceQueue(queue)    disaggregated: experiences the rollout workers made
                              (algorithms.steps.experience_loss), filtered for staleness

Both are specs the driver ships to every rank; `open(...)` there gives the rank's Source:

    fetch(step)   -> Fetched       one micro-batch (or a RolloutLost notice), with bookkeeping
    loss(fetched, backward)        its loss and metrics, backward called per trained share
"""

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..algorithms.schedules import training_sigmas
from ..algorithms.steps import Batch, RolloutLost, RolloutRestart, colocated_loss, experience_loss
from ..data.batches import iter_batches


@dataclass
class Fetched:
    """One micro-batch as a rank got it. `version`: the optimizer step whose weights made it
    (a colocated batch is rolled out by the current weights: the current step); `lost`: the
    driver gave up on a rollout worker, and this is its notice instead of a micro-batch."""

    item: Any
    images: int
    version: int
    waited_s: float = 0.0
    dropped: int = 0
    rollout_s: float = 0.0
    lost: bool = False


@dataclass
class DataStream:
    """Colocated: the Ray Train dataset shard `name` (the driver passes the dataset under it)."""

    name: str = "train"

    def open(self, cfg, rank: int, device, family, data, step: int, **_) -> "StreamSource":
        return StreamSource(cfg, rank, family, data(self.name), step)


@dataclass
class ExperienceQueue:
    """Disaggregated: the ray.util.queue.Queue (or any queue with get(block, timeout)) that the
    rollout workers fill."""

    queue: Any

    def open(self, cfg, rank: int, device, family, data, step: int, generation: int, counters: dict,
             check=None) -> "QueueSource":
        return QueueSource(cfg, self.queue, device, family, generation, counters, check)


class StreamSource:
    """Micro-batch `micro` of step s is batch s * grad_accum + micro of this rank's stream (seeded
    by train.seed + rank). A resumed run reads the batches before its step again and passes
    over them, so it trains on the same images with the same noise (the index seeds it) as one
    that never stopped (re-reading costs the data pipeline's time, not a model's)."""

    def __init__(self, cfg, rank: int, family, data, step: int):
        self.cfg, self.rank, self.family = cfg, rank, family
        self._sigmas: dict[tuple[int, int], torch.Tensor] = {}
        self._batches = self._read(data, step * cfg.train.grad_accum)

    def _read(self, data, skip: int):
        train = self.cfg.train
        for index, (images, captions, ids) in enumerate(iter_batches(data, train.batch_size, seed=train.seed + self.rank)):
            if index >= skip:
                yield Batch(images, captions, ids, index=index, stream=self.rank, seed=train.seed)
        raise RuntimeError("the training data ran out before train.steps; the stream should repeat")

    def fetch(self, step: int) -> Fetched:
        batch = next(self._batches)
        return Fetched(batch, len(batch.captions), step)

    def sigmas(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self._sigmas:
            algo = self.cfg.algorithm
            self._sigmas[height, width] = training_sigmas(algo.training_sigmas, self.family, height, width,
                                                          algo.inference_steps)
        return self._sigmas[height, width]

    def loss(self, weights, fetched: Fetched, backward):
        batch = fetched.item
        _, _, height, width = batch.images.shape
        return colocated_loss(self.family, weights, batch, self.sigmas(height, width), self.cfg.algorithm, backward)


class QueueSource:
    """Experiences of this learner process's generation no older than runtime.max_staleness;
    others are dropped (never trained on) and counted. A RolloutRestart notice is counted in
    counters["rollout_restarts"]; a RolloutLost notice is handed on (Fetched.lost). `check`:
    runtime.debug_check_sync's test of the worker's weights against the published snapshot."""

    def __init__(self, cfg, queue, device, family, generation: int, counters: dict, check=None):
        self.cfg, self.queue, self.device, self.family = cfg, queue, device, family
        self.generation, self.counters = generation, counters
        self.check = check or (lambda exp: True)

    def fetch(self, step: int) -> Fetched:
        start, dropped = time.perf_counter(), 0
        rt = self.cfg.runtime
        while True:
            exp = self.queue.get(block=True, timeout=rt.sync_timeout_s)
            if isinstance(exp, RolloutRestart):  # a rollout worker came back after dying
                self.counters["rollout_restarts"] += 1
                print(f"rollout worker {exp.index} restarted (restarts so far: "
                      f"{self.counters['rollout_restarts']})", flush=True)
                continue
            if isinstance(exp, RolloutLost):  # the driver gave up on a lost rollout worker
                return Fetched(exp, 0, step, time.perf_counter() - start, dropped, lost=True)
            # another generation: made with a dead learner's snapshot; older than max_staleness: too stale
            if exp.generation == self.generation and 0 <= step - exp.version <= rt.max_staleness and self.check(exp):
                return Fetched(exp, len(exp.ids), exp.version, time.perf_counter() - start, dropped,
                               rollout_s=exp.rollout_seconds)
            dropped += 1

    def loss(self, weights, fetched: Fetched, backward):
        # it arrived as CPU tensors (rollout.py): onto this rank's device, asynchronously
        exp = fetched.item.to(self.device, non_blocking=True)
        return experience_loss(self.family, weights, exp, self.cfg.algorithm, backward)
