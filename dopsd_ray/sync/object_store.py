"""Object-store weight transport: the learner puts buckets, rollout workers get them.

Works everywhere Ray runs (any node, CPU or GPU); it costs one serialised copy per
bucket into the object store plus one copy out per worker.

    learner rank 0 ──ray.put(bucket)──▶ object store ◀──ray.get── rollout worker
          └──── store.publish(version, [refs], meta, gen) ──▶ WeightStore ◀── store.changed_since(v, gen)

- One `ray.put` per bucket (never per parameter) and one `publish` RPC per snapshot.
- The learner process OWNS the buckets it puts (Ray 2.56 removed `ray.put(_owner=)`),
  so a snapshot dies with the learner that put it: iterating its buckets then raises
  SnapshotLost (the worker drops what it half-applied and waits, holding no version,
  for a complete snapshot) until the restarted learner re-publishes, which
  it must do before it waits for experiences. The store holding the refs keeps the
  buckets alive while the learner lives; publishing a new snapshot frees the old one.
- ObjectRefs travel nested in a list: Ray resolves ObjectRefs passed as top-level
  arguments, but leaves refs inside a list alone, so the store keeps refs (not copies).
- Versions: the learner's step, plus the generation of the learner process that
  published it. A restarted learner resumes from a checkpoint with a new generation and
  may publish a LOWER version than the store holds, or the same number as a dead
  learner's snapshot; the store takes it (the learner's weights are the truth) and
  workers swap to it, because `fetch_snapshot` returns any snapshot whose (version,
  generation) differs from the worker's, not only newer ones.

`WeightStore` is a plain class: make it an actor at the call site,
`store = ray.remote(WeightStore).remote()`. `publish_snapshot` / `fetch_snapshot` take
either that handle or a plain in-process WeightStore (tests, a debugger).
`StorePublisher` is the learner's face of this transport (the `WeightPublisher`
protocol of sync/__init__.py); rollout workers poll with `fetch_snapshot`.
"""

import time
from collections.abc import Iterable, Iterator

import ray
import torch
from ray.actor import ActorHandle, ActorMethod
from ray.exceptions import GetTimeoutError, ObjectLostError

NO_VERSION = -1


class WeightStore:
    """Holds the latest weight snapshot: its version, one ObjectRef per bucket, and meta."""

    def __init__(self):
        self._version = NO_VERSION
        self._refs: list[ray.ObjectRef] = []
        self._meta: dict = {}
        self.publishes = 0
        self.rollbacks = 0  # publishes of a lower version: a learner resumed from a checkpoint

    def publish(self, version: int, bucket_refs: list[ray.ObjectRef], meta: dict | None = None,
                generation: int = 0) -> int:
        """Replace the snapshot (the previous buckets are freed once no worker holds them)."""
        if version < self._version:
            self.rollbacks += 1
        self._version, self._refs = int(version), list(bucket_refs)
        self._meta = dict(meta or {}, generation=int(generation))
        self.publishes += 1
        return self._version

    def latest(self) -> tuple[int, list[ray.ObjectRef], dict]:
        return self._version, list(self._refs), dict(self._meta)

    def changed_since(self, version: int, generation: int = 0) -> tuple[int, list[ray.ObjectRef], dict] | None:
        """The snapshot if it is not (version, generation): newer, a rollback, or another
        learner process's snapshot of the same step; else None."""
        if self._version == NO_VERSION or (self._version, self._meta["generation"]) == (version, generation):
            return None
        return self.latest()

    def stats(self) -> dict:
        return {"version": self._version, "publishes": self.publishes, "rollbacks": self.rollbacks,
                "buckets": len(self._refs)}


class StorePublisher:
    """Learner rank 0's end of the object-store transport: one `publish_snapshot` per sync."""

    host_buckets = True  # ray.put takes CPU tensors: the learner gathers buckets into host memory

    def __init__(self, store: "ActorHandle | WeightStore", timeout_s: float = 60.0):
        self.store, self.timeout_s = store, timeout_s

    def open(self) -> None:
        """Nothing to set up: the WeightStore actor exists already, and workers poll it."""

    def publish(self, version: int, named: list, buckets: Iterable[dict[str, torch.Tensor]],
                generation: int = 0) -> dict:
        """`named` (the layout the buckets follow) is not needed here: buckets carry their names."""
        return {"sync/bytes": publish_snapshot(self.store, version, buckets, timeout_s=self.timeout_s,
                                               generation=generation)}

    def close(self) -> None:
        """Nothing to tear down: the store keeps the last snapshot for workers that come back."""


def publish_snapshot(
    store: "ActorHandle | WeightStore",
    version: int,
    buckets: Iterable[dict[str, torch.Tensor]],
    timeout_s: float = 60.0,
    meta: dict | None = None,
    generation: int = 0,
) -> int:
    """Learner rank 0: put each bucket once, then publish the refs; returns the bytes put.

    `buckets` may be a generator (e.g. `gather_zero3_buckets(..., rank0_only=True)`):
    each bucket goes to the object store as soon as it is gathered, so at most one
    gathered bucket is held in this process at a time.
    """
    refs, nbytes, ntensors = [], 0, 0
    for bucket in buckets:
        if not bucket:
            continue
        bucket = {k: v.detach().cpu().contiguous() for k, v in bucket.items()}
        nbytes += sum(v.numel() * v.element_size() for v in bucket.values())
        ntensors += len(bucket)
        refs.append(ray.put(bucket))
    meta = dict(meta or {}, buckets=len(refs), tensors=ntensors, bytes=nbytes, published_at=time.time())
    _call(store.publish, timeout_s, version, refs, meta, generation)  # refs nested in a list: not resolved
    return nbytes


class SnapshotLost(RuntimeError):
    """The snapshot's buckets died with the learner that put them (a learner restart)."""


def fetch_snapshot(
    store: "ActorHandle | WeightStore",
    current_version: int,
    timeout_s: float = 60.0,
    current_generation: int = 0,
) -> tuple[int, int, Iterator[dict[str, torch.Tensor]], int] | None:
    """Rollout worker: (version, generation, buckets, bytes) if the store's snapshot is not
    (current_version, current_generation), else None. Swap it in between roll-outs only.

    `buckets` fetches one bucket at a time as it is iterated (weights.apply_snapshot copies
    each into the model), so a worker never holds a second copy of the model. Iterating
    raises SnapshotLost when the buckets are gone with the learner that put them.
    """
    got = _call(store.changed_since, timeout_s, current_version, current_generation)
    if got is None:
        return None
    version, refs, meta = got
    return version, meta["generation"], _buckets(refs, version, timeout_s), meta["bytes"]


def _buckets(refs: list[ray.ObjectRef], version: int, timeout_s: float) -> Iterator[dict[str, torch.Tensor]]:
    for i, ref in enumerate(refs):
        try:
            yield ray.get(ref, timeout=timeout_s)
        except ObjectLostError as e:  # OwnerDiedError included: the learner that put them is gone
            raise SnapshotLost(f"snapshot version {version}: bucket {i + 1}/{len(refs)} is gone") from e
        except GetTimeoutError as e:
            raise TimeoutError(f"object-store weight sync: fetching bucket {i + 1}/{len(refs)} of snapshot "
                               f"version {version} took over {timeout_s} s") from e


def _call(method, timeout_s: float, *args):
    """Call a WeightStore method: on an actor (`store.publish`, with a timeout) or a plain instance."""
    if not isinstance(method, ActorMethod):
        return method(*args)
    try:
        return ray.get(method.remote(*args), timeout=timeout_s)
    except GetTimeoutError as e:
        raise TimeoutError(f"object-store weight sync: WeightStore call did not answer within {timeout_s} s") from e
