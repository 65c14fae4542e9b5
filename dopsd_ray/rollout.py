"""Rollout worker: a plain class, made a Ray actor at the call site (driver.py).

It holds a frozen, versioned snapshot of the student (and of the EMA teacher when
teacher targets are computed here), reads its share of the data stream, and turns
each batch into an Experience for the learner:

    loop:  swap in the latest snapshot (only here, between roll-outs)
           batch -> contexts -> K student Euler steps (no grad) [-> teacher targets]
           -> bounded experience queue (blocks while the learner is behind)

Snapshots arrive by runtime.sync_transport:
- object_store: the roll-out loop polls the WeightStore between roll-outs (fetch_snapshot);
- collective: learner rank 0 calls join_collective(address, rank) once (again when it
  sets up a new group), collective_group() before every sync, then receive_weights(meta);
  that runs in another actor thread (max_concurrency=4: the roll-out loop, a receive, a join
  beside a stuck receive, the driver's pings from nodes.RolloutWatch) and only STAGES the
  snapshot, in host memory (one bucket at a time passes through the GPU).
Either way `next_snapshot` is the one place that tells them apart, and the swap
(load_snapshot, stamping the version) happens only in the loop, between roll-outs, one
bucket at a time (weights.apply_snapshot): a worker never holds a second model on its GPU.

What goes into the experience queue holds CPU tensors only (the queue is an actor with
no GPU; Experience.to): the learner moves them onto its own device.

A worker builds the EMA teacher only when it computes teacher targets
(runtime.teacher_targets=rollout); otherwise it has the student alone.

On-policy mode (max_staleness 0) produces `per_version` experiences per snapshot and
then waits for the next one.

Restarts: the driver makes workers restartable actors (max_restarts=-1) whose `run`
task is retried on the new process (max_task_retries=-1). A restarted worker first puts
a RolloutRestart notice in the experience queue (the learner counts it:
`count/rollout_restarts` in MLflow), then starts empty (version -1) and takes the latest
snapshot before its first roll-out. With the object store that snapshot is there to
fetch. With the collective transport the new process is in no weight-sync group: at the
learner's next sync, learner rank 0 sees that (collective_group() is None) and sets up a
new group with every worker, then broadcasts (sync/collective.py). Until that snapshot
arrives the worker holds no version and makes nothing.
"""

import threading
import time

import ray
from ray.util.queue import Full

from .algorithms.schedules import training_sigmas
from .algorithms.steps import Batch, RolloutRestart, make_experience
from . import process
from .contexts import ContextCache
from .data.batches import iter_batches
from .families import lora_targets
from .sync.buckets import weights_digest
from .sync.collective import CollectiveReceiver
from .families.base import Family
from .sync.object_store import SnapshotLost, fetch_snapshot
from .weights import STUDENT, Weights, apply_snapshot, make_weights, state_dict


def restarted_actor() -> bool:
    """True inside a Ray actor that was restarted after its process died (False outside Ray)."""
    try:
        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not in an actor: a plain object in a test or a debugger
        return False


class RolloutWorker:
    family: Family
    weights: Weights

    def __init__(self, config: dict, model_path: str, index: int, contexts: ContextCache | None = None):
        self.cfg = process.begin(config)
        self.index = index
        # data.cache_contexts: contexts are read, the encoders leave the GPU
        self.family = process.load(self.cfg, model_path, process.device(), contexts)
        self.contexts = contexts
        self.weights = make_weights(self.family.transformer, self.cfg.lora, lora_targets(self.cfg.model.family),
                                    with_teacher=self.cfg.runtime.teacher_targets == "rollout")
        self.weights.module.requires_grad_(False)
        self.version, self.generation = -1, 0  # the snapshot held: learner step, learner process
        self.produced = 0  # experiences made with the current snapshot
        self.stats = {"sync_seconds": 0.0, "sync_bytes": 0, "snapshots": 0, "batches_skipped": 0}
        self._stop = threading.Event()
        self.receiver: CollectiveReceiver | None = None  # collective transport only
        self._staged = None  # collective: (version, generation, state, bytes, seconds) received, not swapped in
        self._staged_lock = threading.Lock()
        self.restarted = restarted_actor()
        self.lost_at: float | None = None  # when a snapshot was lost half way (its learner died)

    # -- weights ---------------------------------------------------------------------
    def load_snapshot(self, version: int, generation: int, buckets) -> bool:
        """Copy a snapshot in bucket by bucket; False if its buckets were lost half way (the
        learner that put them died): the worker then holds no version and waits for a whole one."""
        try:
            apply_snapshot(self.weights, buckets)
        except SnapshotLost:
            self.version = -1
            self.lost_at = time.monotonic()  # a restarted learner needs a start-up's time to re-publish
            return False
        self.version, self.generation, self.produced = version, generation, 0
        return True

    def update_weights(self, store) -> bool:
        """Swap in a newer snapshot if there is one (call only between roll-outs)."""
        start = time.perf_counter()
        got = self.next_snapshot(store)
        if got is None:
            return False
        version, generation, buckets, nbytes, received_s = got
        if not self.load_snapshot(version, generation, buckets):
            return False
        self.stats["sync_seconds"] += received_s + time.perf_counter() - start
        self.stats["sync_bytes"] += nbytes
        self.stats["snapshots"] += 1
        return True

    def next_snapshot(self, store):
        """(version, generation, buckets, bytes, seconds spent receiving elsewhere) or None; the one
        place the transports differ: store is the WeightStore (object_store), or None (collective)."""
        if store is not None:
            got = fetch_snapshot(store, self.version, self.cfg.runtime.sync_timeout_s, self.generation)
            return None if got is None else (*got, 0.0)
        with self._staged_lock:
            staged, self._staged = self._staged, None
        return staged

    # -- collective transport (called by learner rank 0, in the actor's second thread) ------
    def join_collective(self, address, rank: int) -> None:
        """Join the weight-sync group as `rank` (1..n); blocks until the whole group is there."""
        if self.receiver is not None:  # a new group (a worker or the learner restarted): leave the old one
            self.receiver.close()
        receiver = CollectiveReceiver()
        receiver.join(address, rank, timeout_s=self.cfg.runtime.sync_timeout_s)
        self.receiver = receiver

    def collective_group(self) -> str | None:
        """The name of the weight-sync group this process is in; None (a restarted process, or
        one whose receive failed) makes learner rank 0 set up a new group before it syncs."""
        return None if self.receiver is None else self.receiver.group_name

    def receive_weights(self, meta) -> int:
        """Receive one snapshot (every bucket) and stage it; the roll-out loop swaps it in."""
        if self.receiver is None:
            raise RuntimeError(
                f"rollout worker {self.index} is not in the weight-sync group of runtime.sync_transport="
                f"collective (it restarted after the group was set up): it cannot receive version "
                f"{meta.version}; the learner sets up a new group with it at its next sync")
        start = time.perf_counter()
        state = self.receiver.receive(meta)  # host memory: the GPU holds one bucket at a time
        with self._staged_lock:  # a newer snapshot replaces one not yet swapped in
            self._staged = (meta.version, meta.generation, [state], meta.nbytes, time.perf_counter() - start)
        return meta.version

    # -- roll-outs -------------------------------------------------------------------
    def rollout(self, batch: Batch):
        _, _, h, w = batch.images.shape
        algo = self.cfg.algorithm
        sigmas = training_sigmas(algo.training_sigmas, self.family, h, w, algo.inference_steps)
        with_targets = self.cfg.runtime.teacher_targets == "rollout"
        exp = make_experience(self.family, self.weights, batch, sigmas, algo, self.version, with_targets)
        exp.generation = self.generation
        if self.cfg.runtime.debug_check_sync:
            exp.snapshot_digest = weights_digest(state_dict(self.weights, STUDENT))
        self.produced += 1
        return exp.to("cpu")  # the queue is an actor with no GPU; the learner moves it to its own

    def run(self, data, store, queue, per_version: int | None) -> dict:
        """Produce experiences until stop(); returns this worker's stats.

        store: the WeightStore to poll (object_store), or None: snapshots arrive through
        receive_weights (collective).
        """
        cfg = self.cfg
        if self.restarted:  # this process replaces one that died: the learner counts it
            self.put(queue, RolloutRestart(self.index))
        batches = iter_batches(data, cfg.train.batch_size, seed=cfg.train.seed + self.index)
        # a restarted worker reads (and skips) its share of the stream until it holds weights:
        # streaming_split starts each epoch only when every worker asks for it, so a worker
        # that waited without reading would stall the others (and they the learner, which is
        # the only way this one gets weights under the collective transport)
        drain = batches if self.restarted else None
        index = 0
        while not self._stop.is_set():
            self.wait_for_snapshot(store, per_version, drain)
            if self._stop.is_set():
                break
            images, captions, ids = next(batches)
            exp = self.rollout(Batch(images, captions, ids, index=index, stream=self.index, seed=cfg.train.seed))
            index += 1
            self.put(queue, exp)
        stats = dict(self.stats, version=self.version, restarted=self.restarted, node_id=self.node_id())
        if self.contexts is not None:  # data.cache_contexts: self.family is a CachedContexts
            stats.update(context_hits=self.family.hits, encoders_released_bytes=self.family.released_bytes)
        return stats

    def put(self, queue, item) -> None:
        """Into the bounded queue; blocks while the learner is behind, but notices stop()."""
        while not self._stop.is_set():
            try:
                queue.put(item, block=True, timeout=1.0)
                return
            except Full:
                continue

    def wait_for_snapshot(self, store, per_version: int | None, drain=None) -> None:
        """Swap weights between roll-outs; on-policy: block until a fresh snapshot exists.

        A worker without a snapshot (the first one, or after one was lost with its learner)
        waits runtime.startup_timeout_s, counted from the loss: the snapshot comes only after a
        learner loaded its models and set up DeepSpeed (minutes at 6-9B). Otherwise it waits
        runtime.sync_timeout_s. `drain`: batches to skip while it holds no snapshot at all.
        """
        rt = self.cfg.runtime
        since = time.monotonic()
        while not self._stop.is_set():
            self.update_weights(store)
            fresh = self.version >= 0 and (per_version is None or self.produced < per_version)
            if fresh:
                return
            starting = self.version < 0
            timeout_s, name = (rt.startup_timeout_s, "startup_timeout_s") if starting else (rt.sync_timeout_s, "sync_timeout_s")
            if time.monotonic() > max(since, self.lost_at or since) + timeout_s:
                raise TimeoutError(
                    f"rollout worker {self.index}: no new weight snapshot after version {self.version} "
                    f"within runtime.{name}={timeout_s} s (runtime.sync_transport={rt.sync_transport})")
            if starting and drain is not None:
                next(drain)
                self.stats["batches_skipped"] += 1
            else:
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()

    def node_id(self) -> str:
        """The Ray node this process runs on (the driver's RolloutWatch pings with it)."""
        return ray.get_runtime_context().get_node_id()
