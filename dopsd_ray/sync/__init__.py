"""Weight sync: learner -> rollout workers, one file per transport, a version on every snapshot.

- buckets.py       plan/split buckets, gather ZeRO-3 params bucket by bucket, assert_same_weights
- object_store.py  WeightStore actor + publish_snapshot / fetch_snapshot (works everywhere);
                   StorePublisher, the learner's end
- collective.py    CollectiveSender / CollectiveReceiver: a separate gloo (CPU) / NCCL (GPU)
                   group of learner rank 0 + rollout workers, one broadcast per bucket;
                   CollectivePublisher, the learner's end

The learner sees either transport as a `WeightPublisher` (below); the driver picks one
(driver.weight_sync, runtime.sync_transport). Import the transports from their modules
(`from dopsd_ray.sync.object_store import ...`): this package file imports nothing heavy.
"""

from collections.abc import Iterable
from typing import Protocol

from .buckets import assert_same_weights, gather_zero3_buckets, plan_buckets, split_into_buckets

__all__ = ["SyncInterrupted", "WeightPublisher", "assert_same_weights", "gather_zero3_buckets", "plan_buckets", "split_into_buckets"]


class SyncInterrupted(RuntimeError):
    """A sync the transport could not finish but has recovered from (a rollout worker died
    during it): publish() still took every bucket, so the ZeRO-3 gathers of every learner
    rank stayed in step. Gather and publish the same snapshot again."""


class WeightPublisher(Protocol):
    """Learner rank 0's end of a weight transport (StorePublisher, CollectivePublisher)."""

    host_buckets: bool  # True: give publish() buckets copied to host memory; False: device tensors

    def open(self) -> None:
        """Set up, once per learner process, before the first publish."""

    def publish(self, version: int, named: list, buckets: Iterable[dict], generation: int = 0) -> dict:
        """Ship one snapshot, stamped `version` (the learner's step) and `generation` (which
        learner process: a restarted learner re-publishes step numbers a dead one used), and
        return metrics (at least "sync/bytes").

        `buckets` yields {name: full tensor}, gathered from the (name, tensor) list `named`
        with runtime.sync_bucket_numel; it may be a generator that runs ZeRO-3 gathers.
        It iterates `buckets` to the end even when it fails (the gathers are collectives);
        SyncInterrupted: nothing was lost but this snapshot, publish it again.
        """

    def close(self) -> None:
        """Tear down at the end of training."""
