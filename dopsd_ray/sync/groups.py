"""The process groups of the collective weight sync (collective.py): making one over a
TCPStore, waiting on its work with a deadline, closing it; Ray helpers for its members.
Every tensor a group's collective uses is on the group's device (process.device)."""

import datetime
import socket
import time

import ray
import torch
import torch.distributed as dist

from .. import process


class WeightSyncError(RuntimeError):
    """A rollout worker's receive call failed during a collective sync; the group is given up
    (closed, or abandoned while a broadcast is in flight: see CollectiveSender._abandon)."""


def new_group(store, rank: int, address, device: torch.device, timeout_s: float):
    """A ProcessGroup over `store`, outside torch.distributed's global state."""
    store = dist.PrefixStore(f"dopsd_weight_sync/{address.name}", store)
    if address.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        # the watchdog's own timeout comes after ours, so the deadline here raises first
        opts._timeout = td(timeout_s + 60)
        return dist.ProcessGroupNCCL(store, rank, address.world_size, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = td(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=node_ip())]
    return dist.ProcessGroupGloo(store, rank, address.world_size, opts)


def joined_key(rank: int) -> str:
    return f"dopsd_weight_sync/joined/{rank}"


def wait_joined(store, num_receivers: int, deadline: float) -> list[int]:
    """Wait until every receiver rank has checked in on the store; returns the ranks still missing."""
    keys = [joined_key(r) for r in range(1, num_receivers + 1)]
    try:
        store.wait(keys, td(max(deadline - time.monotonic(), 0.001)))
        return []
    except RuntimeError:  # DistStoreError: timed out
        return [r for r, k in enumerate(keys, start=1) if not store.check([k])]


def handshake(group, device: torch.device, deadline: float) -> None:
    """One tiny broadcast, so a group that cannot talk fails at set-up, not at the first sync."""
    wait_work(group.broadcast([torch.zeros(1, device=device)], root0()), deadline)


def wait_work(work, deadline: float, check=None, check_every_s: float = 0.05) -> None:
    """Wait for an async collective until `deadline` (monotonic); re-raise its error if it failed.

    `check()`, called every `check_every_s` while waiting, may raise to give up early.
    """
    next_check = time.monotonic()
    while not work.is_completed():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError("collective did not complete before the deadline")
        if check is not None and now >= next_check:
            check()
            next_check = now + check_every_s
        time.sleep(0.0005)
    work.wait()


def raise_if_failed(refs, what: str) -> None:
    """WeightSyncError if any of the workers' receive calls has already failed."""
    if not refs:
        return
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            raise WeightSyncError(f"{what}: a rollout worker's receive failed, so the broadcast cannot "
                                  f"complete; the group is given up ({e})") from e


def wait_refs(refs, deadline: float, what: str) -> None:
    if not refs:
        return
    try:
        ray.get(list(refs), timeout=max(deadline - time.monotonic(), 0.0))
    except ray.exceptions.GetTimeoutError as e:
        raise TimeoutError(f"{what}: the rollout workers did not answer in time") from e
    except ray.exceptions.RayError as e:
        raise WeightSyncError(f"{what}: a rollout worker failed ({e})") from e


def root0():
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return opts


def close(group) -> None:
    if group is None:
        return
    for name in ("abort", "shutdown"):
        fn = getattr(group, name, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception:  # best effort: the group is being thrown away
                pass


def pick_device(device) -> torch.device:
    """`device` with its index (a bare "cuda": the current GPU), or this process's (process.device)."""
    device = None if device is None else torch.device(device)
    return process.device(device) if device is None or device.type == "cuda" else device


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def node_ip() -> str:
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (a debugger, a unit test without ray.init)
        return socket.gethostbyname(socket.gethostname())


def td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)
