"""Weight sync: learner -> rollout workers, one file per transport, a version on every snapshot.

- buckets.py       plan/split buckets, gather ZeRO-3 params bucket by bucket, assert_same_weights
- object_store.py  WeightStore actor + publish_snapshot / fetch_snapshot (works everywhere)
- collective.py    CollectiveSender / CollectiveReceiver: a separate gloo (CPU) / NCCL (GPU)
                   group of learner rank 0 + rollout workers, one broadcast per bucket

Import the transports from their modules (`from dopsd_ray.sync.object_store import ...`):
this package file imports nothing heavy.
"""

from .buckets import assert_same_weights, gather_zero3_buckets, plan_buckets, split_into_buckets

__all__ = ["assert_same_weights", "gather_zero3_buckets", "plan_buckets", "split_into_buckets"]
