"""Collective weight transport: learner rank 0 broadcasts buckets to the rollout workers.

A process group of its own, made only of learner rank 0 and the rollout workers. It is
NOT the learner's default torch.distributed group (DeepSpeed's), and it is created
statelessly (a TCPStore plus a ProcessGroup object, no init_process_group), so a
process can be in both groups at once:

    learner group (DeepSpeed, default pg):   L0   L1   L2 ...   (gather_zero3_buckets)
    weight-sync group (this file):           L0 = rank 0
                                             W0 = rank 1, W1 = rank 2, ... W(n-1) = rank n

Backend by device: gloo on CPU, NCCL on CUDA. Rank 0 hosts the TCPStore on a free port
of its own node; the address reaches the workers through ordinary Ray calls.

Set-up (learner rank 0, with the worker handles):

    sender = CollectiveSender(num_receivers=len(workers), timeout_s=60)
    address = sender.open()                                   # TCPStore on a free port
    joins = [w.join_collective.remote(address, rank=i + 1) for i, w in enumerate(workers)]
    sender.connect(pending=joins)                             # every worker joined, or TimeoutError

    # worker actor:  def join_collective(self, address, rank):
    #                    self.receiver = CollectiveReceiver(); self.receiver.join(address, rank)

One sync: the metadata goes first through Ray, then one broadcast per bucket (one
flat contiguous byte tensor each):

    buckets = gather_zero3_buckets(named, bucket_numel, rank0_only=True, to_cpu=False)  # every learner rank
    meta = describe_snapshot(step, named, bucket_numel)                       # rank 0 (full shapes, no gather)
    refs = [w.receive_weights.remote(meta) for w in workers]                  # rank 0
    stats = sender.send(meta, buckets, pending=refs)                          # rank 0
    # ranks > 0 just iterate `buckets` to the end (the gather is their collective)

    # worker actor, max_concurrency >= 2 so this runs in a thread beside the roll-out loop:
    #     def receive_weights(self, meta):
    #         state = self.receiver.receive(meta)           # host memory, one bucket on the GPU at a time
    #         with self._staged_lock: self._staged = (meta.version, ..., [state], ...)
    # and the roll-out loop swaps the staged snapshot in BETWEEN roll-outs, never
    # mid-trajectory (rollout.RolloutWorker.next_snapshot / weights.apply_snapshot).
    # Swapping is the caller's job: receive() only returns the new weights.

Timeouts: every wait (join, each broadcast, the workers' replies) has a deadline;
a worker that died or never calls receive() makes `send` raise TimeoutError naming
the transport and the version instead of hanging the learner; a worker whose
receive call fails (e.g. it restarted and is no longer in the group) makes `send`
raise WeightSyncError at once, with the worker's error. After a failure the group is
unusable: close() both sides and set it up again, then re-publish.

The learner uses all of the above through `CollectivePublisher` (the `WeightPublisher`
protocol of sync/__init__.py), built with the rollout worker handles, whose actor class
provides `join_collective(address, rank)`, `collective_group()` and `receive_weights(meta)`
(rollout.py), with max_concurrency >= 3: the roll-out loop, a receive, and a join that
replaces a group a receive is stuck in.

Rollout-worker restarts: a restarted worker is a new process outside the group, and a
group cannot grow back. So CollectivePublisher checks, before every sync, that every
worker is in its current group (`collective_group()`: the name of the group the worker
joined, None in a new process); if one is not, it sets up a NEW group (a new TCPStore,
a new name) and every worker joins it (`join_collective` leaves the old one first),
then broadcasts the snapshot. A receive meant for another group (a stale call Ray
retried on a restarted worker) is refused, so it cannot take another snapshot's
broadcasts. If a worker dies DURING a sync, `publish` still takes every bucket (the
gathers of the other learner ranks stay in step), gives the group up and raises
SyncInterrupted: the learner gathers and publishes the snapshot once more, to a new
group. The restarted worker holds no weights until that snapshot arrives, so it never
rolls out on old ones.
"""

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace

import ray
import torch
import torch.distributed as dist

from . import SyncInterrupted
from .buckets import full_numel, full_shape, plan_buckets
from .groups import (
    WeightSyncError, backend, close, handshake, joined_key, new_group, node_ip, pick_device, raise_if_failed, root0, td,
    wait_joined, wait_refs, wait_work,
)

ALIGN = 16  # bytes: every tensor starts 16-byte aligned inside a bucket, so byte views cast back to any dtype


@dataclass(frozen=True)
class GroupAddress:
    host: str
    port: int
    world_size: int  # learner rank 0 + the receivers
    backend: str  # "gloo" | "nccl"
    name: str = ""  # new for every set-up: which group a worker is in (collective_group)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # in bytes, inside the bucket's flat buffer
    nbytes: int


@dataclass(frozen=True)
class BucketSpec:
    tensors: tuple[TensorSpec, ...]
    nbytes: int  # size of the flat buffer, padding included


@dataclass(frozen=True)
class SnapshotMeta:
    """What the workers need before the broadcasts: the version (and the generation of the
    learner process that sends it, sync/__init__.py) and every bucket's layout."""

    version: int
    buckets: tuple[BucketSpec, ...]
    generation: int = 0
    group: str = ""  # the group whose broadcasts carry it (set by CollectivePublisher); "" = any

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)


def describe_snapshot(version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_numel: int,
                      generation: int = 0) -> SnapshotMeta:
    """The layout of a snapshot, from names, FULL shapes and dtypes only (no gather needed).

    Buckets follow the same plan as `gather_zero3_buckets` / `split_into_buckets`
    (by full size, in order), so the buckets they yield match this layout.
    """
    named = list(named_tensors)
    by_name = dict(named)
    buckets = []
    for names in plan_buckets(((n, full_numel(t)) for n, t in named), bucket_numel):
        specs, offset = [], 0
        for n in names:
            t = by_name[n]
            nbytes = full_numel(t) * t.element_size()
            specs.append(TensorSpec(n, full_shape(t), t.dtype, offset, nbytes))
            offset += _aligned(nbytes)
        buckets.append(BucketSpec(tuple(specs), offset))
    return SnapshotMeta(int(version), tuple(buckets), int(generation))


def pack_bucket(spec: BucketSpec, bucket: dict[str, torch.Tensor], device: torch.device,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """{name: tensor} -> one flat uint8 tensor laid out as `spec` says (the first spec.nbytes
    of `out` when it is given and large enough: the sender reuses two buffers)."""
    if set(bucket) != {t.name for t in spec.tensors}:
        raise ValueError(f"bucket holds {sorted(bucket)[:3]}..., the snapshot layout expects "
                         f"{[t.name for t in spec.tensors][:3]}...: describe_snapshot and the bucket "
                         "iterator must use the same parameters and bucket_numel")
    if out is not None and out.numel() >= spec.nbytes:
        flat = out[:spec.nbytes]
    else:
        flat = torch.empty(spec.nbytes, dtype=torch.uint8, device=device)
    for t in spec.tensors:
        x = bucket[t.name]
        if tuple(x.shape) != t.shape or x.dtype != t.dtype:
            raise ValueError(f"{t.name}: got {tuple(x.shape)} {x.dtype}, layout says {t.shape} {t.dtype}")
        flat[t.offset:t.offset + t.nbytes].copy_(x.detach().reshape(-1).view(torch.uint8))
    return flat


def unpack_bucket(spec: BucketSpec, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of pack_bucket; the tensors are views into `flat` (no copy)."""
    return {t.name: flat[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in spec.tensors}


class CollectiveSender:
    """Learner rank 0's end of the weight-sync group (rank 0 of it)."""

    def __init__(self, num_receivers: int, timeout_s: float = 60.0, device: str | torch.device | None = None):
        self.num_receivers = num_receivers
        self.timeout_s = timeout_s
        self.device = pick_device(device)
        self._store = None
        self._group = None
        self._abandoned: list = []
        self.address: GroupAddress | None = None

    def open(self) -> GroupAddress:
        """Start the rendezvous store on a free port of this node; hand the address to the workers."""
        host = node_ip()
        self._store = dist.TCPStore(host, 0, self.num_receivers + 1, is_master=True,
                                    timeout=td(self.timeout_s), wait_for_workers=False)
        self.address = GroupAddress(host, self._store.port, self.num_receivers + 1, backend(self.device),
                                    name=uuid.uuid4().hex[:12])
        return self.address

    def connect(self, pending: list[ray.ObjectRef] = ()) -> None:
        """Join as rank 0; returns once every receiver has joined (their `pending` join calls too)."""
        if self.address is None:
            raise RuntimeError("CollectiveSender.open() first: the workers need the address")
        deadline = time.monotonic() + self.timeout_s
        missing = wait_joined(self._store, self.num_receivers, deadline)
        if missing:
            self.close()
            raise TimeoutError(f"collective weight sync ({self.address.backend}): rollout worker rank(s) "
                               f"{missing} of {self.num_receivers} did not join {self.address.host}:"
                               f"{self.address.port} within {self.timeout_s} s")
        try:
            self._group = new_group(self._store, 0, self.address, self.device, self.timeout_s)
            handshake(self._group, self.device, deadline)
        except (RuntimeError, TimeoutError) as e:  # DistStoreError is a RuntimeError
            self.close()
            raise TimeoutError(f"collective weight sync ({self.address.backend}): not every one of the "
                               f"{self.num_receivers} rollout workers joined {self.address.host}:"
                               f"{self.address.port} within {self.timeout_s} s ({e})") from e
        wait_refs(pending, deadline, f"collective weight sync ({self.address.backend}): join")

    def send(self, meta: SnapshotMeta, buckets: Iterable[dict[str, torch.Tensor]],
             pending: list[ray.ObjectRef] = ()) -> dict:
        """Broadcast one snapshot bucket by bucket; then wait for the workers' `pending` receive calls.

        `buckets` must match `meta` (same order, names, shapes, dtypes). They may be views on
        the sender's device (gather_zero3_buckets(to_cpu=False)): each is packed into one of
        two device buffers, and bucket i+1 is gathered and packed while bucket i is on the
        wire (double buffering; a buffer is refilled only once its broadcast finished).
        Returns metrics.
        """
        if self._group is None:
            raise RuntimeError("CollectiveSender.connect() first")
        start = time.perf_counter()
        what = f"collective weight sync ({self.address.backend}), version {meta.version}"
        buffers: list[torch.Tensor | None] = [None, None]
        in_flight: list[tuple | None] = [None, None]  # (work, what) per buffer
        count = 0
        for i, bucket in enumerate(buckets):
            if i >= len(meta.buckets):
                raise ValueError(f"{what}: more buckets than the {len(meta.buckets)} in the metadata")
            slot = i % 2
            if in_flight[slot] is not None:  # the broadcast that used this buffer must be done
                self._finish(*in_flight[slot], pending)
            flat = pack_bucket(meta.buckets[i], bucket, self.device, out=buffers[slot])
            if buffers[slot] is None or flat.data_ptr() != buffers[slot].data_ptr():
                buffers[slot] = flat
            in_flight[slot] = (self._group.broadcast([flat], root0()), f"{what}, bucket {i + 1}/{len(meta.buckets)}")
            count += 1
        for slot in (count % 2, (count + 1) % 2):  # the older broadcast first
            if in_flight[slot] is not None:
                self._finish(*in_flight[slot], pending)
        if count != len(meta.buckets):
            raise ValueError(f"{what}: got {count} buckets, the metadata announced {len(meta.buckets)}")
        try:
            wait_refs(pending, time.monotonic() + self.timeout_s, what)
        except (TimeoutError, WeightSyncError):
            self.close()
            raise
        seconds = time.perf_counter() - start
        return {"sync/seconds": seconds, "sync/bytes": meta.nbytes, "sync/version": meta.version,
                "sync/buckets": count, "sync/gb_per_s": meta.nbytes / max(seconds, 1e-9) / 1e9}

    def _finish(self, work, what: str, pending: list[ray.ObjectRef] = ()) -> None:
        """Wait for one bucket's broadcast; while it is in flight, a receive call in `pending` that
        failed fails it at once (WeightSyncError; the group is abandoned, not closed, so the error
        comes without delay)."""
        try:
            wait_work(work, time.monotonic() + self.timeout_s, check=lambda: raise_if_failed(pending, what))
        except WeightSyncError:
            self._abandon()
            raise
        except (RuntimeError, TimeoutError) as e:
            self.close()
            raise TimeoutError(f"{what}: a rollout worker did not take part within {self.timeout_s} s "
                               f"(dead, or not receiving); the group is closed, set it up again ({e})") from e

    def close(self) -> None:
        close(self._group)
        self._group, self._store = None, None

    def _abandon(self) -> None:
        """Drop the group with a broadcast still in flight: closing it (or its destructor) would
        wait that broadcast out to its timeout, so a reference stays here until the process ends."""
        self._abandoned.append((self._group, self._store))
        self._group, self._store = None, None


class CollectivePublisher:
    """Learner rank 0's end of the collective transport, with the rollout worker handles.

    Picklable until open() (it travels to the learner in train_loop_config); open() and
    publish() run in the learner rank 0 process. Worker i is rank i + 1 of the group.
    `restart_timeout_s`: how long a sync waits for a restarting worker (it loads its models).
    """

    host_buckets = False  # buckets stay on the learner's device and are packed there (no host trip)

    def __init__(self, workers: list, bucket_numel: int, timeout_s: float = 60.0, restart_timeout_s: float = 600.0):
        self.workers, self.bucket_numel, self.timeout_s = list(workers), bucket_numel, timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.sender: CollectiveSender | None = None
        self.set_ups = 0  # groups set up by this learner process; > 1: a worker restarted or a sync failed

    def open(self) -> None:
        """Set up the group: every worker joins (`join_collective`), or TimeoutError."""
        if self.sender is not None:
            self.sender.close()
        self.sender = CollectiveSender(num_receivers=len(self.workers), timeout_s=self.timeout_s)
        address = self.sender.open()  # a new store on a new port, a new group name
        joins = [w.join_collective.remote(address, rank=i + 1) for i, w in enumerate(self.workers)]
        self.set_ups += 1
        self.sender.connect(pending=joins)

    def everyone_in_group(self) -> bool:
        """Is every worker in the current group? A restarted worker's new process is in none
        (the call waits while Ray restarts it)."""
        if self.sender is None or self.sender.address is None:
            return False
        try:
            names = ray.get([w.collective_group.remote() for w in self.workers], timeout=self.restart_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(f"collective weight sync: a rollout worker did not answer within "
                               f"{self.restart_timeout_s} s (restarting, or stuck)") from e
        return all(name == self.sender.address.name for name in names)

    def publish(self, version: int, named: list[tuple[str, torch.Tensor]],
                buckets: Iterable[dict[str, torch.Tensor]], generation: int = 0) -> dict:
        """`named`: the (name, tensor) list `buckets` was gathered from, with the same bucket_numel.

        A worker outside the group (restarted) makes a new group first. A failure during
        the sync raises SyncInterrupted once every bucket is taken: publish again.
        """
        try:
            if not self.everyone_in_group():
                self.open()
            meta = replace(describe_snapshot(version, named, self.bucket_numel, generation),
                           group=self.sender.address.name)
            refs = [w.receive_weights.remote(meta) for w in self.workers]  # metadata first, via Ray
            stats = self.sender.send(meta, buckets, pending=refs)
        except (TimeoutError, WeightSyncError) as e:
            for _ in buckets:  # the rest of the gathers: every learner rank takes part in each
                pass
            self.close()  # the next publish sets up a new group
            raise SyncInterrupted(f"collective weight sync of version {version} did not complete ({e}); "
                                  "publish it again, to a new group") from e
        return {**stats, "sync/group_set_ups": self.set_ups}

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        self.sender = None


class CollectiveReceiver:
    """A rollout worker's end of the weight-sync group (rank >= 1)."""

    def __init__(self, device: str | torch.device | None = None):
        self.device = pick_device(device)
        self._group = None
        self.group_name: str | None = None  # the group joined (GroupAddress.name); None when not in one
        self.timeout_s = 60.0
        self._receiving = False  # a receive is waiting on the group (in another thread than close's)

    def join(self, address: GroupAddress, rank: int, timeout_s: float = 60.0) -> None:
        """Blocks until the sender and every other receiver have joined (or raises)."""
        if backend(self.device) != address.backend:
            raise ValueError(f"weight-sync group uses {address.backend}, this receiver's device is {self.device}")
        self.timeout_s = timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            store = dist.TCPStore(address.host, address.port, address.world_size, is_master=False,
                                  timeout=td(timeout_s))
            store.set(joined_key(rank), "1")  # the sender waits for these before building the group
            self._group = new_group(store, rank, address, self.device, timeout_s)
            handshake(self._group, self.device, deadline)
        except (RuntimeError, TimeoutError) as e:
            self.close()
            raise TimeoutError(f"collective weight sync ({address.backend}): rank {rank} could not join "
                               f"{address.host}:{address.port} within {timeout_s} s ({e})") from e
        self.group_name = address.name

    def receive(self, meta: SnapshotMeta) -> dict[str, torch.Tensor]:
        """Receive every bucket of the snapshot `meta` announces; returns {name: CPU tensor}.

        Each bucket lands in a device buffer (NCCL needs one) and is copied to host memory
        before the next: the GPU never holds more than one bucket of it. Safe to call from a
        second actor thread while roll-outs continue: it only fills new buffers. Swapping
        them into the model between roll-outs is the caller's job (weights.apply_snapshot).
        A close() from another thread (the worker joins a new group) ends it at once.
        """
        group = self._group
        if group is None:
            raise RuntimeError("CollectiveReceiver.join() first")
        if meta.group and meta.group != self.group_name:  # a stale call: its broadcasts are another group's
            raise WeightSyncError(f"collective weight sync: version {meta.version} was sent to group "
                                  f"{meta.group}, this worker is in group {self.group_name}")

        def left():
            if self._group is not group:
                raise WeightSyncError("left the group while receiving (a new group was set up)")

        state: dict[str, torch.Tensor] = {}
        self._receiving = True
        try:
            for i, spec in enumerate(meta.buckets):
                flat = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
                try:
                    wait_work(group.broadcast([flat], root0()), time.monotonic() + self.timeout_s, check=left)
                except WeightSyncError:
                    _ABANDONED.append(group)  # a broadcast is in flight: closing would wait it out
                    raise
                except (RuntimeError, TimeoutError) as e:
                    self._receiving = False
                    self.close()
                    raise TimeoutError(f"collective weight sync: receiving version {meta.version}, bucket "
                                       f"{i + 1}/{len(meta.buckets)} timed out after {self.timeout_s} s ({e})") from e
                state.update(unpack_bucket(spec, flat.cpu()))  # one device-to-host copy per bucket
        finally:
            self._receiving = False
        return state

    def close(self) -> None:
        """Leave the group. While a receive is in flight (another thread), that receive drops it."""
        group, self._group, self.group_name = self._group, None, None
        if not self._receiving:
            close(group)


_ABANDONED: list = []  # receivers' groups dropped with a broadcast in flight: referenced until the process ends


# -- helpers ---------------------------------------------------------------------------


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN
