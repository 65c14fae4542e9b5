"""Weights out of the learner: the gathers every rank takes part in, and the snapshots for
rollout workers.

    gathered(named, bucket_numel)    buckets of full tensors (ZeRO-3: a collective per bucket)
    full_state(weights, which)       the whole student or teacher, on rank 0 (empty elsewhere)
    Snapshots(publisher)             disaggregated: every runtime.sync_every steps, the student
                                     (and the EMA teacher with teacher_targets=rollout) as
                                     version = step, through a sync.WeightPublisher
    NoSnapshots()                    colocated: nobody to publish to

The driver picks one of the last two (with the source: sources.py).
"""

import time

from ..sync import SyncInterrupted, WeightPublisher
from ..sync.buckets import gather_zero3_buckets, weights_digest
from ..weights import STUDENT, TEACHER


def gathered(named: list, bucket_numel: int, to_cpu: bool = True, pin: bool = False):
    """Yields buckets {key: full tensor} (empty on ranks > 0); all ranks iterate it. On the
    CPU (pinned for a transfer), or on this rank's device, valid until the next bucket."""
    return gather_zero3_buckets(named, bucket_numel, rank0_only=True, to_cpu=to_cpu, pin=pin)


def full_state(weights, which: str, bucket_numel: int) -> dict:
    state = {}
    for bucket in gathered(weights.named_parameters(which), bucket_numel):
        state.update(bucket)
    return state


class NoSnapshots:
    """Colocated: the learner rolls out itself."""

    def open(self, learner) -> None:
        pass

    def publish(self, step: int) -> tuple[dict, bool]:
        return {}, False

    def due(self, step: int) -> bool:
        return False

    def check(self, exp) -> bool:
        return True

    def close(self) -> None:
        pass


class Snapshots:
    """Learner rank 0's end of the weight sync (`publisher`: driver.weight_sync's), driven by
    every rank: the gathers are collectives. The loop agrees once per step on whether a sync
    was interrupted (a rollout worker died during a collective sync) and then publishes it
    again (`publish(step, last=True)` raises SyncInterrupted a second time)."""

    def __init__(self, publisher: WeightPublisher):
        self.publisher = publisher
        self.digests: dict[int, str] = {}  # runtime.debug_check_sync: version -> student fingerprint

    def open(self, learner) -> None:
        """On every rank, once set up: the collective transport's rollout workers join here."""
        self.learner = learner
        self.rank, cfg = learner.rank, learner.cfg
        self.every, self.bucket_numel = cfg.runtime.sync_every, cfg.runtime.sync_bucket_numel
        self.debug = cfg.runtime.debug_check_sync
        self.named = list(learner.weights.named_parameters(STUDENT))
        if cfg.runtime.teacher_targets == "rollout":  # rollout workers compute the teacher's targets too
            self.named += [(f"{TEACHER}/{k}", p) for k, p in learner.weights.named_parameters(TEACHER)]
        if self.rank == 0:
            self.publisher.open()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def publish(self, step: int, last: bool = False) -> tuple[dict, bool]:
        """Gather the snapshot bucket by bucket (every rank) and publish it as version `step`
        (rank 0): (metrics, interrupted). Raises SyncInterrupted if `last`."""
        start = time.perf_counter()
        # the collective transport packs device buckets straight into its device buffers
        buckets = gathered(self.named, self.bucket_numel, to_cpu=self.publisher.host_buckets or self.debug, pin=True)
        if self.rank != 0:
            for _ in buckets:  # take part in every gather
                pass
            return {}, False
        if self.debug:
            buckets = list(buckets)
            self.digests[step] = weights_digest(
                {k: v for b in buckets for k, v in b.items() if not k.startswith(f"{TEACHER}/")})
        try:
            sync = self.publisher.publish(step, self.named, buckets, generation=self.learner.generation)
        except SyncInterrupted as e:  # every bucket was taken: the other ranks' gathers are done
            if last:
                raise
            print(f"weight sync of step {step} interrupted, publishing it again: {e}", flush=True)
            return {}, True
        seconds = time.perf_counter() - start
        return {**sync, "sync/seconds": seconds, "sync/version": step,
                "sync/gb_per_s": sync["sync/bytes"] / max(seconds, 1e-9) / 1e9}, False

    def check(self, exp) -> bool:
        """runtime.debug_check_sync: the worker's weights must be exactly this process's snapshot
        of exp.version (exp is of this generation)."""
        if exp.snapshot_digest is None or exp.version not in self.digests:
            return True
        if exp.snapshot_digest != self.digests[exp.version]:
            raise RuntimeError(f"weight sync check failed: a rollout worker's student weights for version "
                               f"{exp.version} differ from the learner's gathered snapshot")
        self.learner.counters["sync_checked"] += 1
        return True

    def close(self) -> None:
        if self.rank == 0:
            self.publisher.close()
