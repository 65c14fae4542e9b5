"""Weight sync: seconds and GB/s per snapshot, object store and collective, against raw transfers.

    python benchmarks/sync.py                             # bench transformer (dim 512, 4 layers): LoRA r64 + full
    python benchmarks/sync.py --dim 1024 --layers 8 --receivers 1,2,4 --reps 10

One process plays learner rank 0 (this script); 1-2 rollout-worker actors receive.
Payloads are real state dicts of the bench Z-Image-shaped transformer: the LoRA student
adapters (what a LoRA run syncs) and the full transformer (a full fine-tuning run).
Each is timed from the first byte put / broadcast until every receiver holds the whole
snapshot:

    object_store       publish_snapshot (one ray.put per bucket + WeightStore.publish) ->
                       every worker's fetch_snapshot (ray.get of the buckets)
    collective         describe_snapshot + CollectiveSender.send (one gloo/NCCL broadcast
                       per bucket, packed flat) -> every worker's CollectiveReceiver.receive
    raw_object_store   ray.put of ONE flat uint8 tensor of the same bytes -> ray.get in each worker
    raw_collective     the same bytes as ONE tensor in ONE broadcast over the same group

The raw rows are the limit of this machine between the same processes. GB/s counts the
snapshot's bytes once (not once per receiver). ZeRO-3 gathering is not in these numbers
(one learner rank; see the learner's sync/seconds metric for gather + send).

The sync inside training (the real payload, the ZeRO gather, the worker's apply) and its
share of the learner step are measured in the same rounds by benchmarks/ab.py.
"""

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_model import init_ray, make_transformer, write_result  # noqa: E402
from dopsd_ray.config import RuntimeConfig  # noqa: E402
from dopsd_ray.families.zimage import LORA_TARGETS  # noqa: E402
from dopsd_ray.sync.buckets import split_into_buckets  # noqa: E402
from dopsd_ray.sync.collective import CollectiveReceiver, CollectiveSender, describe_snapshot  # noqa: E402
from dopsd_ray.sync.object_store import WeightStore, fetch_snapshot, publish_snapshot  # noqa: E402
from dopsd_ray.weights import LoraWeights, state_dict  # noqa: E402


class Receiver:
    """A stand-in rollout worker: receives snapshots and reports the bytes it holds."""

    def __init__(self):
        torch.set_num_threads(1)
        self.receiver = None

    def join(self, address, rank: int, timeout_s: float) -> None:
        self.receiver = CollectiveReceiver(device="cpu")
        self.receiver.join(address, rank, timeout_s)

    def receive(self, meta) -> int:
        state = self.receiver.receive(meta)
        return sum(v.numel() * v.element_size() for v in state.values())

    def fetch(self, store, current_version: int) -> int:
        got = fetch_snapshot(store, current_version)
        if got is None:
            raise RuntimeError("no new snapshot in the store")
        return sum(t.numel() * t.element_size() for b in got[2] for t in b.values())

    def get(self, refs: list) -> int:  # refs nested in a list: resolved here, inside the timing
        return sum(t.numel() * t.element_size() for t in ray.get(refs))

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()


def payloads(dim: int, layers: int, lora_rank: int) -> dict[str, dict[str, torch.Tensor]]:
    transformer = make_transformer(dim, layers)
    full = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    lora = state_dict(LoraWeights(transformer, LORA_TARGETS, lora_rank, 2.0 * lora_rank))
    return {"lora": {k: v.detach().clone() for k, v in lora.items()}, "full": full}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def timed(fn, reps: int, warmup: int = 1) -> list[float]:
    out = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn(i)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def bench_receivers(n: int, states: dict, args) -> dict:
    Worker = ray.remote(num_cpus=0)(Receiver)
    workers = [Worker.remote() for _ in range(n)]
    store = ray.remote(num_cpus=0)(WeightStore).remote()
    sender = CollectiveSender(num_receivers=n, timeout_s=args.timeout, device="cpu")
    address = sender.open()
    sender.connect(pending=[w.join.remote(address, i + 1, args.timeout) for i, w in enumerate(workers)])
    bucket_numel = args.bucket_numel
    rows = {}
    version = [0]

    def next_version():
        version[0] += 1
        return version[0]

    try:
        for name, state in states.items():
            size = nbytes(state)
            flat = torch.empty(size, dtype=torch.uint8)
            flat.fill_(7)

            def object_store(_):
                v = next_version()
                publish_snapshot(store, v, split_into_buckets(state, bucket_numel))
                got = ray.get([w.fetch.remote(store, v - 1) for w in workers])
                assert all(g == size for g in got), (got, size)

            def raw_object_store(_):
                ref = ray.put(flat)
                got = ray.get([w.get.remote([ref]) for w in workers])
                assert all(g == size for g in got)
                del ref

            def collective(_):
                meta = describe_snapshot(next_version(), state.items(), bucket_numel)
                refs = [w.receive.remote(meta) for w in workers]
                sender.send(meta, split_into_buckets(state, bucket_numel), pending=refs)

            def raw_collective(_):
                meta = describe_snapshot(next_version(), [("flat", flat)], max(size, 1))
                refs = [w.receive.remote(meta) for w in workers]
                sender.send(meta, [{"flat": flat}], pending=refs)

            for transport, fn in (("object_store", object_store), ("raw_object_store", raw_object_store),
                                  ("collective", collective), ("raw_collective", raw_collective)):
                secs = timed(fn, args.reps)
                med = statistics.median(secs)
                rows[f"{name}/{transport}"] = {
                    "payload": name, "transport": transport, "receivers": n, "bytes": size,
                    "tensors": len(state) if not transport.startswith("raw") else 1,
                    "seconds": med, "seconds_min": min(secs), "seconds_max": max(secs), "gb_per_s": size / med / 1e9,
                }
                print(f"  {n} receiver(s) {name:4s} {transport:17s} {med:8.4f} s  {size / med / 1e9:6.3f} GB/s", flush=True)
    finally:
        ray.get([w.close.remote() for w in workers])
        sender.close()
        for w in workers:
            ray.kill(w)
        ray.kill(store)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--receivers", default="1,2", help="comma list of rollout-worker counts")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bucket-numel", type=int, default=RuntimeConfig().sync_bucket_numel)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    host = socket.gethostname()
    states = payloads(args.dim, args.layers, args.lora_rank)
    init_ray()
    started = time.time()
    rows = {}
    try:
        for n in [int(x) for x in args.receivers.split(",") if x]:
            rows.update({f"{n}/{k}": v for k, v in bench_receivers(n, states, args).items()})
    finally:
        ray.shutdown()

    targets = {}
    for n in sorted({r["receivers"] for r in rows.values()}):
        for transport in ("object_store", "collective"):
            full, raw = rows[f"{n}/full/{transport}"], rows[f"{n}/full/raw_{transport}"]
            targets[f"{n}/full/{transport}_vs_raw"] = {
                "ratio": full["gb_per_s"] / raw["gb_per_s"], "target": 0.5,
                "met": full["gb_per_s"] / raw["gb_per_s"] >= 0.5}
    print(f"\n{'receivers':>9s} {'payload':8s} {'transport':17s} {'MB':>8s} {'seconds':>8s} {'GB/s':>7s}")
    for r in rows.values():
        print(f"{r['receivers']:9d} {r['payload']:8s} {r['transport']:17s} {r['bytes'] / 1e6:8.2f} "
              f"{r['seconds']:8.4f} {r['gb_per_s']:7.3f}")
    print()
    for k, t in targets.items():
        val = t.get("ratio", t.get("fraction"))
        print(f"target {k}: {val:.3f} (target {'>=' if 'ratio' in t else '<='} {t['target']}): "
              f"{'MET' if t['met'] else 'MISSED'}")
    result = {"host": host, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "args": vars(args),
              "rows": rows, "targets": targets, "seconds": time.time() - started}
    write_result(result, args.out, "sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
