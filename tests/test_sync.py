"""Weight sync: bucketing, the object-store and collective transports, ZeRO-3 gathering.

The module's local Ray (conftest.local_ray). The test actors ask for 0 CPUs, so a learner, two workers
and the two DeepSpeed ranks fit; DeepSpeed runs ZeRO-3 on its CPU accelerator over gloo.
"""

import os
import signal
import socket
import sys
import threading
import time

import pytest
import ray
import torch
from ray import cloudpickle

from dopsd_ray.sync.buckets import (
    assert_same_weights,
    full_numel,
    gather_zero3_buckets,
    plan_buckets,
    split_into_buckets,
)
from dopsd_ray.sync import SyncInterrupted
from dopsd_ray.sync.collective import (
    CollectivePublisher,
    CollectiveReceiver,
    CollectiveSender,
    WeightSyncError,
    describe_snapshot,
    pack_bucket,
    unpack_bucket,
)
from dopsd_ray.sync.object_store import WeightStore, fetch_snapshot, publish_snapshot

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test actors defined here run in Ray workers


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(40, 8, generator=g),
        "block.0.attn.weight": torch.randn(8, 8, generator=g),
        "block.0.attn.bias": torch.randn(8, generator=g),
        "block.0.norm.scale": torch.randn(8, generator=g).bfloat16(),
        "block.0.steps": torch.arange(5),
        "head.weight": torch.randn(3, 8, generator=g),
    }


# -- buckets -------------------------------------------------------------------------------
def test_buckets_respect_bucket_numel_and_cover_every_tensor_in_order():
    state = tiny_state()
    buckets = split_into_buckets(state, bucket_numel=100)
    assert [k for b in buckets for k in b] == list(state)  # all, once, stable order
    for b in buckets:
        total = sum(v.numel() for v in b.values())
        assert total <= 100 or len(b) == 1  # only a single oversized tensor may exceed
    assert list(buckets[0]) == ["embed.weight"]  # 320 elements: a bucket of its own
    assert plan_buckets([("a", 3), ("b", 3), ("c", 3)], 6) == [["a", "b"], ["c"]]
    with pytest.raises(ValueError):
        plan_buckets([("a", 1)], 0)


def test_gather_without_zero3_is_a_plain_bucketed_copy():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    buckets = list(gather_zero3_buckets(model.named_parameters(), bucket_numel=20))
    assert [sum(v.numel() for v in b.values()) for b in buckets] == [24, 20]  # 4x6 weight alone (oversized), then 6 + 12 + 2
    assert_same_weights({k: v for b in buckets for k, v in b.items()}, dict(model.named_parameters()))


def test_assert_same_weights_names_the_first_differing_tensor():
    a = tiny_state()
    assert_same_weights(a, {k: v.clone() for k, v in a.items()})
    b = {k: v.clone() for k, v in a.items()}
    b["block.0.attn.bias"][3] += 1e-3
    b["head.weight"][0, 0] += 1.0
    with pytest.raises(AssertionError, match="block.0.attn.bias"):
        assert_same_weights(a, b)
    assert_same_weights(a, {**b, "head.weight": a["head.weight"]}, atol=1e-2)
    with pytest.raises(AssertionError, match="head.weight"):
        assert_same_weights(a, b, atol=1e-2)
    with pytest.raises(AssertionError, match="missing"):
        assert_same_weights(a, {k: v for k, v in a.items() if k != "head.weight"})


def test_pack_unpack_keeps_every_dtype_and_shape():
    state = {**tiny_state(), "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}
    meta = describe_snapshot(7, state.items(), bucket_numel=64)
    got = {}
    for spec, bucket in zip(meta.buckets, split_into_buckets(state, 64), strict=True):
        got.update(unpack_bucket(spec, pack_bucket(spec, bucket, torch.device("cpu"))))
    assert_same_weights(state, got)


# -- object store --------------------------------------------------------------------------
class StoreLearner:
    def publish(self, store, version: int, state: dict, bucket_numel: int) -> int:
        return publish_snapshot(store, version, iter(split_into_buckets(state, bucket_numel)), timeout_s=30)


class StoreWorker:
    def __init__(self):
        self.version, self.generation = -1, 0

    def fetch(self, store):
        got = fetch_snapshot(store, self.version, 30, self.generation)
        if got is None:
            return None
        self.version, self.generation, buckets, nbytes = got
        return self.version, self.generation, {k: v for b in buckets for k, v in b.items()}, nbytes


def test_object_store_round_trip_to_two_workers(local_ray):
    state = tiny_state()
    store = ray.remote(num_cpus=0)(WeightStore).remote()
    learner = ray.remote(num_cpus=0)(StoreLearner).remote()
    workers = [ray.remote(num_cpus=0)(StoreWorker).remote() for _ in range(2)]
    assert ray.get([w.fetch.remote(store) for w in workers]) == [None, None]  # nothing published yet

    nbytes = ray.get(learner.publish.remote(store, 5, state, 100))
    assert nbytes == sum(v.numel() * v.element_size() for v in state.values())
    version, refs, meta = ray.get(store.latest.remote())
    assert version == 5 and len(refs) == meta["buckets"] == len(split_into_buckets(state, 100))

    for version, generation, got, got_bytes in ray.get([w.fetch.remote(store) for w in workers]):
        assert (version, generation) == (5, 0) and got_bytes == nbytes
        assert_same_weights(state, got)
    assert ray.get([w.fetch.remote(store) for w in workers]) == [None, None]  # up to date

    # a restarted learner resumes from an older checkpoint and re-publishes a LOWER version
    older = tiny_state(seed=1)
    publish_snapshot(store, 3, split_into_buckets(older, 100))  # from this process: any process can publish
    for version, _, got, _ in ray.get([w.fetch.remote(store) for w in workers]):
        assert version == 3
        assert_same_weights(older, got)
    assert ray.get(store.stats.remote())["rollbacks"] == 1
    # ... or the SAME version as a dead learner's snapshot: a new generation is a new snapshot
    newer = tiny_state(seed=2)
    publish_snapshot(store, 3, split_into_buckets(newer, 100), generation=7)
    for version, generation, got, _ in ray.get([w.fetch.remote(store) for w in workers]):
        assert (version, generation) == (3, 7)
        assert_same_weights(newer, got)
    assert ray.get([w.fetch.remote(store) for w in workers]) == [None, None]
    for a in [store, learner, *workers]:
        ray.kill(a)


# -- collective ----------------------------------------------------------------------------
class CollectiveLearner:
    """Learner rank 0: it also has its own default torch.distributed group (DeepSpeed's)."""

    def __init__(self, num_workers: int, timeout_s: float):
        import torch.distributed as dist

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self.sender = CollectiveSender(num_workers, timeout_s=timeout_s, device="cpu")

    def set_up(self, workers) -> None:
        address = self.sender.open()
        joins = [w.join.remote(address, rank=i + 1) for i, w in enumerate(workers)]
        self.sender.connect(pending=joins)

    def sync(self, workers, version: int, state: dict, bucket_numel: int) -> dict:
        meta = describe_snapshot(version, state.items(), bucket_numel)
        refs = [w.receive_weights.remote(meta) for w in workers]  # metadata first, via Ray
        return self.sender.send(meta, split_into_buckets(state, bucket_numel), pending=refs)

    def default_group_still_works(self) -> bool:
        import torch.distributed as dist

        x = torch.ones(2)
        dist.all_reduce(x)
        return dist.get_world_size() == 1 and x.tolist() == [1.0, 1.0]


class CollectiveWorker:
    """A rollout worker: receives in a second actor thread, swaps only between roll-outs."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.receiver = CollectiveReceiver(device="cpu")
        self.lock = threading.Lock()
        self.pending = None
        self.version, self.state = -1, {}

    def join(self, address, rank: int) -> None:
        self.receiver.join(address, rank, timeout_s=self.timeout_s)

    def receive_weights(self, meta) -> int:
        state = self.receiver.receive(meta)
        with self.lock:
            self.pending = (meta.version, state)
        return meta.version

    def rollout(self, seconds: float) -> tuple[int, int]:
        """A roll-out: take the pending snapshot first, then run with frozen weights."""
        version_used, _ = self.between_rollouts()
        time.sleep(seconds)
        return version_used, self.version  # unchanged: nothing swaps mid-trajectory

    def between_rollouts(self):
        with self.lock:
            if self.pending is not None:
                (self.version, self.state), self.pending = self.pending, None
        return self.version, self.state


def test_collective_gloo_broadcast_to_two_workers(local_ray):
    Worker = ray.remote(num_cpus=0, max_concurrency=2)(CollectiveWorker)
    workers = [Worker.remote(30.0) for _ in range(2)]
    learner = ray.remote(num_cpus=0)(CollectiveLearner).remote(2, 30.0)
    ray.get(learner.set_up.remote(workers), timeout=60)

    busy = workers[0].rollout.remote(2.0)  # weights arrive in a second thread meanwhile
    for version, seed in [(1, 0), (2, 1)]:
        state = tiny_state(seed)
        stats = ray.get(learner.sync.remote(workers, version, state, 100), timeout=60)
        if version == 1:
            assert not ray.wait([busy], timeout=0)[0], "the sync waited for the roll-out to end"
            assert ray.get(busy) == (-1, -1)
        assert stats["sync/version"] == version and stats["sync/buckets"] == len(split_into_buckets(state, 100))
        for got_version, got in ray.get([w.between_rollouts.remote() for w in workers]):
            assert got_version == version
            assert_same_weights(state, got)
    assert ray.get(learner.default_group_still_works.remote())
    for a in [learner, *workers]:
        ray.kill(a)


def test_collective_sender_times_out_when_a_receiver_never_joins():
    timeout_s = 3.0
    sender = CollectiveSender(num_receivers=2, timeout_s=timeout_s, device="cpu")
    address = sender.open()
    errors = []

    def join_rank_1():  # rank 2 never joins
        try:
            CollectiveReceiver(device="cpu").join(address, 1, timeout_s)
        except TimeoutError as e:
            errors.append(e)

    joining = threading.Thread(target=join_rank_1)
    joining.start()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"collective weight sync \(gloo\): rollout worker rank\(s\) \[2\]"):
        sender.connect()
    assert time.monotonic() - start < timeout_s + 2
    joining.join()
    assert len(errors) == 1  # the worker that joined gives up too, with its own TimeoutError


def test_collective_send_times_out_naming_the_version_when_a_worker_stops_receiving():
    timeout_s = 2.0
    sender = CollectiveSender(num_receivers=2, timeout_s=timeout_s, device="cpu")
    address = sender.open()
    receivers = [CollectiveReceiver(device="cpu") for _ in range(2)]
    joins = [threading.Thread(target=r.join, args=(address, i + 1, timeout_s)) for i, r in enumerate(receivers)]
    for t in joins:
        t.start()
    sender.connect()
    for t in joins:
        t.join()
    state = tiny_state()
    meta = describe_snapshot(9, state.items(), 100)
    errors = []

    def receive_one():
        try:
            receivers[0].receive(meta)
        except TimeoutError as e:  # the sender gave up, so this receiver times out too
            errors.append(e)

    listening = threading.Thread(target=receive_one)
    listening.start()  # receiver 2 never calls receive()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"collective weight sync \(gloo\), version 9"):
        sender.send(meta, split_into_buckets(state, 100))
    assert time.monotonic() - start < timeout_s + 2
    listening.join()
    assert len(errors) == 1 and "version 9" in str(errors[0])


# -- ZeRO-3 --------------------------------------------------------------------------------
class Zero3Rank:
    """One learner rank: torch.distributed like Ray Train sets it up, then DeepSpeed ZeRO-3 on CPU."""

    def run(self, rank: int, world_size: int, port: int, bucket_numel: int) -> dict:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        import deepspeed
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        torch.manual_seed(0)  # the same initial weights on both ranks, as from_pretrained gives
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8),
                                    torch.nn.Linear(8, 300))
        original = {k: v.detach().clone() for k, v in model.named_parameters()}
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=config)
        named = list(engine.module.named_parameters())
        out = {"local_numel": {n: p.numel() for n, p in named}, "ds_numel": {n: full_numel(p) for n, p in named},
               "original": original}
        meta = describe_snapshot(0, named, bucket_numel)  # layout from ds_shape, without gathering
        out["before"] = list(gather_zero3_buckets(named, bucket_numel))
        for spec, bucket in zip(meta.buckets, out["before"], strict=True):
            pack_bucket(spec, bucket, torch.device("cpu"))  # raises if the layout does not match
        out["repartitioned"] = all(p.numel() == 0 for _, p in named)

        loss = engine(torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))).pow(2).mean()
        engine.backward(loss)
        engine.step()
        out["after_rank0_only"] = list(gather_zero3_buckets(named, bucket_numel, rank0_only=True))
        return out


def test_gather_zero3_buckets_under_a_real_deepspeed_zero3_engine(local_ray):
    bucket_numel = 600
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [ray.remote(num_cpus=0)(Zero3Rank).remote() for _ in range(2)]
    out = ray.get([r.run.remote(i, 2, port, bucket_numel) for i, r in enumerate(ranks)], timeout=240)
    for o in out:
        assert set(o["local_numel"].values()) == {0}  # partitioned: numel() is 0, ds_numel is not
        full_sizes = o["ds_numel"]
        assert all(n > 0 for n in full_sizes.values())
        assert o["repartitioned"]
        for bucket in o["before"]:
            total = sum(v.numel() for v in bucket.values())
            assert total <= bucket_numel or len(bucket) == 1, {k: v.numel() for k, v in bucket.items()}
            assert all(v.device.type == "cpu" and v.numel() == full_sizes[k] for k, v in bucket.items())
        assert [sum(v.numel() for v in b.values()) for b in o["before"]] == [544, 264, 2400, 300]
        gathered = {k: v for b in o["before"] for k, v in b.items()}
        assert list(gathered) == list(o["original"])
        assert_same_weights(o["original"], gathered)

    rank0, rank1 = out[0]["after_rank0_only"], out[1]["after_rank0_only"]
    assert len(rank0) == len(rank1) and all(b == {} for b in rank1)  # rank 1 iterated, copied nothing
    stepped = {k: v for b in rank0 for k, v in b.items()}
    with pytest.raises(AssertionError):  # the optimizer step moved the live weights
        assert_same_weights(out[0]["original"], stepped)
    for r in ranks:
        ray.kill(r)


def test_collective_send_fails_at_once_when_a_workers_receive_call_fails(local_ray):
    """A restarted worker refuses receive_weights (it is outside the group): no waiting out the timeout."""
    timeout_s = 30.0
    sender = CollectiveSender(num_receivers=1, timeout_s=timeout_s, device="cpu")
    address = sender.open()
    receiver = CollectiveReceiver(device="cpu")
    joining = threading.Thread(target=receiver.join, args=(address, 1, timeout_s))
    joining.start()
    sender.connect()
    joining.join()

    @ray.remote(num_cpus=0)
    def refuse():
        raise RuntimeError("not in the weight-sync group of runtime.sync_transport=collective")

    state = {"big": torch.randn(1 << 22)}  # larger than socket buffers: the broadcast waits for rank 1
    meta = describe_snapshot(4, state.items(), 1 << 22)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"(?s)version 4.*runtime.sync_transport=collective"):
        sender.send(meta, split_into_buckets(state, 1 << 22), pending=[refuse.remote()])
    assert time.monotonic() - start < timeout_s / 2
    receiver.close()


# -- collective: a restarted rollout worker rejoins --------------------------------------------
class RestartableWorker(CollectiveWorker):
    """A rollout worker as the driver makes it (max_restarts=-1, max_task_retries=-1,
    max_concurrency=3), with rollout.RolloutWorker's collective methods. `die_at`: the
    version whose receive kills this process (the first process only) halfway through."""

    def __init__(self, timeout_s: float, die_at: int = -1):
        super().__init__(timeout_s)
        self.receiver = None  # a new process is in no group
        self.die_at = die_at
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def join_collective(self, address, rank: int) -> None:
        if self.receiver is not None:
            self.receiver.close()
        receiver = CollectiveReceiver(device="cpu")
        receiver.join(address, rank, timeout_s=self.timeout_s)
        self.receiver = receiver

    def collective_group(self):
        return None if self.receiver is None else self.receiver.group_name

    def receive_weights(self, meta) -> int:
        if self.receiver is None:
            raise RuntimeError("not in the weight-sync group")
        if meta.version == self.die_at and not self.restarted:
            time.sleep(0.5)  # the learner is broadcasting meanwhile
            os.kill(os.getpid(), signal.SIGKILL)
        return super().receive_weights(meta)

    def pid(self) -> int:
        return os.getpid()

    def held(self):
        return self.restarted, *self.between_rollouts()


def drained(buckets: list, taken: list):
    """Yields the buckets, recording how many were taken (a ZeRO-3 gather per bucket)."""
    for b in buckets:
        taken.append(1)
        yield b


def test_a_killed_worker_rejoins_a_new_collective_group_at_the_next_sync(local_ray):
    """SIGKILL a worker between syncs: the next publish sets up a new group with every worker and
    delivers; SIGKILL one during a sync: publish takes every bucket, raises SyncInterrupted, and
    publishing again delivers to the restarted worker too. No snapshot lands under the wrong version."""
    Worker = ray.remote(num_cpus=0, max_concurrency=3, max_restarts=-1, max_task_retries=-1)(RestartableWorker)
    workers = [Worker.remote(20.0), Worker.remote(20.0, die_at=3)]
    publisher = CollectivePublisher(workers, bucket_numel=100, timeout_s=20.0, restart_timeout_s=60.0)
    publisher.open()

    def publish(version: int, seed: int):
        state = tiny_state(seed)
        taken = []
        buckets = drained(list(split_into_buckets(state, 100)), taken)
        try:
            return publisher.publish(version, list(state.items()), buckets), state
        finally:
            assert len(taken) == len(split_into_buckets(state, 100)), "publish left gathers undone"

    stats, state = publish(1, 0)
    assert stats["sync/group_set_ups"] == 1
    first = ray.get(workers[0].pid.remote())
    os.kill(first, signal.SIGKILL)  # between syncs: the next one finds it outside the group
    stats, state = publish(2, 1)
    assert stats["sync/group_set_ups"] == 2
    held = ray.get([w.held.remote() for w in workers])
    assert ray.get(workers[0].pid.remote()) != first and held[0][0] is True
    for _, version, got in held:
        assert version == 2
        assert_same_weights(state, got)

    with pytest.raises(SyncInterrupted, match="version 3"):  # worker 1 dies during this sync
        publish(3, 2)
    stats, state = publish(3, 2)  # what the learner does next: the same snapshot again
    assert stats["sync/group_set_ups"] == 3
    held = ray.get([w.held.remote() for w in workers])
    assert held[1][0] is True, "worker 1 was not restarted"
    for _, version, got in held:
        assert version == 3
        assert_same_weights(state, got)
    publisher.close()
    for w in workers:
        ray.kill(w, no_restart=True)
