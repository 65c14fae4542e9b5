"""Checks that fail fast, before any actor or trainer starts, naming what to fix.

`preflight(cfg)` runs before Ray: it refuses placements that would crawl or fail (a GPU
learner with CPU-only rollout workers; NCCL ranks that could share a GPU), checks the paths
(and a CSV / parquet table's named columns), and when this process would start a local Ray
(no RAY_ADDRESS, Ray not initialised) it also checks the recipe against what that local
Ray would have (CPUs, GPUs), so a recipe this machine cannot place fails without starting
Ray at all. `check_resources(cfg)` checks against a running cluster
(ray.cluster_resources()), after `ray.init` connected to it and before any actor starts.
With runtime.gpu_memory_gb set, `check_memory(cfg)` also refuses a recipe whose per-rank memory
(dopsd_ray/plan.py: the models built from their config files, no weights) cannot fit, naming what
to change; with it unset the learner ranks run the same check against their own GPU.
(Unknown keys, wrong types, out-of-range values and unsupported teacher contexts fail
earlier still, in config.load_config.)
"""

import os
import re
import time
import uuid
from pathlib import Path

import ray

from .config import Config, ConfigError
from .data.shards import check_table, is_table
from .storage import Storage, is_uri

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


PLACEHOLDER = "YOUR-BUCKET"  # the recipes' bucket, for the user to replace


def check_placeholders(cfg: Config) -> None:
    data = cfg.data.path
    for key, value in [("train.output_dir", cfg.train.output_dir),
                       *[("data.path", p) for p in ([data] if isinstance(data, str) else data or [])]]:
        if PLACEHOLDER in str(value):
            raise ConfigError(f"{key}={value!r} is the recipe's placeholder: replace {PLACEHOLDER} with your "
                              f"bucket, e.g. {key}={str(value).replace(PLACEHOLDER, 'my-bucket')}")


def check_paths(cfg: Config) -> None:
    check_placeholders(cfg)
    path = cfg.model.path
    if path is not None and is_uri(path):  # on an object store: each node copies it (storage.local_copy)
        path = None
    if path is not None and not Path(path).exists() and not HUB_ID.match(path):
        raise ConfigError(f"model.path={path!r}: no such directory, and not a hub id like 'Tongyi-MAI/Z-Image-Turbo'")
    if path is not None and Path(path).is_dir() and not (Path(path) / "model_index.json").is_file():
        raise ConfigError(f"model.path={path!r} is a directory without model_index.json: "
                          "point it at a diffusers pipeline folder (save_pretrained output)")
    data = cfg.data.path
    for p in ([data] if isinstance(data, str) else data or []):
        if p.startswith(("s3://", "gs://", "http://", "https://")):
            continue
        if not Path(p).exists():
            raise ConfigError(f"data.path={p!r} does not exist; make shards with jobs/prepare_data.py")
        if is_table(Path(p)):  # a CSV / parquet table: its named columns must be there
            try:
                check_table(Path(p), cfg.data.image_column, cfg.data.caption_column)
            except ValueError as err:
                raise ConfigError(f"data.path: {err}") from None


def check_eval(cfg: Config) -> None:
    from .evaluation_job import check_inputs  # torch and transformers: only for a run that evaluates

    try:
        check_inputs(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_placement(cfg: Config) -> None:
    """Recipes every cluster could place but that would run badly or not at all: refused from
    the recipe alone, wherever Ray would run."""
    rt = cfg.runtime
    if not rt.rollout_workers:  # colocated: the learners roll out themselves, no second placement
        return
    learner_gpu = rt.learner_resources.get("GPU", 0)
    rollout_gpu = rt.rollout_resources.get("GPU", 0)
    # A 6B-9B roll-out on CPU is ~100x slower than on the GPU the learner has: nothing fails,
    # the run just crawls, so it must be asked for by name.
    if learner_gpu > 0 and rollout_gpu <= 0 and not rt.allow_cpu_rollout:
        raise ConfigError(
            f"runtime.rollout_resources={rt.rollout_resources} gives the rollout workers no GPU while "
            f"runtime.learner_resources={rt.learner_resources} has one: roll-outs on CPU are ~100x slower; "
            "add GPU to runtime.rollout_resources, or set runtime.allow_cpu_rollout=true if that is meant")
    # Collective sync with a GPU learner is NCCL over learner rank 0 + every rollout worker, and
    # NCCL refuses two ranks on one device. Ray packs fractional GPU requests onto one GPU, so a
    # fractional request on either side may put two ranks there (the sync then fails at start).
    if rt.sync_transport == "collective" and learner_gpu > 0:
        shared = [f"{name}={res}" for name, res in (("runtime.learner_resources", rt.learner_resources),
                                                     ("runtime.rollout_resources", rt.rollout_resources))
                  if 0 < res.get("GPU", 0) < 1]
        if shared:
            raise ConfigError(
                f"runtime.sync_transport=collective (NCCL) with a fractional GPU in {', '.join(shared)}: Ray may "
                "place two NCCL ranks on one GPU, which NCCL refuses; give learners and rollout workers whole "
                "GPUs (GPU: 1), or use runtime.sync_transport=object_store")
        # learner rank 0 sends over NCCL; a CPU rollout worker can only join a gloo group
        if rollout_gpu <= 0:
            raise ConfigError(
                "runtime.sync_transport=collective with a GPU learner sends over NCCL, which CPU rollout workers "
                f"(runtime.rollout_resources={rt.rollout_resources}) cannot join; give them a GPU, or use "
                "runtime.sync_transport=object_store with runtime.allow_cpu_rollout=true")


def needed_resources(cfg: Config) -> dict[str, float]:
    """What the learner group, the rollout workers and the data stream need in total."""
    rt = cfg.runtime
    need: dict[str, float] = {}
    for res, n in ((rt.learner_resources, rt.num_learners),
                   (rt.rollout_resources, rt.rollout_workers)):
        for k, v in res.items():
            need[k] = need.get(k, 0) + v * n
    # Ray Data decodes images in tasks of its own: leave it at least one CPU, or the stream starves
    need["CPU"] = need.get("CPU", 0) + 1
    return need


def local_resources() -> dict[str, float]:
    """What `ray.init()` would detect on this machine, without starting Ray."""
    try:
        from ray._private.utils import get_num_cpus  # honours cgroup CPU limits, as ray.init does

        cpus = float(get_num_cpus())
    except Exception:
        cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    gpus = 0.0
    try:
        import torch

        gpus = float(torch.cuda.device_count())
    except Exception:
        pass
    return {"CPU": cpus, "GPU": gpus}


def check_resources(cfg: Config, total: dict[str, float] | None = None, where: str = "the cluster") -> None:
    """Can the cluster (or `total`) place the learner group and the rollout workers at all?"""
    total = ray.cluster_resources() if total is None else total
    rt = cfg.runtime
    for k, v in needed_resources(cfg).items():
        if total.get(k, 0) < v:
            raise ConfigError(
                f"runtime: {rt.num_learners} learner(s) x {rt.learner_resources}"
                + (f", {rt.rollout_workers} rollout worker(s) x {rt.rollout_resources}"
                   if rt.rollout_workers else "")
                + f" and the data stream (1 CPU) need {v:g} {k} but {where} has {total.get(k, 0):g}; lower "
                "runtime.num_learners / runtime.num_rollout_workers or their *_resources, or add nodes")


def _probe(root: str, name: str, token: str, reply: str) -> str | None:
    """On one node: None if it reads `token` back from `name` under `root` and can write `reply`."""
    try:
        store = Storage(root)
        if not store.is_file(name):
            return "does not see it"
        if store.read_text(name) != token:
            return "sees another file there"
        store.write(reply, token)
    except OSError as err:
        return f"cannot read or write it ({err})"
    return None


def node_label(node: dict) -> str:
    """A node as a user finds it: its address and its custom resources (what the recipe asks for)."""
    custom = sorted(k for k in node["Resources"] if k not in ("CPU", "GPU", "memory", "object_store_memory")
                    and not k.startswith("node:") and not k.startswith("accelerator_type"))
    return f"node {node['NodeManagerAddress']} ({', '.join(custom) or 'no custom resources'})"


def check_storage_reach(cfg: Config, timeout_s: float = 120.0) -> None:
    """Every node a learner rank or rollout worker may run on reads and writes train.output_dir:
    the driver writes a sentinel there, a 0-CPU task pinned to each such node reads it back
    and writes its own reply. One ConfigError line naming the first node that cannot."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root, rt = cfg.train.output_dir, cfg.runtime
    needs = rt.process_resources
    nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != ray.get_runtime_context().get_node_id()
             and any(all(n["Resources"].get(k, 0) >= v for k, v in need.items() if k not in ("CPU", "GPU"))
                     for need in needs)]
    token = uuid.uuid4().hex
    name = f".dopsd-reach-{token}"
    try:
        store = Storage(root)
        store.write(name, token)
    except OSError as err:  # no such bucket, no credentials, no permission
        raise ConfigError(f"train.output_dir={root!r}: the driver cannot write there ({err})") from None
    if not nodes:
        store.remove(name)
        return
    probe = ray.remote(_probe)
    try:
        refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(store.uri, name, token, f"{name}.{i}") for i, n in enumerate(nodes)]
        deadline = time.monotonic() + timeout_s
        for i, (node, ref) in enumerate(zip(nodes, refs, strict=True)):
            try:
                problem = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError):
                continue  # the node went away (a removed node is listed alive for a few seconds)
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(f"train.output_dir={root!r}: {node_label(node)} did not answer the storage check "
                                  f"within {timeout_s:.0f} s; is it up?") from None
            if problem is None and not store.is_file(f"{name}.{i}"):
                problem = "writes where the driver does not see it"
            if problem:
                raise ConfigError(
                    f"train.output_dir={root!r}: {node_label(node)} {problem}; the cluster's nodes share no disk "
                    "there: use an object store (train.output_dir=s3://BUCKET/runs) or a mount every node has")
    finally:
        for n in [name] + [f"{name}.{i}" for i in range(len(nodes))]:
            store.remove(n)


def starts_local_ray() -> bool:
    """Would `ray.init()` start a new local Ray here (rather than join RAY_ADDRESS, or a
    cluster `ray start` left on this machine)?"""
    if ray.is_initialized():
        return False
    try:
        from ray._private.services import canonicalize_bootstrap_address  # what ray.init() itself calls

        return canonicalize_bootstrap_address(None) is None
    except Exception:
        return os.environ.get("RAY_ADDRESS", "") in ("", "local")


def check_memory(cfg: Config) -> None:
    """With runtime.gpu_memory_gb: refuse a recipe that cannot fit that GPU (plan.check_fits)."""
    if cfg.runtime.gpu_memory_gb is not None and not cfg.model.tiny and cfg.model.family != "toy":
        from .plan import check_fits

        check_fits(cfg, cfg.runtime.gpu_memory_gb)


def preflight(cfg: Config) -> None:
    """Before Ray: placement, paths, memory; and resources, if this process is about to start a local Ray."""
    check_placement(cfg)  # first: on a machine without GPUs the local check would hide its reason
    check_paths(cfg)
    check_memory(cfg)
    if cfg.eval.at_end:  # the evaluation after training: its prompts and weights folders, before training
        check_eval(cfg)
    if starts_local_ray():
        check_resources(cfg, local_resources(), where="this machine (the local Ray it would start)")
