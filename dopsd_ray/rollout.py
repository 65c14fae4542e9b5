"""Rollout worker: a plain class, made a Ray actor at the call site (driver.py).

It holds a frozen, versioned snapshot of the student (and of the EMA teacher when
teacher targets are computed here), reads its share of the data stream, and turns
each batch into an Experience for the learner:

    loop:  swap in the latest snapshot (only here, between roll-outs)
           batch -> contexts -> K student Euler steps (no grad) [-> teacher targets]
           -> bounded experience queue (blocks while the learner is behind)

On-policy mode (max_staleness 0) produces `per_version` experiences per snapshot and
then waits for the next one. After a restart the worker starts empty (version -1)
and fetches the latest snapshot before its first roll-out.
"""

import threading
import time

import torch
from ray.util.queue import Full

from .algorithms.schedules import training_sigmas
from .algorithms.steps import Batch, make_experience
from .config import Config
from .data.stream import iter_batches
from .families import lora_targets, load_family
from .sync.buckets import weights_digest
from .sync.object_store import fetch_snapshot
from .weights import STUDENT, TEACHER, load_state_dict, make_weights, state_dict


class RolloutWorker:
    def __init__(self, config: dict, model_path: str, index: int):
        self.cfg = Config.model_validate(config)
        if self.cfg.runtime.torch_threads:
            torch.set_num_threads(self.cfg.runtime.torch_threads)
        self.index = index
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(self.cfg.train.seed)
        self.family = load_family(self.cfg.model, model_path, device=device)
        self.weights = make_weights(self.family.transformer, self.cfg.lora, lora_targets(self.cfg.model.family))
        self.weights.module.requires_grad_(False)
        self.version = -1
        self.produced = 0  # experiences made with the current snapshot
        self.stats = {"sync_seconds": 0.0, "sync_bytes": 0, "snapshots": 0}
        self._stop = threading.Event()

    # -- weights ---------------------------------------------------------------------
    def load_snapshot(self, version: int, state: dict[str, torch.Tensor]) -> None:
        teacher = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{TEACHER}/")}
        student = {k: v for k, v in state.items() if not k.startswith(f"{TEACHER}/")}
        load_state_dict(self.weights, student, STUDENT)
        if teacher:
            load_state_dict(self.weights, teacher, TEACHER)
        self.version, self.produced = version, 0

    def update_weights(self, store) -> bool:
        """Swap in a newer snapshot if the store has one."""
        start = time.perf_counter()
        got = fetch_snapshot(store, self.version, timeout_s=self.cfg.runtime.sync_timeout_s)
        if got is None:
            return False
        version, state, nbytes = got
        self.load_snapshot(version, state)
        self.stats["sync_seconds"] += time.perf_counter() - start
        self.stats["sync_bytes"] += nbytes
        self.stats["snapshots"] += 1
        return True

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, student weights): the debug check that rollout = learner weights."""
        return self.version, state_dict(self.weights, STUDENT)

    # -- roll-outs -------------------------------------------------------------------
    def rollout(self, batch: Batch):
        _, _, h, w = batch.images.shape
        algo = self.cfg.algorithm
        sigmas = training_sigmas(algo.training_sigmas, self.family, h, w, algo.inference_steps)
        with_targets = self.cfg.runtime.teacher_targets == "rollout"
        exp = make_experience(self.family, self.weights, batch, sigmas, algo, self.version, with_targets)
        if self.cfg.runtime.debug_check_sync:
            exp.snapshot_digest = weights_digest(state_dict(self.weights, STUDENT))
        self.produced += 1
        return exp

    def run(self, data, store, queue, per_version: int | None) -> dict:
        """Produce experiences until stop(); returns this worker's stats."""
        cfg = self.cfg
        batches = iter_batches(data, cfg.train.batch_size, seed=cfg.train.seed + self.index)
        index = 0
        while not self._stop.is_set():
            self.wait_for_snapshot(store, per_version)
            if self._stop.is_set():
                break
            images, captions, ids = next(batches)
            exp = self.rollout(Batch(images, captions, ids, index=index, stream=self.index, seed=cfg.train.seed))
            index += 1
            while not self._stop.is_set():
                try:
                    queue.put(exp, block=True, timeout=1.0)
                    break
                except Full:  # the learner is behind: keep waiting, but notice stop()
                    continue
        return dict(self.stats, version=self.version)

    def wait_for_snapshot(self, store, per_version: int | None) -> None:
        """Swap weights between roll-outs; on-policy: block until a fresh snapshot exists."""
        deadline = time.monotonic() + self.cfg.runtime.sync_timeout_s
        while not self._stop.is_set():
            self.update_weights(store)
            fresh = self.version >= 0 and (per_version is None or self.produced < per_version)
            if fresh:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rollout worker {self.index}: no new weight snapshot after version {self.version} "
                    f"within runtime.sync_timeout_s={self.cfg.runtime.sync_timeout_s} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
